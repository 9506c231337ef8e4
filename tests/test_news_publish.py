"""News through the gateway's publisher into the real embedded broker: one NewsItem per symbol,
gw_seq dense per symbol, dead letters with reasons, and the same features from what Kafka holds."""
from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
import time
import uuid

from connectors.news.connector import FeedSpec, NewsConnector
from connectors.news.dedupe import SeenStore
from connectors.news.feedserver import LocalFeedServer
from connectors.news.headlines import HeadlineCatalog
from connectors.news.publish import news_records
from connectors.news.sentiment import VaderScorer
from flows.news_features import NewsWindows
from tickcast.serde import Serde
from tickcast.topics import DEAD_LETTER, KEYED_PARTITIONS, NEWS

SYMBOLS = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]
ASSET = {"BTCUSDT": "BTC", "ETHUSDT": "ETH", "LTCUSDT": "LTC", "POLUSDT": "POL"}


def consume(bootstrap: str, want, timeout: float = 20.0) -> list:
    """Every message of market.news and tickcast.deadletter until ``want(messages)`` is satisfied."""
    from confluent_kafka import Consumer

    from tickcast.kafka import assign_all, consumer_config

    c = Consumer(consumer_config(bootstrap, f"test-news-{uuid.uuid4().hex[:6]}"))
    assign_all(c, [NEWS, DEAD_LETTER])
    out: list = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not want(out):
            for m in c.consume(500, 0.2):
                if m.error() is None:
                    out.append(m)
    finally:
        c.close()
    return out


def _rec(serde, m):
    """The decoded record, or None for another test's undecodable bytes on the shared broker."""
    from tickcast.serde import SerdeError

    try:
        return serde.decode(m.value())
    except SerdeError:
        return None


def test_news_through_the_gateway_publisher(bootstrap, tmp_path):
    from connectors.news.publish import run_news_input
    from connectors.publisher import Publisher, partition_of

    serde = Serde()
    tag = uuid.uuid4().hex[:8]
    clock_s = [1_760_000_000.0 + 3600]
    store_path = tmp_path / "news" / "seen.json"
    with LocalFeedServer(catalog=HeadlineCatalog(epoch_s=1_760_000_000, period_s=60), clock=lambda: clock_s[0]) as srv:
        feeds = [FeedSpec("cryptonews", srv.url("cryptonews"), f"sim.news.cryptonews.{tag}"),
                 FeedSpec("coindesk", srv.url("coindesk", fault="huge"), f"sim.news.coindesk.{tag}"),
                 FeedSpec("cointelegraph", srv.url("cointelegraph", fault="malformed"), f"sim.news.cointelegraph.{tag}")]
        conn = NewsConnector(feeds, store=SeenStore(store_path), scorer=VaderScorer(), poll_interval_s=60,
                             clock_us=lambda: int(clock_s[0] * 1e6))
        pub = Publisher(bootstrap, serde=serde, next_seq={s: 1000 for s in SYMBOLS})
        entries = []

        async def main():
            async def housekeeping():  # what the gateway's loop does: serve delivery reports
                while True:
                    pub.poll(0)
                    await asyncio.sleep(0.01)

            hk = asyncio.create_task(housekeeping())
            orig = conn.dedupe

            def spy(res):
                res = orig(res)
                entries.extend(res.entries)
                return res

            conn.dedupe = spy
            async with conn:
                totals = await run_news_input(conn, pub, SYMBOLS, max_batches=3)
            hk.cancel()
            return totals

        totals = asyncio.run(main())
        assert pub.close(10) == 0  # flushed, and the producer released before the session's broker stops
        gc.collect()
    n = len(entries)
    assert n >= 30 and totals["items"] == n and totals["records"] == 4 * n and totals["refused"] == 0
    assert totals["dead_letters"] == 4  # 2 huge items, the malformed document, its truncated entry
    assert store_path.exists()  # committed once the publisher's queue had drained

    def mine(msgs):  # the session broker is shared: skip other tests' records (and their garbage)
        news = [m for m in msgs if m.topic() == NEWS and (_rec(serde, m) or {}).get("venue", "").endswith(tag)]
        dead = [m for m in msgs if m.topic() == DEAD_LETTER
                and srv.base_url in ((_rec(serde, m) or {}).get("topic") or "")]
        return news, dead

    msgs = consume(bootstrap, lambda out: len(mine(out)[0]) >= 4 * n and len(mine(out)[1]) >= 4)
    news, dead = mine(msgs)
    assert len(news) == 4 * n
    by_symbol: dict[str, list[dict]] = {s: [] for s in SYMBOLS}
    for m in news:
        rec = serde.decode(m.value(), "NewsItem")
        assert m.key().decode() == rec["symbol"] and m.partition() == partition_of(rec["symbol"], KEYED_PARTITIONS)
        by_symbol[rec["symbol"]].append(rec)
    ids = sorted(e.item_id for e in entries)
    for sym, recs in by_symbol.items():
        recs.sort(key=lambda r: r["gw_seq"])
        assert [r["gw_seq"] for r in recs] == list(range(1000, 1000 + n))  # dense, from the publisher
        assert sorted(r["item_id"] for r in recs) == ids  # every item routed to every symbol
        assert all(r["mentioned"] == (ASSET[sym] in r["assets"]) for r in recs)
    assert any(r["mentioned"] for r in by_symbol["BTCUSDT"]) and not all(r["mentioned"] for r in by_symbol["BTCUSDT"])
    # the records in Kafka are exactly what the connector produced (the offline path builds them the same way)
    direct = {(r["symbol"], r["item_id"]): r for e in entries for r in news_records(e, SYMBOLS)}
    for sym, recs in by_symbol.items():
        for r in recs:
            want = direct[(sym, r["item_id"])]
            assert {k: v for k, v in r.items() if k != "gw_seq"} == {k: v for k, v in want.items() if k != "gw_seq"}
    # features from the Kafka records (online) equal features from the direct records in gw_seq order (offline)
    online, offline = NewsWindows("BTCUSDT"), NewsWindows("BTCUSDT")
    for r in by_symbol["BTCUSDT"]:
        online.add(r)
        offline.add(direct[("BTCUSDT", r["item_id"])])
    end = int(clock_s[0] * 1000)
    for k in range(0, 3600, 7):
        a, b = online.values(end - 3_600_000 + k * 1000), offline.values(end - 3_600_000 + k * 1000)
        assert [x.hex() for x in a.values()] == [x.hex() for x in b.values()]
    # dead letters: kind, reason naming the feed, the feed URL as their topic, the raw input kept
    kinds = sorted(serde.decode(m.value(), "DeadLetter")["error_kind"] for m in dead)
    assert kinds == ["huge_item", "huge_item", "malformed_xml", "missing_field"]
    for m in dead:
        d = serde.decode(m.value(), "DeadLetter")
        assert d["source"] in ("news.parse", "news.normalise") and d["payload"] and d["symbol"] is None
        assert d["reason"].startswith(("coindesk: ", "cointelegraph: "))


def test_news_cli_once_publishes_from_the_local_feeds(bootstrap, tmp_path):
    """``tickcast news --local --once`` in its own process: gw_seq restored from Kafka, one fetch
    per feed published, the seen set saved; a second run publishes nothing new."""
    serde = Serde()
    epoch = 1_500_000_000  # July 2017: story URLs no other test produces
    with LocalFeedServer(catalog=HeadlineCatalog(epoch_s=epoch, period_s=60), clock=lambda: epoch + 1800.0) as srv:
        env = {**os.environ, "KAFKA_BOOTSTRAP": bootstrap, "TICKCAST_NEWS_LOCAL_URL": srv.base_url,
               "TICKCAST_DATA_DIR": str(tmp_path), "TICKCAST_SYMBOLS": "BTCUSDT,ETHUSDT"}
        cmd = [sys.executable, "-m", "tickcast.cli", "news", "--local", "--once"]
        first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               check=False)
        assert first.returncode == 0, first.stderr[-3000:]
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               check=False)
        assert second.returncode == 0, second.stderr[-3000:]
        served = {s.url for f in srv.catalog.feeds for s in srv.catalog.items(f, epoch + 1800.0)}
    assert (tmp_path / "news" / "seen.json").exists()
    assert '"records":0' in second.stderr and '"items":0' in second.stderr  # the seen set survived the restart

    def mine(out):
        return [_rec(serde, m) for m in out if m.topic() == NEWS and "/2017/07/14/" in
                ((_rec(serde, m) or {}).get("url") or "")]

    recs = consume(bootstrap, lambda out: len(mine(out)) >= 2 * 25, timeout=10)
    recs = mine(recs)
    items = {r["item_id"] for r in recs}
    assert len(recs) == 2 * len(items) and {r["url"] for r in recs} <= served
    assert all(r["venue"].startswith("sim.news.") for r in recs)
    for sym in ("BTCUSDT", "ETHUSDT"):
        seqs = sorted(r["gw_seq"] for r in recs if r["symbol"] == sym)
        assert seqs == list(range(seqs[0], seqs[0] + len(items)))


def test_news_input_stops_on_the_gateway_stop_event(bootstrap, tmp_path):
    """How the gateway runs it: run_news_input(connector, publisher, symbols, stop=stop) returns
    promptly when stop is set, even while every feed is waiting for its next poll."""
    from connectors.news.publish import run_news_input
    from connectors.publisher import Publisher

    with LocalFeedServer(catalog=HeadlineCatalog(epoch_s=1_600_000_000, period_s=60),
                         clock=lambda: 1_600_000_000 + 3600.0) as srv:
        feeds = [FeedSpec("cryptonews", srv.url("cryptonews"), "sim.news.stoptest")]
        conn = NewsConnector(feeds, store=SeenStore(tmp_path / "seen.json"), scorer=VaderScorer(), poll_interval_s=60)
        pub = Publisher(bootstrap, next_seq={"BTCUSDT": 0})

        async def main():
            stop = asyncio.Event()

            async def housekeeping():
                while not stop.is_set():
                    pub.poll(0)
                    await asyncio.sleep(0.01)

            async def stopper():
                while not (tmp_path / "seen.json").exists():  # the first fetch was published and committed
                    await asyncio.sleep(0.02)
                stop.set()

            async with conn:
                t0 = time.monotonic()
                totals, *_ = await asyncio.wait_for(asyncio.gather(
                    run_news_input(conn, pub, ["BTCUSDT"], stop=stop), housekeeping(), stopper()), 20)
                return totals, time.monotonic() - t0

        totals, took = asyncio.run(main())
        assert pub.close(10) == 0
        gc.collect()
    assert totals["items"] >= 5 and totals["records"] == totals["items"] and took < 10
