"""Synthetic 1-minute klines for tests and benchmarks (clearly not market data): a random walk with
intraday volatility seasonality and GARCH-like clustering, OHLC from sub-minute steps."""
from __future__ import annotations

import numpy as np
import pandas as pd

from flows.candles import MINUTE_MS


def synthetic_klines(n: int, seed: int = 0, symbol: str = "BTCUSDT", start_ts: int = 1_717_200_000_000,
                     price: float = 60_000.0, vol: float = 5e-4, substeps: int = 4) -> pd.DataFrame:
    """DataFrame[symbol, minute_ts, open, high, low, close, volume] of ``n`` consecutive minutes."""
    rng = np.random.default_rng(seed)
    start_ts = start_ts - start_ts % MINUTE_MS
    ts = start_ts + MINUTE_MS * np.arange(n, dtype=np.int64)
    minute_of_day = (ts % 86_400_000) // MINUTE_MS
    season = 1.0 + 0.5 * np.sin(2 * np.pi * minute_of_day / 1440.0)
    # volatility clustering: a slow AR(1) in log-vol
    lv = np.zeros(n)
    e = rng.normal(0, 0.05, n)
    for i in range(1, n):
        lv[i] = 0.995 * lv[i - 1] + e[i]
    sig = vol * season * np.exp(lv)
    steps = rng.standard_t(5, (n, substeps)) * (sig / np.sqrt(substeps * 5 / 3))[:, None]
    logp = np.log(price) + np.cumsum(steps.ravel()).reshape(n, substeps)
    close = np.exp(logp[:, -1])
    open_ = np.concatenate([[price], close[:-1]])
    high = np.maximum(np.exp(logp.max(axis=1)), np.maximum(open_, close))
    low = np.minimum(np.exp(logp.min(axis=1)), np.minimum(open_, close))
    volume = np.exp(rng.normal(3, 0.5, n)) * (sig / vol)
    return pd.DataFrame({"symbol": symbol, "minute_ts": ts, "open": open_, "high": high, "low": low,
                         "close": close, "volume": volume})
