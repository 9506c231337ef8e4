"""The news connector against the local feed server on 127.0.0.1 (real HTTP, real feedparser)."""
from __future__ import annotations

import asyncio
import functools
import http.server
import json
import threading
import time

import httpx
import pytest

from connectors.news.connector import FeedSpec, NewsConnector, SourceWeights, parse_feed_specs
from connectors.news.dedupe import SeenStore
from connectors.news.feedserver import LocalFeedServer
from connectors.news.headlines import HeadlineCatalog
from connectors.news.normalise import Rejected, normalise_title
from connectors.news.sentiment import VaderScorer
from tests.conftest import FIXTURES

E0 = 1_760_000_000.0  # the catalog's epoch: story j is published around E0 + 60 j


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def us(self) -> int:
        return int(self.t * 1_000_000)


@pytest.fixture(scope="module")
def scorer():
    return VaderScorer()


@pytest.fixture
def clock():
    return Clock(E0 + 3600)


@pytest.fixture
def server(clock):
    with LocalFeedServer(catalog=HeadlineCatalog(epoch_s=E0, period_s=60), clock=clock, slow_s=2.0) as srv:
        yield srv


def connector(feeds, store, clock, scorer, **kw):
    kw.setdefault("poll_interval_s", 0.2)
    return NewsConnector(feeds, store=store, scorer=scorer, clock_us=clock.us, jitter=0.0, **kw)


def run(coro):
    return asyncio.run(coro)


async def _poll_all(conn):
    async with conn:
        return await conn.poll_all()


def test_conditional_requests_304_and_new_items_over_time(server, clock, scorer, tmp_path):
    feeds = parse_feed_specs(server.feed_specs())
    conn = connector(feeds, SeenStore(tmp_path / "seen.json"), clock, scorer)

    async def scenario():
        async with conn:
            first = await conn.poll_all()
            second = await conn.poll_all()
            clock.t += 600  # ten more minutes of stories
            third = await conn.poll_all()
            return first, second, third

    first, second, third = run(scenario())
    assert [r.status for r in first] == [200, 200, 200]
    assert all(r.entries for r in first) and all(r.etag and r.last_modified for r in first)
    # nothing new: every feed answers 304 to the validators it sent, and no body is parsed
    assert [r.status for r in second] == [304, 304, 304] and not any(r.entries for r in second)
    for name in ("cryptonews", "coindesk", "cointelegraph"):
        assert server.count(f"{name}:304") == 1 and server.count(f"{name}:200") == 2
    # ten minutes later: only the stories published since then are new
    new = [e for r in third for e in r.entries]
    assert [r.status for r in third] == [200, 200, 200] and 5 <= len(new) <= 14
    assert all(clock.us() // 1000 - 600_000 - 60_000 <= e.published_ts <= clock.us() // 1000 for e in new)
    assert sum(r.counts.get("repeat", 0) for r in third) >= 30
    # every item: normalised fields, tags, score, weight
    for e in (e for r in first + third for e in r.entries):
        assert e.url.startswith("https://") and e.title and e.exchange_ts == e.published_ts
        assert e.recv_ts % 1000 == 0 and -1.0 <= e.sentiment <= 1.0 and e.source_weight == 0.3  # no weights set
        assert e.venue == f"news.{e.source}"


def test_if_modified_since_alone_gets_304(server, clock):
    url = server.url("coindesk")
    r1 = httpx.get(url)
    assert r1.status_code == 200 and "ETag" in r1.headers
    lm = r1.headers["Last-Modified"]
    assert httpx.get(url, headers={"If-Modified-Since": lm}).status_code == 304
    assert httpx.get(url, headers={"If-None-Match": r1.headers["ETag"]}).status_code == 304
    assert httpx.get(url, headers={"If-Modified-Since": "Mon, 01 Jan 2024 00:00:00 GMT"}).status_code == 200
    # If-None-Match wins over If-Modified-Since (RFC 9110)
    assert httpx.get(url, headers={"If-None-Match": '"other"', "If-Modified-Since": lm}).status_code == 200
    clock.t += 300
    assert httpx.get(url, headers={"If-Modified-Since": lm}).status_code == 200


def test_connector_sends_if_modified_since_without_etag(server, clock, scorer, tmp_path):
    store = SeenStore(tmp_path / "seen.json")
    feed = FeedSpec("coindesk", server.url("coindesk"))
    conn = connector([feed], store, clock, scorer)

    async def scenario():
        async with conn:
            first = await conn.poll_once(feed)
            store.set_feed("coindesk", etag=None)  # a server that sends only Last-Modified
            return first, await conn.poll_once(feed)

    first, second = run(scenario())
    assert first.status == 200 and second.status == 304


def test_dedupe_across_sources(server, clock, scorer, tmp_path):
    feeds = parse_feed_specs(server.feed_specs())
    results = run(_poll_all(connector(feeds, SeenStore(tmp_path / "s.json"), clock, scorer)))
    entries = [e for r in results for e in r.entries]
    cross = sum(r.counts.get("cross_source_duplicate", 0) for r in results)
    # the catalog syndicates every sixth story to the next feed under another URL: they are caught
    syndicated = {s.title for f in server.catalog.feeds for s in server.catalog.items(f, clock.t)
                  if s.j % 6 == 0}
    assert cross >= 3 and syndicated
    titles = [normalise_title(e.title) for e in entries]
    assert len(titles) == len(set(titles)) and len({e.url for e in entries}) == len(entries)
    assert len({e.item_id for e in entries}) == len(entries)


def test_dedupe_across_restarts(clock, scorer, tmp_path):
    path = tmp_path / "news" / "seen.json"
    cat = {"epoch_s": E0, "period_s": 60}
    with LocalFeedServer(catalog=HeadlineCatalog(**cat), clock=clock) as srv:
        first = run(_poll_all(c := connector(parse_feed_specs(srv.feed_specs()), SeenStore(path), clock, scorer)))
        c.commit()
    n_first = sum(len(r.entries) for r in first)
    assert n_first >= 40 and path.exists()
    # a new process: another server instance (another port), the same stories; a fresh store object
    with LocalFeedServer(catalog=HeadlineCatalog(**cat), clock=clock) as srv:
        feeds = parse_feed_specs(srv.feed_specs())
        # the validators survived the restart: nothing changed, so the server answers 304
        assert [r.status for r in run(_poll_all(connector(feeds, SeenStore(path), clock, scorer)))] == [304] * 3
        # a server that ignores validators sends the whole feed again: the seen set still drops all of it
        store = SeenStore(path)
        for f in feeds:
            store.set_feed(f.name, etag=None, last_modified=None)
        again = run(_poll_all(connector(feeds, store, clock, scorer)))
        assert [r.status for r in again] == [200, 200, 200]
        assert sum(len(r.entries) for r in again) == 0
        # every listed item is known: the first run's items and the cross-source copies it dropped
        assert sum(r.counts.get("repeat", 0) for r in again) == 60 and n_first < 60
        clock.t += 300
        later = run(_poll_all(connector(feeds, SeenStore(path), clock, scorer)))
        fresh = [e for r in later for e in r.entries]
        assert 1 <= len(fresh) <= 8 and all(e.published_ts > (clock.t - 300 - 60) * 1000 for e in fresh)


def test_uncommitted_items_are_delivered_again(server, clock, scorer, tmp_path):
    """A crash between fetching and publishing loses nothing: without commit() the next process
    sees the same items again (at-least-once; the features drop repeated item ids)."""
    path = tmp_path / "seen.json"
    feeds = parse_feed_specs(server.feed_specs())
    first = run(_poll_all(connector(feeds, SeenStore(path), clock, scorer)))  # no commit
    again = run(_poll_all(connector(feeds, SeenStore(path), clock, scorer)))
    assert sorted(e.item_id for r in again for e in r.entries) == sorted(e.item_id for r in first for e in r.entries)


def test_seen_store_is_bounded_and_survives_a_corrupt_file(tmp_path):
    path = tmp_path / "seen.json"
    store = SeenStore(path, max_keys=10)
    for i in range(30):
        store.mark((f"u:{i}",), 1000 + i, f"id{i}", "src")
    assert len(store) == 10 and store.lookup(("u:0",), 2000) is None and store.lookup(("u:29",), 2000)
    store.set_feed("src", etag='"x"', fetched=True)
    store.save()
    back = SeenStore(path, max_keys=10)
    assert len(back) == 10 and back.feed("src") == {"etag": '"x"', "fetched": True}
    # the title key expires: the same generic headline a day later is a new story
    back.mark(("t:abc",), 0, "id", "src")
    assert back.lookup(("t:abc",), 3600_000) and back.lookup(("t:abc",), 25 * 3600_000) is None
    path.write_text("{not json")
    broken = SeenStore(path)
    assert len(broken) == 0 and (tmp_path / "seen.json.corrupt").exists()


@pytest.mark.parametrize("fault,kinds", [
    ("malformed", {"malformed_xml", "missing_field"}),
    ("html", {"malformed_xml"}),
    ("nodate", {"missing_date"}),
    ("duplicate", {"duplicate_id"}),
    ("huge", {"huge_item"}),
])
def test_bad_input_becomes_dead_letters(server, clock, scorer, tmp_path, fault, kinds):
    feed = FeedSpec("cryptonews", server.url("cryptonews", fault=fault))
    conn = connector([feed], SeenStore(tmp_path / "s.json"), clock, scorer)

    async def scenario():
        async with conn:
            first = await conn.poll_once(feed)
            conn.store.set_feed("cryptonews", etag=None, last_modified=None)  # force a full body again
            second = await conn.poll_once(feed)
            return first, second

    first, second = run(scenario())
    assert first.status == 200
    got = {r.error_kind for r in first.rejected}
    assert got == kinds, [(r.error_kind, r.reason) for r in first.rejected]
    for r in first.rejected:
        assert isinstance(r, Rejected) and r.reason and r.payload and r.feed_url == feed.url
        assert len(r.payload) <= 16_384
    if fault == "malformed":
        doc = next(r for r in first.rejected if r.error_kind == "malformed_xml")
        assert "recovered" in doc.reason and doc.payload.startswith(b"<?xml")
    if fault == "huge":
        assert {r.reason.split(" of ")[0] for r in first.rejected} == {"summary", "title"}
        assert len(first.entries) == 20  # the normal items around them still come through
    if fault in ("duplicate", "huge"):
        assert len(first.entries) >= 19
    # the same bad input served again is not reported again
    assert second.rejected == [] and second.entries == []
    assert second.counts.get("rejected_repeat", 0) + second.counts.get("repeat", 0) == \
        len(first.rejected) + len(first.entries)


def test_undated_items_after_the_first_fetch_get_the_receive_time(server, clock, scorer, tmp_path):
    feed = FeedSpec("coindesk", server.url("coindesk"))
    conn = connector([feed], SeenStore(tmp_path / "s.json"), clock, scorer)

    async def scenario():
        async with conn:
            await conn.poll_once(feed)
            clock.t += 5
            server.catalog.inject("coindesk", "Litecoin surges 9% after ETF filing", "LTC rallied.", published_s=None)
            return await conn.poll_once(feed)

    res = run(scenario())
    assert [e.title for e in res.entries] == ["Litecoin surges 9% after ETF filing"]
    e = res.entries[0]
    assert e.published_ts is None and e.exchange_ts == clock.us() // 1000 and e.assets == ("LTC",) and e.sentiment > 0


def test_a_broken_feed_does_not_stop_the_others(server, clock, scorer, tmp_path):
    closed = LocalFeedServer()
    dead_url = closed.url("cryptonews")
    closed.stop()  # nothing listens there any more
    feeds = [FeedSpec("coindesk", server.url("coindesk")),
             FeedSpec("down", server.url("cryptonews", fault="error")),
             FeedSpec("gone", dead_url),
             FeedSpec("slow", server.url("cointelegraph", fault="slow")),
             FeedSpec("broken", server.url("cryptonews", fault="html"))]
    conn = connector(feeds, SeenStore(tmp_path / "s.json"), clock, scorer, timeout_s=0.5, poll_interval_s=0.15,
                     max_backoff_s=5.0)
    seen: dict[str, list] = {f.name: [] for f in feeds}

    async def scenario():
        async with conn:
            agen = conn.batches()
            deadline = time.monotonic() + 1.6
            while time.monotonic() < deadline:
                try:
                    res = await asyncio.wait_for(agen.__anext__(), deadline - time.monotonic())
                except TimeoutError:
                    break
                seen[res.feed.name].append(res)
                if res.feed.name == "coindesk" and len(seen["coindesk"]) == 2:
                    clock.t += 300  # new stories for the healthy feed
            await agen.aclose()

    run(scenario())
    good = seen["coindesk"]
    assert len(good) >= 3 and good[0].entries and any(r.entries for r in good[2:])
    assert all(r.status == 503 and r.error == "HTTP 503" for r in seen["down"])
    assert all(r.status is None and "Connect" in r.error for r in seen["gone"])
    assert seen["slow"] and all(r.status is None and "Timeout" in r.error for r in seen["slow"])
    assert seen["broken"][0].rejected[0].error_kind == "malformed_xml"
    # failing feeds back off (fewer polls than the healthy one, growing delays); the broken document is
    # bad input, not a server failure, so that feed keeps its normal interval
    assert len(seen["down"]) < len(good) and conn.failures(feeds[1]) >= 1 and conn.failures(feeds[0]) == 0
    assert conn.next_due_in(feeds[1]) > 0.15 and conn.failures(feeds[4]) == 0


def test_retry_after_is_honoured(server, clock, scorer, tmp_path):
    feed = FeedSpec("down", server.url("cryptonews", fault="error"))
    conn = connector([feed], SeenStore(None), clock, scorer, poll_interval_s=0.01)
    run(_poll_all(conn))
    assert 0.9 < conn.next_due_in(feed) <= 1.0  # Retry-After: 1 beats 0.01 * 2


def test_a_huge_feed_body_is_cut_and_reported(server, clock, scorer, tmp_path):
    feed = FeedSpec("big", server.url("coindesk", fault="huge"))
    conn = connector([feed], SeenStore(None), clock, scorer, max_body_bytes=50_000)
    (res,) = run(_poll_all(conn))
    assert res.entries == [] and [r.error_kind for r in res.rejected] == ["huge_feed"]
    assert conn.failures(feed) == 1


def test_items_stream_saves_the_seen_set_after_consumption(server, clock, scorer, tmp_path):
    path = tmp_path / "seen.json"
    feed = FeedSpec("cryptonews", server.url("cryptonews"))
    conn = connector([feed], SeenStore(path), clock, scorer)

    async def scenario():
        got = []
        async with conn:
            agen = conn.items()
            first = await agen.__anext__()
            got.append(first)
            assert not path.exists()  # nothing saved while the fetch's items are being consumed
            while len(got) < 20:
                got.append(await agen.__anext__())
            clock.t += 900
            got.append(await asyncio.wait_for(agen.__anext__(), 5))  # asking for more commits the first fetch
            assert path.exists() and len(json.loads(path.read_text())["keys"]) >= 40
            await agen.aclose()
        return got

    got = run(scenario())
    assert len({e.item_id for e in got}) == len(got)


class _Static(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_realistic_feed_documents(scorer, tmp_path):
    """Documents shaped like cryptonews.com, CoinDesk and Cointelegraph's feeds (tests/fixtures/news)."""
    handler = functools.partial(_Static, directory=str(FIXTURES / "news"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        feeds = [FeedSpec(n, f"{base}/{n}_sample.rss") for n in ("cryptonews", "coindesk", "cointelegraph")]
        clock = Clock(1_749_600_000.0)  # 2025-06-11 00:00 UTC, after every item
        conn = connector(feeds, SeenStore(None), clock, scorer,
                         weights=SourceWeights({"cryptonews": 1.0, "coindesk": 0.9}, default=0.2))
        results = run(_poll_all(conn))
        second = run(_poll_all(conn))
    finally:
        httpd.shutdown()
        httpd.server_close()
    by = {r.feed.name: r for r in results}
    assert all(r.status == 200 and not r.rejected for r in results)
    cn = {e.title: e for e in by["cryptonews"].entries}
    btc = cn["Bitcoin Price Surges Past $110,000 – Traders Eye New Record"]
    assert btc.url == "https://cryptonews.com/news/bitcoin-price-surges-past-110000-traders-eye-new-record"
    assert btc.assets == ("BTC",) and btc.sentiment > 0.3 and btc.source_weight == 1.0
    assert btc.summary.startswith("Bitcoin (BTC) climbed") and "<" not in btc.summary
    assert btc.published_ts == 1_749_550_320_000  # Tue, 10 Jun 2025 10:12:00 +0000
    eth = cn["Ether Slides 8% as Exchange Outflows Reverse ‘Ultrasound’ Narrative"]
    assert eth.assets == ("ETH",) and eth.sentiment < 0
    assert cn["Together With Regulators, Payment Giant Tests Ethernet-Linked Settlement Rails"].assets == ()
    # the same headline on CoinDesk is the same story: dropped as a cross-source duplicate
    cd = {e.title for e in by["coindesk"].entries}
    assert by["coindesk"].counts["cross_source_duplicate"] == 1 and len(cd) == 2
    pol = next(e for e in by["coindesk"].entries if "Polygon" in e.title)
    assert pol.assets == ("POL",) and pol.sentiment > 0 and pol.source_weight == 0.9
    ct = {e.title: e for e in by["cointelegraph"].entries}
    assert ct["Bitcoin Cash hard fork vote splits miners"].assets == ()
    hack = ct["Exchange hacked: $150M drained as ETH and LTC hot wallets exploited"]
    assert hack.assets == ("ETH", "LTC") and hack.sentiment < -0.3 and hack.source_weight == 0.2
    # a static server sends Last-Modified and an ETag: the second round is all 304
    assert [r.status for r in second] == [304, 304, 304]
