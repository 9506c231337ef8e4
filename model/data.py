"""Datasets for the model: loading, kline-only dataset building, and windowing.

A dataset is a table of per-minute rows: ``symbol``, ``minute_ts`` (candle start, ms UTC), the
variate columns (names of ``flows.candles.KLINE_VARIATES`` or of the feature registry) and the
target columns of ``flows.targets`` (``ret_h``, ``rv_h``, ``range_rel_h``, ``direction``, ...).
``load_dataset`` accepts

- a Parquet file (or a folder of Parquet files / a Delta table written by the dataset builder),
- a kline CSV (``timestamp,open,high,low,close,volume``: Bybit linear or Binance spot history),
  from which a kline-only dataset is built with ``flows.candles.kline_variates`` and
  ``flows.targets.forward_targets`` (one definition shared with the online flow),
- a dataset id, resolved under ``<data_dir>/datasets/<id>``.

``Windows`` turns such a table into contiguous per-symbol segments and the valid forecast origins:
minute t is an origin when its lookback window [t-L+1, t] is complete and finite and its targets
(which only look at minutes t+1..t+H) exist. Everything here is numpy/pandas (no torch).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from flows.candles import KLINE_VARIATES, KLINE_WARMUP, MINUTE_MS, fill_missing_minutes, kline_variates
from flows.targets import DEFAULT_FLAT_THRESHOLD, HORIZON, forward_targets

TIME_VARIATES = ("tod_sin", "tod_cos", "dow_sin", "dow_cos")
TARGET_COLUMNS = ("ret_1m", "ret_h", "close_h", "rv_h", "range_h", "range_rel_h", "direction")
KLINE_COLUMNS = ("open", "high", "low", "close", "volume")
# a gap longer than this starts a new segment instead of a run of NaN rows
MAX_FILL_GAP_MIN = 24 * 60


class DatasetError(ValueError):
    """A dataset that cannot be used, with the reason."""


# ----------------------------------------------------------------------------------------- loading
def symbol_from_path(path: str | Path) -> str | None:
    m = re.match(r"([A-Z0-9]{2,20}(?:USDT|USDC|USD|PERP))(?:[_.\-]|$)", Path(path).name.upper())
    return m.group(1) if m else None


def load_klines_csv(path: str | Path) -> pd.DataFrame:
    """A kline CSV (``timestamp,open,high,low,close,volume``; ISO timestamps with or without an
    offset, naive = UTC; or epoch ms) -> DataFrame[minute_ts, open, high, low, close, volume],
    sorted, duplicates dropped."""
    df = pd.read_csv(path)
    cols = {c.lower().strip(): c for c in df.columns}
    ts_col = next((cols[c] for c in ("timestamp", "start_ts", "minute_ts", "open_time", "starttime", "ts")
                   if c in cols), None)
    if ts_col is None or not all(c in cols for c in KLINE_COLUMNS):
        raise DatasetError(f"{path}: expected columns timestamp,open,high,low,close,volume; got {list(df.columns)}")
    raw = df[ts_col]
    if pd.api.types.is_numeric_dtype(raw):
        ts = raw.astype("int64").to_numpy()
        if ts.max() < 10**11:  # seconds
            ts = ts * 1000
    else:
        ts = pd.to_datetime(raw, utc=True, format="ISO8601").dt.as_unit("ms").astype("int64").to_numpy()
    out = pd.DataFrame({"minute_ts": ts.astype(np.int64)})
    for c in KLINE_COLUMNS:
        out[c] = pd.to_numeric(df[cols[c]], errors="coerce").astype(float)
    bad = (out["minute_ts"] % MINUTE_MS) != 0
    if bad.any():
        raise DatasetError(f"{path}: {int(bad.sum())} timestamps are not on a minute boundary")
    out = out.sort_values("minute_ts").drop_duplicates("minute_ts", keep="last").reset_index(drop=True)
    return out


def load_funding_csv(path: str | Path) -> pd.DataFrame:
    """Funding history (``ts,rate``; any row order) -> DataFrame[ts, rate] sorted by settlement time."""
    df = pd.read_csv(path)
    cols = {c.lower(): c for c in df.columns}
    ts_col = cols.get("ts") or cols.get("fundingratetimestamp") or cols.get("timestamp")
    rate_col = cols.get("rate") or cols.get("fundingrate") or cols.get("funding_rate")
    if ts_col is None or rate_col is None:
        raise DatasetError(f"{path}: expected columns ts,rate; got {list(df.columns)}")
    out = pd.DataFrame({"ts": pd.to_numeric(df[ts_col]).astype(np.int64),
                        "rate": pd.to_numeric(df[rate_col], errors="coerce").astype(float)})
    return out.sort_values("ts").drop_duplicates("ts", keep="last").reset_index(drop=True)


def funding_asof(minute_ts: np.ndarray, funding: pd.DataFrame | None) -> np.ndarray:
    """Forward-filled funding rate known at the close of each minute (settlement ts <= minute end);
    NaN before the first settlement or when there is no funding history."""
    minute_ts = np.asarray(minute_ts, dtype=np.int64)
    if funding is None or len(funding) == 0:
        return np.full(len(minute_ts), np.nan)
    fts = funding["ts"].to_numpy(np.int64)
    rates = funding["rate"].to_numpy(float)
    pos = np.searchsorted(fts, minute_ts + MINUTE_MS, side="right") - 1
    out = np.where(pos >= 0, rates[np.clip(pos, 0, None)], np.nan)
    # a funding history that ended long before this minute is not "known": stop after 3 missed settlements
    stale = (pos >= 0) & (minute_ts - fts[np.clip(pos, 0, None)] > 3 * 8 * 3600 * 1000)
    out[stale] = np.nan
    return out


def _segments_of(ts: np.ndarray, max_gap_min: int = MAX_FILL_GAP_MIN) -> list[slice]:
    """Split sorted minute timestamps where the gap exceeds max_gap_min."""
    if len(ts) == 0:
        return []
    cut = np.flatnonzero(np.diff(ts) > max_gap_min * MINUTE_MS) + 1
    bounds = [0, *cut.tolist(), len(ts)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def build_kline_dataset(klines: Mapping[str, pd.DataFrame] | Iterable[tuple[str, pd.DataFrame]],
                        funding: Mapping[str, pd.DataFrame] | None = None, *, horizon: int = HORIZON,
                        flat_threshold: float = DEFAULT_FLAT_THRESHOLD, progress: bool = False) -> pd.DataFrame:
    """Kline-only dataset: per symbol and contiguous segment, missing minutes become NaN rows
    (``fill_missing_minutes``), variates from ``flows.candles.kline_variates`` (funding forward-filled
    by time), targets from ``flows.targets.forward_targets``. One row per minute."""
    from tqdm.auto import tqdm

    items = list(klines.items()) if isinstance(klines, Mapping) else list(klines)
    parts = []
    for symbol, kl in tqdm(items, desc="kline dataset", disable=not progress, unit="file"):
        kl = kl.sort_values("minute_ts").drop_duplicates("minute_ts", keep="last")
        ts_all = kl["minute_ts"].to_numpy(np.int64)
        for seg in _segments_of(ts_all):
            k = kl.iloc[seg]
            ts, o, h, lo, c, v = fill_missing_minutes(k["minute_ts"].to_numpy(np.int64),
                                                      *(k[col].to_numpy(float) for col in KLINE_COLUMNS))
            fr = funding_asof(ts, (funding or {}).get(symbol))
            var = kline_variates(ts, o, h, lo, c, v, fr)
            tg = forward_targets(c, h, lo, horizon=horizon, flat_threshold=flat_threshold)
            df = pd.DataFrame({"symbol": symbol, "minute_ts": ts, "open": o, "high": h, "low": lo,
                               "volume": v})
            for name in KLINE_VARIATES:
                df[name] = var[name]
            for name in TARGET_COLUMNS:
                df[name] = tg[name]
            parts.append(df)
    if not parts:
        raise DatasetError("no klines given")
    return pd.concat(parts, ignore_index=True)


def dataset_fingerprint(df: pd.DataFrame) -> str:
    """A short content hash of the columns the model reads (for manifests and split identity)."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(df.columns.tolist())).encode())
    for col in ("symbol", "minute_ts", "close"):
        if col in df.columns:
            h.update(pd.util.hash_pandas_object(df[col], index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _read_parquet_or_delta(path: Path) -> tuple[pd.DataFrame, dict]:
    manifest: dict = {}
    if path.is_dir():
        for name in ("manifest.json", "_manifest.json"):
            if (path / name).is_file():
                manifest = json.loads((path / name).read_text())
        if (path / "_delta_log").is_dir():
            from deltalake import DeltaTable

            return DeltaTable(str(path)).to_pyarrow_table().to_pandas(), manifest
        files = sorted(p for p in path.rglob("*.parquet"))
        if not files:
            raise DatasetError(f"{path}: no Parquet files or Delta table in this folder")
        import pyarrow.dataset as pads

        return pads.dataset([str(f) for f in files], format="parquet").to_table().to_pandas(), manifest
    sidecar = path.with_suffix(".manifest.json")
    if sidecar.is_file():
        manifest = json.loads(sidecar.read_text())
    return pd.read_parquet(path), manifest


@dataclass
class Dataset:
    frame: pd.DataFrame
    manifest: dict = field(default_factory=dict)
    source: str = ""

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint") or dataset_fingerprint(self.frame)

    @property
    def registry_hash(self) -> str:
        return str(self.manifest.get("registry_hash", ""))


def resolve_dataset(ref: str | Path, data_dir: str | Path = "data", allow_paths: bool = True) -> Path:
    """A dataset path (command line use), or a dataset id looked up under <data_dir>/datasets/.
    With ``allow_paths=False`` (values from a request) only ids are accepted."""
    p = Path(ref)
    if allow_paths and p.exists():
        return p
    ref_s = str(ref)
    if not re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}", ref_s) or ".." in ref_s:
        raise DatasetError(f"dataset {ref_s!r} is neither an existing path nor a valid dataset id")
    root = Path(data_dir) / "datasets"
    for cand in (root / ref_s, root / f"{ref_s}.parquet"):
        if cand.exists():
            return cand
    raise DatasetError(f"dataset {ref_s!r} not found (no such path, nor {root / ref_s})")


def load_dataset(ref: str | Path | pd.DataFrame, *, data_dir: str | Path = "data", symbol: str | None = None,
                 funding_dir: str | Path | None = None, horizon: int = HORIZON,
                 flat_threshold: float = DEFAULT_FLAT_THRESHOLD, allow_paths: bool = True) -> Dataset:
    """Load a dataset (see the module doc); CSV klines are turned into a kline-only dataset."""
    if isinstance(ref, pd.DataFrame):
        df = ref
        if "symbol" not in df.columns or "minute_ts" not in df.columns:
            raise DatasetError("a dataset frame needs symbol and minute_ts columns")
        if "log_return_1m" not in df.columns and "close" in df.columns and "high" in df.columns:
            # raw klines: build variates and targets
            klines = {s: g.drop(columns="symbol") for s, g in df.groupby("symbol", sort=True)}
            df = build_kline_dataset(klines, horizon=horizon, flat_threshold=flat_threshold)
        return Dataset(_check_frame(df, horizon, flat_threshold), {"kind": "frame"}, "frame")
    path = resolve_dataset(ref, data_dir, allow_paths)
    if path.suffix.lower() == ".csv":
        sym = symbol or symbol_from_path(path)
        if not sym:
            raise DatasetError(f"{path}: cannot tell the symbol from the file name; pass symbol=")
        funding = None
        if funding_dir is not None:
            fp = Path(funding_dir) / f"funding_bybit_{sym}.csv"
            if fp.is_file():
                funding = {sym: load_funding_csv(fp)}
        df = build_kline_dataset({sym: load_klines_csv(path)}, funding, horizon=horizon,
                                 flat_threshold=flat_threshold)
        manifest = {"kind": "kline_csv", "source": str(path), "symbols": [sym], "registry_hash": ""}
        return Dataset(df, manifest, str(path))
    try:
        df, manifest = _read_parquet_or_delta(path)
    except DatasetError:
        raise
    except Exception as exc:  # not Parquet, unreadable, ...
        raise DatasetError(f"{path}: cannot read a dataset here ({type(exc).__name__}: {exc})") from None
    return Dataset(_check_frame(df, horizon, flat_threshold), manifest, str(path))


def _normalise_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Accept the dataset builder's layout (flows/datasets.py: ``ts`` = minute start, targets
    ``y_<name>``, the close path as a list column ``y_close_path``) as well as the plain one."""
    ren = {}
    if "minute_ts" not in df.columns and "ts" in df.columns:
        ren["ts"] = "minute_ts"
    for k in TARGET_COLUMNS + ("close_path",):
        if f"y_{k}" in df.columns and k not in df.columns:
            ren[f"y_{k}"] = k
    df = df.rename(columns=ren)
    if "close" not in df.columns and {"close_h", "ret_h"} <= set(df.columns):
        # the reference close C_t = close_h / exp(ret_h) (rows without targets stay unknown)
        df["close"] = df["close_h"].astype(float) / np.exp(df["ret_h"].astype(float))
    return df


def _check_frame(df: pd.DataFrame, horizon: int, flat_threshold: float) -> pd.DataFrame:
    df = _normalise_columns(df)
    missing = [c for c in ("symbol", "minute_ts") if c not in df.columns]
    if missing:
        raise DatasetError(f"dataset lacks columns {missing}")
    df = df.copy()
    df["minute_ts"] = df["minute_ts"].astype(np.int64)
    if "minute_ts" in df and (df["minute_ts"] % MINUTE_MS != 0).any():
        raise DatasetError("minute_ts must be candle-start milliseconds on a minute boundary")
    df = df.sort_values(["symbol", "minute_ts"], kind="stable").reset_index(drop=True)
    if df.duplicated(["symbol", "minute_ts"]).any():
        raise DatasetError("dataset has duplicate (symbol, minute_ts) rows")
    return df


# ---------------------------------------------------------------------------------------- windows
@dataclass
class Windows:
    """Contiguous per-symbol minute grids concatenated into flat arrays, plus the valid origins.

    ``x[i]`` are the variates of global row i (float32, NaN kept); ``origins`` are global row
    indices t with a complete finite window x[t-L+1..t] inside one segment and finite targets.
    """
    variates: list[str]
    lookback: int
    horizon: int
    x: np.ndarray                 # [N, V] float32
    symbol: np.ndarray            # [N] object
    ts: np.ndarray                # [N] int64 minute start
    seg_start: np.ndarray         # [N] global index where this row's segment starts
    seg_end: np.ndarray           # [N] global index one past this row's segment end
    close: np.ndarray             # [N]
    open: np.ndarray              # [N]
    high: np.ndarray
    low: np.ndarray
    path: np.ndarray              # [N, H] log(C_{t+h}/C_t)
    rv: np.ndarray                # [N]
    range_rel: np.ndarray         # [N]
    direction: np.ndarray         # [N] -1/0/1 (NaN unknown)
    rv_past: np.ndarray           # [N] realised vol over [t-H+1, t] (known at t)
    range_rel_past: np.ndarray    # [N] (max H - min L over [t-H+1, t]) / C_t (known at t)
    funding: np.ndarray           # [N] funding rate known at t (NaN unknown)
    origins: np.ndarray           # [M] int64
    flat_threshold: float = DEFAULT_FLAT_THRESHOLD

    def window_index(self, origins: np.ndarray) -> np.ndarray:
        return np.asarray(origins)[:, None] + np.arange(-self.lookback + 1, 1)[None, :]

    def gather(self, origins: np.ndarray) -> np.ndarray:
        """[B, L, V] float32 windows for these origins (oldest minute first)."""
        return self.x[self.window_index(origins)]

    def targets(self, origins: np.ndarray) -> dict[str, np.ndarray]:
        o = np.asarray(origins)
        return {"path": self.path[o], "rv": self.rv[o], "range_rel": self.range_rel[o],
                "direction": self.direction[o]}

    def subset(self, mask_or_idx) -> np.ndarray:
        return self.origins[mask_or_idx]


def _rolling_past(values: np.ndarray, seg_id: np.ndarray, n: int, how: str) -> np.ndarray:
    s = pd.Series(values)
    g = s.groupby(seg_id, sort=False).rolling(n, min_periods=n)
    r = {"sum": g.sum, "max": g.max, "min": g.min}[how]()
    return r.reset_index(level=0, drop=True).sort_index().to_numpy()


def make_windows(ds: Dataset | pd.DataFrame, variates: Sequence[str], lookback: int, horizon: int = HORIZON,
                 flat_threshold: float | None = None) -> Windows:
    """Windows for these variates. Rows are regridded per symbol onto whole minutes (missing
    minutes -> NaN rows; gaps over a day start a new segment). The close path is recomputed from
    ``close`` (targets must come from flows.targets); the dataset's rv/range target columns are used
    when its manifest says they are of this horizon."""
    df = ds.frame if isinstance(ds, Dataset) else ds
    manifest = ds.manifest if isinstance(ds, Dataset) else {}
    if flat_threshold is None:
        flat_threshold = float(manifest.get("flat_threshold",
                                            manifest.get("label_config", {}).get("flat_threshold",
                                                                                 DEFAULT_FLAT_THRESHOLD)))
    missing = [v for v in variates if v not in df.columns]
    if missing:
        raise DatasetError(f"dataset lacks variates {missing}; it has {sorted(df.columns)}")
    if "close" not in df.columns:
        raise DatasetError("dataset needs a close column (the reference price of the targets)")
    blocks, paths_given = [], []
    for symbol, g in df.groupby("symbol", sort=True):
        g = g.sort_values("minute_ts")
        ts_all = g["minute_ts"].to_numpy(np.int64)
        for seg in _segments_of(ts_all):
            part = g.iloc[seg]
            ts = part["minute_ts"].to_numpy(np.int64)
            grid = np.arange(ts[0], ts[-1] + MINUTE_MS, MINUTE_MS, dtype=np.int64)
            pos = (ts - ts[0]) // MINUTE_MS
            dense = pd.DataFrame(index=np.arange(len(grid)))
            dense["minute_ts"] = grid
            if "close_path" in part.columns:
                # list column -> [rows, H] block (None for rows without targets)
                cp = np.full((len(grid), horizon), np.nan)
                for i, v in zip(pos, part["close_path"].to_numpy(object)):
                    if v is not None and len(v) == horizon:
                        cp[i] = np.asarray(v, float)
                paths_given.append(cp)
            else:
                paths_given.append(None)
            for col in part.columns:
                if col in ("symbol", "minute_ts"):
                    continue
                if not pd.api.types.is_numeric_dtype(part[col]):
                    continue
                arr = np.full(len(grid), np.nan)
                arr[pos] = part[col].to_numpy(float)
                dense[col] = arr
            dense["symbol"] = symbol
            blocks.append(dense)
    if not blocks:
        raise DatasetError("dataset is empty")
    N = sum(len(b) for b in blocks)
    seg_start = np.empty(N, np.int64)
    seg_end = np.empty(N, np.int64)
    seg_id = np.empty(N, np.int64)
    off = 0
    for k, b in enumerate(blocks):
        seg_start[off:off + len(b)] = off
        seg_end[off:off + len(b)] = off + len(b)
        seg_id[off:off + len(b)] = k
        off += len(b)
    big = pd.concat(blocks, ignore_index=True)

    def col(name):
        return big[name].to_numpy(float) if name in big.columns else np.full(N, np.nan)

    close = col("close")
    has_hl = "high" in big.columns and "low" in big.columns
    high = col("high") if has_hl else close
    low = col("low") if has_hl else close
    # targets: the close path from flows.targets over each segment (never across segments)
    path = np.full((N, horizon), np.nan)
    rv = np.full(N, np.nan)
    rng = np.full(N, np.nan)
    for k, b in enumerate(blocks):
        a = int(seg_start[seg_id == k][0]) if len(b) else 0
        sl = slice(a, a + len(b))
        tg = forward_targets(close[sl], high[sl], low[sl], horizon=horizon, flat_threshold=flat_threshold)
        path[sl] = tg["close_path"] if paths_given[k] is None else paths_given[k]
        rv[sl] = tg["rv_h"]
        rng[sl] = tg["range_rel_h"] if has_hl else np.nan
    # the dataset's own target columns only when they are of this horizon (its manifest says so): a
    # dataset built at H=30 and trained at another horizon would mix 30-minute rv/range with the
    # requested close path
    ds_h = manifest.get("label_config", {}).get("horizon", manifest.get("horizon"))
    if ds_h is not None and int(ds_h) == horizon:
        if "rv_h" in big.columns:
            rv = np.where(np.isfinite(col("rv_h")), col("rv_h"), rv)
        if "range_rel_h" in big.columns:
            rng = np.where(np.isfinite(col("range_rel_h")), col("range_rel_h"), rng)
    ret_h = path[:, -1]
    direction = np.where(np.isnan(ret_h), np.nan,
                         np.where(ret_h > flat_threshold, 1.0, np.where(ret_h < -flat_threshold, -1.0, 0.0)))
    # known-at-t references: realised vol and range over the last H minutes
    with np.errstate(divide="ignore", invalid="ignore"):
        logc = np.log(close)
    r1 = np.full(N, np.nan)
    r1[1:] = logc[1:] - logc[:-1]
    r1[seg_start == np.arange(N)] = np.nan
    rv_past = np.sqrt(_rolling_past(r1 * r1, seg_id, horizon, "sum"))
    range_past = (_rolling_past(high, seg_id, horizon, "max") - _rolling_past(low, seg_id, horizon, "min")) / close
    open_ = col("open")
    if "open" not in big.columns:  # no open prices: fill at the previous close (no gap return)
        open_ = np.concatenate([[np.nan], close[:-1]])
        open_[seg_start == np.arange(N)] = close[seg_start == np.arange(N)]

    x = np.stack([col(v) for v in variates], axis=1).astype(np.float32)
    finite_row = np.isfinite(x).all(axis=1)
    # window [t-L+1, t] complete: count of bad rows in it is zero, and it stays inside the segment
    bad = np.concatenate([[0], np.cumsum(~finite_row)])
    idx = np.arange(N)
    lo_i = idx - lookback + 1
    inside = lo_i >= seg_start
    bad_in = bad[idx + 1] - bad[np.clip(lo_i, 0, None)]
    ok = inside & (bad_in == 0) & np.isfinite(path).all(axis=1) & np.isfinite(rv) & np.isfinite(rng)
    origins = np.flatnonzero(ok).astype(np.int64)
    return Windows(variates=list(variates), lookback=lookback, horizon=horizon, x=x,
                   symbol=big["symbol"].to_numpy(object), ts=big["minute_ts"].to_numpy(np.int64),
                   seg_start=seg_start, seg_end=seg_end, close=close, open=open_, high=high, low=low,
                   path=path, rv=rv, range_rel=rng, direction=direction, rv_past=rv_past,
                   range_rel_past=range_past, funding=col("funding_rate"), origins=origins,
                   flat_threshold=flat_threshold)


def kline_variate_names(include_funding: bool = False) -> list[str]:
    return [v for v in KLINE_VARIATES if include_funding or v != "funding_rate"]


__all__ = ["Dataset", "DatasetError", "Windows", "TIME_VARIATES", "KLINE_WARMUP", "build_kline_dataset",
           "load_dataset", "load_klines_csv", "load_funding_csv", "funding_asof", "make_windows",
           "resolve_dataset", "dataset_fingerprint", "kline_variate_names"]
