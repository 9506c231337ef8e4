"""Connectors under hostile or unlucky input: each test reproduces one bug found in a review
(unhashable topics, comma or non-ASCII digits in decimals, integers beyond Avro's ranges, oversized
dead letters, huge mempool numbers, a blocked REST API, gw_seq restore of a long-absent symbol).

No broker is needed: the gateway is built against an unreachable bootstrap (librdkafka only queues)
or with a stub publisher.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from connectors.avro_fast import FastEncoder
from connectors.bybit.parse import BybitParser, ParseError
from connectors.gateway import Gateway, GatewayConfig
from connectors.mempool import AlchemyPendingFeed, MempoolSpaceFeed
from connectors.publisher import Publisher
from connectors.rest import BybitRest
from tickcast.serde import EncodeError, Serde

DEAD_BOOTSTRAP = "127.0.0.1:9"  # nothing listens: the producer only queues
DEAD_WS = "ws://127.0.0.1:9/v5/public/linear"
SERDE = Serde()


class StubPublisher:
    """Stands in for connectors.publisher.Publisher (same call signatures)."""

    def __init__(self, *_a, **_k):
        self.published: list[tuple[str, dict]] = []
        self.dead: list[tuple[str, str, str]] = []
        self.accepted: dict[str, int] = {}
        self.next_seq: dict[str, int] = {}
        self.buffered = 0

    def publish(self, name, rec):
        self.published.append((name, rec))
        return True

    def dead_letter(self, source, kind, reason, payload, *, topic=None, symbol=None):
        self.dead.append((source, kind, reason))

    def poll(self, timeout=0.0):
        return 0

    def close(self, timeout=10.0):
        return 0

    def counts(self):
        return {}


@pytest.fixture
def stub_gateway(monkeypatch):
    monkeypatch.setattr("connectors.gateway.Publisher", StubPublisher)

    def make(**kw):
        cfg = dict(symbols=["BTCUSDT"], ws_url=DEAD_WS, control=False, backoff_base_s=0.05, backoff_max_s=0.2)
        cfg.update(kw.pop("config", {}))
        return Gateway(GatewayConfig(**cfg), DEAD_BOOTSTRAP, **kw)
    return make


def _book(price: str) -> str:
    return json.dumps({"topic": "orderbook.50.BTCUSDT", "type": "snapshot", "ts": 1786310816516,
                       "data": {"s": "BTCUSDT", "b": [[price, "1.5"]], "a": [["65001.0", "2"]], "u": 7, "seq": 9},
                       "cts": 1786310816510})


# --- 1. a data message whose topic is a JSON array/object crashes on_message ------------------------

@pytest.mark.parametrize("topic", [["orderbook.50.BTCUSDT"], {"x": 1}])
def test_unhashable_topic_is_a_dead_letter_not_a_crash(stub_gateway, topic):
    gw = stub_gateway()
    raw = json.dumps({"topic": topic, "type": "snapshot", "ts": 1, "data": {}})
    gw.on_message(raw, 1)  # raises TypeError: unhashable type (the transport then aborts the socket)
    assert [d[1] for d in gw.publisher.dead] == ["wrong_type"]


# --- 2. order-book level validation lets invalid decimals through ----------------------------------

@pytest.mark.parametrize("price", ["65000,5", "1,2,3"])
def test_book_price_containing_a_comma_is_rejected(price):
    # check_decimal("65000,5") raises, but levels() validates the comma-joined side in one regex,
    # so a comma inside one value looks like a separator and the value passes
    p = BybitParser("bybit.linear", ["BTCUSDT"])
    with pytest.raises(ParseError):
        p.events(json.loads(_book(price)), 1)


@pytest.mark.parametrize("price", ["\u0666\u0665\u0660\u0660\u0660", "\uff16\uff15\uff10\uff10\uff10"])
def test_non_ascii_digits_are_not_plain_decimals(price):
    # _DEC uses \d, which matches every Unicode decimal digit (Arabic-Indic, full-width, ...)
    p = BybitParser("bybit.linear", ["BTCUSDT"])
    with pytest.raises(ParseError):
        p.events(json.loads(_book(price)), 1)


# --- 3. the fast Avro encoder silently encodes integers the reference codec refuses ----------------

TRADE = {"symbol": "BTCUSDT", "venue": "bybit.linear", "exchange_ts": 1, "recv_ts": 1, "gw_seq": 0, "trade_ts": 1,
         "trade_id": "1", "side": "Buy", "price": "1", "size": "1", "tick_direction": None, "block_trade": False,
         "rpi": None, "cross_seq": None}


@pytest.mark.parametrize("value", [2 ** 63, 2 ** 64 - 1, -(2 ** 63) - 1, 2 ** 70])
def test_fast_encoder_refuses_longs_outside_int64_like_the_reference(value):
    rec = dict(TRADE, trade_ts=value)
    with pytest.raises(EncodeError):
        SERDE.encode("Trade", dict(rec))  # the reference refuses
    with pytest.raises(EncodeError):
        FastEncoder(SERDE).encode("Trade", dict(rec))  # the fast path writes a varint that decodes to garbage


def test_fast_encoder_refuses_int_fields_outside_int32_like_the_reference():
    rec = {"symbol": "BTCUSDT", "venue": "bybit.linear", "exchange_ts": 1, "recv_ts": 1, "gw_seq": 0,
           "kind": "ticker", "funding_rate": "0.0001", "next_funding_time": 1, "funding_interval_hour": 2 ** 31}
    with pytest.raises(EncodeError):
        SERDE.encode("Funding", dict(rec))
    with pytest.raises(EncodeError):
        FastEncoder(SERDE).encode("Funding", dict(rec))


def test_huge_next_funding_time_is_not_published_as_a_different_number():
    """End to end through parser + publisher: a ticker whose nextFundingTime does not fit a long must
    be a dead letter; today it is published and decodes as 0."""
    p = BybitParser("bybit.linear", ["BTCUSDT"])
    msg = {"topic": "tickers.BTCUSDT", "type": "snapshot", "ts": 1786310816516, "cs": 1,
           "data": {"symbol": "BTCUSDT", "fundingRate": "0.0001", "nextFundingTime": "18446744073709551617"}}
    try:
        events = p.events(msg, 1)
    except ParseError:
        return  # rejected at parse time: fine
    pub = Publisher(DEAD_BOOTSTRAP)
    try:
        for name, rec in events:
            pub.publish(name, rec)
        assert pub.dead_letters.get("schema_violation", 0) == len(events), \
            "out-of-range nextFundingTime was encoded instead of dead-lettered"
    finally:
        pub.producer.purge()
        pub.close(0)


# --- 4. an oversized bad message: the dead letter itself raises out of on_message ------------------

def test_oversized_malformed_frame_is_dead_lettered_not_a_crash():
    gw = Gateway(GatewayConfig(symbols=["BTCUSDT"], ws_url=DEAD_WS, control=False), DEAD_BOOTSTRAP)
    try:
        raw = '{"topic":"publicTrade.BTCUSDT","data":"' + "x" * 1_100_000  # truncated JSON, 1.1 MB
        gw.on_message(raw, 1)  # dead_letter -> produce() raises KafkaException(MSG_SIZE_TOO_LARGE)
        assert gw.publisher.dead_letters.get("malformed_json") == 1
    finally:
        gw.publisher.producer.purge()
        gw.publisher.close(0)


# --- 5. mempool feeds: huge numbers escape as OverflowError instead of a dead letter ---------------

class Sink:
    def __init__(self):
        self.records, self.dead = [], []

    def publish(self, name, rec):
        self.records.append((name, rec))
        return True

    def dead_letter(self, source, kind, reason, payload, *, topic=None, symbol=None):
        self.dead.append(kind)


def test_mempool_huge_integer_is_a_dead_letter_not_an_exception():
    sink = Sink()
    feed = MempoolSpaceFeed("http://127.0.0.1:9", "BTC", ["BTCUSDT"], "mempool.space", sink.publish,
                            sink.dead_letter)
    feed.handle_ws('{"mempoolInfo": {"size": 1' + "0" * 400 + ', "bytes": 1}}')  # OverflowError escapes
    assert sink.dead and not sink.records


def test_alchemy_huge_gas_price_is_a_dead_letter_not_an_exception():
    sink = Sink()
    feed = AlchemyPendingFeed("wss://x/key", "ETH", ["ETHUSDT"], sink.publish, sink.dead_letter,
                              clock=lambda: 1000.0)
    tx = {"hash": "0x1", "value": "0x0", "gasPrice": "0x" + "f" * 300}
    feed.handle(json.dumps({"jsonrpc": "2.0", "method": "eth_subscription",
                            "params": {"subscription": "0xa", "result": tx}}), now=1000.0)
    assert sink.dead


# --- 6. a blocked REST API (HTTP 403) holds the live stream and the resync path for minutes --------

def _rest_403() -> BybitRest:
    rest = BybitRest("http://bybit.invalid")
    rest.http = httpx.AsyncClient(base_url="http://bybit.invalid", transport=httpx.MockTransport(
        lambda req: httpx.Response(403, text="403 Forbidden")))
    return rest


def test_a_blocked_rest_holds_the_live_stream_for_one_history_budget_and_stop_ends_it(stub_gateway):
    """HTTP 403 on every REST call (retried with 30-60 s back-off): the start-up history shares one
    budget over every symbol (it is published before the live data so that gw_seq puts the candles
    first), then the WebSocket starts; and stop ends the history wait at once."""
    async def started_after(budget_s: float) -> float:
        gw = stub_gateway(rest=_rest_403(), config={"symbols": ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"],
                                                     "history_budget_s": budget_s})
        stop = asyncio.Event()
        t0 = time.monotonic()
        task = asyncio.create_task(gw.run(stop))
        while not any(kind == "connect_failed" for kind, _, _ in gw.events) and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        waited = time.monotonic() - t0
        stop.set()
        await asyncio.wait_for(task, 3.0)
        await gw.rest.aclose()
        return waited

    async def stop_during_history() -> float:
        gw = stub_gateway(rest=_rest_403(), config={"history_budget_s": 60.0})
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 3.0)
        await gw.rest.aclose()
        return time.monotonic() - t0

    assert 0.9 < asyncio.run(started_after(1.0)) < 3.0  # one budget, not 4 x 20 s
    assert asyncio.run(stop_during_history()) < 2.0


def test_rest_resync_falls_back_promptly_when_rest_is_blocked(stub_gateway):
    """resync='rest': a 403 makes rest.orderbook() retry 5 times with 30-60 s waits, with no timeout;
    the control loop awaits it, so every resync request behind it waits minutes too."""
    async def main():
        gw = stub_gateway(rest=_rest_403(), config={"resync": "rest", "resync_rest_timeout_s": 1.0})
        try:
            return await asyncio.wait_for(gw.resync("BTCUSDT", "test"), 5.0)
        except TimeoutError:
            return "timed out"
        finally:
            await gw.rest.aclose()

    assert asyncio.run(main()) in ("resubscribed", "offline")


# --- 7. gw_seq restore: a symbol not seen in the scanned tail restarts at 0 -----------------------

def test_restore_does_not_restart_a_symbol_at_zero_when_its_records_are_beyond_the_scan(bootstrap):
    """restore_next_seq stops after max_scan records per partition; a symbol whose last record is
    older than that (e.g. unfollowed for a while, then followed again; or a quiet symbol sharing a
    partition with busy ones) gets next_seq 0 with only a warning, so its gw_seq values repeat.
    The docstring: 'the gateway must not guess a sequence'."""
    from connectors.publisher import partition_of, restore_next_seq
    from tickcast.topics import HEARTBEAT, TOPICS

    nparts = next(t.partitions for t in TOPICS if t.name == HEARTBEAT)
    tag = int(time.time() * 1000) % 10_000_000
    quiet = f"AUDQ{tag}USDT"
    busy = next(s for s in (f"AUDB{tag}{i}USDT" for i in range(1000))
                if partition_of(s, nparts) == partition_of(quiet, nparts))
    pub = Publisher(bootstrap)
    try:
        for sym, n in ((quiet, 5), (busy, 60)):
            for _ in range(n):
                pub.publish("Heartbeat", {"symbol": sym, "venue": "audit", "exchange_ts": 1, "recv_ts": 1,
                                          "gw_seq": -1})
        assert pub.flush(20) == 0
    finally:
        pub.close(5)
    got = restore_next_seq(bootstrap, [quiet, busy], SERDE, topics=[HEARTBEAT], max_scan=20, chunk=10)
    assert got[busy] == 60
    assert got[quiet] == 5, f"quiet symbol restarts at {got[quiet]}: gw_seq 0..4 would be published again"


def test_a_parser_bug_is_a_dead_letter_and_the_connection_lives(stub_gateway, monkeypatch):
    gw = stub_gateway()

    def broken(msg, recv_ts):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(gw.parser, "events", broken)
    gw.on_message(_book("65000.5"), 1)  # must not raise into the transport
    assert [d[1] for d in gw.publisher.dead] == ["internal_error"]


def test_only_an_unknown_topic_is_given_up_for_good():
    """A refusal drops a topic for good only when it names the topic as unknown ("handler not found");
    "already subscribed" loses nothing, and a reason that names no topic (a rate limit) retries the
    request later instead of silently unsubscribing healthy topics."""
    from connectors.bybit.ws import BybitConnection

    async def main():
        topics = ["orderbook.50.BTCUSDT", "publicTrade.BTCUSDT", "tickers.NOPEUSDT"]
        conn = BybitConnection(DEAD_WS, topics, lambda *a: None)
        sent: list[list[str]] = []

        class WS:
            async def send(self, text):
                sent.append(json.loads(text).get("args", []))

        conn.ws = WS()

        async def refuse(args, ret_msg):
            req = await conn.send_op("subscribe", args)
            return conn.rejected({"success": False, "ret_msg": ret_msg, "op": "subscribe", "req_id": req})

        assert await refuse(["publicTrade.BTCUSDT"], "error:already subscribed,topic:publicTrade.BTCUSDT") == []
        assert await refuse(["orderbook.50.BTCUSDT"], "too many visits") == []
        assert await refuse(topics[1:], "error:handler not found,topic:tickers.NOPEUSDT") == ["tickers.NOPEUSDT"]
        ok = await conn.send_op("subscribe", ["orderbook.50.BTCUSDT"])
        conn.acknowledged({"success": True, "req_id": ok})
        await asyncio.sleep(0.05)
        return conn.topics, conn._requests, sent

    topics, pending, sent = asyncio.run(main())
    assert topics == ["orderbook.50.BTCUSDT", "publicTrade.BTCUSDT"]  # only the unknown one is gone
    assert ["publicTrade.BTCUSDT"] in sent[4:]  # the rest of the refused request, subscribed again
    # answered requests are not kept: only the retry of the rest still waits for its answer
    assert list(pending.values()) == [("subscribe", ["publicTrade.BTCUSDT"])]


def test_rest_403_backs_off_for_minutes_and_kline_limit_is_bounded():
    import random

    rest = BybitRest("http://bybit.invalid", rng=random.Random(1))
    try:
        delays = [rest._delay(attempt, 403) for attempt in range(6)]
        assert min(delays) >= 30 and max(delays) > 60  # grows past a minute ("back off for minutes")
        assert max(delays) <= 300
        with pytest.raises(ValueError, match="1..1000"):
            asyncio.run(rest.klines("BTCUSDT", 0, 60_000, limit=1001))
    finally:
        asyncio.run(rest.aclose())


def test_a_fresh_book_snapshot_is_asked_for_at_least_every_snapshot_every_s(stub_gateway):
    """Bybit sends a snapshot only on subscribe; the replay looks back a day for one: the gateway
    asks for a fresh one (a resync) whenever a symbol's last snapshot is older than the interval."""
    gw = stub_gateway(config={"snapshot_every_s": 100.0})
    gw.on_message(_book("65000.5"), 1)
    t = gw.snapshot_at["BTCUSDT"]
    assert gw.snapshots_due(t + 50) == []
    assert gw.snapshots_due(t + 100) == ["BTCUSDT"]
    assert gw.snapshots_due(t + 150) == []  # asked once, not at every tick until it arrives
    assert gw.snapshots_due(t + 200) == ["BTCUSDT"]  # no snapshot came: ask again one interval later


def test_a_rejected_mempool_push_changes_nothing():
    """mempoolInfo valid, fees invalid: the push is a dead letter, and the mempool counts it carried
    must not be published by the next good push as if they had been accepted."""
    sink = Sink()
    feed = MempoolSpaceFeed("http://127.0.0.1:9", "BTC", ["BTCUSDT"], "mempool.space", sink.publish,
                            sink.dead_letter)
    feed.handle_ws('{"mempoolInfo": {"size": 100, "bytes": 5000}}')
    before = (feed.state.tx_count, feed.state.vsize)
    feed.handle_ws('{"mempoolInfo": {"size": 999999, "bytes": 1}, "fees": {"fastestFee": -3}}')
    assert sink.dead and (feed.state.tx_count, feed.state.vsize) == before
