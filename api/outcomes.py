"""Outcome join: what actually happened over a forecast's horizon, and the alerts it raises.

Realised values come from the 1-minute closes/highs/lows the API saw on ``features.live`` and are
computed by ``flows.targets.forward_targets`` (the one definition shared with the dataset builder and
the backtest): Close(t+H), realised volatility of the 1-minute log returns over [t+1, t+H], and the
range max(High) - min(Low) over [t+1, t+H]. A minute missing inside the horizon makes that outcome
incomplete (stored with the reason, never an alert). The range needs per-minute highs and lows; when
``features.live`` carries none (``high``/``low`` in the m1 values), the range outcome is null with
that reason.

An alert is raised for each target whose actual lies outside [q_low, q_high] (the 0.1 and 0.9
quantiles, or the outermost levels the model has).
"""
from __future__ import annotations

import numpy as np

from api.window import MINUTE_MS, SymbolHistory
from flows.targets import forward_targets

HIGH_NAMES = ("high", "high_1m")
LOW_NAMES = ("low", "low_1m")


def _first_series(history: SymbolHistory, names: tuple[str, ...], start: int, end: int) -> np.ndarray:
    best = None
    for n in names:
        s = history.series(n, start, end)
        if np.isfinite(s).any():
            return s
        best = s if best is None else best
    return best


def horizon_status(history: SymbolHistory, origin_ts: int, horizon: int, grace_minutes: int = 2) -> str:
    """``ready`` (every minute of [t, t+H] seen), ``wait`` or ``incomplete`` (the horizon end, plus a
    grace for late vectors, has passed and minutes are missing)."""
    end = origin_ts + horizon * MINUTE_MS
    latest = history.latest
    if latest is None or latest < end:
        return "wait"
    rows = history.rows(origin_ts, end)
    if all(r is not None for r in rows):
        return "ready"
    return "incomplete" if latest >= end + grace_minutes * MINUTE_MS else "wait"


def compute_outcome(history: SymbolHistory, pred: dict, *, flat_threshold: float, q_lo: int, q_hi: int,
                    joined_ts: int) -> tuple[dict, list[dict]]:
    """(outcome row, alert records) for a stored prediction ``pred`` (a forecast record)."""
    t = pred["origin_ts"]
    H = pred["horizon"]
    end = t + H * MINUTE_MS
    close = history.series("close", t, end)
    high = _first_series(history, HIGH_NAMES, t, end)
    low = _first_series(history, LOW_NAMES, t, end)
    tg = forward_targets(close, high, low, horizon=H, flat_threshold=flat_threshold)
    missing = int(np.sum(~np.isfinite(close[1:])))
    reasons = []
    if missing:
        reasons.append(f"{missing} of the {H} horizon minutes have no close")
    close_h = float(tg["close_h"][0]) if np.isfinite(tg["close_h"][0]) else None
    rv_h = float(tg["rv_h"][0]) if np.isfinite(tg["rv_h"][0]) else None
    range_h = float(tg["range_h"][0]) if np.isfinite(tg["range_h"][0]) else None
    ret_1m = float(tg["ret_1m"][0]) if np.isfinite(tg["ret_1m"][0]) else None
    ret_h = float(tg["ret_h"][0]) if np.isfinite(tg["ret_h"][0]) else None
    if range_h is None and not missing:
        reasons.append("no per-minute high/low on features.live: range outcome unavailable")
    qlev = pred["quantile_levels"]
    bands = {
        "close": (pred["close_path"][-1][q_lo], pred["close_path"][-1][q_hi], close_h),
        "realized_vol": (pred["realized_vol"][q_lo], pred["realized_vol"][q_hi], rv_h),
        "price_range": (pred["price_range"][q_lo], pred["price_range"][q_hi], range_h),
    }
    row = {
        "symbol": pred["symbol"], "origin_ts": int(t), "model_version": pred["model_version"],
        "status": "complete" if close_h is not None else "incomplete",
        "reason": "; ".join(reasons) if reasons else None,
        "close_t": float(close[0]) if np.isfinite(close[0]) else None,
        "close_h": close_h, "ret_1m": ret_1m, "ret_h": ret_h,
        "realized_vol": rv_h, "price_range": range_h,
        "q_low_level": float(qlev[q_lo]), "q_high_level": float(qlev[q_hi]),
        "joined_ts": int(joined_ts),
    }
    alerts = []
    for target, (lo, hi, actual) in bands.items():
        key = {"close": "close", "realized_vol": "rv", "price_range": "range"}[target]
        row[f"{key}_q_low"] = float(lo)
        row[f"{key}_q_high"] = float(hi)
        inside = None if actual is None else bool(lo <= actual <= hi)
        row[f"{key}_inside"] = inside
        if inside is False:
            alerts.append({
                "symbol": pred["symbol"], "origin_ts": int(t), "target": target, "actual": float(actual),
                "q_low": float(lo), "q_high": float(hi), "direction": "above" if actual > hi else "below",
                "model_version": pred["model_version"], "raised_ts": int(joined_ts)})
    return row, alerts
