"""The raw source's event-time merge when the broker's view of a topic lags (a partition heals and one
topic's backlog is fetched first). The consumer is a stand-in here because the race it models (a
stale cached high watermark) cannot be produced on demand against the real broker; the soak test
(`tests/test_soak.py`, broker partition fault) covers the same path end to end on tansu."""
from __future__ import annotations

import json

from flows.kafka_io import _RawPartition

BOOK, TRADE = "bybit.orderbook.raw", "bybit.trades.raw"


class _Msg:
    def __init__(self, topic: str, offset: int, rec: dict):
        self._t, self._o, self._v = topic, offset, json.dumps(rec).encode()

    def topic(self):
        return self._t

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return b"BTCUSDT"

    def error(self):
        return None


class _JsonSerde:
    def decode_any(self, raw: bytes):
        rec = json.loads(raw)
        return rec.pop("_name"), rec


class _Consumer:
    """Fetch responses scripted per consume() call; ``high`` is the broker's true high watermark and
    ``cached`` what the client last saw in a fetch response."""

    def __init__(self):
        self.script: list[list[_Msg]] = []
        self.high = {BOOK: 0, TRADE: 0}
        self.cached = {BOOK: 0, TRADE: 0}
        self.fail = False
        self.round_trips = 0

    def consume(self, n, timeout):
        return self.script.pop(0) if self.script else []

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        if cached:
            return 0, self.cached[tp.topic]
        self.round_trips += 1
        if self.fail:
            raise RuntimeError("KafkaError{code=_TRANSPORT}")
        return 0, self.high[tp.topic]

    def pause(self, tps):
        pass

    def resume(self, tps):
        pass

    def close(self):
        pass


NOW_US = 1_800_000_000_000_000  # the tests' wall clock (µs)


def _rec(name: str, ts: int, seq: int, recv_age_ms: int = 30_000) -> dict:
    """A record received by the gateway ``recv_age_ms`` before NOW_US (default: a backlog)."""
    return {"_name": name, "symbol": "BTCUSDT", "exchange_ts": ts, "gw_seq": seq,
            "recv_ts": NOW_US - recv_age_ms * 1000}


def _source() -> tuple[_RawPartition, _Consumer]:
    part = _RawPartition("127.0.0.1:1", (BOOK, TRADE), 0, None, 100, _JsonSerde(), False, 1_000, 50_000, 1_000)
    part.consumer.close()
    part.now_us = lambda: NOW_US
    fake = _Consumer()
    part.consumer = fake
    return part, fake


def _handed(batches) -> list[tuple[str, int]]:
    return [(name, rec["exchange_ts"]) for _, items in batches for name, rec in items]


def test_a_stale_watermark_after_a_partition_does_not_let_the_book_backlog_pass_the_trades():
    part, c = _source()
    t0 = 1_000_000
    # before the partition: one trade and one delta, both topics read to their end
    c.script.append([_Msg(TRADE, 0, _rec("Trade", t0, 1)), _Msg(BOOK, 0, _rec("OrderBookDelta", t0 + 1, 2))])
    c.high = {BOOK: 1, TRADE: 1}
    c.cached = dict(c.high)
    assert sorted(_handed(part.next_batch())) == [("OrderBookDelta", t0 + 1), ("Trade", t0)]
    # the partition heals: 6 s of deltas arrive first; 3 trades sent between them are on the broker,
    # but the client's cached trade watermark still says "read to the end"
    c.script.append([_Msg(BOOK, 1 + i, _rec("OrderBookDelta", t0 + 100 * (i + 1), 10 + 2 * i)) for i in range(60)])
    c.high = {BOOK: 61, TRADE: 4}
    c.cached = {BOOK: 61, TRADE: 1}
    before = []
    for _ in range(5):  # the trades' fetch is slow: the source keeps being polled meanwhile
        before += _handed(part.next_batch())
    # at most one confirmation step (1 s) plus the slack (1 s) past the last confirmed time passed
    assert before and max(ts for _, ts in before) <= t0 + 2_000, "the deltas ran ahead of the trades"
    # the trades are fetched: they pass before any delta more than the slack later than them
    trade_ts = [t0 + 2_000 * (i + 1) + 50 for i in range(3)]
    c.script.append([_Msg(TRADE, 1 + i, _rec("Trade", ts, 13 + 40 * i)) for i, ts in enumerate(trade_ts)])
    c.cached = dict(c.high)
    after = []
    for _ in range(10):
        batch = _handed(part.next_batch())
        for ts in trade_ts:  # every delta handed with or before a trade is within the slack of it
            if ("Trade", ts) in batch:
                assert max(t for _, t in before + after + batch) <= ts + 1_000
        after += batch
    assert len(before) + len(after) == 63 and part.snapshot() == {BOOK: 61, TRADE: 4}


def test_at_the_live_pace_there_is_no_round_trip():
    part, c = _source()
    t0 = 5_000_000
    for i in range(50):  # 5 s of live deltas, each just received; the trade topic idle
        c.script.append([_Msg(BOOK, i, _rec("OrderBookDelta", t0 + 100 * i, i, recv_age_ms=3))])
    for i in range(50):
        c.high[BOOK] = c.cached[BOOK] = i + 1
        assert _handed(part.next_batch()) == [("OrderBookDelta", t0 + 100 * i)]
    assert c.round_trips == 0


def test_a_backlog_confirms_once_per_second_of_exchange_time_not_per_batch():
    part, c = _source()
    t0 = 5_000_000
    for i in range(50):  # 5 s of deltas received long ago (a restart's catch-up); the trade topic idle
        c.script.append([_Msg(BOOK, i, _rec("OrderBookDelta", t0 + 100 * i, i))])
    for i in range(50):
        c.high[BOOK] = c.cached[BOOK] = i + 1
        assert _handed(part.next_batch()) == [("OrderBookDelta", t0 + 100 * i)]
    assert 4 <= c.round_trips <= 6  # one trade-topic query per ~1 s of exchange time


def test_a_failed_watermark_query_holds_the_hand_over_and_is_retried():
    part, c = _source()
    t0 = 9_000_000
    c.script.append([_Msg(TRADE, 0, _rec("Trade", t0, 1))])
    c.high = {BOOK: 0, TRADE: 1}
    c.cached = dict(c.high)
    assert _handed(part.next_batch()) == [("Trade", t0)]
    c.script.append([_Msg(BOOK, i, _rec("OrderBookDelta", t0 + 3_000 + 500 * i, 2 + i)) for i in range(10)])
    c.high = {BOOK: 10, TRADE: 1}
    c.cached = dict(c.high)
    c.fail = True
    held = _handed(part.next_batch())
    assert held == []  # the trade topic's state is unknown: wait
    c.fail = False
    rest = _handed(part.next_batch())
    for _ in range(10):
        rest += _handed(part.next_batch())
    assert len(held) + len(rest) == 10  # no deadlock: the retry confirmed the topic idle
