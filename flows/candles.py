"""Per-minute candle variates: the kline-only feature set, one definition for every path.

The online flow computes these at the 1-minute cadence from its candles, the dataset builder from
archived or historical klines (months of CSV/REST history), and the model consumes them under these
names. Every rolling statistic is an exactly rounded sum (``math.fsum``) over an explicit window, so
the value for minute t does not depend on how much history was passed in or in which order the
rows were evaluated: the same candles give bit-identical variates online and offline.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

MINUTE_MS = 60_000
DAY_MS = 24 * 3600 * 1000

# name -> short description; the order is the canonical variate order
KLINE_VARIATES: dict[str, str] = {
    "close": "close price of the minute",
    "log_return_1m": "log(C_t / C_{t-1})",
    "return_15m": "log(C_t / C_{t-15})",
    "return_60m": "log(C_t / C_{t-60})",
    "range_rel_1m": "(H_t - L_t) / C_t",
    "body_rel_1m": "(C_t - O_t) / O_t",
    "log_volume_1m": "log(1 + V_t)",
    "rv_15m": "sqrt(sum of squared 1-min log returns over the last 15 minutes)",
    "rv_60m": "sqrt(sum of squared 1-min log returns over the last 60 minutes)",
    "parkinson_15m": "Parkinson volatility of the last 15 candles: sqrt(sum ln(H/L)^2 / (4 ln 2 n) * n)",
    "volume_z_60m": "z-score of log_volume_1m against the previous 60 minutes",
    "tod_sin": "sin(2 pi minute-of-day / 1440)",
    "tod_cos": "cos(2 pi minute-of-day / 1440)",
    "dow_sin": "sin(2 pi day-of-week / 7)",
    "dow_cos": "cos(2 pi day-of-week / 7)",
    "funding_rate": "last known funding rate (NaN when unknown)",
}
# minutes of history (beyond t) needed for every variate to be defined
KLINE_WARMUP = 61


def kline_registry_hash() -> str:
    """The kline-only feature set's registry hash (what a kline-only dataset and a model trained on
    it carry): SHA-256 of its canonical JSON (names, order, definitions, warm-up). The online flow
    computes these variates with the same code as the dataset builder, whatever its registry."""
    import hashlib
    import json

    canon = json.dumps({"variates": KLINE_VARIATES, "warmup": KLINE_WARMUP}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]

_LN2x4 = 4.0 * math.log(2.0)
_NAN = float("nan")


def _window(values: Sequence[float], end: int, n: int) -> list[float] | None:
    """values[end-n+1 .. end] when all of it exists and is finite."""
    if end - n + 1 < 0:
        return None
    w = values[end - n + 1:end + 1]
    return None if any(not math.isfinite(v) for v in w) else list(w)


def _sqrt_sum_sq(w: list[float] | None) -> float:
    return _NAN if w is None else math.sqrt(math.fsum(v * v for v in w))


def _zscore(values: Sequence[float], end: int, n: int) -> float:
    """z-score of values[end] against the n values before it (population std)."""
    w = _window(values, end - 1, n)
    x = values[end]
    if w is None or not math.isfinite(x):
        return _NAN
    mean = math.fsum(w) / n
    var = math.fsum((v - mean) ** 2 for v in w) / n
    return _NAN if var <= 0.0 else (x - mean) / math.sqrt(var)


def kline_variates(start_ts: Sequence[int], open_: Sequence[float], high: Sequence[float],
                   low: Sequence[float], close: Sequence[float], volume: Sequence[float],
                   funding_rate: Sequence[float] | None = None, *, rows: range | None = None) -> dict[str, np.ndarray]:
    """Variates for consecutive 1-minute candles (oldest first; a missing minute must be a NaN row).

    ``rows`` restricts the output to those row indices (the online flow asks for the last one only);
    values for a row depend only on that row and its history, never on rows after it.
    """
    n = len(close)
    rows = range(n) if rows is None else rows
    o, h, lo, c, v = (list(map(float, a)) for a in (open_, high, low, close, volume))
    r1 = [_NAN] + [math.log(c[i] / c[i - 1]) if c[i] > 0 and c[i - 1] > 0 else _NAN for i in range(1, n)]
    logv = [math.log1p(x) if x >= 0 else _NAN for x in v]
    hl2 = [math.log(h[i] / lo[i]) ** 2 if h[i] > 0 and lo[i] > 0 else _NAN for i in range(n)]
    fr = list(map(float, funding_rate)) if funding_rate is not None else None
    out = {name: np.full(len(rows), np.nan) for name in KLINE_VARIATES}
    for j, i in enumerate(rows):
        ci = c[i]
        out["close"][j] = ci
        out["log_return_1m"][j] = r1[i]
        out["return_15m"][j] = math.log(ci / c[i - 15]) if i >= 15 and ci > 0 and c[i - 15] > 0 else _NAN
        out["return_60m"][j] = math.log(ci / c[i - 60]) if i >= 60 and ci > 0 and c[i - 60] > 0 else _NAN
        out["range_rel_1m"][j] = (h[i] - lo[i]) / ci if ci > 0 else _NAN
        out["body_rel_1m"][j] = (ci - o[i]) / o[i] if o[i] > 0 else _NAN
        out["log_volume_1m"][j] = logv[i]
        out["rv_15m"][j] = _sqrt_sum_sq(_window(r1, i, 15))
        out["rv_60m"][j] = _sqrt_sum_sq(_window(r1, i, 60))
        w = _window(hl2, i, 15)
        out["parkinson_15m"][j] = _NAN if w is None else math.sqrt(math.fsum(w) / _LN2x4)
        out["volume_z_60m"][j] = _zscore(logv, i, 60)
        ts = int(start_ts[i])
        minute_of_day = (ts % DAY_MS) // MINUTE_MS
        day_of_week = ((ts // DAY_MS) + 3) % 7  # 1970-01-01 was a Thursday: Monday = 0
        out["tod_sin"][j] = math.sin(2 * math.pi * minute_of_day / 1440)
        out["tod_cos"][j] = math.cos(2 * math.pi * minute_of_day / 1440)
        out["dow_sin"][j] = math.sin(2 * math.pi * day_of_week / 7)
        out["dow_cos"][j] = math.cos(2 * math.pi * day_of_week / 7)
        out["funding_rate"][j] = fr[i] if fr is not None else _NAN
    return out


def fill_missing_minutes(start_ts: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """Reindex candles onto a dense minute grid; missing minutes become NaN rows (never invented)."""
    start_ts = np.asarray(start_ts, dtype=np.int64)
    if len(start_ts) == 0:
        return (start_ts, *columns)
    grid = np.arange(start_ts[0], start_ts[-1] + MINUTE_MS, MINUTE_MS, dtype=np.int64)
    pos = (start_ts - start_ts[0]) // MINUTE_MS
    out = [grid]
    for col in columns:
        dense = np.full(len(grid), np.nan)
        dense[pos] = np.asarray(col, dtype=float)
        out.append(dense)
    return tuple(out)
