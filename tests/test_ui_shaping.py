"""The dashboard's data shaping (ui/shaping.py, ui/render.py): pure functions over the API's JSON.

Record fixtures are validated against the API's own response models (api/schemas.py), so the shapes
tested here are the ones the API sends.
"""
from __future__ import annotations

import math

import pytest

from api import schemas as API
from ui import render as R
from ui import shaping as S

MIN = 60_000
T0 = 1_795_000_000_000 - (1_795_000_000_000 % MIN)


def vector(minute: int, close: float, **values) -> dict:
    v = {"symbol": "BTCUSDT", "venue": "bybit.linear", "cadence": "m1", "window_end": minute + MIN,
         "registry_hash": "abc", "values": {"close": close, **values}, "nulls": {}, "book_valid": True,
         "event_count": 10, "last_gw_seq": 5, "close_recv_ts": 1, "emit_ts": 2, "age_s": 0.5}
    API.FeatureVectorOut.model_validate(v)
    return v


def forecast(origin: int, last: float, levels=(0.1, 0.5, 0.9), horizon: int = 3, step: float = 0.01,
             **kw) -> dict:
    path = [[last * (1 + (h + 1) * step * (q - 0.5) * 2 + 0.001 * (h + 1)) for q in levels] for h in range(horizon)]
    fc = {"symbol": "BTCUSDT", "origin_ts": origin, "model_name": "m", "model_version": "3", "registry_hash": "",
          "horizon": horizon, "quantile_levels": list(levels), "last_close": last, "close_path": path,
          "realized_vol": [0.01] * len(levels), "price_range": [1.0] * len(levels), "p_up": 0.6, "p_flat": 0.3,
          "p_down": 0.1, "degraded": False, "reason": None, "simulated": False, "issued_ts": 123, **kw}
    API.ForecastOut.model_validate(fc)
    return fc


def signal(origin: int, action: str, strength: float = 0.5) -> dict:
    s = {"symbol": "BTCUSDT", "origin_ts": origin, "action": action, "strength": strength, "reason": "why",
         "model_version": "3", "degraded": False, "simulated": False, "issued_ts": 1}
    API.SignalOut.model_validate(s)
    return s


def alert(origin: int, target: str, actual: float, lo: float, hi: float) -> dict:
    a = {"symbol": "BTCUSDT", "origin_ts": origin, "target": target, "actual": actual, "q_low": lo, "q_high": hi,
         "direction": "above" if actual > hi else "below", "model_version": "3", "raised_ts": 9}
    API.AlertOut.model_validate(a)
    return a


def history_item(origin: int, last: float, qs: list[float], close_h: float | None, horizon: int = 30,
                 levels=(0.1, 0.5, 0.9)) -> dict:
    outcome = None
    if close_h is not None:
        outcome = {"status": "complete", "close_h": close_h, "q_low_level": levels[0], "q_high_level": levels[-1],
                   "close_q_low": qs[0], "close_q_high": qs[-1], "close_inside": qs[0] <= close_h <= qs[-1]}
    it = {"origin_ts": origin, "model_version": "3", "status": "served", "last_close": last, "horizon": horizon,
          "quantile_levels": list(levels), "close_h_q": qs, "action": "BUY", "outcome": outcome}
    API.HistoryItem.model_validate(it)
    return it


# ------------------------------------------------------------------------------------ candles
def test_candle_from_vector_recovers_open_and_volume_and_never_invents_a_wick():
    c = S.candle_from_vector(vector(T0, 101.0, body_rel_1m=0.01, log_volume_1m=math.log1p(250.0)))
    assert c["t"] == T0 and c["close"] == 101.0
    assert c["open"] == pytest.approx(100.0)  # C / (1 + body)
    assert c["volume"] == pytest.approx(250.0)
    assert c["high"] is None and c["low"] is None  # real m1 vectors carry no high/low
    c2 = S.candle_from_vector(vector(T0, 101.0, open=99.5, high=102.0, low=99.0, volume_1m=7.0,
                                     log_volume_1m=math.log1p(1000.0)))
    assert (c2["open"], c2["high"], c2["low"], c2["volume"]) == (99.5, 102.0, 99.0, 7.0)  # volume_1m first
    assert S.candle_from_vector(vector(T0, None)) is None  # no close, no candle
    assert S.candle_from_vector({**vector(T0, 1.0), "cadence": "s1"}) is None
    assert S.candle_from_vector(vector(T0, 101.0, body_rel_1m=float("nan")))["open"] is None


def test_candle_columns_bodies_wicks_colors():
    cols = S.candle_columns([
        {"t": T0, "open": 100.0, "high": 103.0, "low": 99.0, "close": 102.0, "volume": 5.0},
        {"t": T0 + MIN, "open": 102.0, "high": None, "low": None, "close": 101.0, "volume": None},
        {"t": T0 + 2 * MIN, "open": None, "high": None, "low": None, "close": 101.5, "volume": 1.0},
        {"t": T0 + 3 * MIN, "open": 100.0, "high": 100.5, "low": 99.0, "close": 101.0, "volume": 1.0},  # bad high
        {"t": T0 + 4 * MIN, "open": 1.0, "close": None},  # no close: dropped
    ])
    assert cols["x"] == [T0 + 30_000 + i * MIN for i in range(4)]
    assert cols["top"][:2] == [102.0, 102.0] and cols["bottom"][:2] == [100.0, 101.0]
    assert (cols["wick_lo"][0], cols["wick_hi"][0]) == (99.0, 103.0)
    assert (cols["wick_lo"][1], cols["wick_hi"][1]) == (101.0, 102.0)  # unknown: the wick is the body
    assert cols["color"][:3] == [S.UP_COLOR, S.DOWN_COLOR, S.FLAT_COLOR]
    assert cols["top"][2] == cols["bottom"][2] == 101.5  # a tick at the close without an open
    assert cols["wick_hi"][3] == 101.0  # a high below the body is not drawn
    assert math.isnan(cols["volume"][1]) and math.isnan(cols["high"][1])


def test_merge_candle_and_backtest_rows():
    rows = [{"origin_ts": T0, "open": 1.0, "close": 2.0}, {"origin_ts": T0 + MIN, "open": None, "close": None}]
    got = S.candles_from_backtest_rows(rows)
    assert got == [{"t": T0, "open": 1.0, "high": None, "low": None, "close": 2.0, "volume": None, "venue": None}]
    merged = S.merge_candle(got[0], {"t": T0, "open": None, "high": 2.5, "low": 0.5, "close": 2.1, "volume": 3.0})
    assert merged == {"t": T0, "open": 1.0, "high": 2.5, "low": 0.5, "close": 2.1, "volume": 3.0, "venue": None}


# ------------------------------------------------------------------------------------ forecast fan
def test_forecast_fan_anchor_positions_and_levels():
    fc = forecast(T0, 100.0, levels=(0.05, 0.1, 0.5, 0.9, 0.95), horizon=4)
    fan = S.forecast_fan(fc)
    assert fan["x"] == [T0 + 30_000 + h * MIN for h in range(5)]
    assert fan["step"] == [0, 1, 2, 3, 4]
    assert fan["lower"][0] == fan["upper"][0] == fan["median"][0] == 100.0
    assert fan["lower"][1:] == [s[1] for s in fc["close_path"]]  # q0.1, not q0.05
    assert fan["upper"][1:] == [s[3] for s in fc["close_path"]]
    assert fan["median"][1:] == [s[2] for s in fc["close_path"]]
    assert all(lo <= m <= hi for lo, m, hi in zip(fan["lower"], fan["median"], fan["upper"]))
    summ = S.forecast_summary(fc)
    assert summ["horizon"] == 4 and summ["median"] == fc["close_path"][-1][2]
    assert summ["median_ret"] == pytest.approx(summ["median"] / 100.0 - 1)


def test_forecast_fan_empty_for_unusable_forecasts():
    assert S.forecast_fan(None)["x"] == []
    bad = forecast(T0, 100.0)
    bad["close_path"][1] = bad["close_path"][1][:2]  # a step with the wrong number of quantiles
    assert S.forecast_fan(bad)["x"] == []
    assert S.forecast_fan({**forecast(T0, 100.0), "last_close": None})["x"] == []
    assert S.forecast_summary(None) is None


# ------------------------------------------------------------------------------------ markers
def test_fired_signals_are_changes_to_buy_or_sell():
    acts = ["FLAT", "BUY", "BUY", "SELL", "SELL", "FLAT", "BUY", "FLAT", "FLAT"]
    sigs = [signal(T0 + i * MIN, a) for i, a in enumerate(acts)]
    fired = S.fired_signals(list(reversed(sigs)))  # order of arrival does not matter
    assert [(s["origin_ts"] - T0) // MIN for s in fired] == [1, 3, 6]
    assert [s["action"] for s in fired] == ["BUY", "SELL", "BUY"]


def test_signal_markers_sit_below_buys_and_above_sells():
    candles = {T0: {"t": T0, "open": 100.0, "high": 101.0, "low": 99.0, "close": 100.5},
               T0 + MIN: {"t": T0 + MIN, "open": 100.5, "high": None, "low": None, "close": 100.0}}
    cols = S.signal_marker_columns([signal(T0, "BUY"), signal(T0 + MIN, "SELL"), signal(T0 + 2 * MIN, "BUY")],
                                   candles, pad=0.5)
    assert cols["x"] == [T0 + 30_000, T0 + MIN + 30_000]  # no candle for the third: no marker
    assert cols["y"] == [98.5, 101.0]
    assert cols["marker"] == ["triangle", "inverted_triangle"]
    assert S.marker_pad(list(candles.values())) == pytest.approx(max(0.5 * 2.0, 100.0 * 2e-4))


def test_alert_markers_at_the_horizon_minute():
    H = 5
    at = T0 + H * MIN
    candles = {at: {"t": at, "open": 100.0, "high": 110.0, "low": 99.0, "close": 109.0},
               at + MIN: {"t": at + MIN, "open": 100.0, "high": 101.0, "low": 99.0, "close": 100.0}}
    alerts = [alert(T0, "close", 109.0, 98.0, 104.0), alert(T0, "realized_vol", 0.05, 0.001, 0.01),
              alert(T0 + MIN, "price_range", 2.0, 5.0, 8.0)]
    cols = S.alert_marker_columns(alerts, candles, H, pad=0.5)
    assert cols["x"] == [at + 30_000, at + MIN + 30_000]
    assert cols["y"][0] == 109.0  # the actual close
    assert cols["y"][1] == 99.0 - 1.0  # a range alert below: beyond the candle
    assert cols["targets"][0] == "close, realized_vol" and cols["direction"] == ["above", "below"]
    assert "close above" in cols["detail"][0]
    assert S.alert_marker_columns(alerts, candles, None, 0.5)["x"] == []


# ------------------------------------------------------------------------------------ features, states, banner
def test_feature_rows_key_features_first_and_null_reasons():
    fv = vector(T0, 100.0, zeta=1.0, alpha=2.0, volume_1m=3.0, funding_rate=None)
    fv["nulls"] = {"funding_rate": "no ticker yet"}
    rows = S.feature_rows(fv)
    assert [r["name"] for r in rows] == ["close", "volume_1m", "funding_rate", "alpha", "zeta"]
    assert rows[2] == {"name": "funding_rate", "value": "null", "note": "no ticker yet"}
    assert S.feature_rows(None) == []


def test_simulated_sources():
    assert S.simulated_sources([forecast(T0, 1.0)], [vector(T0, 1.0)]) == {}
    sim = S.simulated_sources([forecast(T0, 1.0, simulated=True)],
                              [{**vector(T0, 1.0), "venue": "sim.linear"}, {**vector(T0, 1.0), "symbol": "ETHUSDT",
                                                                            "venue": "sim.linear"}])
    assert sim == {"venue sim.linear": ["BTCUSDT", "ETHUSDT"], "flagged simulated": ["BTCUSDT"]}
    assert S.simulated_text(sim) == "venue sim.linear: BTCUSDT, ETHUSDT; flagged simulated: BTCUSDT"
    assert not S.is_simulated_venue("simple.exchange") and S.is_simulated_venue("sim")


@pytest.mark.parametrize("kw,kind", [
    ({"api_error": "connection refused"}, "unreachable"),
    ({"symbol": None}, "no_data"),
    ({"model_version": None, "has_candles": True}, "no_model"),
    ({"model_version": None, "has_candles": False}, "no_model_no_data"),
    ({"model_version": None, "model_checked": False, "has_candles": False, "has_forecast": False}, "no_data"),
    ({"has_candles": False, "has_forecast": False}, "no_data"),
    ({"has_forecast": False, "last_reason": "2 of 8 lookback minutes missing"}, "waiting"),
    ({}, "ok"),
])
def test_live_state(kw, kind):
    args = {"api_error": None, "model_version": "3", "model_checked": True, "has_candles": True,
            "has_forecast": True, "symbol": "BTCUSDT", **kw}
    st = S.live_state(**args)
    assert st["kind"] == kind
    if kind == "waiting":
        assert "lookback" in st["message"]
    if kind == "unreachable":
        assert "connection refused" in st["message"]


# ------------------------------------------------------------------------------------ backtest and strategy
def test_trade_markers_fill_at_the_next_open():
    rows = [{"origin_ts": T0 + i * MIN, "open": 100.0 + i, "close": 100.5 + i, "position": p, "action": None}
            for i, p in enumerate([0.0, 1.0, 1.0, -1.0, 0.0, 0.0, 1.0])]
    cols = S.trade_marker_columns(rows)
    assert cols["x"] == [T0 + k * MIN + 30_000 for k in (2, 4, 5)]  # the last change has no next bar yet
    assert cols["y"] == [102.0, 104.0, 105.0]
    assert cols["side"] == ["BUY", "SELL", "BUY"]
    assert cols["text"][0].startswith("buy to open long")
    assert cols["text"][1].startswith("sell to reverse to short")
    assert cols["text"][2].startswith("buy to close short")


def test_equity_monthly_and_summaries():
    eq = S.equity_columns([{"minute_ts": T0, "equity": 10_000.0}, {"minute_ts": T0 + MIN, "equity": 10_050.0},
                           {"minute_ts": T0 + 2 * MIN, "equity": None}], 10_000.0)
    assert eq == {"x": [T0 + 30_000, T0 + MIN + 30_000], "equity": [10_000.0, 10_050.0], "pnl": [0.0, 50.0]}
    m = S.monthly_pnl_columns({"monthly_pnl": {"2026-11": -5.0, "2026-10": 12.5, "2026-09": float("nan")}})
    assert m["month"] == ["2026-10", "2026-11"] and m["pnl"] == [12.5, -5.0]
    assert m["color"] == [S.UP_COLOR, S.DOWN_COLOR] and m["text"] == ["+12.50", "-5.00"]
    bt = {"symbol": "BTCUSDT", "candles": 3, "model_version": "3",
          "rows": [{"origin_ts": T0, "open": 1.0, "close": 1.0, "close_h_actual": None, "action": "BUY",
                    "position": 1.0}, {"origin_ts": T0 + MIN, "open": 1.0, "close": 1.0, "close_h_actual": None,
                                       "action": None, "position": 0.0}],
          "quality": {"forecasts": 1, "no_forecast": 1, "close_interval_coverage": 0.75, "coverage_n": 4,
                      "nominal_coverage": 0.8, "direction_hit_rate": 0.5, "direction_n": 2},
          "stats": {"pnl": -3.5, "total_return": -0.00035, "win_rate": 0.0, "n_trades": 1, "fees_paid": 1.3},
          "equity": [], "config": {"capital": 10_000.0, "fee_bps": 5.5, "slippage_bps": 1.0}}
    API.BacktestOut.model_validate(bt)
    s = S.backtest_summary(bt)
    assert (s["pnl"], s["hit_rate"], s["coverage"], s["n_trades"]) == (-3.5, 0.5, 0.75, 1)
    assert s["actions"] == {"BUY": 1, "SELL": 0, "FLAT": 0, "none": 1}
    pnl = {"symbol": "BTCUSDT", "days": 30, "from_ts": 0, "to_ts": 1, "minutes": 2, "signals": {"BUY": 2},
           "stats": {"pnl": 5.0, "sharpe": 1.2, "max_drawdown": 0.01}, "equity": [], "config": {"capital": 1.0}}
    API.PnlOut.model_validate(pnl)
    st = S.strategy_summary(pnl)
    assert (st["pnl"], st["sharpe"], st["max_drawdown"], st["capital"]) == (5.0, 1.2, 0.01, 1.0)
    assert S.backtest_summary(None) == {} and S.strategy_summary(None) == {}


# ------------------------------------------------------------------------------------ model quality
def test_calibration_coverage_and_skill_from_the_live_record():
    items = [
        history_item(T0, 100.0, [98.0, 101.0, 104.0], 99.0),   # below the median, inside
        history_item(T0 + MIN, 100.0, [98.0, 101.0, 104.0], 105.0),  # above q0.9
        history_item(T0 + 2 * MIN, 100.0, [98.0, 101.0, 104.0], 102.0),  # inside, above the median
        history_item(T0 + 3 * MIN, 100.0, [98.0, 101.0, 104.0], 97.0),  # below q0.1
        history_item(T0 + 4 * MIN, 100.0, [98.0, 101.0, 104.0], None),  # no outcome yet: ignored
    ]
    cal = S.calibration_rows(items)
    assert [(r["level"], r["observed"], r["n"]) for r in cal] == [(0.1, 0.25, 4), (0.5, 0.5, 4), (0.9, 0.75, 4)]
    assert cal[0]["error"] == pytest.approx(0.15)
    cov = S.rolling_coverage(items, window=2)
    assert cov["coverage"] == [1.0, 0.5, 0.5, 0.5]
    assert cov["x"][0] == T0 + 30 * MIN + 30_000  # when the outcome became known
    sk = S.live_skill(items)
    assert sk["n"] == 4
    assert sk["mae_model"] == pytest.approx((2 + 4 + 1 + 4) / 4)  # |101 - y|
    assert sk["mae_random_walk"] == pytest.approx((1 + 5 + 2 + 3) / 4)  # |100 - y|
    assert sk["skill_vs_random_walk"] == pytest.approx(1 - 11 / 11)
    assert sk["hit_rate"] == pytest.approx(0.5) and sk["hit_rate_always_up"] == pytest.approx(0.5)
    assert sk["coverage"] == pytest.approx(0.5) and sk["nominal_coverage"] == pytest.approx(0.8)
    assert S.live_skill([])["n"] == 0


def test_model_metric_rows():
    assert S.model_metric_rows({"tags": {"dataset": "x", "val_close_pinball": "0.0123", "test_close_coverage": "0.8"}}) \
        == [{"metric": "test_close_coverage", "value": "0.8"}, {"metric": "val_close_pinball", "value": "0.0123"}]
    assert S.model_metric_rows({"metrics": {"main_mae": 1.5, "baseline_mae": None}}) == [
        {"metric": "main_mae", "value": "1.5"}]
    assert S.model_metric_rows(None) == []
    # the baseline-vs-main comparison has its own table
    assert S.model_metric_rows({"metrics": {"cmp_main_rv_pinball": 1.0, "val_rv_pinball": 2.0}}) == [
        {"metric": "val_rv_pinball", "value": "2"}]


def test_variate_comparison_rows():
    m = {"cmp_baseline_close_pinball": 0.002, "cmp_main_close_pinball": 0.0019, "cmp_baseline_rv_coverage": 0.8,
         "cmp_main_rv_coverage": 0.82, "cmp_baseline_range_mae": 0.0, "cmp_main_range_mae": 0.1,
         "cmp_baseline_rv_pinball": 1.0, "val_close_pinball": 5.0}  # rv pinball: no main value -> no row
    rows = S.variate_comparison_rows({"metrics": m})
    assert rows == [
        {"target": "close", "metric": "pinball", "baseline": "0.002", "main": "0.0019", "change": "-5.0 %"},
        {"target": "rv", "metric": "coverage", "baseline": "0.8", "main": "0.82", "change": "+2.5 %"},
        {"target": "range", "metric": "mae", "baseline": "0", "main": "0.1", "change": "n/a"}]
    assert S.variate_comparison_rows({"metrics": {"val_close_pinball": 1.0}}) == []
    assert S.variate_comparison_rows(None) == [] and S.variate_comparison_rows({"metrics": None}) == []


# ------------------------------------------------------------------------------------ monitoring
def test_percentiles_and_latency_rows():
    p = S.percentiles([5, 1, 3, 2, 4, float("nan"), None])
    assert p == {"n": 5, "p50": 3, "p90": 5, "p99": 5, "max": 5}
    assert S.percentiles([])["p50"] is None
    rows = S.latency_rows({"feature_emit": [1.0, 2.0], "forecast": [], "sse_delivery": [7.0]},
                          {"inference": {"n": 3, "p50_ms": 0.4, "p99_ms": 0.9, "last_ms": 0.5}})
    assert [r["n"] for r in rows] == [2, 0, 1, 3, 0]
    assert rows[3]["p50"] == 0.4 and rows[3]["p99"] == 0.9 and rows[4]["p50"] is None


def test_monitoring_psi_and_health_rows():
    mon = {"model_version": "3", "latency": {}, "recent_alerts": [], "sse_clients": 1, "psi_note": None,
           "symbols": {"ETHUSDT": {"minutes_served": 10, "minutes_degraded": 1, "minutes_skipped": 2,
                                   "data_gap_minutes": 1, "served_ratio": 11 / 14, "alerts": 2, "feature_age_s": 3.0,
                                   "coverage": {"close": {"n": 10, "inside": 8, "coverage": 0.8}},
                                   "psi": {"a": 0.05, "b": 0.3, "c": 0.15}, "psi_max": 0.3,
                                   "sequence_errors": 3, "sequence_error_reasons": {"update id gap": 2, "crossed": 1},
                                   "book_invalid_minutes": 2},
                       "BTCUSDT": {"minutes_served": 0, "minutes_degraded": 0, "minutes_skipped": 0,
                                   "data_gap_minutes": 0, "served_ratio": None, "alerts": 0, "feature_age_s": None,
                                   "coverage": {}, "psi": {}, "psi_max": None}}}
    API.MonitoringOut.model_validate(mon)
    rows = S.monitoring_rows(mon, {"ETHUSDT": {"book_valid": False}})
    assert [r["symbol"] for r in rows] == ["BTCUSDT", "ETHUSDT"]
    assert rows[1]["gaps"] == 1 and rows[1]["coverage"] == 0.8 and rows[1]["book_valid"] is False
    assert rows[0]["served_ratio"] is None and rows[0]["book_valid"] is None
    assert (rows[1]["seq_errors"], rows[1]["seq_reasons"], rows[1]["book_invalid_minutes"]) == \
        (3, "crossed 1, update id gap 2", 2)
    assert (rows[0]["seq_errors"], rows[0]["seq_reasons"]) == (0, "")
    psi = S.psi_rows(mon, top=2)
    assert [(r["feature"], r["level"]) for r in psi] == [("b", "shifted"), ("c", "moderate")]
    health = {"status": "degraded", "components": {
        "broker": {"status": "ok", "detail": {"error": None, "caught_up": True}},
        "features": {"status": "degraded", "detail": {"BTCUSDT": {"status": "down", "age_s": None}}}}}
    API.HealthOut.model_validate(health)
    hr = S.health_rows(health)
    assert hr == [{"component": "broker", "status": "ok", "detail": "caught_up=True"},
                  {"component": "features", "status": "degraded", "detail": "BTCUSDT: down"}]


# ------------------------------------------------------------------------------------ formatting and HTML
def test_formatting():
    assert S.fmt_price(96123.456) == "96,123.46" and S.fmt_price(0.301254) == "0.301254"
    assert S.fmt_num(0.01234, 2, pct=True, signed=True) == "+1.23%" and S.fmt_num(None) == "n/a"
    assert S.fmt_ts(T0).endswith("UTC") and S.fmt_ts("x") == "n/a"
    assert S.fmt_age(30) == "30 s" and S.fmt_age(600) == "10 min" and S.fmt_age(None) == "never"
    assert S.fmt_value(1e-7) == "1.000e-07" and S.fmt_value(0.5) == "0.5" and S.fmt_value(None) == "null"
    assert S.num(True) is None and S.num("1.5") == 1.5 and S.num(float("inf")) is None


def test_render_escapes_api_text():
    html = R.cards([("reason", "<script>x</script>", "a & b", "t")])
    assert "<script>" not in html and "&lt;script&gt;" in html and "a &amp; b" in html
    t = R.table(["a", "b"], [("<b>", R.badge("ok"))], "tbl", raw_cols=(1,))
    assert "&lt;b&gt;" in t and "tc-badge" in t
    assert 'data-testid="x"' in R.banner("sim", "SIMULATED", "x")


def test_candles_from_api_keep_ohlcv_and_drop_unusable_rows():
    items = [{"origin_ts": 60_000, "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 3.0, "venue": "sim.linear",
              "history": True},
             {"origin_ts": 120_000, "open": None, "high": None, "low": None, "close": None, "volume": None},
             {"origin_ts": True, "close": 1.0}]
    assert S.candles_from_api(items) == [{"t": 60_000, "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5,
                                          "volume": 3.0, "venue": "sim.linear"}]


def test_candle_from_vector_prefers_the_candle_bar_fields():
    fv = {"cadence": "m1", "window_end": 120_000, "venue": "sim.linear",
          "values": {"close": 10.0, "open_1m": 9.0, "high_1m": 11.0, "low_1m": 8.5, "candle_volume_1m": 4.0,
                     "volume_1m": 3.9, "body_rel_1m": 0.5}}
    c = S.candle_from_vector(fv)
    assert (c["t"], c["open"], c["high"], c["low"], c["close"], c["volume"]) == (60_000, 9.0, 11.0, 8.5, 10.0, 4.0)
