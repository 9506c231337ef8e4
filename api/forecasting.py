"""From the model's outputs for one symbol to a Forecast and a Signal record (schemas/avro).

Prices follow model/CONTRACT.md: close path = C_t * exp(q) per step and quantile, range =
C_t * range_rel, realised volatility stays in log-return units (as flows/targets.py defines it).

The signal follows the rule the model was tuned with when its metadata carries one
(``tickcast.signal`` from model/train.py: score = p_up - p_down against a threshold chosen on
validation, re-decided every ``hold`` minutes; the same rule model/backtest.py scores). Without it,
a fallback: the direction classifier's favourite (p_down, p_flat, p_up) must agree with the median
log return at the horizon, which must lie outside the flat band (+-flat_threshold); otherwise FLAT.
Strength (0..1) is |score| (or p_up - p_down / p_down - p_up) for BUY/SELL and the confidence in
flat for FLAT, halved when the forecast is degraded. The reason says which numbers decided it.
"""
from __future__ import annotations

import math

import numpy as np

from api.modelrt import ModelSpec


class ForecastError(ValueError):
    """The model's outputs for a row cannot be turned into a forecast (the reason says why)."""


def _check_row(spec: ModelSpec, logret: np.ndarray, rv: np.ndarray, rng: np.ndarray, p: np.ndarray) -> list[str]:
    notes = []
    for name, arr in (("close_logret_q", logret), ("rv_q", rv), ("range_rel_q", rng), ("direction_p", p)):
        if not np.all(np.isfinite(arr)):
            raise ForecastError(f"model output {name} is not finite")
    if np.any(np.diff(logret, axis=-1) < 0) or np.any(np.diff(rv) < 0) or np.any(np.diff(rng) < 0):
        notes.append("model quantiles crossed and were sorted")
    return notes


def build_forecast(spec: ModelSpec, outputs: dict[str, np.ndarray], i: int, *, symbol: str, origin_ts: int,
                   last_close: float, degraded: bool, reasons: list[str], simulated: bool,
                   registry_hash: str, issued_ts: int) -> dict:
    """Forecast record for row ``i`` of a batch's outputs."""
    logret = outputs["close_logret_q"][i]
    rv = outputs["rv_q"][i]
    rng = outputs["range_rel_q"][i]
    p = outputs["direction_p"][i]
    notes = _check_row(spec, logret, rv, rng, p)
    logret = np.sort(logret, axis=-1)
    rv = np.maximum(np.sort(rv), 0.0)
    rng = np.maximum(np.sort(rng), 0.0)
    psum = float(p.sum())
    if psum <= 0 or np.any(p < -1e-6):
        raise ForecastError(f"direction probabilities {p.tolist()} are not a distribution")
    p = np.clip(p, 0.0, None) / psum
    reasons = list(reasons) + notes
    degraded = degraded or bool(notes)
    with np.errstate(over="ignore"):
        prices = last_close * np.exp(logret)
    if not np.all(np.isfinite(prices)) or not np.isfinite(last_close * rng[-1]):
        raise ForecastError("the forecast's prices overflow (a model output far outside any market move)")
    close_path = prices.tolist()
    return {
        "symbol": symbol,
        "origin_ts": int(origin_ts),
        "model_name": spec.name,
        "model_version": spec.version,
        "registry_hash": registry_hash or spec.registry_hash,
        "horizon": spec.horizon,
        "quantile_levels": list(spec.quantiles),
        "last_close": float(last_close),
        "close_path": close_path,
        "realized_vol": rv.tolist(),
        "price_range": (last_close * rng).tolist(),
        "p_up": float(p[2]),
        "p_flat": float(p[1]),
        "p_down": float(p[0]),
        "degraded": bool(degraded),
        "reason": "; ".join(reasons) if reasons else None,
        "simulated": bool(simulated),
        "issued_ts": int(issued_ts),
    }


def _pct(x: float) -> str:
    return f"{x * 100:+.3f}%"


def derive_signal(spec: ModelSpec, forecast: dict, held: dict | None = None) -> dict:
    """Signal record (BUY / SELL / FLAT, strength, reason) from a forecast record.

    With the model's tuned rule (``tickcast.signal``): score = p_up - p_down; BUY above the threshold,
    SELL below minus it, else FLAT; re-decided every ``hold`` minutes: ``held`` is the decision still in
    force (the service keeps it), which this minute's signal repeats. Without it, the fallback rule of
    the module doc applies."""
    mid = spec.median_index
    last = forecast["last_close"]
    ret_med = math.log(forecast["close_path"][-1][mid] / last)
    p_up, p_flat, p_down = forecast["p_up"], forecast["p_flat"], forecast["p_down"]
    probs = f"p_up {p_up:.2f}, p_flat {p_flat:.2f}, p_down {p_down:.2f}"
    med = f"median {spec.horizon}m return {_pct(ret_med)}"
    if held is not None:
        action, strength = held["action"], held["strength"]
        reason = (f"holding the {action} decided for minute {held['origin_ts']} (the model's signal is re-decided "
                  f"every {spec.signal['hold'] if spec.signal else 1} min); now {probs}, {med}")
        return _signal(forecast, action, strength, reason, halve=False)
    if spec.signal is not None:
        thr = spec.signal["threshold"]
        score = p_up - p_down
        tuned = f"threshold {thr:.3f} tuned on validation" if math.isfinite(thr) else ""
        if not math.isfinite(thr):
            action, strength = "FLAT", p_flat
            reason = ("the model's validation found no signal threshold that beat staying flat, so its signal "
                      f"is always FLAT; {probs}, {med}")
        elif score > thr:
            action, strength = "BUY", score
            reason = f"score p_up - p_down {score:+.3f} > {tuned}; {probs}, {med}"
        elif score < -thr:
            action, strength = "SELL", -score
            reason = f"score p_up - p_down {score:+.3f} < -{tuned}; {probs}, {med}"
        else:
            action = "FLAT"
            strength = 1.0 - abs(score) / thr if thr > 0 else 0.0
            reason = f"score p_up - p_down {score:+.3f} within +-{tuned}; {probs}, {med}"
        return _signal(forecast, action, strength, reason)
    thr = spec.flat_threshold
    favourite = max((("up", p_up), ("flat", p_flat), ("down", p_down)), key=lambda kv: kv[1])[0]
    band = f"flat band +-{thr * 100:.3f}%"
    if favourite == "up" and ret_med > thr:
        action, strength = "BUY", p_up - p_down
        reason = f"up is the most likely direction ({probs}) and the {med} is above the {band}"
    elif favourite == "down" and ret_med < -thr:
        action, strength = "SELL", p_down - p_up
        reason = f"down is the most likely direction ({probs}) and the {med} is below the {band}"
    else:
        action, strength = "FLAT", p_flat
        if favourite == "flat":
            reason = f"flat is the most likely direction ({probs}); {med}"
        else:
            reason = f"classifier favours {favourite} ({probs}) but the {med} is not beyond the {band}"
    return _signal(forecast, action, strength, reason)


def _signal(forecast: dict, action: str, strength: float, reason: str, halve: bool = True) -> dict:
    strength = min(1.0, max(0.0, float(strength)))
    if forecast["degraded"] and halve:
        strength *= 0.5
        reason += f"; strength halved: degraded forecast ({forecast['reason']})"
    return {
        "symbol": forecast["symbol"],
        "origin_ts": forecast["origin_ts"],
        "action": action,
        "strength": strength,
        "reason": reason,
        "model_version": forecast["model_version"],
        "degraded": forecast["degraded"],
        "simulated": forecast["simulated"],
        "issued_ts": forecast["issued_ts"],
    }


def no_forecast_signal(symbol: str, origin_ts: int, reason: str, model_version: str, simulated: bool,
                       issued_ts: int) -> dict:
    """The signal published when no forecast can be made: FLAT, strength 0, the reason, degraded."""
    return {"symbol": symbol, "origin_ts": int(origin_ts), "action": "FLAT", "strength": 0.0,
            "reason": f"no forecast: {reason}", "model_version": model_version, "degraded": True,
            "simulated": bool(simulated), "issued_ts": int(issued_ts)}
