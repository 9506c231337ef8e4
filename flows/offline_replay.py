"""The offline replay: the archived raw events of a period through the *same* feature dataflow.

    python -m flows.offline_replay --from 2026-11-20 --to 2026-11-21 --symbols BTCUSDT,ETHUSDT --out data/replay/x
    tickcast replay --from ... --to ... --symbols ... --out ...

``flows.replay_source.DeltaReplaySource`` (each symbol's events in gw_seq order from the Delta
bronze tables, streamed in bounded memory) -> ``flows.dataflow.build_flow`` (unchanged) -> a
Parquet sink of the FeatureVector records. The replay starts early enough to reproduce the period:
``registry.warmup_ms`` before ``--from`` (back to the last book snapshot), and runs until the first
event past ``--to`` + ``--tail`` so the period's last windows close; only windows ending in
(from, to] are written.

Output (``--out``): ``vectors/cadence=<c>/<symbol>-<n>.parquet``, one row per FeatureVector: its
fields except ``emit_ts`` (wall time, not part of parity), ``values`` as one float64 column
``f.<feature>`` per feature of the cadence (null = null) and ``nulls`` as JSON; ``iter_vectors`` gives
the records back exactly. ``replay.json``: period, symbols, table versions, registry hash, counts,
events/s. ``replay_vectors`` gives the 1-minute vectors per symbol as wide
tables for the dataset builder.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.lake import Lake
from tickcast.logs import get_logger

log = get_logger("replay")

META_COLUMNS = [("symbol", pa.string()), ("venue", pa.string()), ("cadence", pa.string()),
                ("window_end", pa.int64()), ("registry_hash", pa.string()), ("book_valid", pa.bool_()),
                ("event_count", pa.int64()), ("last_gw_seq", pa.int64()), ("close_recv_ts", pa.int64()),
                ("nulls", pa.string())]
FEATURE_PREFIX = "f."  # one float64 column per feature of the cadence, in the record's key order
DEFAULT_TAIL_MS = 60_000
_META = [m for m, _ in META_COLUMNS if m != "nulls"]


class ReplayError(ValueError):
    """A replay that cannot start as asked (bad period, registry or output folder): the CLIs print
    the reason and exit 2."""


class _Part:
    """Column buffers of one (cadence, symbol) part; the feature names of its first vector fix the
    columns (a vector with other names starts a new part)."""

    __slots__ = ("meta", "n", "names", "nulls", "values")

    def __init__(self, names: tuple):
        self.names = names
        self.meta = {m: [] for m in _META}
        self.values = [[] for _ in names]
        self.nulls: list[str] = []
        self.n = 0

    def add(self, rec: dict) -> None:
        for m in _META:
            self.meta[m].append(rec[m])
        for col, v in zip(self.values, rec["values"].values()):
            col.append(v)
        self.nulls.append(json.dumps(rec["nulls"], separators=(",", ":")) if rec["nulls"] else "{}")
        self.n += 1

    def table(self) -> pa.Table:
        cols = {m: pa.array(self.meta[m], t) for m, t in META_COLUMNS if m != "nulls"}
        cols["nulls"] = pa.array(self.nulls, pa.string())
        for name, col in zip(self.names, self.values):
            cols[FEATURE_PREFIX + name] = pa.array(col, pa.float64())
        return pa.table(cols)


def table_vectors(t: pa.Table) -> list[dict]:
    """FeatureVector records (without emit_ts) of a vectors table (one cadence)."""
    feats = [c for c in t.column_names if c.startswith(FEATURE_PREFIX)]
    names = [c[len(FEATURE_PREFIX):] for c in feats]
    meta = {m: t.column(m).to_pylist() for m in _META}
    nulls = t.column("nulls").to_pylist()
    vals = [t.column(c).to_pylist() for c in feats]
    out = []
    for i in range(t.num_rows):
        rec = {m: meta[m][i] for m in _META}
        rec["values"] = dict(zip(names, (col[i] for col in vals)))
        rec["nulls"] = json.loads(nulls[i])
        out.append(rec)
    return out


class VectorWriter:
    """Buffers feature vectors per (cadence, symbol), column-wise, and writes Parquet parts of
    ``flush_rows`` rows: ``vectors/cadence=<c>/<symbol>-<n>.parquet``."""

    def __init__(self, out: Path, from_ms: int, to_ms: int, flush_rows: int = 5_000):
        self.out = Path(out)
        self.from_ms, self.to_ms = from_ms, to_ms
        self.flush_rows = flush_rows
        self.buf: dict[tuple[str, str], _Part] = {}
        self.parts: dict[tuple[str, str], int] = {}
        self.counts: dict[str, int] = {}
        self.dropped_outside = 0

    def add(self, rec: dict) -> None:
        if not (self.from_ms < rec["window_end"] <= self.to_ms):
            self.dropped_outside += 1
            return
        key = (rec["cadence"], rec["symbol"])
        part = self.buf.get(key)
        names = tuple(rec["values"])
        if part is not None and part.names != names:
            self._write(key)
            part = None
        if part is None:
            part = self.buf[key] = _Part(names)
        part.add(rec)
        self.counts[rec["cadence"]] = self.counts.get(rec["cadence"], 0) + 1
        if part.n >= self.flush_rows:
            self._write(key)

    def _write(self, key: tuple[str, str]) -> None:
        part = self.buf.pop(key, None)
        if part is None or part.n == 0:
            return
        cadence, symbol = key
        n = self.parts.get(key, 0)
        self.parts[key] = n + 1
        d = self.out / "vectors" / f"cadence={cadence}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(part.table(), d / f"{symbol}-{n:05d}.parquet", compression="zstd")

    def close(self) -> None:
        for key in list(self.buf):
            self._write(key)


class _VectorSinkPartition(StatelessSinkPartition):
    def __init__(self, writer: VectorWriter):
        self.writer = writer

    def write_batch(self, items):
        add = self.writer.add
        for _symbol, rec in items:
            add(rec)

    def close(self):
        self.writer.close()


class VectorSink(DynamicSink):
    """The replay's feature sink: (symbol, FeatureVector) -> Parquet parts under ``out``."""

    def __init__(self, writer: VectorWriter):
        self.writer = writer

    def build(self, step_id, worker_index, worker_count):
        return _VectorSinkPartition(self.writer)


class CountingSink(DynamicSink):
    """Counts (key, record) items (offline the dead letters and control requests have nobody to go to)."""

    def __init__(self):
        self.count = 0

    def build(self, step_id, worker_index, worker_count):
        sink = self

        class _P(StatelessSinkPartition):
            def write_batch(self, items):
                sink.count += len(items)

        return _P()


def replay(lake: Lake, symbols: Sequence[str], from_ms: int, to_ms: int, out: str | Path, *,
           versions: dict[str, int] | None = None, registry_path: str | None = None, tail_ms: int = DEFAULT_TAIL_MS,
           progress: bool = True) -> dict:
    """Replay the archive for [from_ms, to_ms) and write the vectors under ``out``; returns the report."""
    from bytewax.testing import run_main
    from tqdm import tqdm

    from flows.dataflow import FlowConfig, FlowSinks, build_flow
    from flows.registry import DEFAULT_PATH, RegistryError, load_registry
    from flows.replay_source import REPLAY_TABLES, DeltaReplaySource, estimate_rows
    from tickcast.gc_tuning import throughput_gc

    if to_ms <= from_ms:
        raise ReplayError("empty replay period")
    try:
        registry = load_registry(registry_path or DEFAULT_PATH)
    except (RegistryError, OSError) as exc:
        raise ReplayError(f"feature registry: {exc}") from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReplayError(f"--out {out} exists and is not a folder")
    versions = dict(versions) if versions else lake.versions(REPLAY_TABLES)
    start_ms = from_ms - registry.warmup_ms
    out.mkdir(parents=True, exist_ok=True)
    writer = VectorWriter(out, from_ms, to_ms)
    total = estimate_rows(lake, symbols, start_ms, to_ms + tail_ms, versions=versions)
    bar = tqdm(total=total or None, desc="replay", unit="ev", unit_scale=True, disable=not progress, mininterval=0.5)
    events = [0]

    def on_rows(n: int) -> None:
        events[0] += n
        bar.update(n)

    source = DeltaReplaySource(lake, symbols, start_ms, to_ms + tail_ms, versions=versions, on_rows=on_rows)
    dead, control = CountingSink(), CountingSink()
    flow = build_flow(source, FlowSinks(features=VectorSink(writer), control=control, dead_letters=dead),
                      FlowConfig(flow_id="tickcast-replay", registry_path=registry_path, requester="replay"))
    t0 = time.perf_counter()
    c0 = time.process_time()
    with throughput_gc():
        run_main(flow, epoch_interval=timedelta(days=1))  # no snapshots: a replay is re-run, never resumed
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    bar.close()
    writer.close()
    report = {"period": {"from": from_ms, "to": to_ms}, "replay_start": start_ms, "tail_ms": tail_ms,
              "symbols": list(symbols), "raw_table_versions": versions, "lake_root": lake.root,
              "registry_hash": registry.hash, "registry_path": str(registry.path), "events": events[0],
              "vectors": dict(sorted(writer.counts.items())), "vectors_outside_period": writer.dropped_outside,
              "dead_letters": dead.count, "resync_requests": control.count, "wall_s": round(wall, 3),
              "cpu_s": round(cpu, 3), "events_per_s": round(events[0] / wall, 1) if wall > 0 else None}
    (out / "replay.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    log.info("replay done", extra={"counts": {"events": events[0], **writer.counts}})
    return report


def _part_files(out: str | Path, cadence: str | None, symbols: Sequence[str] | None) -> list[Path]:
    base = Path(out) / "vectors"
    files = sorted(base.glob(f"cadence={cadence}/*.parquet" if cadence else "cadence=*/*.parquet"))
    if symbols is not None:
        files = [f for f in files if f.name.rsplit("-", 1)[0] in set(symbols)]
    return files


def read_vectors(out: str | Path, cadence: str, symbols: Sequence[str] | None = None) -> pa.Table:
    """The vectors of one cadence a replay wrote (optionally some symbols), sorted by symbol and
    window_end: the meta columns + ``f.<feature>`` columns."""
    files = _part_files(out, cadence, symbols)
    if not files:
        return pa.schema(META_COLUMNS).empty_table()
    t = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    return t.sort_by([("symbol", "ascending"), ("window_end", "ascending")])


def iter_vectors(out: str | Path, symbols: Sequence[str] | None = None):
    """Every FeatureVector record (without emit_ts) a replay wrote, part by part."""
    for f in _part_files(out, None, symbols):
        yield from table_vectors(pq.read_table(f))


def wide_m1(vectors: pa.Table, feature_names: Sequence[str]) -> pa.Table:
    """1-minute vectors of one symbol as a wide table: window_end + one float column per feature
    (a feature the vectors lack is all null)."""
    n = vectors.num_rows
    cols = {"window_end": vectors.column("window_end").cast(pa.int64())}
    for name in feature_names:
        c = FEATURE_PREFIX + name
        cols[name] = vectors.column(c).cast(pa.float64()) if c in vectors.column_names else pa.nulls(n, pa.float64())
    return pa.table(cols)


def replay_vectors(lake: Lake, symbols: Sequence[str], from_ms: int, to_ms: int, *,
                   versions: dict[str, int] | None = None, progress: bool = False,
                   registry_path: str | None = None, work_dir: str | Path | None = None) -> tuple[dict[str, pa.Table], str]:
    """({symbol: wide m1 table}, registry hash): the replay's 1-minute vectors for the dataset builder."""
    from flows.registry import DEFAULT_PATH, load_registry

    registry = load_registry(registry_path or DEFAULT_PATH)
    names = registry.names("m1")
    with tempfile.TemporaryDirectory(prefix="replay-", dir=work_dir) as tmp:
        replay(lake, symbols, from_ms, to_ms, tmp, versions=versions, registry_path=registry_path, progress=progress)
        t = read_vectors(tmp, "m1")
    out = {}
    import pyarrow.compute as pc

    for sym in symbols:
        out[sym] = wide_m1(t.filter(pc.equal(t.column("symbol"), sym)), names)
    return out, registry.hash


def main(argv: list[str] | None = None) -> int:
    from flows.datasets import DatasetError, parse_time_ms

    p = argparse.ArgumentParser(prog="python -m flows.offline_replay", description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="period_from", required=True, help="UTC start (ISO or epoch ms)")
    p.add_argument("--to", dest="period_to", required=True, help="UTC end, exclusive (ISO or epoch ms)")
    p.add_argument("--symbols", help="comma-separated (default: TICKCAST_SYMBOLS)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lake-root", help="default: TICKCAST_LAKE_ROOT")
    p.add_argument("--registry", help="feature registry YAML (default flows/features.yaml)")
    p.add_argument("--tail-ms", type=int, default=DEFAULT_TAIL_MS, help="events after --to that close its last windows")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    from tickcast.config import ConfigError, get_settings

    try:
        s = get_settings()
        lo, hi = parse_time_ms(a.period_from, "from"), parse_time_ms(a.period_to, "to")
    except (ConfigError, DatasetError) as exc:
        print(exc, file=sys.stderr)
        return 2
    symbols = [x.strip().upper() for x in a.symbols.split(",") if x.strip()] if a.symbols else list(s.symbols)
    if any(not x.isalnum() for x in symbols):
        print(f"bad symbols {symbols}", file=sys.stderr)
        return 2
    if hi <= lo:
        print("--to must be after --from", file=sys.stderr)
        return 2
    lake = Lake(a.lake_root or str(s.lake_root), dict(s.lake_storage_options))
    try:
        report = replay(lake, symbols, lo, hi, a.out, registry_path=a.registry, tail_ms=a.tail_ms,
                        progress=not a.no_progress)
    except ReplayError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
