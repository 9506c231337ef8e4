"""The prediction service's plain parts: input windows, forecasts and signals, outcomes and alerts, drift,
the Delta store, the SSE hub, parameter parsing, the model contract checks and the job runner."""
from __future__ import annotations

import asyncio
import json
import math
import sys
import time

import numpy as np
import pytest

from api import contract_model
from api.drift import psi, summarise, summary_for
from api.forecasting import ForecastError, build_forecast, derive_signal, no_forecast_signal
from api.modelrt import ModelContractError, ModelSpec, OnnxModel, parse_metadata
from api.outcomes import compute_outcome, horizon_status
from api.window import MINUTE_MS, MinuteObs, SymbolHistory, assemble_window
from flows.targets import forward_targets

T0 = 1_790_000_040_000 - 1_790_000_040_000 % MINUTE_MS
VARS = ("close", "log_return_1m", "range_rel_1m")


def obs(i: int, close: float | None = 100.0, **values) -> MinuteObs:
    v = {"close": close, "log_return_1m": 0.001 * i, "range_rel_1m": 0.002, **values}
    return MinuteObs(T0 + i * MINUTE_MS, v, "bybit.linear", values.pop("_hash", "h1"), True, {}, 0)


def history(rows: dict[int, MinuteObs], capacity: int = 100) -> SymbolHistory:
    h = SymbolHistory(capacity)
    for i in sorted(rows):
        h.add(rows[i])
    return h


def spec(**kw) -> ModelSpec:
    base = dict(name="m", version="7", variates=VARS, lookback=4, horizon=3, quantiles=(0.1, 0.5, 0.9),
                flat_threshold=0.001, registry_hash="", cadence="m1")
    base.update(kw)
    return ModelSpec(**base)


# ------------------------------------------------------------------------------------ history
def test_history_add_classifies_new_duplicate_late_and_gaps():
    h = SymbolHistory(5)
    assert h.add(obs(0)).kind == "new"
    r = h.add(obs(3))
    assert (r.kind, r.gap_minutes, r.gap_from) == ("new", 2, T0 + MINUTE_MS)
    assert h.add(obs(3)).kind == "duplicate"
    assert h.add(obs(1)).kind == "late"
    for i in range(4, 9):
        h.add(obs(i))
    assert len(h) == 5 and h.oldest == T0 + 4 * MINUTE_MS and h.latest == T0 + 8 * MINUTE_MS
    assert [r is None for r in h.rows(T0 + 3 * MINUTE_MS, T0 + 5 * MINUTE_MS)] == [True, False, False]
    snap = h.snapshot()
    h.add(obs(9))
    assert snap.latest == T0 + 8 * MINUTE_MS  # a snapshot does not follow later adds


# ------------------------------------------------------------------------------------ windows
def test_full_window_is_the_raw_variates_oldest_first():
    h = history({i: obs(i, 100.0 + i) for i in range(6)})
    w = assemble_window(h, T0 + 5 * MINUTE_MS, VARS, 4)
    assert not w.degraded and w.reason is None and w.last_close == 105.0
    assert w.x.dtype == np.float32 and w.x.shape == (4, 3)
    assert w.x[:, 0].tolist() == [102.0, 103.0, 104.0, 105.0]


def test_missing_minutes_and_nulls_are_filled_and_marked_degraded():
    rows = {i: obs(i, 100.0 + i) for i in range(6) if i != 3}
    rows[4] = obs(4, 104.0, log_return_1m=float("nan"))
    w = assemble_window(history(rows), T0 + 5 * MINUTE_MS, VARS, 4)
    assert w.degraded
    assert "1 of 4 lookback minutes missing" in w.reason and "log_return_1m" in w.reason
    assert w.x[:, 0].tolist() == [102.0, 102.0, 104.0, 105.0]  # minute 3 carried forward from 2
    assert w.x[:, 1].tolist() == pytest.approx([0.002, 0.002, 0.002, 0.005])  # NaN at 4 carried from 2
    # a leading gap takes the first value after it
    w2 = assemble_window(history({i: obs(i, 100.0 + i) for i in (3, 4, 5)}), T0 + 5 * MINUTE_MS, VARS, 4)
    assert w2.degraded and w2.x[:, 0].tolist() == [103.0, 103.0, 104.0, 105.0]


def test_a_variate_absent_from_the_whole_window_is_fed_as_zero_with_the_reason():
    h = history({i: obs(i) for i in range(4)})
    w = assemble_window(h, T0 + 3 * MINUTE_MS, ("close", "funding_rate"), 4)
    assert w.degraded and "funding_rate" in w.reason and w.x[:, 1].tolist() == [0.0] * 4


def test_no_forecast_without_enough_history_or_without_a_close():
    h = history({i: obs(i) for i in (2, 3)})
    w = assemble_window(h, T0 + 3 * MINUTE_MS, VARS, 4)
    assert w.x is None and "only 2 of the 4 lookback minutes" in w.reason
    h = history({i: obs(i, None if i == 3 else 100.0) for i in range(4)})
    w = assemble_window(h, T0 + 3 * MINUTE_MS, VARS, 4)
    assert w.x is None and "close" in w.reason
    w = assemble_window(h, T0 + 9 * MINUTE_MS, VARS, 4)
    assert w.x is None and "no m1 feature vector" in w.reason


def test_registry_hash_mismatch_degrades():
    h = history({i: obs(i) for i in range(4)})
    w = assemble_window(h, T0 + 3 * MINUTE_MS, VARS, 4, model_registry_hash="other")
    assert w.degraded and "differs from the model's other" in w.reason
    # a kline-only model (trained on a kline dataset) carries the kline feature set's hash: its
    # variates are the same candle code under any registry, so that is no reason to degrade
    from flows.candles import kline_registry_hash

    w = assemble_window(h, T0 + 3 * MINUTE_MS, VARS, 4, model_registry_hash=kline_registry_hash())
    assert not w.degraded and w.x is not None


# ------------------------------------------------------------------------------------ forecasts and signals
def _outputs(logret, rv=(0.01, 0.02, 0.03), rng=(0.02, 0.03, 0.04), p=(0.2, 0.3, 0.5)):
    return {"close_logret_q": np.array([logret], dtype=float), "rv_q": np.array([rv], dtype=float),
            "range_rel_q": np.array([rng], dtype=float), "direction_p": np.array([p], dtype=float)}


def _fc(sp, logret, **kw):
    return build_forecast(sp, _outputs(logret, **kw), 0, symbol="BTCUSDT", origin_ts=T0, last_close=200.0,
                          degraded=False, reasons=[], simulated=False, registry_hash="", issued_ts=1)


def test_forecast_prices_follow_the_contract():
    sp = spec()
    logret = [[-0.01, 0.0, 0.01], [-0.02, 0.001, 0.02], [-0.03, 0.002, 0.03]]
    fc = _fc(sp, logret)
    assert fc["close_path"][2] == pytest.approx([200 * math.exp(-0.03), 200 * math.exp(0.002), 200 * math.exp(0.03)])
    assert fc["price_range"] == pytest.approx([4.0, 6.0, 8.0])
    assert fc["realized_vol"] == pytest.approx([0.01, 0.02, 0.03])
    assert (fc["p_down"], fc["p_flat"], fc["p_up"]) == pytest.approx((0.2, 0.3, 0.5))
    assert not fc["degraded"]
    from tickcast.serde import Serde

    Serde().encode("Forecast", fc, validate=True)  # a valid Forecast record


def test_crossed_quantiles_are_sorted_and_flagged_and_nan_refused():
    sp = spec()
    fc = _fc(sp, [[0.01, 0.0, -0.01]] * 3)
    assert fc["degraded"] and "crossed" in fc["reason"]
    assert fc["close_path"][0] == sorted(fc["close_path"][0])
    with pytest.raises(ForecastError):
        _fc(sp, [[float("nan"), 0.0, 0.1]] * 3)
    with pytest.raises(ForecastError):
        _fc(sp, [[0.0, 0.0, 0.1]] * 3, p=(0.0, 0.0, 0.0))
    with pytest.raises(ForecastError, match="overflow"):  # finite log-returns, infinite prices
        _fc(sp, [[0.0, 0.0, 800.0]] * 3)


@pytest.mark.parametrize("median,p,action", [
    (0.01, (0.1, 0.2, 0.7), "BUY"),
    (-0.01, (0.7, 0.2, 0.1), "SELL"),
    (0.0005, (0.1, 0.2, 0.7), "FLAT"),  # classifier says up, median inside the flat band
    (0.01, (0.2, 0.6, 0.2), "FLAT"),
])
def test_fallback_signal_rule(median, p, action):
    sp = spec()
    fc = _fc(sp, [[median - 0.01, median, median + 0.01]] * 3, p=p)
    sig = derive_signal(sp, fc)
    assert sig["action"] == action and 0 <= sig["strength"] <= 1 and sig["reason"]
    if action == "BUY":
        assert sig["strength"] == pytest.approx(0.6)


def test_tuned_signal_rule_threshold_hold_and_degraded():
    sp = spec(signal={"threshold": 0.3, "hold": 5})
    up = _fc(sp, [[0.0, 0.001, 0.002]] * 3, p=(0.1, 0.3, 0.6))
    assert derive_signal(sp, up)["action"] == "BUY"  # 0.5 > 0.3
    mild = _fc(sp, [[0.0, 0.001, 0.002]] * 3, p=(0.3, 0.3, 0.4))
    s = derive_signal(sp, mild)
    assert s["action"] == "FLAT" and s["strength"] == pytest.approx(1 - 0.1 / 0.3)
    held = derive_signal(sp, mild, held={"origin_ts": T0 - MINUTE_MS, "action": "SELL", "strength": 0.4})
    assert held["action"] == "SELL" and held["strength"] == 0.4 and "holding the SELL" in held["reason"]
    never = derive_signal(spec(signal={"threshold": float("inf"), "hold": 1}), up)
    assert never["action"] == "FLAT" and "always FLAT" in never["reason"]
    up["degraded"], up["reason"] = True, "x"
    assert derive_signal(sp, up)["strength"] == pytest.approx(0.25)
    nf = no_forecast_signal("BTCUSDT", T0, "why", "7", False, 3)
    assert nf["action"] == "FLAT" and nf["strength"] == 0 and nf["reason"] == "no forecast: why" and nf["degraded"]


# ------------------------------------------------------------------------------------ outcomes
def _pred(sp, close_path, rv, rng, origin=T0):
    return {"symbol": "BTCUSDT", "origin_ts": origin, "model_version": "7", "horizon": sp.horizon,
            "quantile_levels": list(sp.quantiles), "close_path": close_path, "realized_vol": rv, "price_range": rng}


def test_outcome_matches_flows_targets_and_raises_alerts():
    rng_ = np.random.default_rng(3)
    close = 100 * np.exp(np.cumsum(rng_.normal(0, 0.001, 8)))
    high, low = close * 1.001, close * 0.999
    rows = {i: obs(i, float(close[i]), high=float(high[i]), low=float(low[i])) for i in range(8)}
    h = history(rows)
    sp = spec()
    tg = forward_targets(close, high, low, horizon=3)
    t = 2
    ch, rv, rg = float(tg["close_h"][t]), float(tg["rv_h"][t]), float(tg["range_h"][t])
    # close interval far below the actual, rv interval around it, range interval far above it
    pred = _pred(sp, [[1, 2, 3]] * 3, [rv * 0.5, rv, rv * 2], [rg * 3, rg * 4, rg * 5], origin=T0 + t * MINUTE_MS)
    assert horizon_status(h, pred["origin_ts"], 3) == "ready"
    row, alerts = compute_outcome(h, pred, flat_threshold=0.001, q_lo=0, q_hi=2, joined_ts=9)
    assert row["status"] == "complete" and row["close_h"] == pytest.approx(ch)
    assert row["realized_vol"] == pytest.approx(rv) and row["price_range"] == pytest.approx(rg)
    assert row["ret_1m"] == pytest.approx(math.log(close[t + 1] / close[t]))
    assert (row["close_inside"], row["rv_inside"], row["range_inside"]) == (False, True, False)
    got = {(a["target"], a["direction"]) for a in alerts}
    assert got == {("close", "above"), ("price_range", "below")}
    from tickcast.serde import Serde

    for a in alerts:
        Serde().encode("Alert", a, validate=True)


def test_incomplete_horizon_and_missing_high_low():
    sp = spec()
    rows = {i: obs(i, 100.0 + i) for i in range(7) if i != 4}
    h = history(rows)
    assert horizon_status(h, T0 + 2 * MINUTE_MS, 3) == "wait"  # minute 4 may still come late
    h.add(obs(7))
    assert horizon_status(h, T0 + 2 * MINUTE_MS, 3) == "incomplete"
    row, alerts = compute_outcome(h, _pred(sp, [[1, 2, 3]] * 3, [0, 1, 2], [0, 1, 2], origin=T0 + 2 * MINUTE_MS),
                                  flat_threshold=0.001, q_lo=0, q_hi=2, joined_ts=1)
    assert row["status"] == "incomplete" and "1 of the 3 horizon minutes" in row["reason"] and alerts == []
    h2 = history({i: obs(i, 100.0 + i) for i in range(6)})  # no high/low in the vectors
    row, _ = compute_outcome(h2, _pred(sp, [[90, 100, 110]] * 3, [0, 1, 2], [0, 1, 2], origin=T0),
                             flat_threshold=0.001, q_lo=0, q_hi=2, joined_ts=1)
    assert row["status"] == "complete" and row["price_range"] is None and row["range_inside"] is None
    assert "high/low" in row["reason"] and row["close_inside"] is True


# ------------------------------------------------------------------------------------ drift
def test_psi_is_small_for_the_training_distribution_and_large_after_a_shift():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 20_000)
    s = summarise({"x": train}, per_symbol={"BTCUSDT": {"x": train * 2}})
    b = summary_for(s, "ETHUSDT")["x"]
    assert len(b["cuts"]) == 9 and sum(b["fractions"]) == pytest.approx(1.0)
    assert psi(rng.normal(0, 1, 2000), b["cuts"], b["fractions"]) < 0.02
    assert psi(rng.normal(1.5, 1, 2000), b["cuts"], b["fractions"]) > 0.5
    assert psi([1.0] * 10, b["cuts"], b["fractions"]) is None
    assert summary_for(s, "BTCUSDT")["x"]["cuts"] != b["cuts"]


# ------------------------------------------------------------------------------------ store
def _row(origin, version="1", sym="BTCUSDT"):
    return {"symbol": sym, "origin_ts": origin, "model_name": "m", "model_version": version, "status": "served",
            "degraded": False, "reason": None, "registry_hash": "", "horizon": 2, "quantile_levels": [0.1, 0.5, 0.9],
            "last_close": 1.0, "close_path": [[1.0, 2.0, 3.0]] * 2, "realized_vol": [0.1, 0.2, 0.3],
            "price_range": [1.0, 2.0, 3.0], "p_up": 0.3, "p_flat": 0.4, "p_down": 0.3, "action": "FLAT",
            "strength": 0.4, "signal_reason": "r", "simulated": False, "issued_ts": 5}


def test_store_is_idempotent_and_shows_unflushed_rows(tmp_path):
    from api.store import PREDICTIONS, Store

    st = Store(str(tmp_path / "lake"))
    st.put(PREDICTIONS, [_row(T0), _row(T0)])
    assert len(st.query(PREDICTIONS)) == 1  # visible before the write
    st.flush()
    st.put(PREDICTIONS, [_row(T0), _row(T0 + MINUTE_MS), _row(T0, version="2"), _row(T0, sym="ETHUSDT")])
    st.flush()
    st.put(PREDICTIONS, [_row(T0 + MINUTE_MS)])
    st.flush()
    rows = st.query(PREDICTIONS, symbols=["BTCUSDT"])
    assert [(r["origin_ts"], r["model_version"]) for r in rows] == [(T0, "1"), (T0, "2"), (T0 + MINUTE_MS, "1")]
    assert rows[0]["close_path"] == [[1.0, 2.0, 3.0]] * 2
    assert st.query(PREDICTIONS, symbols=["BTCUSDT"], origin_from=T0 + 1, origin_to=T0 + MINUTE_MS)[0]["origin_ts"] \
        == T0 + MINUTE_MS
    assert len(st.keys(PREDICTIONS)) == 4
    from deltalake import DeltaTable

    assert DeltaTable(st.uri(PREDICTIONS)).to_pyarrow_table().num_rows == 4
    assert st.last_error is None


# ------------------------------------------------------------------------------------ SSE hub
def test_hub_replays_after_last_event_id_filters_symbols_and_drops_slow_clients():
    from api.sse import EventHub

    async def go():
        dropped = []
        hub = EventHub(buffer_size=5, queue_size=2, heartbeat_s=0, on_drop=lambda: dropped.append(1))
        hub.start()
        ids = [hub.publish("signal", {"symbol": s, "i": i}, s) for i, s in enumerate("ABABAB")]
        assert ids == sorted(ids) and len(set(ids)) == 6
        sub = hub.subscribe({"A"}, ids[1])
        assert [json.loads(e.raw.decode().split("data: ")[1])["i"] for e in sub.replay] == [2, 4]
        assert not sub.gap
        old = hub.subscribe(None, ids[0] - 5)
        assert old.gap and len(old.replay) == 5  # the buffer keeps 5
        frames = []
        agen = hub.stream(sub)
        frames.append(await agen.__anext__())
        frames.append(await agen.__anext__())
        hb = await agen.__anext__()
        assert b"event: heartbeat" in hb and b"id:" not in hb
        hub.publish("signal", {"symbol": "B"}, "B")
        hub.publish("alert", {"symbol": "A"}, "A")
        nxt = await agen.__anext__()
        assert nxt.startswith(b"event: alert\r\nid: ")
        slow = hub.subscribe(None, None)
        for _ in range(3):
            hub.publish("signal", {"symbol": "A"}, "A")
        assert slow.dropped and dropped
        await agen.aclose()
        assert sub not in hub.subs
        await hub.stop()

    asyncio.run(go())


# ------------------------------------------------------------------------------------ parameters
def test_time_parsing_and_ranges():
    from fastapi import HTTPException

    from api.main import parse_time, time_range

    assert parse_time("1790000000000", "from") == 1_790_000_000_000
    assert parse_time("2026-01-01T00:00:00Z", "from") == parse_time("2026-01-01T00:00:00", "from") \
        == parse_time("2026-01-01", "from") == 1_767_225_600_000
    assert parse_time("2026-01-01T01:00:00+01:00", "to") == 1_767_225_600_000
    for bad in ("tomorrow", "2026-13-01", "99999999999999", "-5", "2200-01-01"):
        with pytest.raises(HTTPException) as e:
            parse_time(bad, "from")
        assert e.value.status_code == 422 and "from" in e.value.detail
    assert time_range(None, "1000000", 0, 500) == (999_500, 1_000_000)
    assert time_range("1000", None, 10**9, 500) == (1000, 10**9)  # to: the latest minute, as documented
    with pytest.raises(HTTPException):
        time_range("2000", "1000", 0, 1)
    with pytest.raises(HTTPException):
        time_range("2026-01-01", "2026-03-01", 0, 1)


# ------------------------------------------------------------------------------------ model contract
def test_metadata_parsing_refuses_what_breaks_the_contract():
    good = {"tickcast.variates": '["close"]', "tickcast.lookback": "4", "tickcast.horizon": "3",
            "tickcast.quantiles": "[0.1, 0.5, 0.9]", "tickcast.flat_threshold": "0.001", "tickcast.cadence": "m1",
            "tickcast.signal": '{"threshold": Infinity, "hold": 30}'}
    sp = parse_metadata(good, "3")
    assert sp.version == "3" and sp.lookback == 4 and sp.signal["threshold"] == float("inf")
    for key, val, needle in (("tickcast.variates", "[]", "variates"), ("tickcast.quantiles", "[0.9, 0.1]", "ascending"),
                             ("tickcast.cadence", "s1", "m1"), ("tickcast.lookback", "x", "lookback"),
                             ("tickcast.signal", '{"hold": 1}', "signal")):
        with pytest.raises(ModelContractError, match=needle):
            parse_metadata({**good, key: val})
    bad = dict(good)
    del bad["tickcast.horizon"]
    with pytest.raises(ModelContractError, match="horizon"):
        parse_metadata(bad)


def test_onnx_model_checks_outputs(tmp_path):
    import onnx

    p = contract_model.build(tmp_path / "ok" / "model.onnx", ["close", "x"], lookback=6, horizon=4, drift=0.001)
    m = OnnxModel(p, "1")
    assert m.spec.lookback == 6 and m.spec.variates == ("close", "x")
    x = np.ones((3, 6, 2), np.float32)
    x[:, :, 0] = np.exp(np.linspace(0, 0.01, 6))
    out = m.predict(x)
    assert out["close_logret_q"].shape == (3, 4, 3) and np.allclose(out["direction_p"].sum(axis=1), 1.0)
    with pytest.raises(ModelContractError, match="shape"):
        m.predict(np.ones((1, 5, 2), np.float32))
    proto = onnx.load(str(p))
    del proto.graph.output[3]  # no direction_p
    bad = tmp_path / "bad" / "model.onnx"
    bad.parent.mkdir()
    onnx.save(proto, str(bad))
    with pytest.raises(ModelContractError, match="direction_p"):
        OnnxModel(bad, "2")


# ------------------------------------------------------------------------------------ analytics
def test_candles_and_pnl_use_model_backtest():
    from api.analytics import candle_of, pnl_from_store
    from model.backtest import BacktestConfig, run_backtest

    o = obs(0, 101.0, body_rel_1m=0.01)
    assert candle_of(o)["open"] == pytest.approx(100.0)
    closes = [100.0, 101.0, 100.5, 102.0, 101.0]
    cand = [{"origin_ts": T0 + i * MINUTE_MS, "open": c * 0.999, "close": c} for i, c in enumerate(closes)]
    preds = [{"origin_ts": T0 + i * MINUTE_MS, "status": "served", "action": a, "issued_ts": 1, "model_version": "1"}
             for i, a in enumerate(["BUY", "BUY", "SELL", "FLAT"])]
    res = pnl_from_store(cand, preds, fee_bps=5.0, slippage_bps=1.0)
    ref = run_backtest([c["origin_ts"] for c in cand], [c["open"] for c in cand], closes, [1, 1, -1, 0, 0],
                       BacktestConfig(fee_bps=5.0, slippage_bps=1.0, funding=False))
    assert res["stats"]["total_return"] == pytest.approx(ref.stats["total_return"])
    assert res["signals"] == {"BUY": 2, "SELL": 1, "FLAT": 1, "none": 1}


# ------------------------------------------------------------------------------------ jobs
def test_job_runner_runs_children_and_reports():
    from api.jobs import JobQueueFull, JobRunner

    jr = JobRunner(max_queued=1)
    ok = jr.submit("k", [sys.executable, "-c", "print('working'); print('{\"rows\": 3}')"], {"a": 1})
    bad = jr.submit("other", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], {})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (ok.status in ("queued", "running") or bad.status in ("queued", "running")):
        time.sleep(0.05)
    assert ok.status == "succeeded" and ok.result == {"rows": 3} and ok.view()["log_tail"][0] == "working"
    assert bad.status == "failed" and bad.returncode == 3 and "boom" in bad.error
    jr.submit("slow", [sys.executable, "-c", "import time; time.sleep(2)"], {})
    jr.submit("slow", [sys.executable, "-c", "pass"], {})
    with pytest.raises(JobQueueFull):
        jr.submit("slow", [sys.executable, "-c", "pass"], {})
    jr.stop()


# ------------------------------------------------------------------------------------ restart
def test_a_restarted_service_restores_served_minutes_pending_outcomes_and_latest(tmp_path):
    """After a restart the predictions table tells the service which minutes it already served (no
    duplicate forecast), which forecasts still wait for their outcome, and the latest per symbol."""
    from api.service import ApiOptions, PredictionService
    from api.store import OUTCOMES, PREDICTIONS, Store
    from tickcast.config import load_settings

    now = (int(time.time() * 1000) // MINUTE_MS) * MINUTE_MS
    st = Store(str(tmp_path / "lake"))
    rows = [{**_row(now - k * MINUTE_MS), "symbol": "BTCUSDT"} for k in (40, 3, 2)]
    rows.append({**_row(now - MINUTE_MS), "status": "skipped", "close_path": None, "quantile_levels": None,
                 "action": "FLAT", "strength": 0.0, "signal_reason": "no forecast: x"})
    st.put(PREDICTIONS, rows)
    st.put(OUTCOMES, [{"symbol": "BTCUSDT", "origin_ts": now - 40 * MINUTE_MS, "model_version": "1",
                       "status": "complete", "joined_ts": 1}])
    st.flush()
    settings = load_settings(symbols=["BTCUSDT", "ETHUSDT"], lake_root=str(tmp_path / "lake"),
                             data_dir=str(tmp_path / "d"))
    svc = PredictionService(settings, ApiOptions(start_consumer=False, start_champion=False))
    svc._restore()
    assert {("BTCUSDT", now - k * MINUTE_MS, "1") for k in (40, 3, 2, 1)} <= svc.served
    assert sorted(svc.pending_outcomes["BTCUSDT"]) == [(now - 3 * MINUTE_MS, "1"), (now - 2 * MINUTE_MS, "1")]
    latest = svc.latest_prediction["BTCUSDT"]
    assert latest["status"] == "skipped" and latest["signal"]["origin_ts"] == now - MINUTE_MS
    assert "ETHUSDT" not in svc.latest_prediction


def test_without_a_champion_every_minute_still_gets_a_flat_signal_with_the_reason(tmp_path):
    from api.service import ApiOptions, PredictionService
    from api.store import PREDICTIONS
    from tickcast.config import load_settings

    settings = load_settings(symbols=["BTCUSDT"], lake_root=str(tmp_path / "lake"), data_dir=str(tmp_path / "d"))
    svc = PredictionService(settings, ApiOptions(start_consumer=False, start_champion=False))

    class NoChampion:
        current = None
        last_error = "no 'champion' alias on registered model 'tickcast-itransformer'"

    class Producer:
        def __init__(self):
            self.sent = []

        def produce(self, topic, key, value, on_delivery=None):
            self.sent.append((topic, key))

        def poll(self, *_):
            return 0

    svc.champion = NoChampion()
    svc.producer = Producer()
    for i in range(3):
        o = obs(i)
        svc._on_minute({"symbol": "BTCUSDT", "window_end": o.minute + MINUTE_MS, "values": o.values,
                        "venue": o.venue, "registry_hash": "", "book_valid": True, "nulls": {}, "emit_ts": 0},
                       backlog=False)
    rows = svc.store.query(PREDICTIONS)
    assert [r["origin_ts"] for r in rows] == [T0 + i * MINUTE_MS for i in range(3)]
    assert all(r["status"] == "skipped" and "no 'champion' alias" in r["reason"] for r in rows)
    assert svc.latest_prediction["BTCUSDT"]["signal"]["action"] == "FLAT"
    assert len(svc.producer.sent) == 3 and svc.counts["BTCUSDT"]["skipped"] == 3
