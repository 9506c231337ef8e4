"""Forecast targets at minute t, computed only from minutes t+1 .. t+H (never from t or before,
except the reference close C_t). One definition for the dataset builder, the model, the API's
outcome join and the backtest.

- ``close_path[h-1] = log(C_{t+h} / C_t)`` for h = 1..H (the log-return path to Close(t+H))
- ``ret_1m = log(C_{t+1}/C_t)``, ``ret_h = log(C_{t+H}/C_t)``, ``close_h = C_{t+H}``
- ``rv_h = sqrt(sum_{i=t+1}^{t+H} r_i^2)`` with ``r_i = log(C_i / C_{i-1})`` (not annualised)
- ``range_h = max(High_{t+1..t+H}) - min(Low_{t+1..t+H})``, ``range_rel_h = range_h / C_t``
- ``direction``: +1 up / 0 flat / -1 down by ``ret_h`` against a threshold (log-return units)
- optional triple-barrier label: which of +k*sigma / -k*sigma / the horizon is touched first

Rows whose future is incomplete (end of data or a missing minute inside it) get NaN targets.
"""
from __future__ import annotations

import math

import numpy as np

HORIZON = 30
DEFAULT_FLAT_THRESHOLD = 0.001
TARGET_NAMES = ("close", "realized_vol", "price_range")


def forward_targets(close, high, low, horizon: int = HORIZON,
                    flat_threshold: float = DEFAULT_FLAT_THRESHOLD) -> dict[str, np.ndarray]:
    c = np.asarray(close, dtype=float)
    h = np.asarray(high, dtype=float)
    lo = np.asarray(low, dtype=float)
    n = len(c)
    path = np.full((n, horizon), np.nan)
    rv = np.full(n, np.nan)
    rng = np.full(n, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        logc = np.log(c)
    r = np.full(n, np.nan)
    r[1:] = logc[1:] - logc[:-1]
    for t in range(n - horizon):
        fut = slice(t + 1, t + horizon + 1)
        if not (np.isfinite(logc[t]) and np.all(np.isfinite(logc[fut]))):
            continue
        path[t] = logc[fut] - logc[t]
        rv[t] = math.sqrt(math.fsum(float(x) * float(x) for x in r[fut]))
        hh, ll = h[fut], lo[fut]
        if np.all(np.isfinite(hh)) and np.all(np.isfinite(ll)):
            rng[t] = float(hh.max() - ll.min())
    ret_h = path[:, horizon - 1]
    direction = np.where(np.isnan(ret_h), np.nan,
                         np.where(ret_h > flat_threshold, 1.0, np.where(ret_h < -flat_threshold, -1.0, 0.0)))
    return {
        "close_path": path,
        "ret_1m": path[:, 0].copy(),
        "ret_h": ret_h.copy(),
        "close_h": c * np.exp(ret_h),
        "rv_h": rv,
        "range_h": rng,
        "range_rel_h": rng / c,
        "direction": direction,
    }


def triple_barrier(close, high, low, sigma, horizon: int = HORIZON, k: float = 1.0) -> np.ndarray:
    """+1 if High reaches C_t*exp(k*sigma_t) first, -1 if Low reaches C_t*exp(-k*sigma_t) first,
    0 if neither within the horizon (a minute touching both counts as -1: the conservative side).
    ``sigma`` is a per-row volatility over the horizon known at t (e.g. rv_60m * sqrt(H/60))."""
    c = np.asarray(close, dtype=float)
    h = np.asarray(high, dtype=float)
    lo = np.asarray(low, dtype=float)
    s = np.asarray(sigma, dtype=float)
    n = len(c)
    out = np.full(n, np.nan)
    for t in range(n - horizon):
        if not (np.isfinite(c[t]) and np.isfinite(s[t]) and s[t] > 0):
            continue
        up, dn = c[t] * math.exp(k * s[t]), c[t] * math.exp(-k * s[t])
        label = 0.0
        fut_h, fut_l = h[t + 1:t + horizon + 1], lo[t + 1:t + horizon + 1]
        if not (np.all(np.isfinite(fut_h)) and np.all(np.isfinite(fut_l))):
            continue
        for hi, lw in zip(fut_h, fut_l):
            if lw <= dn:
                label = -1.0
                break
            if hi >= up:
                label = 1.0
                break
        out[t] = label
    return out
