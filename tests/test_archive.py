"""The bronze archive: real broker, real Delta tables, restarts without duplicates or loss."""
from __future__ import annotations

import uuid

import pyarrow.compute as pc
import pytest

from flows.archive import ArchiveConfig, BronzeWriter, RawMessage, decode_message, run_archive
from flows.lake import BRONZE, DEAD_LETTER_TABLE, Lake, batch_to_records
from tickcast.serde import Serde
from tickcast.topics import TopicSpec, ensure_topics

SERDE = Serde()
DAY = 86_400_000
T0 = 1_786_310_816_516  # 2026-08-09 21:26:56.516 UTC


def trade(sym: str, seq: int, ts: int) -> dict:
    return {"symbol": sym, "venue": "bybit.linear", "exchange_ts": ts, "recv_ts": ts * 1000 + 123,
            "gw_seq": seq, "trade_ts": ts - 1, "trade_id": f"t-{sym}-{seq}", "side": "Buy" if seq % 2 else "Sell",
            "price": "104217.50", "size": f"0.{seq:03d}0", "tick_direction": "PlusTick", "block_trade": False,
            "rpi": None, "cross_seq": seq * 10}


def delta(sym: str, seq: int, ts: int) -> dict:
    return {"symbol": sym, "venue": "bybit.linear", "exchange_ts": ts, "recv_ts": ts * 1000 + 7, "gw_seq": seq,
            "depth": 50, "update_id": 1000 + seq, "cross_seq": 5000 + seq, "match_ts": ts - 2,
            "bid_px": ["104217.5", "104217.4"], "bid_sz": ["0.100", "0"], "ask_px": ["104217.60"],
            "ask_sz": ["1.25e-3"]}


@pytest.fixture()
def topics(bootstrap):
    """Fresh topics for this test (the session broker is shared): trades, deltas, dead letters."""
    tag = uuid.uuid4().hex[:8]
    mapping = {f"t{tag}.market.trades": "raw_trades", f"t{tag}.market.orderbook.delta": "raw_orderbook_deltas",
               f"t{tag}.tickcast.deadletter": DEAD_LETTER_TABLE}
    schemas = {"raw_trades": "Trade", "raw_orderbook_deltas": "OrderBookDelta", DEAD_LETTER_TABLE: "DeadLetter"}
    ensure_topics(bootstrap, tuple(TopicSpec(t, (schemas[tb],), partitions=1 if tb == DEAD_LETTER_TABLE else 2)
                                   for t, tb in mapping.items()))
    return mapping


def produce(bootstrap, items):
    from confluent_kafka import Producer

    from tickcast.kafka import producer_config

    p = Producer(producer_config(bootstrap))
    for topic, key, value in items:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def topic_of(mapping, table):
    return next(t for t, tb in mapping.items() if tb == table)


def archive(bootstrap, lake, mapping, **kw):
    cfg = ArchiveConfig(bootstrap=bootstrap, lake=lake, topics=mapping, stop_at_end=True, batch_seconds=0.5,
                        serde=SERDE, **kw)
    run_archive(cfg)


def all_rows(lake, table):
    dt = lake.table(table)
    return dt.to_pyarrow_table() if dt is not None else None


def test_decode_message_every_case():
    mapping = {"market.trades": "raw_trades", "tickcast.deadletter": DEAD_LETTER_TABLE}
    rec = trade("BTCUSDT", 7, T0)
    ok = RawMessage("market.trades", 3, 41, b"BTCUSDT", SERDE.encode("Trade", rec), 1_786_310_816_600)
    table, row = decode_message(SERDE, mapping, ok)
    assert table == "raw_trades"
    assert {k: row[k] for k in rec} == rec  # the record's fields untouched
    assert (row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]) == ("market.trades", 3, 41)
    assert row["date"] == "2026-08-09" and row["ingest"] == "kafka"

    cases = {
        b"\x00\x01garbage": "unknown_schema",
        b"{\"json\": 1}": "malformed_payload",
        SERDE.encode("Trade", rec)[:-3]: "malformed_payload",
        SERDE.encode("Heartbeat", {"symbol": "BTCUSDT", "venue": "x", "exchange_ts": 1, "recv_ts": 2, "gw_seq": 3}):
            "schema_mismatch",
        None: "empty_payload",
    }
    for value, kind in cases.items():
        msg = RawMessage("market.trades", 1, 9, b"BTCUSDT", value, 1_786_310_816_600)
        table, row = decode_message(SERDE, mapping, msg)
        assert table == DEAD_LETTER_TABLE, kind
        assert row["error_kind"] == kind and row["reason"]
        assert row["payload"] == (value or b"") and row["symbol"] == "BTCUSDT"
        assert row["ts"] == 1_786_310_816_600_000 and row["source"] == "archive.decode"
        assert (row["kafka_topic"], row["kafka_offset"]) == ("market.trades", 9)
    # a key that is not a symbol is not invented into one
    _, row = decode_message(SERDE, mapping, RawMessage("market.trades", 1, 9, b"\xff\xfe", b"x", None))
    assert row["symbol"] is None and row["date"] >= "2025-01-01"
    # a dead letter published by the gateway is archived as itself
    dl = {"source": "gateway.bybit.parse", "topic": "orderbook.50.BTCUSDT", "symbol": "BTCUSDT",
          "error_kind": "malformed_json", "reason": "Expecting value", "payload": b"{oops", "ts": T0 * 1000}
    table, row = decode_message(SERDE, mapping, RawMessage("tickcast.deadletter", 0, 5, b"BTCUSDT",
                                                           SERDE.encode("DeadLetter", dl), T0))
    assert table == DEAD_LETTER_TABLE and {k: row[k] for k in dl} == dl


def test_archive_exact_rows_restart_no_duplicates_no_loss(bootstrap, topics, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    t_trades, t_deltas = topic_of(topics, "raw_trades"), topic_of(topics, "raw_orderbook_deltas")
    t_dlq = topic_of(topics, DEAD_LETTER_TABLE)
    sent = {"raw_trades": [], "raw_orderbook_deltas": []}
    items = []
    for i in range(120):  # two symbols over two days
        for sym in ("BTCUSDT", "ETHUSDT"):
            ts = T0 + i * 1_000 + (DAY if i >= 60 else 0)
            tr, de = trade(sym, 2 * i, ts), delta(sym, 2 * i + 1, ts)
            sent["raw_trades"].append(tr)
            sent["raw_orderbook_deltas"].append(de)
            items += [(t_trades, sym.encode(), SERDE.encode("Trade", tr)),
                      (t_deltas, sym.encode(), SERDE.encode("OrderBookDelta", de))]
    items.append((t_trades, b"BTCUSDT", b"\x00\x00\x00\x00\x01not avro"))
    produce(bootstrap, items)
    archive(bootstrap, lake, topics)

    for table, records in sent.items():
        at = all_rows(lake, table)
        got = sorted(batch_to_records(BRONZE[table], at), key=lambda r: (r["symbol"], r["gw_seq"]))
        assert got == sorted(records, key=lambda r: (r["symbol"], r["gw_seq"]))  # exact values, no loss
        assert set(at.column("date").to_pylist()) == {"2026-08-09", "2026-08-10"}
        keys = list(zip(at.column("kafka_topic").to_pylist(), at.column("kafka_partition").to_pylist(),
                        at.column("kafka_offset").to_pylist()))
        assert len(keys) == len(set(keys))
        parts = {p["symbol"] for p in lake.table(table).partitions()}
        assert parts == {"BTCUSDT", "ETHUSDT"}
    dl = all_rows(lake, DEAD_LETTER_TABLE)
    assert dl.num_rows == 1 and dl.column("error_kind")[0].as_py() == "unknown_schema"
    assert dl.column("payload")[0].as_py() == b"\x00\x00\x00\x00\x01not avro"

    # restart with nothing new: no commit at all
    versions = lake.versions()
    archive(bootstrap, lake, topics)
    assert lake.versions() == versions

    # more data (and a dead letter from the gateway) after the restart: appended once
    more = [trade("BTCUSDT", 1000 + i, T0 + DAY + 200_000 + i) for i in range(30)]
    dl_rec = {"source": "gateway.bybit.parse", "topic": "publicTrade.BTCUSDT", "symbol": "BTCUSDT",
              "error_kind": "malformed_json", "reason": "bad", "payload": b"{", "ts": T0 * 1000}
    produce(bootstrap, [(t_trades, b"BTCUSDT", SERDE.encode("Trade", r)) for r in more]
            + [(t_dlq, b"BTCUSDT", SERDE.encode("DeadLetter", dl_rec))])
    archive(bootstrap, lake, topics)
    at = all_rows(lake, "raw_trades")
    assert at.num_rows == 240 + 30
    keys = list(zip(at.column("kafka_partition").to_pylist(), at.column("kafka_offset").to_pylist()))
    assert len(keys) == len(set(keys))
    dl = all_rows(lake, DEAD_LETTER_TABLE)
    assert dl.num_rows == 2
    assert sorted(dl.column("source").to_pylist()) == ["archive.decode", "gateway.bybit.parse"]


class CrashingLake(Lake):
    """A lake whose process dies after N commits (the exception aborts the dataflow like a kill)."""

    def __init__(self, root, crash_after):
        super().__init__(root)
        self.crash_after = crash_after
        self.commits = 0

    def append(self, table, data, **kw):
        if self.commits >= self.crash_after:
            raise RuntimeError(f"simulated crash before committing {table}")
        self.commits += 1
        return super().append(table, data, **kw)


def test_crash_between_the_commits_of_a_micro_batch(bootstrap, topics, tmp_path):
    root = str(tmp_path / "lake")
    t_trades = topic_of(topics, "raw_trades")
    recs = [trade("LTCUSDT", i, T0 + i) for i in range(50)]
    items = [(t_trades, b"LTCUSDT", SERDE.encode("Trade", r)) for r in recs[:25]]
    items.insert(10, (t_trades, b"LTCUSDT", b"garbage-1"))
    items += [(t_trades, b"LTCUSDT", b"garbage-2")]
    items += [(t_trades, b"LTCUSDT", SERDE.encode("Trade", r)) for r in recs[25:]]
    produce(bootstrap, items)
    # the dead letters are committed, then the process dies before the trades' commit
    crashing = CrashingLake(root, crash_after=1)
    with pytest.raises(Exception, match="error writing output batch"):
        archive(bootstrap, crashing, topics, batch_max_rows=10_000)
    assert crashing.commits == 1
    lake = Lake(root)
    assert all_rows(lake, DEAD_LETTER_TABLE).num_rows == 2
    assert all_rows(lake, "raw_trades").num_rows == 0
    archive(bootstrap, lake, topics)
    assert all_rows(lake, DEAD_LETTER_TABLE).num_rows == 2  # not archived twice
    got = batch_to_records(BRONZE["raw_trades"], all_rows(lake, "raw_trades"))
    assert sorted(got, key=lambda r: r["gw_seq"]) == recs  # nothing lost


def test_writer_skips_offsets_a_table_already_committed(tmp_path):
    """Re-delivered rows (a resumed epoch, an overlapping start) are dropped per table and partition."""
    from flows.lake import with_meta

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables()
    t = BRONZE["raw_trades"]
    rows = [("raw_trades", with_meta(t, trade("BTCUSDT", i, T0 + i), topic="market.trades", partition=0,
                                     offset=i, kafka_ts=T0, ingest="kafka")) for i in range(10)]
    w = BronzeWriter(lake)
    assert w.write(rows[:6]) == {"raw_trades": 6}
    w2 = BronzeWriter(lake)  # a restarted process
    assert w2.write(rows[3:]) == {"raw_trades": 4}
    assert w2.counts["skipped_duplicates"] == 3
    at = all_rows(lake, "raw_trades")
    assert sorted(at.column("kafka_offset").to_pylist()) == list(range(10))
    assert lake.committed_offset("raw_trades", "market.trades", 0) == 9
    assert lake.committed_offset("raw_trades", "market.trades", 1) is None
    # the rows of one file are in gw_seq order (what the replay merges on)
    assert pc.all(pc.equal(at.column("gw_seq"), at.column("kafka_offset"))).as_py()


def test_micro_batches_close_by_time_while_rows_keep_coming():
    """A steady stream (a row every 50 ms, never a quiet gap) must be written every ``batch_seconds``,
    not only when ``batch_max_rows`` fill up (Bytewax's op.collect restarts its timeout on every item,
    so a live archive used to commit only every 50,000 rows)."""
    import time
    from datetime import timedelta

    from bytewax import operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import DynamicSource, StatelessSourcePartition
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import run_main

    from flows.archive import micro_batch

    class Steady(StatelessSourcePartition):
        def __init__(self):
            self.n = 0

        def next_batch(self):
            if self.n >= 40:
                raise StopIteration()
            time.sleep(0.05)
            self.n += 1
            return [("k", (self.n, time.monotonic()))]

    class Src(DynamicSource):
        def build(self, step_id, worker_index, worker_count):
            return Steady()

    batches = []

    class Sink(DynamicSink):
        def build(self, step_id, worker_index, worker_count):
            class P(StatelessSinkPartition):
                def write_batch(self, items):
                    batches.extend((b, time.monotonic()) for _k, b in items)
            return P()

    flow = Dataflow("micro_batch_test")
    keyed = op.input("in", flow, Src())
    op.output("out", micro_batch("mb", keyed, timedelta(seconds=0.3), 10_000), Sink())
    run_main(flow)
    assert [x[0] for b, _ in batches for x in b] == list(range(1, 41))  # every item once, in order
    assert len(batches) >= 4, [len(b) for b, _ in batches]
    for b, emitted in batches[:-1]:  # each batch leaves at most ~timeout after its first item
        assert emitted - b[0][1] < 0.3 + 0.5, (emitted - b[0][1], len(b))


def test_retention_runs_once_a_utc_day_from_the_archive_sink(tmp_path):
    """The archive's sink runs the lake's retention between micro-batches: once per UTC day (a
    restarted archive remembers the day), retried an hour after a failure."""
    from flows.archive import RetentionSchedule, _BronzeSinkPartition
    from tests.test_lake import D0, _fill

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades"])
    _fill(lake, days=3, per_day=10, files_per_day=2)  # 2026-08-01 .. 2026-08-03
    now = [(D0 + 2 * DAY + 3_600_000) / 1000]  # 2026-08-03 01:00 UTC
    state = tmp_path / "data" / "archive" / "retention.json"
    kept = []
    sched = RetentionSchedule(lake, 2, state, keep_versions=lambda: kept.append(1) or {}, clock=lambda: now[0])
    sink = _BronzeSinkPartition(lake, sched)
    sink.write_batch([])  # an idle flush still gives the schedule its turn
    assert sorted(set(lake.read("raw_trades").column("date").to_pylist())) == ["2026-08-02", "2026-08-03"]
    assert kept == [1] and state.exists()
    # the rest of the day: nothing more, also after a restart
    now[0] += 20 * 3600
    sink.write_batch([])
    sink2 = _BronzeSinkPartition(lake, RetentionSchedule(lake, 2, state, clock=lambda: now[0]))
    sink2.write_batch([])
    assert kept == [1] and lake.read("raw_trades").num_rows == 20
    # the next UTC day: 2026-08-02 expires
    now[0] += 4 * 3600
    sink2.write_batch([])
    assert sorted(set(lake.read("raw_trades").column("date").to_pylist())) == ["2026-08-03"]
    # a failing retention is logged, not raised, and tried again an hour later
    calls = []

    class Broken:
        def retention(self, *a, **kw):
            calls.append(1)
            raise OSError("bucket unreachable")

    bad = RetentionSchedule(Broken(), 2, tmp_path / "other.json", clock=lambda: now[0])
    assert bad.maybe_run() is None and bad.maybe_run() is None and calls == [1]
    now[0] += 3_601
    assert bad.maybe_run() is None and calls == [1, 1]
    with pytest.raises(ValueError):
        RetentionSchedule(lake, 0, state)


def test_the_archive_sink_compacts_recent_small_files_every_interval(tmp_path):
    """Between micro-batches, a minute after start-up and then every compact_every_s, the recent small
    files are rewritten (Lake.compact_recent); without retention days no retention runs."""
    import pyarrow as pa

    from flows.archive import RetentionSchedule, _BronzeSinkPartition
    from tests.test_lake import D0, _fill

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades"])
    _fill(lake, days=1, per_day=140, files_per_day=70)
    now = [(D0 + 3_600_000) / 1000]

    def nfiles():
        return pa.table(lake.table("raw_trades").get_add_actions(flatten=True)).num_rows

    sink = _BronzeSinkPartition(lake, RetentionSchedule(lake, None, tmp_path / "r.json", clock=lambda: now[0],
                                                        compact_every_s=900))
    sink.write_batch([])
    assert nfiles() == 70  # not at start-up ...
    now[0] += 61
    sink.write_batch([])
    assert nfiles() == 1 and lake.read("raw_trades").num_rows == 140  # ... but a minute later
    _fill(lake, days=1, per_day=140, files_per_day=70)  # 70 more small files
    now[0] += 600
    sink.write_batch([])
    assert nfiles() == 71  # not before the interval
    now[0] += 301
    sink.write_batch([])
    assert nfiles() <= 2 and lake.read("raw_trades").num_rows == 280
    assert not (tmp_path / "r.json").exists()  # no retention without retention days
