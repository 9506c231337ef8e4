"""Historical klines and funding into the bronze tables: exact text, idempotent, bad rows dead-lettered."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

from flows.kline_history import (
    HistoryError,
    detect_layout,
    import_funding_file,
    import_kline_file,
    import_klines,
    infer_from_filename,
    read_bybit_rest_klines,
)
from flows.lake import BRONZE, Lake, batch_to_records, rows_to_arrow, with_meta

FIX = Path(__file__).parent / "fixtures" / "klines"
BYBIT = FIX / "BTCUSDT_1m_bybit_linear_20250530.csv"
BINANCE = FIX / "BTCUSDT_1m_binance_spot_20210326.csv"


def csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))[1:]


def klines(lake, symbol="BTCUSDT"):
    at = lake.read("raw_kline", symbols=[symbol])
    return sorted(batch_to_records(BRONZE["raw_kline"], at), key=lambda r: r["start_ts"]), at


def test_bybit_csv_import_keeps_text_exactly_and_is_idempotent(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    rep = import_kline_file(lake, BYBIT)
    assert (rep.read, rep.inserted, rep.skipped_existing, rep.dead_letters) == (300, 300, 0, 0)
    assert rep.venues == {"bybit.linear.csv": 300}
    recs, at = klines(lake)
    src = csv_rows(BYBIT)
    assert len(recs) == 300
    for r, row in zip(recs, src):
        assert [r["open"], r["high"], r["low"], r["close"], r["volume"]] == row[1:]  # "104200.0" stays
        assert r["gw_seq"] == -1 and r["confirm"] is True and r["interval"] == "1" and r["turnover"] is None
        assert r["end_ts"] == r["start_ts"] + 59_999 == r["exchange_ts"]
    assert recs[0]["start_ts"] == 1_748_623_140_000  # 2025-05-30 16:39:00+00:00
    assert set(at.column("ingest").to_pylist()) == {"history:" + BYBIT.name}
    assert at.column("kafka_offset").null_count == 300
    v = lake.versions()["raw_kline"]
    again = import_kline_file(lake, BYBIT)
    assert (again.inserted, again.skipped_existing) == (0, 300)
    assert lake.versions()["raw_kline"] == v  # nothing written at all


def test_a_live_confirmed_kline_wins_over_history_and_open_ones_do_not_block(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables()
    src = csv_rows(BYBIT)
    from flows.kline_history import _parse_ts

    t = BRONZE["raw_kline"]

    def live(i, confirm):
        start = _parse_ts(src[i][0])
        rec = {"symbol": "BTCUSDT", "venue": "bybit.linear", "exchange_ts": start + 60_003, "recv_ts": 1,
               "gw_seq": 100 + i, "interval": "1", "start_ts": start, "end_ts": start + 59_999,
               "open": src[i][1], "high": src[i][2], "low": src[i][3], "close": src[i][4], "volume": src[i][5],
               "turnover": "1.0", "confirm": confirm}
        return with_meta(t, rec, topic="market.kline.1m", partition=0, offset=i, kafka_ts=None, ingest="kafka")

    lake.append("raw_kline", rows_to_arrow(t, [live(5, True), live(6, False), live(299, True)]))
    rep = import_kline_file(lake, BYBIT)
    assert (rep.inserted, rep.skipped_existing) == (298, 2)
    at = lake.read("raw_kline", filter=pc.field("confirm"))
    starts = at.column("start_ts").to_pylist()
    assert len(starts) == len(set(starts)) == 300


def test_binance_spot_csv_is_labelled_binance(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert detect_layout(BINANCE) == "binance-csv"
    rep = import_kline_file(lake, BINANCE)
    assert rep.inserted == 120 and rep.venues == {"binance.spot.csv": 120}
    recs, _ = klines(lake)
    assert recs[0]["start_ts"] == 1_616_727_600_000  # naive 2021-03-26 03:00:00 read as UTC
    assert recs[0]["close"] == "51827.72" and recs[0]["volume"] == "73.9024"


def test_bad_rows_become_dead_letters_once(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    bad = tmp_path / "ETHUSDT_1m_bad.csv"
    bad.write_text("timestamp,open,high,low,close,volume\n"
                   "2025-05-30 16:39:00+00:00,2600.1,2601.0,2599.0,2600.5,10.5\n"
                   "2025-05-30 16:40:00+00:00,2600.5,2590.0,2599.0,2600.5,1\n"  # high below low
                   "2025-05-30 16:41:00+00:00,NaN,2601,2599,2600,1\n"
                   "2025-05-30 16:42:30+00:00,2600.5,2601.0,2599.0,2600.5,1\n"  # not minute-aligned
                   "not a time,1,1,1,1,1\n"
                   "2025-05-30 16:43:00+00:00,1,2\n"
                   "2025-05-30 16:44:00+00:00,2600.5,2601.0,2599.0,2600.5,-3\n"  # negative volume
                   "2025-05-30 16:39:00+00:00,2600.1,2601.0,2599.0,2600.5,10.5\n")  # duplicate
    rep = import_kline_file(lake, bad, layout="bybit-csv")
    assert (rep.inserted, rep.dead_letters, rep.duplicates_in_input) == (1, 6, 1)
    dl = lake.read("raw_dead_letters")
    kinds = sorted(dl.column("error_kind").to_pylist())
    assert kinds == ["bad_csv_row"] + ["invalid_kline"] * 5
    reasons = " ".join(dl.column("reason").to_pylist())
    for needle in ("inconsistent candle", "NaN", "not aligned", "not a non-negative decimal", "3 fields"):
        assert needle in reasons
    assert set(dl.column("symbol").to_pylist()) == {"ETHUSDT"}
    assert b"not a time,1,1,1,1,1" in dl.column("payload").to_pylist()
    rep2 = import_kline_file(lake, bad, layout="bybit-csv")
    assert rep2.dead_letters == 0 and lake.read("raw_dead_letters").num_rows == 6


def test_bybit_rest_list_layout(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    page = {"retCode": 0, "retMsg": "OK", "time": 1_672_025_956_592,
            "result": {"symbol": "BTCUSDT", "category": "linear", "interval": "60", "list": [
                ["1672023600000", "16800.5", "16810", "16790", "16805", "120.5", "2025000.1"],  # still open
                ["1672020000000", "16790", "16801", "16780.5", "16800.5", "99.25", "1666000"],
                ["1672016400000", "16795", "16799", "16770", "16790", "150", "2519000.25"]]}}
    recs = list(read_bybit_rest_klines(page))
    assert [r["start_ts"] for r in recs] == [1672016400000, 1672020000000, 1672023600000]  # oldest first
    assert [r["confirm"] for r in recs] == [True, True, False]
    assert recs[0]["venue"] == "bybit.linear.rest" and recs[0]["turnover"] == "2519000.25"
    path = tmp_path / "page.json"
    path.write_text(json.dumps([page]))
    rep = import_kline_file(lake, path)
    assert (rep.inserted, rep.skipped_open) == (2, 1)
    got, _ = klines(lake)
    assert [g["close"] for g in got] == ["16790", "16800.5"] and got[0]["end_ts"] == 1672016400000 + 3_599_999
    with pytest.raises(HistoryError):
        list(read_bybit_rest_klines({"retCode": 10001, "retMsg": "params error", "result": {}}))


def test_records_from_a_backfill_iterable(tmp_path):
    """The REST client's Kline records: gw_seq forced to -1, schema violations dead-lettered."""
    lake = Lake(str(tmp_path / "lake"))
    good = {"symbol": "POLUSDT", "venue": "bybit.linear.rest", "exchange_ts": 1_700_000_060_000,
            "recv_ts": 1_700_000_060_123_456, "gw_seq": 5, "interval": "1", "start_ts": 1_700_000_040_000,
            "end_ts": 1_700_000_099_999, "open": "0.2101", "high": "0.2110", "low": "0.2100", "close": "0.2105",
            "volume": "12000", "turnover": "2526.0", "confirm": True}
    wrong_type = dict(good, start_ts="yesterday")
    rep = import_klines(lake, [good, wrong_type], source="bybit_rest")
    assert (rep.inserted, rep.dead_letters) == (1, 1)
    recs, _ = klines(lake, "POLUSDT")
    assert recs[0] == dict(good, gw_seq=-1)


def test_funding_history_import(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    fix = FIX / "funding_bybit_BTCUSDT.csv"
    rep = import_funding_file(lake, fix)
    assert rep.inserted == 40
    at = lake.read("raw_funding")
    recs = sorted(batch_to_records(BRONZE["raw_funding"], at), key=lambda r: r["exchange_ts"])
    assert recs[0]["funding_rate"] == "2.758e-05" and recs[0]["kind"] == "settlement" and recs[0]["gw_seq"] == -1
    assert import_funding_file(lake, fix).inserted == 0


def test_file_name_inference_and_errors(tmp_path):
    assert infer_from_filename("BTCUSDT_1m_20250530-20250629.csv") == ("BTCUSDT", "1")
    assert infer_from_filename("ETHUSDT_5m_x.csv") == ("ETHUSDT", "5")
    assert infer_from_filename("klines.csv") == (None, None)
    odd = tmp_path / "klines.csv"
    odd.write_text("timestamp,open,high,low,close,volume\n")
    with pytest.raises(HistoryError, match="venue"):
        detect_layout(odd)
    with pytest.raises(HistoryError, match="symbol"):
        import_kline_file(Lake(str(tmp_path / "l")), odd, layout="bybit-csv")
    notcsv = tmp_path / "bybit_x.csv"
    notcsv.write_text("a,b\n1,2\n")
    with pytest.raises(HistoryError, match="not a kline CSV"):
        detect_layout(notcsv)
    with pytest.raises(HistoryError, match="no such file"):
        import_kline_file(Lake(str(tmp_path / "l")), tmp_path / "missing.csv")


@pytest.mark.shared_data
def test_full_shared_bybit_month(shared_real, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    path = shared_real / "bybit_linear_klines_cobra0506" / "BTCUSDT_1m_20250530-20250629.csv"
    rep = import_kline_file(lake, path)
    assert (rep.inserted, rep.dead_letters) == (43_200, 0)
    assert rep.last_ts - rep.first_ts == (43_200 - 1) * 60_000  # no gaps
    assert import_kline_file(lake, path).inserted == 0


def test_backfill_out_csv_layout_with_rest_columns(tmp_path):
    """``tickcast backfill --out`` writes Bybit's REST columns (startTime in ms, turnover)."""
    path = tmp_path / "BTCUSDT_1_1748623140000_1748623260000.csv"
    path.write_text("startTime,open,high,low,close,volume,turnover\n"
                    "1748623140000,104217.5,104402.7,104200.0,104337.8,477.605,49800000.5\n"
                    "1748623200000,104337.8,104409.1,104230.8,104288.5,328.242,34200000\n")
    assert detect_layout(path) == "bybit-csv"
    lake = Lake(str(tmp_path / "lake"))
    rep = import_kline_file(lake, path)
    assert rep.inserted == 2 and rep.venues == {"bybit.linear.csv": 2}
    recs, _ = klines(lake)
    assert recs[0]["start_ts"] == 1748623140000 and recs[0]["turnover"] == "49800000.5"
    assert recs[1]["low"] == "104230.8"
