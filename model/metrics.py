"""Forecast metrics (numpy only): pinball per quantile, coverage and width of the central interval,
CRPS from quantiles, MAE/RMSE of the median, directional accuracy, calibration.

Conventions
- ``q``: [n, Q] quantile forecasts ascending; ``y``: [n] outcomes; ``taus``: the Q levels.
- ``crps_from_quantiles``: the quantile-score approximation CRPS ~= (2/Q) * sum_tau pinball_tau
  (exact in the limit of a dense, evenly spaced quantile grid; with 0.1/0.5/0.9 it is a coarse
  but proper score, comparable across models that forecast the same quantiles).
- directional accuracy: for returns, sign(median) vs sign(outcome) over rows where both are
  non-zero; for volatility and range, the direction of change against the value known at t
  (the realised vol / range of the last H minutes): sign(median - ref) vs sign(outcome - ref).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pinball_per_origin(y: np.ndarray, q: np.ndarray, taus: Sequence[float]) -> np.ndarray:
    """Pinball loss of each origin, per quantile: [n, Q]."""
    y = np.asarray(y, float)[:, None]
    q = np.asarray(q, float)
    t = np.asarray(taus, float)[None, :]
    d = y - q
    return np.maximum(t * d, (t - 1.0) * d)


def pinball(y: np.ndarray, q: np.ndarray, taus: Sequence[float]) -> np.ndarray:
    """Mean pinball loss per quantile: [Q]."""
    return np.mean(pinball_per_origin(y, q, taus), axis=0)


def bootstrap_gain(loss: np.ndarray, ref_loss: np.ndarray, blocks: np.ndarray, n_boot: int = 2000,
                   level: float = 0.9, seed: int = 0) -> dict:
    """Relative gain ``1 - sum(loss) / sum(ref_loss)`` with a block-bootstrap interval: whole blocks
    (e.g. UTC days) are resampled with replacement, because the losses of neighbouring origins are
    strongly dependent (overlapping 30-minute targets, volatility clusters) and an i.i.d. bootstrap
    would give far too narrow an interval. Origins whose loss is not finite on either side are left out."""
    loss, ref_loss, blocks = np.asarray(loss, float), np.asarray(ref_loss, float), np.asarray(blocks)
    ok = np.isfinite(loss) & np.isfinite(ref_loss)
    ids, inv = np.unique(blocks[ok], return_inverse=True)
    per_m = np.bincount(inv, weights=loss[ok], minlength=len(ids))
    per_r = np.bincount(inv, weights=ref_loss[ok], minlength=len(ids))
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    gains = 1.0 - per_m[draw].sum(axis=1) / per_r[draw].sum(axis=1)
    a = (1.0 - level) / 2
    return {"gain": float(1.0 - per_m.sum() / per_r.sum()), "lo": float(np.quantile(gains, a)),
            "hi": float(np.quantile(gains, 1 - a)), "level": level, "blocks": int(len(ids)),
            "p_gain_ge_2pct": float(np.mean(gains >= 0.02)), "p_gain_le_0": float(np.mean(gains <= 0.0))}


def coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    y = np.asarray(y, float)
    return float(np.mean((y >= lo) & (y <= hi)))


def crps_from_quantiles(y: np.ndarray, q: np.ndarray, taus: Sequence[float]) -> float:
    return float(2.0 * np.mean(pinball(y, q, taus)))


def directional_accuracy(pred: np.ndarray, y: np.ndarray, ref: np.ndarray | float = 0.0) -> float:
    a = np.sign(np.asarray(pred, float) - ref)
    b = np.sign(np.asarray(y, float) - ref)
    m = (a != 0) & (b != 0) & np.isfinite(a) & np.isfinite(b)
    return float(np.mean(a[m] == b[m])) if m.any() else float("nan")


def calibration(y: np.ndarray, q: np.ndarray, taus: Sequence[float]) -> list[tuple[float, float]]:
    """(nominal tau, observed frequency of y <= q_tau) per quantile: the calibration curve."""
    y = np.asarray(y, float)
    return [(float(t), float(np.mean(y <= q[:, i]))) for i, t in enumerate(taus)]


def quantile_metrics(y: np.ndarray, q: np.ndarray, taus: Sequence[float], ref: np.ndarray | float = 0.0) -> dict:
    """Every metric for one target: pinball per quantile and mean, coverage/width of the outer
    interval, CRPS, MAE/RMSE of the median, directional accuracy, calibration."""
    y = np.asarray(y, float)
    q = np.asarray(q, float)
    ok = np.isfinite(y) & np.isfinite(q).all(axis=1)
    ref_arr = np.broadcast_to(np.asarray(ref, float), y.shape)
    y, q, ref_arr = y[ok], q[ok], ref_arr[ok]
    taus = list(taus)
    mid = taus.index(0.5) if 0.5 in taus else len(taus) // 2
    pb = pinball(y, q, taus)
    med = q[:, mid]
    out = {
        "n": int(len(y)),
        "pinball": float(np.mean(pb)),
        **{f"pinball_q{int(round(t * 100)):02d}": float(v) for t, v in zip(taus, pb)},
        "coverage": coverage(y, q[:, 0], q[:, -1]),
        "width": float(np.mean(q[:, -1] - q[:, 0])),
        "crps": crps_from_quantiles(y, q, taus),
        "mae": float(np.mean(np.abs(y - med))),
        "rmse": float(np.sqrt(np.mean((y - med) ** 2))),
        "dir_acc": directional_accuracy(med, y, ref_arr),
        "calibration": calibration(y, q, taus),
        "crossing_rate": float(np.mean(np.any(np.diff(q, axis=1) < 0, axis=1))),
    }
    return out


def direction_accuracy_3class(p: np.ndarray, label: np.ndarray) -> float:
    """Accuracy of argmax over (down, flat, up) probabilities against labels -1/0/1."""
    label = np.asarray(label, float)
    ok = np.isfinite(label)
    return float(np.mean(np.argmax(p[ok], axis=1) - 1 == label[ok])) if ok.any() else float("nan")


def log_loss_3class(p: np.ndarray, label: np.ndarray) -> float:
    label = np.asarray(label, float)
    ok = np.isfinite(label)
    idx = (label[ok] + 1).astype(int)
    return float(-np.mean(np.log(np.clip(p[ok][np.arange(ok.sum()), idx], 1e-12, 1.0))))


TARGETS = ("close", "rv", "range")


def forecast_metrics(fc: dict, y: dict, taus: Sequence[float], ref: dict | None = None) -> dict:
    """Metrics for every target. ``fc``: close_q [n,H,Q], rv_q [n,Q], range_q [n,Q], optional
    dir_p [n,3]; ``y``: path [n,H], rv [n], range_rel [n], direction [n]; ``ref``: rv_past,
    range_rel_past for the directional accuracy of vol and range. The close target is Close(t+H)
    (h = H); ``close_path`` averages pinball over h = 1..H."""
    ref = ref or {}
    out = {
        "close": quantile_metrics(y["path"][:, -1], fc["close_q"][:, -1, :], taus, 0.0),
        "rv": quantile_metrics(y["rv"], fc["rv_q"], taus, ref.get("rv_past", np.nan)),
        "range": quantile_metrics(y["range_rel"], fc["range_q"], taus, ref.get("range_rel_past", np.nan)),
    }
    H = y["path"].shape[1]
    out["close_path"] = {"pinball": float(np.mean([np.mean(pinball(y["path"][:, h], fc["close_q"][:, h, :], taus))
                                                   for h in range(H)])),
                         "coverage": float(np.mean((y["path"] >= fc["close_q"][..., 0]) &
                                                   (y["path"] <= fc["close_q"][..., -1])))}
    if fc.get("dir_p") is not None and "direction" in y:
        out["direction"] = {"acc3": direction_accuracy_3class(fc["dir_p"], y["direction"]),
                            "logloss": log_loss_3class(fc["dir_p"], y["direction"])}
    return out
