"""The shared real kline history as one kline-only dataset, and the fixed real-data split.

Sources (``../shared/data/real``, see its SOURCES.md): Bybit linear 1m BTCUSDT/ETHUSDT
(2025-05-30 .. 2025-06-29, no gaps) and Binance spot 1m windows (BTC and ETH, 2021-2024, about 35
days each, two with exchange outages). The Bybit funding history (2025-12 .. 2026-06) overlaps none
of these klines, so ``funding_rate`` is NaN everywhere and is left out of the variates (the loader
still forward-fills it by time when it overlaps).

The split was fixed before any experiment and is never changed by results:

- test (held out, later, chronological): Bybit origins from 2025-06-19 00:00 UTC to the end;
- validation (early stopping, every choice of model, baseline and signal threshold):
  2025-06-12 00:00 .. 2025-06-19 00:00 (minus the purge);
- train: everything before 2025-06-12 (all Binance windows and the first 12.3 Bybit days);
- purge and embargo of 30 minutes (= H) at each cut.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from model.data import Dataset, build_kline_dataset, load_funding_csv, load_klines_csv, symbol_from_path

REAL = Path(os.environ.get("TICKCAST_SHARED_REAL", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
KLINE_DIRS = ("bybit_linear_klines_cobra0506", "binance_spot_klines_benicio1007")
FUNDING_DIR = "bybit_funding_nkululeko96"
VAL_START = "2025-06-12T00:00:00Z"
TEST_START = "2025-06-19T00:00:00Z"
REAL_SPLIT = {"kind": "chronological", "val_start": VAL_START, "test_start": TEST_START}


def real_kline_files(root: Path = REAL) -> list[Path]:
    files = []
    for d in KLINE_DIRS:
        files += sorted((root / d).glob("*_1m_*.csv"))
    return files


def build_real_dataset(root: Path = REAL, cache: Path | None = Path("data/datasets/real_klines.parquet"),
                       progress: bool = True) -> Dataset:
    """Kline-only dataset of every 1m file (cached as Parquet when ``cache`` is given)."""
    if cache is not None and Path(cache).is_file():
        return Dataset(pd.read_parquet(cache), {"kind": "real_klines", "source": str(cache), "registry_hash": ""},
                       str(cache))
    files = real_kline_files(root)
    if not files:
        raise FileNotFoundError(f"no real kline CSVs under {root}")
    klines = [(symbol_from_path(f), load_klines_csv(f)) for f in files]
    funding = {}
    for f in sorted((root / FUNDING_DIR).glob("funding_bybit_*.csv")):
        funding[symbol_from_path(f.name.removeprefix("funding_bybit_"))] = load_funding_csv(f)
    # one symbol's files are separate windows: concatenate (gaps of days become new segments)
    by_sym: dict[str, list[pd.DataFrame]] = {}
    for sym, df in klines:
        by_sym.setdefault(sym, []).append(df)
    merged = {s: pd.concat(v, ignore_index=True).sort_values("minute_ts").drop_duplicates("minute_ts")
              for s, v in by_sym.items()}
    df = build_kline_dataset(merged, funding, progress=progress)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(cache, index=False)
    return Dataset(df, {"kind": "real_klines", "source": ",".join(f.name for f in files), "registry_hash": ""},
                   str(cache or root))
