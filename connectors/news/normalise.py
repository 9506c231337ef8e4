"""One feed entry -> one normalised news item (or a rejection with a reason).

Normalisation: titles and summaries lose their HTML (tags dropped, entities decoded, whitespace
collapsed, Unicode NFC); the summary is trimmed to ``SUMMARY_KEEP`` characters on a word boundary
(a headline feed's summary is a teaser; whole articles are not the product); URLs are made
canonical (https, lower-case host without ``www.``, no fragment, no tracking parameters, sorted
query, no trailing slash), so the same story reached through two links gets one id.

Identity: ``item_id`` is a hash of the canonical URL and the normalised title (case-folded, only
letters and digits). The dedupe keys (see ``dedupe.py``) are the canonical URL, the normalised
title and the feed's own guid, each on its own.

Time: ``published_ts`` is the entry's published (else updated) time; ``exchange_ts`` is that time,
or the receive time when the entry has none and its feed has been polled before (the item appeared
between two polls), and never later than the receive time (a feed whose clock runs ahead cannot
date news into the future). Rejections (``Rejected.error_kind``): ``missing_field`` (no title or
link), ``bad_url``, ``missing_date`` (an undated entry in a feed's first fetch: its time cannot be
placed), ``bad_date`` (before 2009 or more than a day ahead), ``huge_item`` (title or summary beyond
the limits), ``duplicate_id`` (an id repeated within one document, or reused for another story).
"""
from __future__ import annotations

import calendar
import hashlib
import html
import json
import re
import unicodedata
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from connectors.news.assets import tag_assets
from connectors.news.sentiment import SentimentScorer

MAX_TITLE_CHARS = 1_000
MAX_SUMMARY_CHARS = 50_000  # after HTML is stripped
MAX_URL_CHARS = 2_048
SUMMARY_KEEP = 1_000
DEAD_LETTER_PAYLOAD_MAX = 16_384
MIN_PUBLISHED_MS = 1_230_940_800_000  # 2009-01-03, the Bitcoin genesis block
MAX_AHEAD_MS = 24 * 3600 * 1000

_TRACKING = re.compile(r"^(utm_[a-z]+|ref|ref_src|source|fbclid|gclid|mc_cid|mc_eid|ocid|cmpid|_ga)$", re.IGNORECASE)
_TAG = re.compile(r"<[^>]*>")
_WS = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True)
class NewsEntry:
    """A normalised, scored, tagged news item; ``news_records`` turns it into NewsItem records."""

    item_id: str
    source: str  # feed name, e.g. cryptonews
    venue: str  # e.g. news.cryptonews
    url: str
    title: str
    summary: str | None
    published_ts: int | None  # ms
    exchange_ts: int  # ms: published time, else receive time
    recv_ts: int  # µs
    assets: tuple[str, ...]
    sentiment: float
    source_weight: float
    keys: tuple[str, ...] = field(default=(), compare=False)  # dedupe keys, see dedupe.py


@dataclass(frozen=True)
class Rejected:
    """Input that became a dead letter: stable ``error_kind``, readable ``reason``, raw ``payload``."""

    source: str  # feed name
    feed_url: str
    stage: str  # fetch | parse | normalise | dedupe
    error_kind: str
    reason: str
    payload: bytes
    recv_ts: int  # µs
    keys: tuple[str, ...] = field(default=(), compare=False)  # marks it seen so it is reported once


def clean_text(value: str | None) -> str:
    """HTML-free, entity-decoded, whitespace-collapsed NFC text."""
    if not value:
        return ""
    text = _TAG.sub(" ", value)
    text = html.unescape(text)
    text = unicodedata.normalize("NFC", text)
    return _WS.sub(" ", text).strip()


def trim(text: str, limit: int = SUMMARY_KEEP) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + "…"


def normalise_title(title: str) -> str:
    """The title as compared for identity: case-folded letters and digits separated by single spaces."""
    folded = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode().casefold()
    return _NON_ALNUM.sub(" ", folded).strip()


def canonical_url(url: str) -> str | None:
    """https, lower-case host without www./m., no fragment, tracking parameters or trailing slash."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    for prefix in ("www.", "m."):
        host = host.removeprefix(prefix)
    if port and port not in (80, 443):
        host = f"{host}:{port}"
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                             if not _TRACKING.match(k)))
    path = parts.path.rstrip("/") or "/"
    return urlunsplit(("https", host, path, query, ""))


def _h(text: str, n: int = 20) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def make_item_id(canon_url: str, norm_title: str) -> str:
    return _h(f"{canon_url}\n{norm_title}", 24)


def url_key(canon_url: str) -> str:
    return "u:" + _h(canon_url)


def title_key(norm_title: str) -> str:
    return "t:" + _h(norm_title)


def guid_key(source: str, guid: str) -> str:
    return f"g:{source}:" + _h(guid)


def entry_payload(entry: dict, limit: int = DEAD_LETTER_PAYLOAD_MAX) -> bytes:
    """The raw entry as JSON (the fields that identify it, long values cut) for a dead letter."""
    def cut(v):
        v = "" if v is None else str(v)
        return v if len(v) <= 2000 else v[:2000] + f"... [{len(v)} chars]"

    plain = dict(entry)  # plain lookups: no feedparser key fallbacks (and their warnings)
    raw = {k: cut(plain.get(k)) for k in ("id", "link", "title", "published", "updated") if plain.get(k)}
    if plain.get("summary"):
        raw["summary"] = cut(plain.get("summary"))
    return json.dumps(raw, ensure_ascii=False).encode()[:limit]


def _entry_time_ms(entry: dict) -> tuple[int | None, str | None]:
    """(ms, raw string) of the published, else updated, time; ms None when absent or unparseable."""
    plain = dict(entry)  # FeedParserDict.get("updated") would fall back to "published" with a warning
    for name in ("published", "updated", "created"):
        parsed = plain.get(f"{name}_parsed")
        raw = plain.get(name)
        if parsed:
            return calendar.timegm(parsed) * 1000, raw
        if raw:
            return None, raw
    return None, None


def normalise_entry(entry: dict, *, source: str, venue: str, feed_url: str, recv_ts_us: int,
                    scorer: SentimentScorer, source_weight: float, allow_undated: bool
                    ) -> NewsEntry | Rejected:
    """A feedparser entry -> NewsEntry, or Rejected with the reason (never raises on bad input)."""
    def reject(kind: str, reason: str, keys: tuple[str, ...] = ()) -> Rejected:
        return Rejected(source, feed_url, "normalise", kind, reason, entry_payload(entry), recv_ts_us, keys)

    raw_title = entry.get("title") or ""
    raw_link = entry.get("link") or ""
    guid = str(entry.get("id") or "")
    gkey = (guid_key(source, guid),) if guid else ()
    if len(raw_title) > 20 * MAX_TITLE_CHARS or len(raw_link) > MAX_URL_CHARS:
        return reject("huge_item", f"title of {len(raw_title)} chars or link of {len(raw_link)} chars is "
                                   f"beyond the limits ({MAX_TITLE_CHARS}, {MAX_URL_CHARS})", gkey)
    title = clean_text(raw_title)
    if not title or not raw_link:
        missing = " and ".join(n for n, v in (("title", title), ("link", raw_link)) if not v)
        return reject("missing_field", f"entry has no {missing}", gkey)
    canon = canonical_url(raw_link)
    if canon is None:
        return reject("bad_url", f"link {raw_link[:200]!r} is not an http(s) URL", gkey)
    ukey = url_key(canon)
    keys_bad = (ukey, *gkey)
    if len(title) > MAX_TITLE_CHARS:
        return reject("huge_item", f"title of {len(title)} chars exceeds {MAX_TITLE_CHARS}", keys_bad)
    summary_raw = entry.get("summary") or ""
    if len(summary_raw) > 20 * MAX_SUMMARY_CHARS:
        return reject("huge_item", f"summary of {len(summary_raw)} chars exceeds {MAX_SUMMARY_CHARS}", keys_bad)
    summary = clean_text(summary_raw)
    if len(summary) > MAX_SUMMARY_CHARS:
        return reject("huge_item", f"summary of {len(summary)} chars exceeds {MAX_SUMMARY_CHARS}", keys_bad)
    recv_ms = recv_ts_us // 1000
    published_ms, raw_time = _entry_time_ms(entry)
    if published_ms is None:
        if raw_time is not None:
            return reject("bad_date", f"unparseable date {raw_time[:100]!r}", keys_bad)
        if not allow_undated:
            return reject("missing_date", "undated entry in the feed's first fetch: its time cannot be placed",
                          keys_bad)
        exchange_ms = recv_ms
    else:
        if published_ms < MIN_PUBLISHED_MS or published_ms > recv_ms + MAX_AHEAD_MS:
            return reject("bad_date", f"published time {raw_time!r} is before 2009 or more than a day ahead",
                          keys_bad)
        exchange_ms = min(published_ms, recv_ms)
    summary_kept = trim(summary) if summary else None
    norm = normalise_title(title)
    return NewsEntry(
        item_id=make_item_id(canon, norm), source=source, venue=venue, url=canon, title=title,
        summary=summary_kept, published_ts=published_ms, exchange_ts=exchange_ms, recv_ts=recv_ts_us,
        assets=tuple(tag_assets(title, summary_kept)), sentiment=scorer.score(title, summary_kept),
        source_weight=source_weight, keys=(ukey, title_key(norm), *gkey) if norm else (ukey, *gkey))
