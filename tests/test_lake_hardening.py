"""The lake, archive, replay and datasets under unlucky timing and bad arguments, each test a bug
found in a review: a date expiring twice, compaction racing a commit, old-dated news, data starting
days into a period, parity that compared nothing, dataset ids of another lake, CLI tracebacks."""
from __future__ import annotations

import pyarrow.compute as pc

from flows.lake import BRONZE, DAY_MS, Lake, ms_of_date, rows_to_arrow, with_meta
from flows.replay_source import merged_events

D0 = ms_of_date("2026-08-01")


def _trade(sym, seq, ts):
    return {"symbol": sym, "venue": "bybit.linear", "exchange_ts": ts, "recv_ts": ts * 1000, "gw_seq": seq,
            "trade_ts": ts, "trade_id": str(seq), "side": "Buy", "price": "1.5", "size": "2", "tick_direction": None,
            "block_trade": False, "rpi": None, "cross_seq": None}


def _append_trades(lake, recs, first_offset):
    t = BRONZE["raw_trades"]
    rows = [with_meta(t, r, topic="market.trades", partition=0, offset=first_offset + i, kafka_ts=None,
                      ingest="kafka") for i, r in enumerate(recs)]
    lake.append("raw_trades", rows_to_arrow(t, rows),
                offsets={("market.trades", 0): first_offset + len(recs) - 1})


def _news(sym, seq, ts, recv_ms, item_id="n1"):
    return {"symbol": sym, "venue": "news.test", "exchange_ts": ts, "recv_ts": recv_ms * 1000, "gw_seq": seq,
            "item_id": item_id, "source": "test", "url": "https://x.test/a", "title": "BTC news", "summary": None,
            "published_ts": ts, "assets": ["BTC"], "mentioned": True, "sentiment": 0.5, "source_weight": 1.0}


# ---------------------------------------------------------------------------------------------
# 1. retention: a date that expires a second time overwrites the archive copy of the first expiry


def test_retention_re_expiring_a_date_keeps_the_rows_archived_before(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades"])
    _append_trades(lake, [_trade("BTCUSDT", 0, D0 + 1000), _trade("BTCUSDT", 1, D0 + 2000)], 0)
    lake.retention(1, now_ms=D0 + 2 * DAY_MS, tables=["raw_trades"], compact=False)
    archived = Lake(str(tmp_path / "lake" / "_expired"))
    assert archived.read("raw_trades").num_rows == 2
    # a late row of the expired date arrives (an archive catching up after an outage, a clock-skewed
    # event, ...); the next day's retention expires the date again
    _append_trades(lake, [_trade("BTCUSDT", 2, D0 + 3000)], 2)
    lake.retention(1, now_ms=D0 + 3 * DAY_MS, tables=["raw_trades"], compact=False)
    assert lake.read("raw_trades").num_rows == 0
    # every row of the date must still exist somewhere: the archive copy
    assert sorted(archived.read("raw_trades").column("gw_seq").to_pylist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# 2. replay: plan_files prunes by date partition, but a row's date is its *exchange* time while the
#    replay order is gw_seq: a news item published days before it was received is skipped


def test_replay_includes_an_old_dated_news_item_received_inside_the_period(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades", "raw_news"])
    t0 = D0 + 10 * DAY_MS + 3_600_000
    _append_trades(lake, [_trade("BTCUSDT", s, t0 + s * 1000) for s in (0, 1, 2, 4, 5)], 0)
    # gw_seq 3: an RSS item received at t0 + 3 s whose published time is 3 days earlier
    t = BRONZE["raw_news"]
    lake.append("raw_news", rows_to_arrow(t, [with_meta(t, _news("BTCUSDT", 3, t0 - 3 * DAY_MS, t0 + 3000),
                                                        topic="market.news", partition=0, offset=0, kafka_ts=None,
                                                        ingest="kafka")]))
    got = [r["gw_seq"] for chunk in merged_events(lake, "BTCUSDT", t0, t0 + 60_000) for _, r in chunk]
    assert got == [0, 1, 2, 3, 4, 5]  # what the online flow consumed, in gw_seq order


# ---------------------------------------------------------------------------------------------
# 3. replay: find_start_seq looks for the first event only 2 days after the start; a period whose
#    data begins later replays nothing at all


def test_replay_period_whose_data_starts_three_days_in_is_not_empty(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_trades"])
    start = D0
    first = D0 + 3 * DAY_MS
    _append_trades(lake, [_trade("BTCUSDT", s, first + s * 1000) for s in range(5)], 0)
    got = [r["gw_seq"] for chunk in merged_events(lake, "BTCUSDT", start, D0 + 7 * DAY_MS) for _, r in chunk]
    assert got == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# 4. compact_recent reads the rows at one version and overwrites by predicate at a later one: rows
#    appended in between that match the predicate are deleted and never rewritten


def _kline(sym, seq, start):
    end = start + 59_999
    return {"symbol": sym, "venue": "bybit.linear", "exchange_ts": end, "recv_ts": end * 1000, "gw_seq": seq,
            "interval": "1", "start_ts": start, "end_ts": end, "open": "1", "high": "2", "low": "0.5",
            "close": "1.5", "volume": "3", "turnover": None, "confirm": True}


def test_compact_recent_does_not_lose_rows_appended_while_it_runs(tmp_path, monkeypatch):
    from flows.kline_history import import_klines

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables(["raw_kline"])
    now = D0 + 12 * 3_600_000
    t = BRONZE["raw_kline"]
    # today's partition: a history import (gw_seq -1, e.g. a REST backfill after an outage) and live files
    import_klines(lake, [_kline("BTCUSDT", -1, D0 + i * 60_000) for i in range(3)], source="rest")
    for s in range(4):
        lake.append("raw_kline", rows_to_arrow(t, [with_meta(t, _kline("BTCUSDT", s, D0 + (10 + s) * 60_000),
                                                             topic="market.kline.1m", partition=0, offset=s,
                                                             kafka_ts=None, ingest="kafka")]),
                    offsets={("market.kline.1m", 0): s})
    before = lake.read("raw_kline").num_rows
    assert before == 7

    real_read = Lake.read
    fired = []

    def read_then_concurrent_import(self, table, **kw):
        out = real_read(self, table, **kw)
        if table == "raw_kline" and kw.get("filter") is not None and not fired:
            fired.append(1)  # another process (tickcast lake import-klines) commits right now
            import_klines(Lake(self.root), [_kline("BTCUSDT", -1, D0 + 5 * 60_000)], source="rest")
        return out

    monkeypatch.setattr(Lake, "read", read_then_concurrent_import)
    done = lake.compact_recent(now_ms=now, tables=["raw_kline"], min_files=2)
    monkeypatch.setattr(Lake, "read", real_read)
    assert fired and done == {"raw_kline": [f"BTCUSDT/{lake_date(D0)}"]}
    starts = sorted(lake.read("raw_kline").column("start_ts").to_pylist())
    assert D0 + 5 * 60_000 in starts  # the concurrently imported candle survives
    assert len(starts) == before + 1


def lake_date(ms):
    from flows.lake import date_of_ms

    return date_of_ms(ms)


# ---------------------------------------------------------------------------------------------
# 5. parity: windows that the replay could not reproduce at all do not fail the check


def test_parity_fails_when_the_replay_reproduces_none_of_the_published_windows():
    from flows.parity import ParityReport, compare

    rec = {"symbol": "BTCUSDT", "cadence": "m1", "window_end": 60_000, "values": {"mid_price": 1.0}, "nulls": {},
           "book_valid": True, "event_count": 3, "last_gw_seq": 2, "close_recv_ts": 1, "registry_hash": "h",
           "venue": "bybit.linear"}
    online = {("BTCUSDT", "m1", 60_000): rec}
    report = compare(online, {}, ParityReport((0, 120_000), ["BTCUSDT"]))
    assert report.windows_compared == 0 and report.only_online == 1
    assert not report.ok  # PARITY OK with nothing compared and every published window missing offline


# ---------------------------------------------------------------------------------------------
# 6. datasets: the id is not tied to the lake (or the table identity): another lake whose tables
#    happen to be at the same versions returns the first lake's dataset


def test_dataset_of_another_lake_with_the_same_versions_is_not_the_cached_one(tmp_path):
    from flows.datasets import build_dataset, load_dataset
    from flows.kline_history import import_klines

    def lake_with(close):
        lake = Lake(str(tmp_path / f"lake-{close}"))
        import_klines(lake, [{**_kline("BTCUSDT", -1, D0 + i * 60_000), "close": close} for i in range(120)],
                      source="t")
        return lake

    a, b = lake_with("1.5"), lake_with("1.25")
    assert a.versions(["raw_kline"]) == b.versions(["raw_kline"])
    spec = {"symbols": ["BTCUSDT"], "from": D0 + 60 * 60_000, "to": D0 + 120 * 60_000}
    ma = build_dataset(spec, lake=a, data_dir=tmp_path / "data", publish=False)
    mb = build_dataset(spec, lake=b, data_dir=tmp_path / "data", publish=False)
    assert mb["lake_root"] == b.root
    closes = load_dataset(mb["dataset_id"], tmp_path / "data", as_="arrow")
    assert ma["dataset_id"] != mb["dataset_id"] or pc.max(closes.column("y_close_h")).as_py() == 1.25


# ---------------------------------------------------------------------------------------------
# 7. CLI: bad arguments end in tracebacks (or are silently replaced) instead of clear errors


def _cli(tmp_path, *args, module="tickcast.cli"):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TICKCAST_LAKE_ROOT": str(tmp_path / "lake"), "TICKCAST_DATA_DIR": str(tmp_path / "data"),
           "TICKCAST_LOG_LEVEL": "WARNING"}
    env.pop("KAFKA_BOOTSTRAP", None)
    env.pop("TICKCAST_KAFKA_BOOTSTRAP", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


PERIOD_ARGS = ("--from", "2026-01-01", "--to", "2026-01-02", "--symbols", "BTCUSDT")


def test_cli_replay_with_a_missing_registry_file_is_a_clear_error(tmp_path):
    r = _cli(tmp_path, "replay", *PERIOD_ARGS, "--out", "o", "--registry", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-600:]
    r = _cli(tmp_path, *PERIOD_ARGS, "--out", "o", "--registry", str(tmp_path / "nope.yaml"),
             module="flows.offline_replay")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-600:]


def test_cli_replay_with_out_naming_an_existing_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = _cli(tmp_path, "replay", *PERIOD_ARGS, "--out", str(tmp_path / "afile"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-600:]


def test_cli_out_of_range_epoch_ms_is_a_clear_error(tmp_path):
    r = _cli(tmp_path, "dataset", "build", "--from", "99999999999999999999", "--to", "1", "--symbols", "BTCUSDT",
             "--no-publish")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-600:]


def test_cli_lake_retention_days_zero_is_refused_not_replaced_by_the_default(tmp_path):
    r = _cli(tmp_path, "lake", "retention", "--days", "0")
    assert r.returncode == 2, (r.returncode, r.stdout[-300:])


# ---------------------------------------------------------------------------------------------
# 8. replay start: Bybit sends an order-book snapshot only on (re)subscribe; when the last one is
#    more than book_lookback_ms (1 day) before the replay's start, the replay starts on a delta with
#    no book, while the online flow had a valid book all along
