"""Bronze tables: exact round trips, app-transaction offsets, retention, compaction and vacuum."""
from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from deltalake.exceptions import DeltaError

from flows.lake import (
    BRONZE,
    DAY_MS,
    Lake,
    batch_to_records,
    date_of_ms,
    dates_between,
    ms_of_date,
    rows_to_arrow,
    with_meta,
)
from tickcast.serde import Serde

sys.path.insert(0, str(Path(__file__).parent))
from avro_samples import sample

SERDE = Serde()
D0 = ms_of_date("2026-08-01")


def test_every_bronze_table_round_trips_the_decoded_record_exactly(tmp_path):
    lake = Lake(str(tmp_path))
    lake.ensure_tables()
    for name, t in BRONZE.items():
        recs = [SERDE.decode(SERDE.encode(t.schema_name, sample(SERDE.schema(t.schema_name).raw, i)))
                for i in (1, 2, 3)]
        rows = [with_meta(t, r, topic=t.topic, partition=0, offset=i, kafka_ts=None, ingest="kafka")
                for i, r in enumerate(recs)]
        lake.append(name, rows_to_arrow(t, rows), offsets={(t.topic, 0): 2})
        back = batch_to_records(t, lake.read(name))
        key = (lambda r: r.get("gw_seq", 0), lambda r: r["ts"])[t.time_field == "ts"]
        assert sorted(back, key=key) == sorted(recs, key=key), name
        assert lake.committed_offset(name, t.topic, 0) == 2
    assert set(lake.versions()) == set(BRONZE)


def test_dates():
    assert date_of_ms(ms_of_date("2026-08-09")) == "2026-08-09"
    assert date_of_ms(ms_of_date("2026-08-10") - 1) == "2026-08-09"
    assert dates_between(ms_of_date("2026-08-09") + 5, ms_of_date("2026-08-11")) == ["2026-08-09", "2026-08-10"]
    assert dates_between(5, 5) == []
    assert date_of_ms(-1) == "1969-12-31"


def _trade(sym, seq, ts):
    return {"symbol": sym, "venue": "bybit.linear", "exchange_ts": ts, "recv_ts": ts * 1000, "gw_seq": seq,
            "trade_ts": ts, "trade_id": str(seq), "side": "Buy", "price": "1.5", "size": "2", "tick_direction": None,
            "block_trade": False, "rpi": None, "cross_seq": None}


def _fill(lake, days=5, per_day=40, files_per_day=4):
    """Trades over ``days`` days written as several micro-batches whose gw_seq ranges interleave."""
    t = BRONZE["raw_trades"]
    seq = 0
    off = 0
    for d in range(days):
        recs = []
        for i in range(per_day):
            recs.append(_trade("BTCUSDT", seq, D0 + d * DAY_MS + i * 1000))
            seq += 1
        chunks = [recs[k::files_per_day] for k in range(files_per_day)]  # interleaved gw_seq ranges
        for chunk in chunks:
            rows = []
            for r in chunk:
                rows.append(with_meta(t, r, topic="market.trades", partition=0, offset=off, kafka_ts=None,
                                      ingest="kafka"))
                off += 1
            lake.append("raw_trades", rows_to_arrow(t, rows), offsets={("market.trades", 0): off - 1})
    return off


def test_retention_moves_expired_partitions_compacts_and_vacuums(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades", "raw_kline"])
    total = _fill(lake)
    v_before = lake.versions()["raw_trades"]
    dataset_version = 6  # a version a dataset refers to: vacuum must keep its files
    kept_rows = lake.table("raw_trades", version=dataset_version).to_pyarrow_table().num_rows
    now = D0 + 4 * DAY_MS + 3_600_000  # during day 5: keep 2 days = days 4 and 5
    archive_root = str(tmp_path / "expired")
    rep = lake.retention(2, now_ms=now, tables=["raw_trades"], archive_root=archive_root, vacuum_hours=0,
                         keep_versions={"raw_trades": [dataset_version]})
    r = rep["raw_trades"]
    assert r["expired_rows"] == 3 * 40
    assert sorted(r["expired_partitions"]) == ["BTCUSDT/2026-08-01", "BTCUSDT/2026-08-02", "BTCUSDT/2026-08-03"]
    live = lake.read("raw_trades")
    assert sorted(set(live.column("date").to_pylist())) == ["2026-08-04", "2026-08-05"]
    assert live.num_rows == 80
    # the expired rows are in the archive location, exactly once, with their offsets
    moved = Lake(archive_root).read("raw_trades")
    assert moved.num_rows == 120
    assert sorted(moved.column("kafka_offset").to_pylist()) + sorted(live.column("kafka_offset").to_pylist()) \
        == list(range(total))
    # the archive never re-ingests what retention deleted: the committed offset survives the delete
    assert lake.committed_offset("raw_trades", "market.trades", 0) == total - 1
    # the closed day (2026-08-04) was compacted into one file, sorted by gw_seq; today is left alone
    assert r["compacted"] == ["BTCUSDT/2026-08-04"]
    dt = lake.table("raw_trades")
    files = [f for f in dt.file_uris()]
    day4 = [f for f in files if "date=2026-08-04" in f]
    day5 = [f for f in files if "date=2026-08-05" in f]
    assert len(day4) == 1 and len(day5) == 4
    seqs = pq.read_table(day4[0]).column("gw_seq").to_pylist()
    assert seqs == sorted(seqs) and len(seqs) == 40
    # vacuum removed the unreferenced files but kept the dataset's version readable
    assert r["vacuumed_files"] > 0
    assert lake.table("raw_trades", version=dataset_version).to_pyarrow_table().num_rows == kept_rows
    with pytest.raises((OSError, DeltaError)) as lost:  # an unreferenced old version lost its files
        lake.table("raw_trades", version=v_before).to_pyarrow_table()
    assert "not found" in str(lost.value).lower() or "no such file" in str(lost.value).lower(), lost.value
    assert dt.version() > v_before
    # re-running retention is a no-op on data (no duplicates in the archive location)
    rep2 = lake.retention(2, now_ms=now, tables=["raw_trades"], archive_root=archive_root, vacuum_hours=0)
    assert rep2["raw_trades"]["expired_rows"] == 0
    assert Lake(archive_root).read("raw_trades").num_rows == 120
    # long-history tables are exempt by default
    rep3 = lake.retention(1, now_ms=now + 365 * DAY_MS, archive_root=archive_root, vacuum_hours=0)
    assert "raw_kline" not in rep3 and rep3["raw_trades"]["expired_rows"] == 80


def test_retention_rejects_bad_arguments(tmp_path):
    lake = Lake(str(tmp_path))
    with pytest.raises(ValueError):
        lake.retention(0)
    with pytest.raises(ValueError):
        lake.retention(3, tables=["nope"])
    with pytest.raises(ValueError):
        lake.uri("../etc")


def test_compact_recent_rewrites_the_small_files_sorted_and_keeps_every_row_and_offset(tmp_path):
    """The archive writes a file per partition per micro-batch; a replay pays per file. The recent
    days' small files are rewritten as one file sorted by gw_seq: the same rows, the same replay,
    the same Kafka offsets to resume from; a partition with fewer than min_files is left alone."""
    import numpy as np
    import pyarrow as pa

    from flows.replay_source import merged_events

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades"])
    last_offset = _fill(lake, days=3, per_day=48, files_per_day=24)  # interleaved gw_seq ranges
    lake.append("raw_trades", rows_to_arrow(BRONZE["raw_trades"], [with_meta(
        BRONZE["raw_trades"], _trade("ETHUSDT", 0, D0 + 2 * DAY_MS), topic="market.trades", partition=1,
        offset=0, kafka_ts=None, ingest="kafka")]), offsets={("market.trades", 1): 0})

    def rows():
        t = lake.read("raw_trades")
        return t.drop_columns([c for c in t.column_names if c.startswith("__")]).sort_by(
            [("symbol", "ascending"), ("gw_seq", "ascending")])

    def replayed():
        return [r for chunk in merged_events(lake, "BTCUSDT", D0, D0 + 3 * DAY_MS, tables=("raw_trades",))
                for r in chunk]

    def files():
        add = pa.table(lake.table("raw_trades").get_add_actions(flatten=True))
        return sorted(zip(add.column("partition.symbol").to_pylist(), add.column("partition.date").to_pylist(),
                          add.column("path").to_pylist()))

    before_rows, before_replay, before_files = rows(), replayed(), files()
    now = D0 + 2 * DAY_MS + 3_600_000  # day 3, 01:00: days 2 and 3 are recent, day 1 is closed
    done = lake.compact_recent(now_ms=now, min_files=16)
    assert done == {"raw_trades": ["BTCUSDT/2026-08-02", "BTCUSDT/2026-08-03"]}
    after = files()
    by_part = {}
    for sym, date, path in after:
        by_part.setdefault((sym, date), []).append(path)
    assert len(by_part[("BTCUSDT", "2026-08-02")]) == len(by_part[("BTCUSDT", "2026-08-03")]) == 1
    assert by_part[("BTCUSDT", "2026-08-01")] == [p for s, d, p in before_files if (s, d) == ("BTCUSDT", "2026-08-01")]
    assert by_part[("ETHUSDT", "2026-08-03")] == [p for s, d, p in before_files if s == "ETHUSDT"]  # 1 < 16 files
    for date in ("2026-08-02", "2026-08-03"):
        seq = pq.read_table(str(tmp_path / "lake" / "raw_trades" / by_part[("BTCUSDT", date)][0]),
                            columns=["gw_seq"]).column("gw_seq").to_numpy()
        assert len(seq) == 48 and np.all(np.diff(seq) > 0)
    assert rows().equals(before_rows)
    assert replayed() == before_replay
    assert lake.committed_offset("raw_trades", "market.trades", 0) == last_offset - 1
    assert lake.committed_offset("raw_trades", "market.trades", 1) == 0
    assert lake.compact_recent(now_ms=now, min_files=16) == {}  # nothing small left


def test_compact_recent_bounds_the_rows_per_call_and_goes_on_at_the_next(tmp_path):
    import pyarrow as pa

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades"])
    t = BRONZE["raw_trades"]
    for k in range(100):  # 100 micro-batches of 2 consecutive gw_seq
        rows = [with_meta(t, _trade("BTCUSDT", seq, D0 + seq * 1000), topic="market.trades", partition=0,
                          offset=seq, kafka_ts=None, ingest="kafka") for seq in (2 * k, 2 * k + 1)]
        lake.append("raw_trades", rows_to_arrow(t, rows), offsets={("market.trades", 0): 2 * k + 1})
    before = lake.read("raw_trades").sort_by("gw_seq")
    now = D0 + 3_600_000
    sizes = []
    for _ in range(5):
        lake.compact_recent(now_ms=now, min_files=2, max_rows=60)
        add = pa.table(lake.table("raw_trades").get_add_actions(flatten=True))
        sizes.append(sorted(add.column("num_records").to_pylist(), reverse=True))
    assert sizes[0] == [60] + [2] * 70  # the oldest 60 rows first
    assert sizes[1] == [60, 60] + [2] * 40  # then the next 60 (a 60-row file is small too, but full)
    assert sum(sizes[-1]) == 200 and len(sizes[-1]) <= 5
    after = lake.read("raw_trades").sort_by("gw_seq")
    assert after.drop_columns([c for c in after.column_names if c.startswith("__")]).equals(
        before.drop_columns([c for c in before.column_names if c.startswith("__")]))
    assert lake.committed_offset("raw_trades", "market.trades", 0) == 199
