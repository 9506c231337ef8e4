"""The Delta replay source and the offline replay: gw_seq order, bounded files, period edges, and the
replay through build_flow equals the engine run on the same events, bit for bit."""
from __future__ import annotations

import pyarrow as pa

from flows.archive import BronzeWriter
from flows.engine import new_engine
from flows.lake import BRONZE, TABLE_OF_TOPIC, Lake, rows_to_arrow, with_meta
from flows.offline_replay import iter_vectors, read_vectors, replay, wide_m1
from flows.parity import ParityReport, compare, same_value
from flows.replay_source import find_start_seq, merged_events
from tests.synth import T0, SynthStream
from tickcast.topics import RAW_TOPIC_OF


def archive_events(lake: Lake, events, *, batch: int = 700, offsets=None):
    """Write events as the archive does: Kafka coordinates, micro-batches, sorted files."""
    lake.ensure_tables()
    offsets = {} if offsets is None else offsets
    items = []
    for name, rec in events:
        topic = RAW_TOPIC_OF[name]
        table = TABLE_OF_TOPIC[topic]
        o = offsets.get(topic, 0)
        offsets[topic] = o + 1
        items.append((table, with_meta(BRONZE[table], rec, topic=topic, partition=0, offset=o, kafka_ts=None,
                                       ingest="kafka")))
    w = BronzeWriter(lake)
    for i in range(0, len(items), batch):
        w.write(items[i:i + batch])
    return offsets


def replayed(lake, symbol, lo, hi, **kw):
    return [x for chunk in merged_events(lake, symbol, lo, hi, **kw) for x in chunk]


def features_of(events, symbol):
    return [r for k, r in new_engine(symbol).process(events) if k == "features"]


def strip(rec):
    return {k: v for k, v in rec.items() if k != "emit_ts"}


def test_source_yields_every_symbol_in_gw_seq_order_with_files_opened_lazily(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    btc = SynthStream("BTCUSDT", seed=5).run(60)
    eth = SynthStream("ETHUSDT", seed=6).run(60)
    # interleave symbols in arrival order, small micro-batches: many files per table
    archive_events(lake, sorted(btc + eth, key=lambda e: (e[1]["exchange_ts"], e[1]["symbol"])), batch=900)
    stats = {}
    got = replayed(lake, "BTCUSDT", T0 - 1, T0 + 10**7, stats=stats)
    assert got == btc  # exactly the records, exactly in gw_seq order
    assert replayed(lake, "ETHUSDT", T0 - 1, T0 + 10**7) == eth
    # starting at T0 starts at the book snapshot taken at T0 (the ticker before it is not needed)
    assert replayed(lake, "BTCUSDT", T0, T0 + 10**7) == btc[1:] and btc[1][0] == "OrderBookSnapshot"
    assert stats["files"] >= 20 and stats["max_open"] <= 6  # one open file per table at a time
    assert [r["gw_seq"] for _, r in got] == list(range(len(btc)))


def test_start_at_the_last_book_snapshot_and_stop_at_the_first_event_past_the_end(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    s = SynthStream("BTCUSDT", seed=7)
    s.run(30)
    s.snapshot()  # a resync snapshot at T0 + 30 s
    events = s.run(60)
    archive_events(lake, events)
    snap = next(r for n, r in events if n == "OrderBookSnapshot" and r["exchange_ts"] > T0)
    seq, ts = find_start_seq(lake, "BTCUSDT", T0 + 45_000)
    assert (seq, ts) == (snap["gw_seq"], snap["exchange_ts"])
    got = replayed(lake, "BTCUSDT", T0 + 45_000, T0 + 50_000)
    assert got[0] == ("OrderBookSnapshot", snap)
    assert all(r["exchange_ts"] < T0 + 50_000 for _, r in got)
    expect = [e for e in events if e[1]["gw_seq"] >= snap["gw_seq"]]
    cut = next(i for i, e in enumerate(expect) if e[1]["exchange_ts"] >= T0 + 50_000)
    assert got == expect[:cut]  # cut by order: no hole in gw_seq
    # without a snapshot in the lookback, the first event at or after the start
    seq2, _ = find_start_seq(lake, "BTCUSDT", T0 + 45_000, book_lookback_ms=1_000)
    assert seq2 == min(r["gw_seq"] for _, r in events if r["exchange_ts"] >= T0 + 45_000)
    assert replayed(lake, "NOPE", T0, T0 + 10**7) == []


def test_historical_rows_are_skipped_and_unsorted_files_still_replay_in_order(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    events = SynthStream("BTCUSDT", seed=8).run(20)
    archive_events(lake, events)
    # a historical kline (gw_seq -1) for a minute inside the stream
    t = BRONZE["raw_kline"]
    hist = {"symbol": "BTCUSDT", "venue": "bybit.linear.csv", "exchange_ts": T0 + 59_999, "recv_ts": 0,
            "gw_seq": -1, "interval": "1", "start_ts": T0, "end_ts": T0 + 59_999, "open": "1", "high": "1",
            "low": "1", "close": "1", "volume": "1", "turnover": None, "confirm": True}
    lake.append("raw_kline", rows_to_arrow(t, [with_meta(t, hist, topic=None, partition=None, offset=None,
                                                         kafka_ts=None, ingest="history:test")]))
    # more trades written by some other writer in reverse gw_seq order (not sorted)
    s2 = SynthStream("BTCUSDT", seed=8)
    s2.seq = len(events)
    s2.ts = events[-1][1]["exchange_ts"]
    s2.out = [("x", {})]  # skip its opening snapshot
    extra = [(n, r) for n, r in s2.run(2)[1:] if n == "Trade"]
    for i, (_, r) in enumerate(extra):
        r["gw_seq"] = len(events) + i
    tt = BRONZE["raw_trades"]
    rows = [with_meta(tt, r, topic="market.trades", partition=0, offset=10_000 + i, kafka_ts=None, ingest="kafka")
            for i, (_, r) in enumerate(reversed(extra))]
    lake.append("raw_trades", pa.Table.from_pylist(rows, schema=tt.arrow))  # bypasses the sort
    got = replayed(lake, "BTCUSDT", T0 - 1, T0 + 10**7)
    assert got == events + extra
    assert all(r["gw_seq"] >= 0 for _, r in got)


def test_replay_through_build_flow_equals_the_engine_and_pinned_versions_time_travel(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    btc = SynthStream("BTCUSDT", seed=11).run(100)
    eth = SynthStream("ETHUSDT", seed=12).run(100)
    offsets = archive_events(lake, btc + eth)
    versions = lake.versions()
    lo, hi = T0 + 20_000, T0 + 90_000
    rep = replay(lake, ["BTCUSDT", "ETHUSDT"], lo, hi, tmp_path / "out", progress=False)
    assert rep["events"] == len(btc) + len(eth)  # warm-up reaches the start of the archive
    got = {(r["symbol"], r["cadence"], r["window_end"]): r for r in iter_vectors(tmp_path / "out")}
    ref = {}
    for sym, evs in (("BTCUSDT", btc), ("ETHUSDT", eth)):
        for r in features_of(evs, sym):
            if lo < r["window_end"] <= hi:
                ref[(sym, r["cadence"], r["window_end"])] = strip(r)
    assert set(got) == set(ref) and len(ref) > 150
    rpt = compare(ref, got, ParityReport((lo, hi), ["BTCUSDT", "ETHUSDT"]))
    print(f"replay vs engine: {rpt.values_compared} values compared, {rpt.value_mismatches} mismatches")
    assert rpt.ok and rpt.values_compared > 3_000 and rpt.value_mismatches == 0
    assert {c for _, c, _ in got} == {"s1", "s3", "s15", "m1"}
    # later data does not change a replay pinned to the earlier versions
    more = SynthStream("BTCUSDT", seed=99)
    more.seq, more.ts = len(btc), btc[-1][1]["exchange_ts"] + 1
    more.out = [("x", {})]
    archive_events(lake, more.run(20)[1:], offsets=offsets)
    rep2 = replay(lake, ["BTCUSDT", "ETHUSDT"], lo, hi, tmp_path / "out2", versions=versions, progress=False)
    assert rep2["events"] == rep["events"] and rep2["raw_table_versions"] == versions
    m1 = read_vectors(tmp_path / "out2", "m1", symbols=["BTCUSDT"])
    names = [c[2:] for c in m1.column_names if c.startswith("f.")]
    wide = wide_m1(m1, names + ["no_such_feature"])
    assert wide.column("no_such_feature").null_count == wide.num_rows
    assert wide.num_rows == m1.num_rows and wide.column("window_end").to_pylist() == sorted(
        k[2] for k in ref if k[0] == "BTCUSDT" and k[1] == "m1")


def test_parity_comparison_is_bitwise():
    assert same_value(0.1 + 0.2, 0.30000000000000004) and not same_value(0.0, -0.0)
    assert same_value(None, None) and not same_value(None, 0.0)
    assert same_value(float("nan"), float("nan"))
    base = {"values": {"a": 1.0, "b": None}, "nulls": {"b": "no book"}, "book_valid": True, "event_count": 3,
            "last_gw_seq": 9, "close_recv_ts": 1, "registry_hash": "h", "venue": "v"}
    other = {**base, "values": {"a": 1.0000000000000002, "b": None}, "event_count": 4}
    r = compare({("S", "s1", 1): base, ("S", "s1", 2): base}, {("S", "s1", 1): other, ("S", "s3", 3): base},
                ParityReport((0, 5), ["S"]))
    assert (r.values_compared, r.value_mismatches, r.only_online, r.only_offline) == (2, 1, 1, 1)
    assert r.mismatches_by_feature == {"a": 1} and r.meta_mismatches == {"event_count": 1} and not r.ok
    assert "PARITY FAILED" in r.text() and "a" in r.text()
