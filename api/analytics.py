"""Backtest over the last N candles and the signals' strategy P&L, scored by model/backtest.py.

One backtest definition for the project: ``model.backtest`` (T+1 execution at the next minute's open,
fees and slippage per side, fixed sizing: +1 for BUY, -1 for SELL, 0 for FLAT or a minute without a
forecast). Funding is not charged here: the API's stores keep no settlement history (the offline
backtests charge it where funding history exists), so a P&L over days that spans settlements leaves
out up to a few bps per settlement held. Analytics only: nothing is ever traded.

Candles come from the m1 vectors the API sees on features.live: ``close``; ``open`` when the vector
carries it, else recovered from ``body_rel_1m = (C - O) / O`` as ``O = C / (1 + body_rel_1m)``;
``high``/``low`` when carried (the range outcome needs them).

- ``backtest_recent``: re-runs the current champion on each of the last N minutes the API holds (one
  batched call; the same input assembly and signal rule as live serving, the model's tuned threshold
  and holding period when it has them) and backtests those signals with ``last_n_candles``; adds the
  forecast quality over the minutes whose horizon has passed (coverage of [q_low, q_high] of the close
  at t+H, direction hit rate).
- ``pnl_from_store``: the signals actually published over N days (the predictions table) against the
  stored candles, through ``run_backtest``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from api.forecasting import ForecastError, build_forecast, derive_signal
from api.modelrt import OnnxModel
from api.window import MINUTE_MS, MinuteObs, SymbolHistory, assemble_window, finite
from flows.targets import forward_targets

POSITION = {"BUY": 1.0, "SELL": -1.0, "FLAT": 0.0}


def candle_of(obs: MinuteObs) -> dict:
    """(open, high, low, close) of a minute from its m1 vector; None where it cannot be known."""
    c = obs.value("close")
    o = obs.value("open_1m") if obs.value("open_1m") is not None else obs.value("open")
    if o is None and c is not None:
        b = obs.value("body_rel_1m")
        if b is not None and b > -1.0:
            o = c / (1.0 + b)
    return {"origin_ts": obs.minute, "open": o, "high": obs.value("high_1m") or obs.value("high"),
            "low": obs.value("low_1m") or obs.value("low"), "close": c, "volume": obs.value("candle_volume_1m")}


def clean(v):
    """JSON-safe copy: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _downsample(points: list[dict], n: int = 500) -> list[dict]:
    if len(points) <= n:
        return points
    idx = np.linspace(0, len(points) - 1, n).round().astype(int)
    return [points[i] for i in idx]


def _bt_config(fee_bps: float, slippage_bps: float):
    from model.backtest import BacktestConfig

    return BacktestConfig(fee_bps=fee_bps, slippage_bps=slippage_bps, sizing="fixed", funding=False)


def backtest_recent(model: OnnxModel, history: SymbolHistory, symbol: str, candles: int, *,
                    max_missing_frac: float, fee_bps: float, slippage_bps: float, batch: int = 256) -> dict:
    import pandas as pd

    from model.backtest import last_n_candles, positions_from_scores

    spec = model.spec
    latest = history.latest
    if latest is None:
        return {"rows": [], "summary": None, "stats": None, "reason": "no m1 feature vectors for this symbol yet"}
    # one extra candle: last_n_candles uses the first as the entry reference of the second
    origins = [latest - i * MINUTE_MS for i in range(candles, -1, -1)]
    inputs = []
    for t in origins:
        w = assemble_window(history, t, spec.variates, spec.lookback, max_missing_frac=max_missing_frac,
                            model_registry_hash=spec.registry_hash)
        if w.x is not None:
            inputs.append((t, w))
    forecasts: dict[int, dict] = {}
    for i in range(0, len(inputs), batch):
        chunk = inputs[i:i + batch]
        out = model.predict(np.stack([w.x for _, w in chunk]))
        for j, (t, w) in enumerate(chunk):
            try:
                forecasts[t] = build_forecast(spec, out, j, symbol=symbol, origin_ts=t, last_close=w.last_close,
                                              degraded=w.degraded, reasons=w.reasons, simulated=w.simulated,
                                              registry_hash=w.registry_hash, issued_ts=0)
            except ForecastError:
                continue
    if spec.signal is not None:
        score = np.array([forecasts[t]["p_up"] - forecasts[t]["p_down"] if t in forecasts else np.nan
                          for t in origins])
        pos = positions_from_scores(score, spec.signal["threshold"], int(spec.signal["hold"]))
        actions = [("BUY" if p > 0 else "SELL" if p < 0 else "FLAT") if t in forecasts else None
                   for t, p in zip(origins, pos)]
    else:
        actions = [derive_signal(spec, forecasts[t])["action"] if t in forecasts else None for t in origins]
        pos = np.array([POSITION[a] if a else 0.0 for a in actions])
    cdl = [candle_of(o) if (o := history.get(t)) else {"origin_ts": t, "open": None, "high": None, "low": None,
                                                        "close": None} for t in origins]
    frame = pd.DataFrame({"minute_ts": origins, "open": [c["open"] for c in cdl],
                          "close": [c["close"] for c in cdl]}).astype({"open": float, "close": float})
    sig = pd.DataFrame({"minute_ts": origins, "position": pos})
    bt = None
    if frame.dropna().shape[0] >= 2:  # minutes without a candle stay in: their signals still execute
        bt = last_n_candles(frame, sig, n=candles, cfg=_bt_config(fee_bps, slippage_bps))
    # forecast quality where the horizon has passed
    H = spec.horizon
    end = latest + H * MINUTE_MS
    close = history.series("close", origins[0], end)
    high = history.series("high", origins[0], end)
    low = history.series("low", origins[0], end)
    tg = forward_targets(close, high, low, horizon=H, flat_threshold=spec.flat_threshold)
    lo_i, hi_i, mid = spec.q_low_index, spec.q_high_index, spec.median_index
    rows = []
    cov_n = cov_k = dir_n = dir_k = 0
    for k, t in enumerate(origins[1:], start=1):
        ch = finite(tg["close_h"][k])
        item = {"origin_ts": t, "open": cdl[k]["open"], "close": cdl[k]["close"], "close_h_actual": ch,
                "action": actions[k], "position": float(pos[k])}
        fc = forecasts.get(t)
        if fc is not None:
            qs = fc["close_path"][-1]
            item.update({"degraded": fc["degraded"], "close_h_q_low": qs[lo_i], "close_h_median": qs[mid],
                         "close_h_q_high": qs[hi_i], "p_up": fc["p_up"], "p_down": fc["p_down"]})
            if ch is not None:
                inside = bool(qs[lo_i] <= ch <= qs[hi_i])
                item["inside"] = inside
                cov_n += 1
                cov_k += inside
                if actions[k] in ("BUY", "SELL"):
                    dir_n += 1
                    dir_k += (ch > fc["last_close"]) == (actions[k] == "BUY")
        else:
            item["reason"] = "no forecast for this minute (lookback window incomplete)"
        rows.append(item)
    quality = {"forecasts": sum(1 for t in origins[1:] if t in forecasts),
               "no_forecast": sum(1 for t in origins[1:] if t not in forecasts),
               "close_interval_coverage": (cov_k / cov_n) if cov_n else None, "coverage_n": cov_n,
               "nominal_coverage": spec.quantiles[hi_i] - spec.quantiles[lo_i],
               "direction_hit_rate": (dir_k / dir_n) if dir_n else None, "direction_n": dir_n}
    return {"rows": rows, "quality": quality, "stats": bt["stats"] if bt else None,
            "equity": _downsample(bt["equity"]) if bt else [], "config": bt["config"] if bt else None,
            "reason": None if bt else "fewer than 2 candles with open and close"}


def pnl_from_store(candles: Iterable[dict], predictions: Iterable[dict], *, fee_bps: float,
                   slippage_bps: float) -> dict:
    """Strategy P&L of the published signals (the first issued per minute) against the stored candles."""
    import pandas as pd

    from model.backtest import run_backtest

    by_origin: dict[int, dict] = {}
    for p in sorted(predictions, key=lambda r: (r["origin_ts"], r.get("issued_ts") or 0)):
        by_origin.setdefault(p["origin_ts"], p)
    c = pd.DataFrame([r for r in candles if r.get("open") is not None and r.get("close") is not None],
                     columns=["origin_ts", "open", "close"])
    counts = {"BUY": 0, "SELL": 0, "FLAT": 0, "none": 0}
    if len(c) < 2:
        return {"stats": None, "equity": [], "signals": counts, "minutes": len(c),
                "reason": "fewer than 2 stored candles in the period"}
    c = c.sort_values("origin_ts").drop_duplicates("origin_ts")
    # every minute of the span, a missing candle as NaN: the signal published at such a minute still
    # executes at the next open (run_backtest skips the minutes without a price)
    first, last = int(c["origin_ts"].iloc[0]), int(c["origin_ts"].iloc[-1])
    c = c.set_index("origin_ts").reindex(np.arange(first, last + 1, MINUTE_MS, dtype=np.int64))
    c = c.rename_axis("origin_ts").reset_index()
    pos = []
    for t in c["origin_ts"]:
        p = by_origin.get(int(t))
        a = p.get("action") if p and p.get("status") != "skipped" else None
        counts[a or "none"] += 1
        pos.append(POSITION.get(a, 0.0) if a else 0.0)
    cfg = _bt_config(fee_bps, slippage_bps)
    r = run_backtest(c["origin_ts"].to_numpy(np.int64), c["open"].to_numpy(float), c["close"].to_numpy(float),
                     np.asarray(pos), cfg)
    equity = [{"minute_ts": int(t), "equity": float(e)} for t, e in zip(r.ts, r.equity)]
    return {"stats": r.stats, "equity": _downsample(equity), "signals": counts, "minutes": len(c),
            "config": cfg.to_dict(), "reason": None}
