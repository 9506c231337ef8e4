"""Training datasets: per-minute rows per symbol = features known at the minute's close, joined with
targets computed only from the future (``flows.targets``); versioned, with a manifest.

Python API (what the FastAPI service calls):

    build_dataset(spec) -> manifest          # spec: DatasetSpec or a dict (POST /dataset/build body)
    list_datasets() -> list[manifest]
    load_dataset(dataset_id, as_="pandas"|"arrow"|"path")

Rows. ``ts`` is the start of minute t (ms) and ``available_ts = ts + 60 s`` its close: every feature
of the row is computed from data with event time before ``available_ts`` (candles up to and
including minute t, funding events with ``exchange_ts < available_ts``), every target from minutes
t+1 .. t+H (plus the reference close C_t). Targets never reach past ``period_to``: the last H rows
of a period have null targets, so a dataset carries no information from after its period (later
periods can be used as honest test sets).

Kinds. ``klines``: the ``flows.candles.kline_variates`` of the confirmed 1-minute candles in
``raw_kline`` (live or historical; one row per minute chosen deterministically, preferring rows the
gateway saw live), with the funding rate forward-filled from ``raw_funding``. ``features``: the
1-minute (``m1``) feature vectors of the offline replay of the archive (``flows.offline_replay``),
joined with the same targets from the candles.

Versioning. The build pins the version of every table it reads (or the versions the spec pins, for
an exact rebuild by time travel); the dataset id is a hash of the normalised spec, those versions,
the feature registry hash and a hash of the code that shapes the rows, so the same inputs give the
same id, and the same data bytes (Parquet written with fixed settings, rows in a fixed order).
Output: ``<data_dir>/datasets/<id>/data.parquet`` + ``manifest.json``; a ``DatasetReady`` message on
``features.dataset.ready`` when a build finishes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.candles import KLINE_VARIATES, KLINE_WARMUP, MINUTE_MS, kline_registry_hash, kline_variates
from flows.lake import DAY_MS, Lake, dates_between
from flows.targets import DEFAULT_FLAT_THRESHOLD, HORIZON, forward_targets, triple_barrier
from tickcast.logs import get_logger

log = get_logger("datasets")

REPO = Path(__file__).resolve().parent.parent
DATASET_ID = re.compile(r"^ds-[0-9a-f]{16}$")
_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
MAX_PERIOD_MS = 800 * DAY_MS
KINDS = ("klines", "features")
DATA_FILE = "data.parquet"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# the code that shapes a dataset's rows: a change gives new dataset ids
CODE_FILES = ("flows/datasets.py", "flows/candles.py", "flows/targets.py", "flows/lake.py")
FEATURE_CODE_FILES = ("flows/engine.py", "flows/feature_kinds.py", "flows/book.py", "flows/registry.py",
                      "flows/dataflow.py", "flows/replay_source.py", "flows/offline_replay.py")
TABLES = {"klines": ("raw_kline", "raw_funding"),
          "features": ("raw_orderbook_snapshots", "raw_orderbook_deltas", "raw_trades", "raw_kline", "raw_ticker",
                       "raw_funding", "raw_mempool", "raw_news", "raw_heartbeats")}


class DatasetError(ValueError):
    """A spec or id that cannot be used; the message says why (the API maps it to a 4xx)."""


# ---------------------------------------------------------------------------------------------
# spec


def parse_time_ms(value: Any, name: str) -> int:
    """ms since the epoch from an int (ms), an ISO date/time (naive = UTC) or a datetime."""
    if isinstance(value, bool):
        raise DatasetError(f"{name}: expected a time, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return _in_range(int(value), name, value)
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        s = value.strip()
        if re.fullmatch(r"-?\d+", s):
            return _in_range(int(s), name, value)
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise DatasetError(f"{name}: {value!r} is not an ISO date/time or epoch milliseconds") from None
    else:
        raise DatasetError(f"{name}: expected a time, got {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return _in_range(int(round(dt.timestamp() * 1000)), name, value)


_MS_MIN, _MS_MAX = 0, 4_102_444_800_000  # 1970 .. 2100: epoch milliseconds any market data can have


def _in_range(ms: int, name: str, value) -> int:
    if not _MS_MIN <= ms <= _MS_MAX:
        raise DatasetError(f"{name}: {str(value)[:40]!r} is outside 1970..2100 (epoch milliseconds or ISO 8601)")
    return ms


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class LabelConfig:
    horizon: int = HORIZON  # minutes: return(t+N), Close(t+N), realised vol and range over [t+1, t+N]
    flat_threshold: float = DEFAULT_FLAT_THRESHOLD  # |log return| at or below it = flat
    triple_barrier: bool = False
    barrier_k: float = 1.0  # barriers at C_t * exp(+-k * sigma_t), sigma_t = rv_60m_t * sqrt(N / 60)

    def validate(self) -> LabelConfig:
        if not isinstance(self.horizon, int) or isinstance(self.horizon, bool) or not 1 <= self.horizon <= 1440:
            raise DatasetError(f"horizon must be an integer number of minutes in 1..1440, got {self.horizon!r}")
        if not (isinstance(self.flat_threshold, (int, float)) and math.isfinite(self.flat_threshold)
                and 0 <= self.flat_threshold < 1):
            raise DatasetError(f"flat_threshold must be in [0, 1) (log-return units), got {self.flat_threshold!r}")
        if not (isinstance(self.barrier_k, (int, float)) and math.isfinite(self.barrier_k) and self.barrier_k > 0):
            raise DatasetError(f"barrier_k must be > 0, got {self.barrier_k!r}")
        return LabelConfig(int(self.horizon), float(self.flat_threshold), bool(self.triple_barrier),
                           float(self.barrier_k))


@dataclass(frozen=True)
class DatasetSpec:
    symbols: tuple[str, ...]
    period_from: int  # ms, inclusive (floored to the minute)
    period_to: int  # ms, exclusive (floored to the minute)
    kind: str = "klines"
    labels: LabelConfig = field(default_factory=LabelConfig)
    venues: tuple[str, ...] | None = None  # only klines from these venues (None: any)
    raw_versions: dict[str, int] | None = None  # pin table versions (time travel); None: current

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        if isinstance(d, DatasetSpec):
            return d.validate()
        if not isinstance(d, dict):
            raise DatasetError("a dataset spec is an object")
        known = {f.name for f in dataclasses.fields(cls)} | {"from", "to", "horizon", "flat_threshold",
                                                              "triple_barrier", "barrier_k"}
        unknown = set(d) - known
        if unknown:
            raise DatasetError(f"unknown dataset spec fields: {sorted(unknown)}")
        labels = d.get("labels") or {}
        if isinstance(labels, dict):
            for k in ("horizon", "flat_threshold", "triple_barrier", "barrier_k"):
                if k in d:
                    labels = {**labels, k: d[k]}
            try:
                labels = LabelConfig(**labels)
            except TypeError as exc:
                raise DatasetError(f"labels: {exc}") from None
        syms = d.get("symbols")
        if isinstance(syms, str):
            syms = [s for s in syms.split(",") if s.strip()]
        venues = d.get("venues")
        if isinstance(venues, str):
            venues = [v for v in venues.split(",") if v.strip()]
        spec = cls(symbols=tuple(syms or ()),
                   period_from=parse_time_ms(d.get("period_from", d.get("from")), "from"),
                   period_to=parse_time_ms(d.get("period_to", d.get("to")), "to"),
                   kind=d.get("kind", "klines"), labels=labels,
                   venues=tuple(venues) if venues else None,
                   raw_versions=dict(d["raw_versions"]) if d.get("raw_versions") else None)
        return spec.validate()

    def validate(self) -> DatasetSpec:
        syms = []
        for s in self.symbols:
            u = str(s).strip().upper()
            if not _SYMBOL.match(u):
                raise DatasetError(f"bad symbol {s!r}: letters and digits only, e.g. BTCUSDT")
            if u not in syms:
                syms.append(u)
        if not syms:
            raise DatasetError("at least one symbol is required")
        if self.kind not in KINDS:
            raise DatasetError(f"kind must be one of {KINDS}, got {self.kind!r}")
        lo = self.period_from - self.period_from % MINUTE_MS
        hi = self.period_to - self.period_to % MINUTE_MS
        if hi <= lo:
            raise DatasetError(f"empty period: from {iso_ms(self.period_from)} is not before to {iso_ms(self.period_to)}")
        if hi - lo > MAX_PERIOD_MS:
            raise DatasetError(f"period longer than {MAX_PERIOD_MS // DAY_MS} days")
        labels = self.labels.validate()
        if self.raw_versions is not None:
            for k, v in self.raw_versions.items():
                if k not in TABLES[self.kind] or not isinstance(v, int) or v < 0:
                    raise DatasetError(f"raw_versions: bad entry {k}={v!r}")
        venues = tuple(sorted(set(self.venues))) if self.venues else None
        return DatasetSpec(tuple(sorted(syms)), lo, hi, self.kind, labels, venues,
                           dict(sorted(self.raw_versions.items())) if self.raw_versions else None)

    def to_dict(self) -> dict:
        return {"symbols": list(self.symbols), "period_from": self.period_from, "period_to": self.period_to,
                "kind": self.kind, "labels": dataclasses.asdict(self.labels),
                "venues": list(self.venues) if self.venues else None, "raw_versions": self.raw_versions}


# ---------------------------------------------------------------------------------------------
# provenance


def code_version() -> str:
    """``git describe`` of the checkout (``-dirty`` when it has changes), or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_hash(files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        p = REPO / rel
        h.update(rel.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()[:16]


def dataset_id(spec: DatasetSpec, versions: dict[str, int], registry_hash: str, chash: str,
               table_ids: dict[str, str] | None = None) -> str:
    """Same inputs, same id: the spec, the raw tables (their Delta ids and versions), the feature
    registry and the code."""
    canon = json.dumps({"spec": {**spec.to_dict(), "raw_versions": None}, "versions": versions,
                        "tables": table_ids or {}, "registry": registry_hash, "code": chash,
                        "format": FORMAT_VERSION}, sort_keys=True, separators=(",", ":"))
    return "ds-" + hashlib.sha256(canon.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# inputs


def load_candles(lake: Lake, symbol: str, lo: int, hi: int, *, version: int | None = None,
                 venues: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Confirmed 1-minute candles of ``symbol`` with start in [lo, hi) on a dense minute grid
    (missing minutes are NaN rows, never invented). One row per minute: a candle the gateway saw live
    (gw_seq >= 0) wins over a historical one, then the latest exchange_ts, recv_ts and the values
    themselves decide, so the choice never depends on file order."""
    grid = np.arange(lo, hi, MINUTE_MS, dtype=np.int64)
    n = len(grid)
    cols = ["start_ts", "open", "high", "low", "close", "volume", "venue", "gw_seq", "exchange_ts", "recv_ts"]
    expr = ((pc.field("interval") == "1") & pc.field("confirm")
            & (pc.field("start_ts") >= lo) & (pc.field("start_ts") < hi))
    if venues:
        expr = expr & pc.field("venue").isin(list(venues))
    at = lake.read("raw_kline", symbols=[symbol], dates=dates_between(lo, hi + DAY_MS), columns=cols,
                   filter=expr, version=version)
    best: dict[int, tuple] = {}
    data = {c: at.column(c).to_pylist() for c in cols}
    for i in range(at.num_rows):
        start = data["start_ts"][i]
        key = (data["gw_seq"][i] >= 0, data["exchange_ts"][i], data["recv_ts"][i], data["close"][i],
               data["high"][i], data["low"][i], data["open"][i], data["volume"][i], data["venue"][i])
        cur = best.get(start)
        if cur is None or key > cur[0]:
            best[start] = (key, i)
    out = {k: np.full(n, np.nan) for k in ("open", "high", "low", "close", "volume")}
    venue = [None] * n
    for start, (_, i) in best.items():
        j = (start - lo) // MINUTE_MS
        for k in out:
            out[k][j] = float(data[k][i])
        venue[j] = data["venue"][i]
    out["start_ts"] = grid
    out["venue"] = np.array(venue, dtype=object)
    return out


def load_funding(lake: Lake, symbol: str, grid: np.ndarray, *, version: int | None = None) -> np.ndarray:
    """Funding rate known at the close of each minute: the last ``raw_funding`` event with
    ``exchange_ts < start + 60 s`` (ties broken by gw_seq, kind, rate), NaN before the first."""
    n = len(grid)
    if n == 0:
        return np.full(0, np.nan)
    hi = int(grid[-1]) + MINUTE_MS
    at = lake.read("raw_funding", symbols=[symbol], columns=["exchange_ts", "gw_seq", "kind", "funding_rate"],
                   filter=pc.field("exchange_ts") < hi, version=version)
    rows = sorted(zip(*(at.column(c).to_pylist() for c in ("exchange_ts", "gw_seq", "kind", "funding_rate"))))
    if not rows:
        return np.full(n, np.nan)
    ts = np.array([r[0] for r in rows], dtype=np.int64)
    rate = np.array([float(r[3]) for r in rows])
    idx = np.searchsorted(ts, grid + MINUTE_MS, side="left") - 1
    return np.where(idx >= 0, rate[np.maximum(idx, 0)], np.nan)


# ---------------------------------------------------------------------------------------------
# rows


def _label_array(x: np.ndarray) -> pa.Array:
    return pa.array([None if not np.isfinite(v) else int(v) for v in x], type=pa.int8())


def target_columns(close, high, low, labels: LabelConfig, rv_60m: np.ndarray | None = None) -> dict[str, pa.Array]:
    t = forward_targets(close, high, low, labels.horizon, labels.flat_threshold)
    cols = {f"y_{k}": pa.array(t[k], type=pa.float64(), from_pandas=True) for k in ("ret_1m", "ret_h", "close_h", "rv_h", "range_h",
                                                                   "range_rel_h")}
    cols["y_direction"] = _label_array(t["direction"])
    paths = t["close_path"]
    cols["y_close_path"] = pa.array([None if not np.all(np.isfinite(p)) else p.tolist() for p in paths],
                                    type=pa.list_(pa.float64()))
    if labels.triple_barrier:
        sigma = (rv_60m if rv_60m is not None else np.full(len(close), np.nan)) * math.sqrt(labels.horizon / 60.0)
        cols["y_triple_barrier"] = _label_array(triple_barrier(close, high, low, sigma, labels.horizon,
                                                               labels.barrier_k))
    return cols


def kline_rows(lake: Lake, spec: DatasetSpec, symbol: str, versions: dict[str, int]) -> pa.Table:
    """The rows of one symbol of a kline-only dataset."""
    lo = spec.period_from - KLINE_WARMUP * MINUTE_MS
    c = load_candles(lake, symbol, lo, spec.period_to, version=versions.get("raw_kline"), venues=spec.venues)
    fr = load_funding(lake, symbol, c["start_ts"], version=versions.get("raw_funding"))
    var = kline_variates(c["start_ts"], c["open"], c["high"], c["low"], c["close"], c["volume"], fr)
    keep = slice(KLINE_WARMUP, None)  # rows of the period (the grid starts KLINE_WARMUP minutes earlier)
    targets = target_columns(c["close"], c["high"], c["low"], spec.labels, var["rv_60m"])
    ts = c["start_ts"][keep]
    cols: dict[str, pa.Array] = {
        "symbol": pa.array([symbol] * len(ts), type=pa.string()),
        "ts": pa.array(ts, type=pa.int64()),
        "available_ts": pa.array(ts + MINUTE_MS, type=pa.int64()),
        "venue": pa.array(list(c["venue"][keep]), type=pa.string()),
    }
    for name in KLINE_VARIATES:
        cols[name] = pa.array(var[name][keep], type=pa.float64(), from_pandas=True)  # NaN -> null
    for name, arr in targets.items():
        cols[name] = arr[KLINE_WARMUP:]
    return pa.table(cols)


def feature_rows(lake: Lake, spec: DatasetSpec, symbol: str, versions: dict[str, int],
                 vectors: pa.Table) -> pa.Table:
    """The rows of one symbol of a replay-feature dataset: its m1 feature vectors (``vectors``: one
    row per window, columns ``window_end`` + the feature values) on the minute grid, joined with the
    targets of the candles. A window ending at ``window_end`` is the minute starting 60 s earlier."""
    grid = np.arange(spec.period_from, spec.period_to, MINUTE_MS, dtype=np.int64)
    c = load_candles(lake, symbol, spec.period_from, spec.period_to, version=versions.get("raw_kline"),
                     venues=spec.venues)
    var_rv = np.full(len(grid), np.nan)
    ends = vectors.column("window_end").to_numpy() if vectors.num_rows else np.zeros(0, np.int64)
    pos = {int(e) - MINUTE_MS: i for i, e in enumerate(ends)}
    take = [pos.get(int(t)) for t in grid]
    feats = [n for n in vectors.column_names if n not in ("window_end",)]
    cols: dict[str, pa.Array] = {
        "symbol": pa.array([symbol] * len(grid), type=pa.string()),
        "ts": pa.array(grid, type=pa.int64()),
        "available_ts": pa.array(grid + MINUTE_MS, type=pa.int64()),
        "venue": pa.array(list(c["venue"]), type=pa.string()),
    }
    idx = pa.array(take, type=pa.int64())
    for name in feats:
        cols[name] = pc.take(vectors.column(name), idx).combine_chunks() if vectors.num_rows else \
            pa.nulls(len(grid), vectors.schema.field(name).type)
        if name == "rv_60m":
            var_rv = np.array([np.nan if v is None else v for v in cols[name].to_pylist()], dtype=float)
    for name, arr in target_columns(c["close"], c["high"], c["low"], spec.labels, var_rv).items():
        cols[name] = arr
    return pa.table(cols)


def lookahead_violations(a: pa.Table | Any, b: pa.Table | Any, columns: Sequence[str], cut_ts: int) -> dict[str, int]:
    """Per column, how many rows with ``available_ts <= cut_ts`` differ between two builds whose
    inputs differ only at event times >= ``cut_ts``. Any non-zero count is look-ahead."""
    ta = a if isinstance(a, pa.Table) else pa.Table.from_pandas(a, preserve_index=False)
    tb = b if isinstance(b, pa.Table) else pa.Table.from_pandas(b, preserve_index=False)
    out = {}
    for col in columns:
        mask_a = pc.less_equal(ta.column("available_ts"), cut_ts)
        va = ta.filter(mask_a).column(col).to_pylist()
        vb = tb.filter(pc.less_equal(tb.column("available_ts"), cut_ts)).column(col).to_pylist()
        if len(va) != len(vb):
            out[col] = abs(len(va) - len(vb)) or 1
            continue
        out[col] = sum(1 for x, y in zip(va, vb) if not _same(x, y))
    return out


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return (math.isnan(x) and math.isnan(y)) or x == y
    return x == y


# ---------------------------------------------------------------------------------------------
# build, list, load


def datasets_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is None:
        from tickcast.config import get_settings

        data_dir = get_settings().data_dir
    return Path(data_dir) / "datasets"


def write_parquet(table: pa.Table, path: Path) -> None:
    """Fixed writer settings: the same rows give the same bytes."""
    pq.write_table(table, path, compression="zstd", compression_level=3, row_group_size=131_072,
                   use_dictionary=True, write_statistics=True, data_page_version="2.0",
                   store_schema=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_dataset(spec: DatasetSpec | dict, *, lake: Lake | None = None, data_dir: str | Path | None = None,
                  overwrite: bool = False, publish: bool = True, bootstrap: str | None = None,
                  progress: bool = False, vectors_by_symbol: dict[str, pa.Table] | None = None,
                  registry_hash: str | None = None) -> dict:
    """Build (or find) the dataset of ``spec`` and return its manifest.

    ``features`` datasets need the replay's m1 vectors: ``vectors_by_symbol`` (what
    ``flows.offline_replay`` produces) and the registry hash they were computed with; without them
    the replay is run here."""
    from tqdm import tqdm

    spec = DatasetSpec.from_dict(spec) if not isinstance(spec, DatasetSpec) else spec.validate()
    lake = lake or Lake.from_settings()
    root = datasets_dir(data_dir)
    tables = TABLES[spec.kind]
    current = lake.versions(tables)
    versions = {t: (spec.raw_versions or {}).get(t, current.get(t)) for t in tables if
                (spec.raw_versions or {}).get(t, current.get(t)) is not None}
    if spec.kind == "klines":
        if "raw_kline" not in versions:
            raise DatasetError(f"no raw_kline table under {lake.root}: archive or import klines first")
        registry_hash = kline_registry_hash()
        chash = code_hash(CODE_FILES)
    else:
        if vectors_by_symbol is None:
            from flows.offline_replay import replay_vectors  # the replay of the archive (part 3)

            root.mkdir(parents=True, exist_ok=True)  # the replay's scratch space lives next to the datasets
            vectors_by_symbol, registry_hash = replay_vectors(lake, spec.symbols, spec.period_from, spec.period_to,
                                                              versions=versions, progress=progress, work_dir=root)
        if not registry_hash:
            raise DatasetError("a features dataset needs the registry hash of its vectors")
        chash = code_hash(CODE_FILES + FEATURE_CODE_FILES)
    ds_id = dataset_id(spec, versions, registry_hash, chash, lake.table_ids(list(versions)))
    final = root / ds_id
    if (final / MANIFEST).is_file() and not overwrite:
        log.info("dataset exists", extra={"dataset_id": ds_id})
        return json.loads((final / MANIFEST).read_text())

    t0 = time.monotonic()
    parts, rows_per_symbol, venues = [], {}, {}
    for sym in tqdm(spec.symbols, desc=f"dataset {ds_id}", unit="symbol", disable=not progress):
        if spec.kind == "klines":
            t = kline_rows(lake, spec, sym, versions)
        else:
            vec = vectors_by_symbol[sym] if sym in vectors_by_symbol else _empty_vectors(vectors_by_symbol)
            t = feature_rows(lake, spec, sym, versions, vec)
        parts.append(t)
        rows_per_symbol[sym] = t.num_rows
        vc = pc.value_counts(t.column("venue").drop_null()).to_pylist() if t.num_rows else []
        venues[sym] = {d["values"]: d["counts"] for d in sorted(vc, key=lambda d: d["values"])}
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    feature_cols = [n for n in table.column_names if n not in ("symbol", "ts", "available_ts", "venue")
                    and not n.startswith("y_")]
    target_cols = [n for n in table.column_names if n.startswith("y_")]
    complete = int(pc.sum(pc.is_valid(table.column("y_ret_h"))).as_py() or 0)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{ds_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_parquet(table, tmp / DATA_FILE)
        manifest = {
            "dataset_id": ds_id, "format_version": FORMAT_VERSION, "kind": spec.kind,
            "uri": str((final / DATA_FILE).resolve()),
            "period": {"from": spec.period_from, "to": spec.period_to, "from_iso": iso_ms(spec.period_from),
                       "to_iso": iso_ms(spec.period_to)},
            "symbols": list(spec.symbols), "rows": table.num_rows, "rows_per_symbol": rows_per_symbol,
            "rows_with_targets": complete, "venues": venues,
            "label_config": dataclasses.asdict(spec.labels),
            "raw_table_versions": versions, "lake_root": lake.root,
            "registry_hash": registry_hash, "code_version": code_version(), "code_hash": chash,
            "feature_columns": feature_cols, "target_columns": target_cols,
            "row_semantics": "ts = minute start (ms); features use event time < available_ts = ts + 60 s; "
                             "targets use minutes t+1..t+horizon within the period",
            "files": [{"path": DATA_FILE, "bytes": (tmp / DATA_FILE).stat().st_size,
                       "sha256": _sha256_file(tmp / DATA_FILE)}],
            "spec": spec.to_dict(),
            "created_ts": int(time.time() * 1_000_000),
            "build_seconds": round(time.monotonic() - t0, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if final.exists():
            old = root / f".old-{ds_id}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("dataset built", extra={"dataset_id": ds_id, "counts": {"rows": table.num_rows,
                                                                      "with_targets": complete}})
    if publish:
        publish_dataset_ready(manifest, bootstrap=bootstrap)
    return manifest


def _empty_vectors(vectors_by_symbol: dict[str, pa.Table]) -> pa.Table:
    for t in vectors_by_symbol.values():
        return t.schema.empty_table()
    return pa.table({"window_end": pa.array([], type=pa.int64())})


def publish_dataset_ready(manifest: dict, *, bootstrap: str | None = None, timeout: float = 10.0) -> bool:
    """Send DatasetReady on ``features.dataset.ready``; False (logged) when no broker is configured."""
    from confluent_kafka import Producer

    from tickcast.kafka import producer_config
    from tickcast.serde import default_serde
    from tickcast.topics import DATASET_READY

    if bootstrap is None:
        from tickcast.config import get_settings

        bootstrap = get_settings().kafka_bootstrap
    if not bootstrap:
        log.info("no broker configured: DatasetReady not published", extra={"dataset_id": manifest["dataset_id"]})
        return False
    rec = {"dataset_id": manifest["dataset_id"], "uri": manifest["uri"], "period_from": manifest["period"]["from"],
           "period_to": manifest["period"]["to"], "symbols": manifest["symbols"], "rows": manifest["rows"],
           "registry_hash": manifest["registry_hash"], "code_version": manifest["code_version"],
           "raw_table_versions": {k: int(v) for k, v in manifest["raw_table_versions"].items()},
           "created_ts": manifest["created_ts"]}
    producer = Producer(producer_config(bootstrap))
    producer.produce(DATASET_READY, key=manifest["dataset_id"].encode(), value=default_serde().encode("DatasetReady", rec))
    left = producer.flush(timeout)
    if left:
        log.warning("DatasetReady not delivered", extra={"dataset_id": manifest["dataset_id"]})
        return False
    return True


def list_datasets(data_dir: str | Path | None = None) -> list[dict]:
    """Manifests of every complete dataset, oldest first."""
    root = datasets_dir(data_dir)
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not DATASET_ID.match(d.name):
            continue
        try:
            out.append(json.loads((d / MANIFEST).read_text()))
        except (OSError, ValueError) as exc:
            log.warning("unreadable dataset manifest", extra={"dataset_id": d.name, "error": str(exc)})
    return sorted(out, key=lambda m: (m.get("created_ts", 0), m["dataset_id"]))


def dataset_path(dataset_id: str, data_dir: str | Path | None = None) -> Path:
    """Folder of a dataset; the id is validated (no path can be smuggled in)."""
    if not isinstance(dataset_id, str) or not DATASET_ID.match(dataset_id):
        raise DatasetError(f"bad dataset id {dataset_id!r}: expected ds-<16 hex digits>")
    root = datasets_dir(data_dir).resolve()
    path = (root / dataset_id).resolve()
    if path.parent != root:
        raise DatasetError(f"bad dataset id {dataset_id!r}")
    if not (path / MANIFEST).is_file():
        raise KeyError(f"no dataset {dataset_id}")
    return path


def get_manifest(dataset_id: str, data_dir: str | Path | None = None) -> dict:
    return json.loads((dataset_path(dataset_id, data_dir) / MANIFEST).read_text())


def load_dataset(dataset_id: str, data_dir: str | Path | None = None, as_: str = "pandas"):
    """The dataset's rows as a pandas DataFrame (``as_="pandas"``), an Arrow table (``"arrow"``) or the
    Parquet file's path (``"path"``). Raises DatasetError for a bad id, KeyError for an unknown one."""
    path = dataset_path(dataset_id, data_dir) / DATA_FILE
    if as_ == "path":
        return path
    table = pq.read_table(path)
    if as_ == "arrow":
        return table
    if as_ == "pandas":
        return table.to_pandas()
    raise DatasetError(f"as_ must be pandas, arrow or path, got {as_!r}")


def referenced_versions(data_dir: str | Path | None = None) -> dict[str, list[int]]:
    """Table versions the datasets refer to (retention's vacuum keeps them readable)."""
    out: dict[str, set[int]] = {}
    for m in list_datasets(data_dir):
        for t, v in m.get("raw_table_versions", {}).items():
            out.setdefault(t, set()).add(int(v))
    return {t: sorted(v) for t, v in out.items()}
