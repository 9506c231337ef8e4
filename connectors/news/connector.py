"""The news connector: polls RSS/Atom feeds and produces normalised, deduplicated, scored items.

    async with NewsConnector(feeds, store=SeenStore(path)) as conn:
        async for result in conn.batches():          # one PollResult per feed fetch, forever
            publish(result.entries, result.rejected)  # NewsEntry / Rejected
            conn.commit()                             # persist the seen set after a durable publish

or ``async for event in conn.items()`` (entries and rejections one by one, committing after each
fetch's last event has been consumed).

Each feed runs in its own task: a conditional GET (If-None-Match / If-Modified-Since from the
validators the feed last sent), then the next fetch after ``poll_interval_s`` (with +-10% jitter, so
several instances do not synchronise), or, after an error, exponential backoff up to
``max_backoff_s`` (a Retry-After header is honoured when longer). An unreachable, slow or broken
feed only delays itself. Parsing and normalising run in a worker thread (feedparser and the scorer
are CPU work; the event loop may be a gateway's); dedupe runs in the consumer, one result at a time,
against the ``SeenStore`` (so two feeds carrying the same story in the same second still give one
item).

Bad input never raises: a malformed document, an entry without a title, link or usable date, a
repeated or reused id, a huge item or a body beyond ``max_body_bytes`` becomes a ``Rejected`` with
a stable kind and the reason (the publisher writes them as DeadLetter records). Transport errors
and HTTP errors are not input: they are logged with counts and retried with backoff.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from connectors.news.dedupe import SeenStore
from connectors.news.normalise import DEAD_LETTER_PAYLOAD_MAX, NewsEntry, Rejected, normalise_entry
from connectors.news.sentiment import SentimentScorer
from tickcast.logs import get_logger

log = get_logger("news")

DEFAULT_MAX_BODY = 5 * 1024 * 1024
USER_AGENT = "tickcast-news/0.1 (+https://github.com/tickcast; polite RSS poller)"
ACCEPT = "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.8, */*;q=0.1"


@dataclass(frozen=True)
class FeedSpec:
    name: str  # source name: the key of the source weights, e.g. cryptonews
    url: str
    venue: str = ""  # default news.<name>

    def __post_init__(self):
        if not self.venue:
            object.__setattr__(self, "venue", f"news.{self.name}")


def parse_feed_specs(values: list[str] | tuple[str, ...]) -> list[FeedSpec]:
    """``name=url`` strings -> FeedSpecs (ValueError naming the bad entry)."""
    out: list[FeedSpec] = []
    for raw in values:
        name, sep, url = raw.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"news feed {raw!r} must be name=http(s)://url")
        if not all(c.isalnum() or c in "-_" for c in name):
            raise ValueError(f"news feed name {name!r} must be letters, digits, - or _")
        if any(f.name == name for f in out):
            raise ValueError(f"news feed name {name!r} is listed twice")
        out.append(FeedSpec(name, url))
    return out


class SourceWeights:
    """Trust per source in [0, 1]; a source without a configured weight gets ``default``."""

    def __init__(self, weights: dict[str, float] | None = None, default: float = 0.3):
        for k, v in {**(weights or {}), "(default)": default}.items():
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"source weight of {k} must be in [0, 1], got {v}")
        self.weights = {k: float(v) for k, v in (weights or {}).items()}
        self.default = float(default)

    def __call__(self, source: str) -> float:
        return self.weights.get(source, self.default)


@dataclass
class PollResult:
    feed: FeedSpec
    status: int | None  # HTTP status; None after a transport error
    recv_ts: int  # µs
    entries: list[NewsEntry] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    etag: str | None = None
    last_modified: str | None = None

    @property
    def not_modified(self) -> bool:
        return self.status == 304

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


@dataclass
class _Schedule:
    failures: int = 0
    next_due: float = 0.0


def _now_us() -> int:
    return time.time_ns() // 1000


class NewsConnector:
    def __init__(self, feeds: list[FeedSpec], *, store: SeenStore, scorer: SentimentScorer | None = None,
                 weights: SourceWeights | None = None, poll_interval_s: float = 120.0, timeout_s: float = 20.0,
                 max_backoff_s: float = 1800.0, max_body_bytes: int = DEFAULT_MAX_BODY, jitter: float = 0.1,
                 clock_us: Callable[[], int] = _now_us, user_agent: str = USER_AGENT):
        if not feeds:
            raise ValueError("at least one news feed is required")
        names = [f.name for f in feeds]
        if len(set(names)) != len(names):
            raise ValueError(f"feed names must be unique: {names}")
        if scorer is None:
            from connectors.news.sentiment import VaderScorer

            scorer = VaderScorer()
        self.feeds = list(feeds)
        self.store = store
        self.scorer = scorer
        self.weights = weights or SourceWeights()
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s
        self.max_body_bytes = max_body_bytes
        self.jitter = jitter
        self.clock_us = clock_us
        self.user_agent = user_agent
        self._sched = {f.name: _Schedule() for f in feeds}
        self._rng = random.Random(0x6E657773)
        self._client = None
        self.totals: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    async def __aenter__(self) -> NewsConnector:
        self._http()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _http(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), follow_redirects=True,
                                             headers={"User-Agent": self.user_agent, "Accept": ACCEPT})
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def commit(self) -> None:
        """Persist the seen set and the feeds' validators (call after the items are durably published)."""
        self.store.save()

    # -- one fetch ---------------------------------------------------------------------------------
    async def fetch(self, feed: FeedSpec) -> PollResult:
        """One conditional GET, parsed and normalised, not yet deduplicated. Never raises on bad
        input or a failing server; updates the feed's schedule (interval or backoff)."""
        import httpx

        state = self.store.feed(feed.name)
        headers = {}
        if state.get("etag"):
            headers["If-None-Match"] = state["etag"]
        if state.get("last_modified"):
            headers["If-Modified-Since"] = state["last_modified"]
        retry_after = 0.0
        try:
            async with self._http().stream("GET", feed.url, headers=headers) as resp:
                res = PollResult(feed, resp.status_code, self.clock_us(),
                                 etag=resp.headers.get("etag"), last_modified=resp.headers.get("last-modified"))
                if resp.status_code == 304:
                    res.count("not_modified")
                    self._schedule(feed, ok=True)
                    return res
                if resp.status_code != 200:
                    retry_after = _retry_after(resp.headers.get("retry-after"))
                    res.error = f"HTTP {resp.status_code}"
                    res.count("http_error")
                    self._schedule(feed, ok=False, retry_after=retry_after)
                    return res
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_body_bytes:
                        break
                content_type = resp.headers.get("content-type", "")
        except httpx.HTTPError as exc:
            res = PollResult(feed, None, self.clock_us(), error=f"{type(exc).__name__}: {exc}")
            res.count("transport_error")
            self._schedule(feed, ok=False)
            return res
        if len(body) > self.max_body_bytes:
            res.rejected.append(Rejected(
                feed.name, feed.url, "fetch", "huge_feed",
                f"feed body exceeds {self.max_body_bytes} bytes; download stopped", bytes(body[:DEAD_LETTER_PAYLOAD_MAX]),
                res.recv_ts, (_doc_key(feed, body[:65536]),)))
            res.count("huge_feed")
            self._schedule(feed, ok=False)
            return res
        allow_undated = bool(state.get("fetched"))
        try:
            await asyncio.to_thread(self._parse_into, res, bytes(body), content_type, allow_undated)
        except Exception as exc:  # noqa: BLE001 - a parser bug must not kill the feed's task: report it
            res.rejected.append(Rejected(feed.name, feed.url, "parse", "parse_error",
                                         f"{type(exc).__name__}: {exc}", bytes(body[:DEAD_LETTER_PAYLOAD_MAX]),
                                         res.recv_ts, (_doc_key(feed, body),)))
            res.count("parse_error")
        self._schedule(feed, ok=True)
        return res

    def _parse_into(self, res: PollResult, body: bytes, content_type: str, allow_undated: bool) -> None:
        import feedparser

        feed = res.feed
        doc = feedparser.parse(body, response_headers={"content-type": content_type or "application/xml",
                                                       "content-location": feed.url})
        exc = doc.get("bozo_exception") if doc.get("bozo") else None
        benign = isinstance(exc, (feedparser.CharacterEncodingOverride, feedparser.NonXMLContentType))
        if not doc.entries and not doc.get("version"):
            why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
            res.rejected.append(Rejected(feed.name, feed.url, "parse", "malformed_xml",
                                         f"not an RSS or Atom document{why}", body[:DEAD_LETTER_PAYLOAD_MAX],
                                         res.recv_ts, (_doc_key(feed, body),)))
            res.count("malformed_xml")
            return
        if exc is not None and not benign:
            res.rejected.append(Rejected(
                feed.name, feed.url, "parse", "malformed_xml",
                f"{type(exc).__name__}: {exc}; {len(doc.entries)} entries recovered by the lenient parser "
                "and validated one by one", body[:DEAD_LETTER_PAYLOAD_MAX], res.recv_ts, (_doc_key(feed, body),)))
            res.count("malformed_xml")
        weight = self.weights(feed.name)
        seen_ids: set[str] = set()
        for raw in doc.entries:
            ident = str(raw.get("id") or raw.get("link") or "")
            if ident and ident in seen_ids:
                from connectors.news.normalise import entry_payload

                res.rejected.append(Rejected(
                    feed.name, feed.url, "parse", "duplicate_id",
                    f"entry id {ident[:200]!r} appears more than once in one document", entry_payload(raw),
                    res.recv_ts, ("d:" + feed.name + ":" + hashlib.sha256(ident.encode()).hexdigest()[:20],)))
                res.count("duplicate_id")
                continue
            seen_ids.add(ident)
            out = normalise_entry(raw, source=feed.name, venue=feed.venue, feed_url=feed.url,
                                  recv_ts_us=res.recv_ts, scorer=self.scorer, source_weight=weight,
                                  allow_undated=allow_undated)
            if isinstance(out, Rejected):
                res.rejected.append(out)
                res.count(out.error_kind)
            else:
                res.entries.append(out)
        res.entries.sort(key=lambda e: (e.exchange_ts, e.item_id))

    def _schedule(self, feed: FeedSpec, *, ok: bool, retry_after: float = 0.0) -> None:
        sched = self._sched.setdefault(feed.name, _Schedule())
        if ok:
            sched.failures = 0
            delay = self.poll_interval_s
        else:
            sched.failures += 1
            delay = max(retry_after, min(self.max_backoff_s, self.poll_interval_s * 2 ** sched.failures))
        delay *= 1.0 + self._rng.uniform(-self.jitter, self.jitter)
        sched.next_due = time.monotonic() + delay

    def next_due_in(self, feed: FeedSpec) -> float:
        return max(0.0, self._sched.setdefault(feed.name, _Schedule()).next_due - time.monotonic())

    def failures(self, feed: FeedSpec) -> int:
        return self._sched.setdefault(feed.name, _Schedule()).failures

    # -- dedupe (one result at a time, in the consumer) ----------------------------------------------
    def dedupe(self, res: PollResult) -> PollResult:
        """Drop repeats, report reused ids, remember what is new; updates the feed's validators."""
        store = self.store
        now_ms = res.recv_ts // 1000
        if res.status == 200:
            store.set_feed(res.feed.name, etag=res.etag, last_modified=res.last_modified, fetched=True)
        kept: list[NewsEntry] = []
        rejected: list[Rejected] = []
        for e in res.entries:
            hit = store.lookup(e.keys, now_ms)
            if hit is None:
                store.mark(e.keys, now_ms, e.item_id, e.source)
                kept.append(e)
                res.count("new")
                continue
            key, (_, item_id, source) = hit
            if key.startswith("g:") and item_id != e.item_id:
                ukey = e.keys[0]
                if store.lookup((ukey,), now_ms) is None:
                    store.mark((ukey,), now_ms, e.item_id, e.source)
                    rejected.append(Rejected(
                        e.source, res.feed.url, "dedupe", "duplicate_id",
                        f"feed reuses an id of item {item_id} for another story", _entry_json(e), res.recv_ts))
                    res.count("duplicate_id")
                continue
            if source == e.source:
                res.count("repeat")
            else:
                store.mark(tuple(k for k in e.keys if not k.startswith("t:")), now_ms, item_id, e.source)
                res.count("cross_source_duplicate")
        for r in res.rejected:
            # a bad entry or document is reported once, not at every poll that still serves it
            keys = r.keys or (f"d:{r.source}:" + hashlib.sha256(r.payload).hexdigest()[:20],)
            if store.lookup(keys, now_ms) is not None:
                res.count("rejected_repeat")
                continue
            store.mark(keys, now_ms, "", r.source)
            rejected.append(r)
        res.entries, res.rejected = kept, rejected
        return res

    async def poll_once(self, feed: FeedSpec) -> PollResult:
        res = self.dedupe(await self.fetch(feed))
        self._log(res)
        return res

    async def poll_all(self) -> list[PollResult]:
        """Every feed once, concurrently; results deduplicated in feed order."""
        fetched = await asyncio.gather(*(self.fetch(f) for f in self.feeds))
        out = []
        for res in fetched:
            out.append(self.dedupe(res))
            self._log(out[-1])
        return out

    # -- streams -----------------------------------------------------------------------------------
    async def batches(self) -> AsyncIterator[PollResult]:
        """One deduplicated PollResult per fetch of any feed, forever (each feed on its own schedule)."""
        queue: asyncio.Queue[PollResult] = asyncio.Queue()

        async def run(feed: FeedSpec) -> None:
            while True:
                wait = self.next_due_in(feed)
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    res = await self.fetch(feed)
                except Exception as exc:  # never let one feed's surprise stop its loop
                    log.exception("news fetch failed unexpectedly", extra={"feed": feed.name})
                    res = PollResult(feed, None, self.clock_us(), error=f"{type(exc).__name__}: {exc}")
                    res.count("internal_error")
                    self._schedule(feed, ok=False)
                await queue.put(res)

        tasks = [asyncio.create_task(run(f), name=f"news:{f.name}") for f in self.feeds]
        try:
            while True:
                res = self.dedupe(await queue.get())
                self._log(res)
                yield res
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def items(self) -> AsyncIterator[NewsEntry | Rejected]:
        """Entries and rejections one by one; the seen set is saved once a fetch's last event has
        been consumed (so a crash while publishing re-delivers, never loses)."""
        async for res in self.batches():
            for e in res.entries:
                yield e
            for r in res.rejected:
                yield r
            self.commit()

    def _log(self, res: PollResult) -> None:
        for k, v in res.counts.items():
            self.totals[k] = self.totals.get(k, 0) + v
        extra = {"feed": res.feed.name, "status": res.status, "counts": dict(res.counts)}
        if res.error:
            log.warning("news feed fetch failed; backing off", extra={
                **extra, "error": res.error, "retry_in_s": round(self.next_due_in(res.feed), 1),
                "failures": self.failures(res.feed)})
        elif res.not_modified:
            log.debug("news feed not modified", extra=extra)
        else:
            log.info("news feed polled", extra=extra)


def _retry_after(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return 0.0


def _doc_key(feed: FeedSpec, body: bytes) -> str:
    return f"d:{feed.name}:" + hashlib.sha256(bytes(body)).hexdigest()[:20]


def _entry_json(e: NewsEntry) -> bytes:
    import json

    return json.dumps({"item_id": e.item_id, "url": e.url, "title": e.title, "source": e.source,
                       "published_ts": e.published_ts}, ensure_ascii=False).encode()
