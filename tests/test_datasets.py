"""Dataset builder: features known at t, targets from the future only, manifests, byte-identical rebuilds."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flows.candles import KLINE_VARIATES, KLINE_WARMUP, kline_variates
from flows.datasets import (
    DatasetError,
    DatasetSpec,
    build_dataset,
    dataset_path,
    get_manifest,
    list_datasets,
    load_dataset,
    lookahead_violations,
    referenced_versions,
)
from flows.kline_history import _parse_ts, import_kline_file, import_klines, make_kline
from flows.lake import BRONZE, Lake, rows_to_arrow, with_meta
from flows.targets import forward_targets

FIX = Path(__file__).parent / "fixtures" / "klines" / "BTCUSDT_1m_bybit_linear_20250530.csv"
M = 60_000


def csv_rows():
    with open(FIX, newline="") as fh:
        return list(csv.reader(fh))[1:]


ROWS = csv_rows()
START = _parse_ts(ROWS[0][0])  # 2025-05-30 16:39 UTC
END = START + len(ROWS) * M
PERIOD = (START + KLINE_WARMUP * M, END)


def lake_from(tmp_path, name="lake", mutate=None, symbol="BTCUSDT"):
    """A lake with the fixture's 300 candles; ``mutate(i, row) -> row`` edits candle i."""
    lake = Lake(str(tmp_path / name))
    recs = []
    for i, r in enumerate(ROWS):
        r = mutate(i, list(r)) if mutate else r
        recs.append(make_kline(symbol, "1", _parse_ts(r[0]), r[1], r[2], r[3], r[4], r[5], None, "bybit.linear.csv"))
    import_klines(lake, recs, source="test")
    return lake


def spec(**kw):
    d = {"symbols": ["BTCUSDT"], "from": PERIOD[0], "to": PERIOD[1]}
    d.update(kw)
    return DatasetSpec.from_dict(d)


def add_funding(lake, events, symbol="BTCUSDT"):
    t = BRONZE["raw_funding"]
    rows = [with_meta(t, {"symbol": symbol, "venue": "bybit.linear", "exchange_ts": ts, "recv_ts": ts * 1000,
                          "gw_seq": i, "kind": "ticker", "funding_rate": rate, "next_funding_time": None,
                          "funding_interval_hour": 8}, topic="market.funding", partition=0, offset=i,
                      kafka_ts=None, ingest="kafka") for i, (ts, rate) in enumerate(events)]
    lake.ensure_tables(["raw_funding"])
    lake.append("raw_funding", rows_to_arrow(t, rows))


def test_kline_dataset_values_match_the_shared_definitions(tmp_path):
    lake = lake_from(tmp_path)
    m = build_dataset(spec(), lake=lake, data_dir=tmp_path, publish=False)
    df = load_dataset(m["dataset_id"], tmp_path, as_="arrow")
    n = len(ROWS) - KLINE_WARMUP
    assert df.num_rows == m["rows"] == n
    assert df.column("ts").to_pylist() == [START + (KLINE_WARMUP + i) * M for i in range(n)]
    assert df.column("available_ts").to_pylist() == [t + M for t in df.column("ts").to_pylist()]
    f = np.array([[float(x) for x in r[1:6]] for r in ROWS])
    ts = np.array([_parse_ts(r[0]) for r in ROWS])
    ref = kline_variates(ts, f[:, 0], f[:, 1], f[:, 2], f[:, 3], f[:, 4])
    for name in KLINE_VARIATES:
        got = np.array(df.column(name).to_pylist(), dtype=float)
        np.testing.assert_array_equal(got, ref[name][KLINE_WARMUP:], err_msg=name)
    assert math.isfinite(df.column("volume_z_60m")[0].as_py())  # the warm-up history was used
    tgt = forward_targets(f[:, 3], f[:, 1], f[:, 2])
    for name in ("ret_1m", "ret_h", "close_h", "rv_h", "range_h", "range_rel_h"):
        got = np.array([np.nan if v is None else v for v in df.column("y_" + name).to_pylist()])
        np.testing.assert_array_equal(got, tgt[name][KLINE_WARMUP:], err_msg=name)
    # no target reaches past the period: the last 30 rows have none
    assert df.column("y_ret_h").null_count == 30
    ret_h = df.column("y_ret_h").to_numpy(zero_copy_only=False)
    assert np.isnan(ret_h[-30:]).all() and np.isfinite(ret_h[:-30]).all()
    assert df.column("y_direction").null_count == 30 and df.column("y_close_path").null_count == 30
    assert set(df.column("y_direction").drop_null().to_pylist()) <= {-1, 0, 1}
    assert df.column("y_close_path")[0].as_py() == pytest.approx(list(tgt["close_path"][KLINE_WARMUP]), abs=0)
    assert m["rows_with_targets"] == n - 30
    assert df.column("funding_rate").null_count == n  # no funding known


def test_manifest_listing_loading_and_ids(tmp_path):
    lake = lake_from(tmp_path)
    m = build_dataset(spec(flat_threshold=0.002, triple_barrier=True, barrier_k=1.5), lake=lake,
                      data_dir=tmp_path, publish=False)
    assert m["raw_table_versions"] == {"raw_kline": lake.versions()["raw_kline"]}
    assert m["period"] == {"from": PERIOD[0], "to": PERIOD[1], "from_iso": "2025-05-30T17:40:00Z",
                           "to_iso": "2025-05-30T21:39:00Z"}
    assert m["symbols"] == ["BTCUSDT"] and m["rows_per_symbol"] == {"BTCUSDT": 239}
    assert m["label_config"] == {"horizon": 30, "flat_threshold": 0.002, "triple_barrier": True, "barrier_k": 1.5}
    assert len(m["registry_hash"]) == 16 and m["code_version"] and len(m["code_hash"]) == 16
    assert m["venues"] == {"BTCUSDT": {"bybit.linear.csv": 239}}
    assert "y_triple_barrier" in m["target_columns"] and "close" in m["feature_columns"]
    df = load_dataset(m["dataset_id"], tmp_path)
    assert set(df["y_triple_barrier"].dropna().unique()) <= {-1, 0, 1}
    assert df["y_triple_barrier"].notna().sum() > 100
    assert get_manifest(m["dataset_id"], tmp_path) == m
    assert load_dataset(m["dataset_id"], tmp_path, as_="path") == dataset_path(m["dataset_id"], tmp_path) / "data.parquet"
    m2 = build_dataset(spec(horizon=15), lake=lake, data_dir=tmp_path, publish=False)
    assert m2["dataset_id"] != m["dataset_id"]
    assert [x["dataset_id"] for x in list_datasets(tmp_path)] == [m["dataset_id"], m2["dataset_id"]]
    assert referenced_versions(tmp_path) == {"raw_kline": [lake.versions()["raw_kline"]]}
    for bad in ("../../etc/passwd", "ds-../../../x", "ds-0123", "DS-0123456789abcdef", "", None, "ds-0123456789abcdeg"):
        with pytest.raises(DatasetError):
            load_dataset(bad, tmp_path)
    with pytest.raises(KeyError):
        load_dataset("ds-0123456789abcdef", tmp_path)


def test_same_period_twice_gives_byte_identical_data(tmp_path):
    lake = lake_from(tmp_path)
    a = build_dataset(spec(triple_barrier=True), lake=lake, data_dir=tmp_path / "a", publish=False)
    b = build_dataset(spec(triple_barrier=True), lake=lake, data_dir=tmp_path / "b", publish=False)
    assert a["dataset_id"] == b["dataset_id"]
    pa_, pb = (load_dataset(x["dataset_id"], tmp_path / d, as_="path") for x, d in ((a, "a"), (b, "b")))
    assert pa_.read_bytes() == pb.read_bytes()
    assert a["files"] == b["files"]
    # an identical copy of the data, imported in a different order, into another lake: same bytes
    lake2 = Lake(str(tmp_path / "lake2"))
    recs = [make_kline("BTCUSDT", "1", _parse_ts(r[0]), *r[1:6], None, "bybit.linear.csv") for r in ROWS]
    import_klines(lake2, recs[150:], source="t")
    import_klines(lake2, recs[:150], source="t")
    c = build_dataset(spec(triple_barrier=True), lake=lake2, data_dir=tmp_path / "c", publish=False)
    assert load_dataset(c["dataset_id"], tmp_path / "c", as_="path").read_bytes() == pa_.read_bytes()
    # a rebuild in place (overwrite) gives the same file too
    again = build_dataset(spec(triple_barrier=True), lake=lake, data_dir=tmp_path / "a", publish=False, overwrite=True)
    assert again["files"] == a["files"]


def test_pinned_versions_rebuild_the_old_dataset_by_time_travel(tmp_path):
    lake = lake_from(tmp_path)
    old = build_dataset(spec(), lake=lake, data_dir=tmp_path, publish=False)
    v = old["raw_table_versions"]["raw_kline"]
    # a live kline that revises the last minute arrives later (new table version)
    t = BRONZE["raw_kline"]
    r = ROWS[-1]
    live = make_kline("BTCUSDT", "1", _parse_ts(r[0]), r[1], r[2], r[3], "104000.0", r[5], "1", "bybit.linear")
    live.update(gw_seq=7, exchange_ts=live["end_ts"] + 5)
    lake.append("raw_kline", rows_to_arrow(t, [with_meta(t, live, topic="market.kline.1m", partition=0, offset=0,
                                                          kafka_ts=None, ingest="kafka")]))
    new = build_dataset(spec(), lake=lake, data_dir=tmp_path, publish=False)
    assert new["dataset_id"] != old["dataset_id"]
    assert load_dataset(new["dataset_id"], tmp_path)["close"].iloc[-1] == 104000.0  # live row preferred
    pinned = build_dataset(spec(raw_versions={"raw_kline": v}), lake=lake, data_dir=tmp_path / "p", publish=False)
    assert pinned["dataset_id"] == old["dataset_id"]
    assert load_dataset(pinned["dataset_id"], tmp_path / "p", as_="path").read_bytes() == \
        load_dataset(old["dataset_id"], tmp_path, as_="path").read_bytes()


def test_no_feature_sees_the_future_and_the_check_would_catch_it(tmp_path):
    cut_i = 200  # candles from index 200 on (event time >= cut) are different in the second lake
    cut = START + cut_i * M
    base = lake_from(tmp_path, "a")
    def bump(i, r):
        return r if i < cut_i else [r[0]] + [str(round(float(x) * 1.07, 1)) for x in r[1:5]] + ["9999.5"]
    fut = lake_from(tmp_path, "b", mutate=bump)
    # a funding event exactly at the close of the minute before the cut belongs to the next row
    add_funding(base, [(START, "0.0001"), (cut, "0.0001")])
    add_funding(fut, [(START, "0.0001"), (cut, "0.0009")])
    a = build_dataset(spec(triple_barrier=True), lake=base, data_dir=tmp_path / "da", publish=False)
    b = build_dataset(spec(triple_barrier=True), lake=fut, data_dir=tmp_path / "db", publish=False)
    ta, tb = (load_dataset(x["dataset_id"], tmp_path / d, as_="arrow") for x, d in ((a, "da"), (b, "db")))
    feats = a["feature_columns"]
    assert len(feats) == len(KLINE_VARIATES)
    viol = lookahead_violations(ta, tb, feats, cut)
    assert viol == {f: 0 for f in feats}, viol
    # the rows after the cut do change (the perturbation is real) ...
    after = lookahead_violations(ta, tb, ["close", "funding_rate", "rv_15m"], cut + M)
    assert all(v > 0 for v in after.values()), after
    # ... the targets of the rows before it do too (they are made of the future) ...
    tv = lookahead_violations(ta, tb, a["target_columns"], cut)
    assert all(v > 0 for v in tv.values()), tv
    # ... and a feature shifted by one minute into the future would be caught
    def leaky(t):
        return t.append_column("close_next", pa.array(t.column("close").to_pylist()[1:] + [None], type=pa.float64()))
    assert lookahead_violations(leaky(ta), leaky(tb), ["close_next"], cut)["close_next"] == 1


def test_funding_is_forward_filled_only_from_known_events(tmp_path):
    lake = lake_from(tmp_path)
    row0 = PERIOD[0]
    add_funding(lake, [(row0 - 8 * 3600_000, "-0.0002"), (row0 + M - 1, "0.00015"), (row0 + 2 * M, "0.0003")])
    m = build_dataset(spec(), lake=lake, data_dir=tmp_path, publish=False)
    fr = load_dataset(m["dataset_id"], tmp_path)["funding_rate"].tolist()
    # row 0 closes at row0 + 60 s: the event at row0 + 59.999 s is known; the one at row0 + 120 s
    # (the close of row 1) only from row 2 on
    assert fr[:4] == [0.00015, 0.00015, 0.0003, 0.0003]


def test_missing_minutes_are_nan_rows_and_venues_can_be_chosen(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    recs = [make_kline("ETHUSDT", "1", _parse_ts(r[0]), *r[1:6], None, "bybit.linear.csv")
            for i, r in enumerate(ROWS) if not 100 <= i < 103]
    import_klines(lake, recs, source="t")
    other = [make_kline("ETHUSDT", "1", _parse_ts(ROWS[i][0]), "1", "2", "0.5", "1.5", "3", None, "binance.spot.csv")
             for i in range(100, 103)]
    import_klines(lake, other, source="t2")
    s = spec(symbols=["ETHUSDT"], venues=["bybit.linear.csv"])
    m = build_dataset(s, lake=lake, data_dir=tmp_path, publish=False)
    df = load_dataset(m["dataset_id"], tmp_path)
    gap = df[df["venue"].isna()]
    assert list((gap["ts"] - START) // M) == [100, 101, 102]
    assert gap["close"].isna().all() and m["venues"] == {"ETHUSDT": {"bybit.linear.csv": 236}}
    # the 30 rows before the gap have no targets (incomplete future), the rows after it do again
    idx = int((START + 100 * M - PERIOD[0]) // M)
    assert df["y_ret_h"].iloc[idx - 30:idx].isna().all() and df["y_ret_h"].iloc[idx - 31] == df["y_ret_h"].iloc[idx - 31]
    m_any = build_dataset(spec(symbols=["ETHUSDT"]), lake=lake, data_dir=tmp_path, publish=False)
    assert m_any["venues"]["ETHUSDT"] == {"binance.spot.csv": 3, "bybit.linear.csv": 236}


def test_bad_specs_are_clear_errors(tmp_path):
    for bad, needle in [({"symbols": [], "from": 0, "to": M}, "symbol"),
                        ({"symbols": ["BTC/USDT"], "from": 0, "to": M}, "bad symbol"),
                        ({"symbols": ["BTCUSDT"], "from": M, "to": M}, "empty period"),
                        ({"symbols": ["BTCUSDT"], "from": "yesterday", "to": M}, "ISO"),
                        ({"symbols": ["BTCUSDT"], "from": 0, "to": M, "horizon": 0}, "horizon"),
                        ({"symbols": ["BTCUSDT"], "from": 0, "to": M, "flat_threshold": float("nan")}, "flat_threshold"),
                        ({"symbols": ["BTCUSDT"], "from": 0, "to": M, "kind": "magic"}, "kind"),
                        ({"symbols": ["BTCUSDT"], "from": 0, "to": M, "path": "/etc"}, "unknown"),
                        ({"symbols": ["BTCUSDT"], "from": 0, "to": 4 * 10**12}, "longer"),
                        ({"symbols": ["BTCUSDT"], "from": 0, "to": 10**13}, "outside 1970..2100")]:
        with pytest.raises(DatasetError, match=needle):
            DatasetSpec.from_dict(bad)
    s = DatasetSpec.from_dict({"symbols": "ethusdt,BTCUSDT", "from": "2025-05-30T17:40:30Z", "to": "2025-05-30 21:39"})
    assert s.symbols == ("BTCUSDT", "ETHUSDT") and s.period_from == PERIOD[0] and s.period_to == PERIOD[1]
    with pytest.raises(DatasetError, match="no raw_kline"):
        build_dataset(s, lake=Lake(str(tmp_path / "empty")), data_dir=tmp_path, publish=False)


def test_dataset_ready_is_published(bootstrap, tmp_path):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from tickcast.kafka import consumer_config
    from tickcast.serde import Serde
    from tickcast.topics import DATASET_READY

    lake = lake_from(tmp_path)
    m = build_dataset(spec(), lake=lake, data_dir=tmp_path, publish=True, bootstrap=bootstrap)
    c = Consumer(consumer_config(bootstrap, "test-dataset-ready"))
    c.assign([TopicPartition(DATASET_READY, 0, OFFSET_BEGINNING)])
    serde, found = Serde(), None
    for _ in range(100):
        msg = c.poll(0.2)
        if msg is None or msg.error():
            continue
        rec = serde.decode(msg.value(), "DatasetReady")
        if rec["dataset_id"] == m["dataset_id"]:
            found = rec
            break
    c.close()
    assert found is not None
    assert found["rows"] == m["rows"] and found["symbols"] == ["BTCUSDT"]
    assert found["raw_table_versions"] == m["raw_table_versions"] and found["uri"].endswith("data.parquet")
    assert (found["period_from"], found["period_to"]) == PERIOD


@pytest.mark.shared_data
def test_a_month_of_real_bybit_klines(shared_real, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    for sym in ("BTCUSDT", "ETHUSDT"):
        import_kline_file(lake, shared_real / "bybit_linear_klines_cobra0506" / f"{sym}_1m_20250530-20250629.csv")
    s = DatasetSpec.from_dict({"symbols": ["BTCUSDT", "ETHUSDT"], "from": "2025-06-01", "to": "2025-06-08"})
    m = build_dataset(s, lake=lake, data_dir=tmp_path, publish=False)
    assert m["rows"] == 2 * 7 * 1440 and m["rows_with_targets"] == m["rows"] - 2 * 30
    df = load_dataset(m["dataset_id"], tmp_path)
    assert df[list(KLINE_VARIATES)[:-1]].notna().all().all()


def test_features_dataset_from_the_replay(tmp_path):
    """kind=features: the m1 vectors of the replay of the archive, joined with the candles' targets."""
    from flows.engine import new_engine
    from flows.registry import load_registry
    from tests.synth import T0, SynthStream
    from tests.test_replay import archive_events

    lake = Lake(str(tmp_path / "lake"))
    events = SynthStream("BTCUSDT", seed=4).run(300)
    archive_events(lake, events, batch=5000)
    lo, hi = T0 + 2 * M, T0 + 5 * M
    s = DatasetSpec.from_dict({"symbols": ["BTCUSDT"], "from": lo, "to": hi, "kind": "features", "horizon": 1})
    m = build_dataset(s, lake=lake, data_dir=tmp_path, publish=False)
    df = load_dataset(m["dataset_id"], tmp_path, as_="arrow")
    reg = load_registry()
    assert m["kind"] == "features" and m["registry_hash"] == reg.hash
    assert m["feature_columns"] == reg.names("m1")
    assert df.column("ts").to_pylist() == [lo, lo + M, lo + 2 * M]
    ref = {r["window_end"]: r for k, r in new_engine("BTCUSDT").process(events) if k == "features" and r["cadence"] == "m1"}
    for i, ts in enumerate(df.column("ts").to_pylist()):
        vec = ref[ts + M]["values"]
        for name in reg.names("m1"):
            got = df.column(name)[i].as_py()
            assert (got is None and vec[name] is None) or got == vec[name], (ts, name)
    # targets from the confirmed candles the stream carried (horizon 1: the next minute's return)
    kl = {r["start_ts"]: float(r["close"]) for n, r in events if n == "Kline"}
    y = df.column("y_ret_1m").to_pylist()
    assert y[0] == math.log(kl[lo + M]) - math.log(kl[lo]) and y[0] != 0
    assert y[-1] is None  # its future is outside the period
    assert set(m["raw_table_versions"]) >= {"raw_orderbook_deltas", "raw_trades", "raw_kline"}
