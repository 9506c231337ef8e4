"""CLI of the flows package: the bronze archive, the lake's maintenance and history imports, datasets.

    tickcast archive [--once]                       raw topics -> Delta bronze tables
    tickcast lake versions | retention | import-klines FILE... | import-funding FILE...
    tickcast dataset build --from --to --symbols | list | show ID
    tickcast replay --from --to --symbols --out               the archive through the feature dataflow
    tickcast parity --from --to [--symbols]                   features.live vs the replay, per feature

Only typer and the standard library at module level; everything heavy is imported inside commands.
"""
from __future__ import annotations

import json

import typer

from tickcast.clitools import settings_or_exit as _settings

lake_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="The Delta Lake bronze tables: versions, retention, history imports.")
dataset_app = typer.Typer(no_args_is_help=True, add_completion=False,
                          help="Versioned training datasets (features + future-only targets).")



def _lake(lake_root: str | None):
    from flows.lake import Lake

    s = _settings()
    return Lake(lake_root or str(s.lake_root), dict(s.lake_storage_options))


def _symbols(value: str | None) -> list[str] | None:
    return [v.strip().upper() for v in value.split(",") if v.strip()] if value else None


# ---------------------------------------------------------------------------------------------


def archive(bootstrap: str = typer.Option(None, help="default: KAFKA_BOOTSTRAP"),
            lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT"),
            once: bool = typer.Option(False, "--once", help="archive up to the current end of every partition, then exit"),
            batch_seconds: float = typer.Option(2.0, help="micro-batch: at most this many seconds ..."),
            batch_rows: int = typer.Option(50_000, help="... or this many rows"),
            workers: int = typer.Option(1, help="Bytewax workers in this process"),
            retention_days: int = typer.Option(None, help="run the retention once a day, keeping this many days "
                                                          "(default: TICKCAST_RETENTION_DAYS; 0: never)")) -> None:
    """Archive every raw topic and the dead-letter topic into the Delta bronze tables (exactly once:
    restarts resume from the offsets committed in the tables) and, once a UTC day, run the lake's
    retention (what `tickcast lake retention` does)."""
    from flows.archive import ArchiveConfig, run_archive

    s = _settings()
    bootstrap = bootstrap or s.kafka_bootstrap
    if not bootstrap:
        typer.echo("no broker: set KAFKA_BOOTSTRAP or pass --bootstrap", err=True)
        raise typer.Exit(2)
    if batch_seconds <= 0 or batch_rows < 1 or workers < 1 or (retention_days is not None and retention_days < 0):
        typer.echo("--batch-seconds, --batch-rows and --workers must be positive, --retention-days >= 0", err=True)
        raise typer.Exit(2)
    cfg = ArchiveConfig(bootstrap=bootstrap, lake=_lake(lake_root), stop_at_end=once, batch_seconds=batch_seconds,
                        batch_max_rows=batch_rows, data_dir=str(s.data_dir),
                        retention_days=None if once else (s.retention_days if retention_days is None else retention_days)
                        or None)
    try:
        run_archive(cfg, workers=workers)
    except KeyboardInterrupt:
        pass


def features(bootstrap: str = typer.Option(None, help="default: KAFKA_BOOTSTRAP"),
             registry: str = typer.Option(None, help="feature registry YAML (default flows/features.yaml)"),
             recovery_dir: str = typer.Option("data/recovery/features", help="'' disables recovery"),
             snapshot_s: float = typer.Option(5.0, help="epoch/snapshot interval in seconds"),
             process_id: int = typer.Option(None, "--process-id", "-i", help="this process in a cluster"),
             addresses: str = typer.Option(None, "--addresses", "-a", help="host:port of every process, comma-separated"),
             workers: int = typer.Option(1, "--workers", "-w", help="worker threads per process"),
             from_end: bool = typer.Option(False, "--from-end", help="without recovery state, start at the topics' end"),
             metrics_port: int = typer.Option(None, help="Prometheus /metrics port (+ process id); default "
                                                         "TICKCAST_FEATURES_METRICS_PORT, 0: off")) -> None:
    """Run the online feature flow: raw topics -> order books and windowed features -> features.live."""
    from flows.online_features import run
    from flows.registry import RegistryError, load_registry

    if registry:
        try:
            load_registry(registry)
        except RegistryError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
    if (process_id is None) != (addresses is None) or snapshot_s <= 0 or workers < 1:
        typer.echo("--process-id and --addresses go together; --snapshot-s and --workers must be positive", err=True)
        raise typer.Exit(2)
    try:
        run(bootstrap, registry_path=registry, recovery_dir=recovery_dir or None, snapshot_s=snapshot_s,
            process_id=process_id, addresses=addresses.split(",") if addresses else None, workers=workers,
            from_end=from_end,
            metrics_port=(_settings().features_metrics_port if metrics_port is None else metrics_port) or None)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------------------------


@lake_app.command("versions")
def lake_versions(lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Current version and row count of every bronze table."""
    lake = _lake(lake_root)
    for name, v in lake.versions().items():
        dt = lake.table(name)
        typer.echo(f"{name:26s} version={v:<6d} rows={dt.count():,}")


@lake_app.command("retention")
def lake_retention(days: int = typer.Option(None, help="days to keep (default: TICKCAST_RETENTION_DAYS)"),
                   tables: str = typer.Option(None, help="comma-separated (default: all but raw_kline, raw_funding)"),
                   archive_root: str = typer.Option(None, help="where expired partitions go (default: <lake>/_expired)"),
                   vacuum_hours: int = typer.Option(168, help="vacuum files unreferenced for this long"),
                   compact: bool = typer.Option(True, "--compact/--no-compact"),
                   lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Move partitions older than N days to the archive location, compact closed days, vacuum
    (keeping the table versions that datasets refer to)."""
    from flows.datasets import referenced_versions

    s = _settings()
    days = s.retention_days if days is None else days  # 0 is refused below, never the default
    if days < 1 or vacuum_hours < 0:
        typer.echo("--days must be >= 1 and --vacuum-hours >= 0", err=True)
        raise typer.Exit(2)
    lake = _lake(lake_root)
    try:
        report = lake.retention(days, tables=[t.strip() for t in tables.split(",")] if tables else None,
                                archive_root=archive_root, vacuum_hours=vacuum_hours, compact=compact,
                                keep_versions=referenced_versions(s.data_dir))
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2))


@lake_app.command("import-klines")
def lake_import_klines(files: list[str] = typer.Argument(..., help="CSV (Bybit or Binance kline layout) or Bybit REST JSON"),
                       layout: str = typer.Option("auto", help="auto, bybit-csv, binance-csv, bybit-rest-json"),
                       symbol: str = typer.Option(None, help="default: from the file name"),
                       interval: str = typer.Option(None, help="default: from the file name (1m, 5m, ...)"),
                       category: str = typer.Option("linear", help="Bybit category of a bybit-csv file"),
                       lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Import historical klines into raw_kline (idempotent on symbol, interval, start)."""
    from flows.kline_history import HistoryError, import_kline_file

    lake = _lake(lake_root)
    failed = False
    for f in files:
        try:
            rep = import_kline_file(lake, f, layout=layout, symbol=symbol, interval=interval, category=category,
                                    progress=True)
        except (HistoryError, OSError, ValueError) as exc:
            typer.echo(f"{f}: {exc}", err=True)
            failed = True
            continue
        typer.echo(json.dumps({"file": f, **rep.as_dict()}))
    if failed:
        raise typer.Exit(1)


@lake_app.command("import-funding")
def lake_import_funding(files: list[str] = typer.Argument(..., help="ts,rate CSV files of funding settlements"),
                        symbol: str = typer.Option(None, help="default: from the file name"),
                        venue: str = typer.Option("bybit.linear.csv"),
                        lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Import funding-rate settlements into raw_funding (idempotent)."""
    from flows.kline_history import HistoryError, import_funding_file

    lake = _lake(lake_root)
    failed = False
    for f in files:
        try:
            rep = import_funding_file(lake, f, symbol=symbol, venue=venue, progress=True)
        except (HistoryError, OSError, ValueError) as exc:
            typer.echo(f"{f}: {exc}", err=True)
            failed = True
            continue
        typer.echo(json.dumps({"file": f, **rep.as_dict()}))
    if failed:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------


@dataset_app.command("build")
def dataset_build(period_from: str = typer.Option(..., "--from", help="UTC start, e.g. 2025-06-01 or epoch ms"),
                  period_to: str = typer.Option(..., "--to", help="UTC end (exclusive)"),
                  symbols: str = typer.Option(None, help="comma-separated; default TICKCAST_SYMBOLS"),
                  kind: str = typer.Option("klines", help="klines (candle variates) or features (replay of the archive)"),
                  horizon: int = typer.Option(30, help="target horizon N in minutes"),
                  flat_threshold: float = typer.Option(0.001, help="|log return| <= this is flat"),
                  triple_barrier: bool = typer.Option(False, "--triple-barrier", help="add triple-barrier labels"),
                  barrier_k: float = typer.Option(1.0, help="barrier width in sigmas"),
                  venues: str = typer.Option(None, help="only klines of these venues, comma-separated"),
                  overwrite: bool = typer.Option(False, "--overwrite", help="rebuild even if the dataset exists"),
                  publish: bool = typer.Option(True, "--publish/--no-publish", help="DatasetReady on features.dataset.ready"),
                  lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Build a versioned dataset and print its manifest."""
    from flows.datasets import DatasetError, build_dataset

    s = _settings()
    spec = {"symbols": _symbols(symbols) or list(s.symbols), "from": period_from, "to": period_to, "kind": kind,
            "horizon": horizon, "flat_threshold": flat_threshold, "triple_barrier": triple_barrier,
            "barrier_k": barrier_k, "venues": [v.strip() for v in venues.split(",") if v.strip()] if venues else None}
    try:
        m = build_dataset(spec, lake=_lake(lake_root), data_dir=s.data_dir, overwrite=overwrite, publish=publish,
                          progress=True)
    except DatasetError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(m, indent=2, sort_keys=True))


@dataset_app.command("list")
def dataset_list() -> None:
    """Every dataset: id, kind, period, symbols, rows."""
    from flows.datasets import list_datasets

    for m in list_datasets(_settings().data_dir):
        typer.echo(f"{m['dataset_id']}  {m['kind']:8s} {m['period']['from_iso']} .. {m['period']['to_iso']}  "
                   f"{','.join(m['symbols'])}  rows={m['rows']}")


@dataset_app.command("show")
def dataset_show(dataset_id: str = typer.Argument(...)) -> None:
    """A dataset's manifest."""
    from flows.datasets import DatasetError, get_manifest

    try:
        m = get_manifest(dataset_id, _settings().data_dir)
    except DatasetError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except KeyError:
        typer.echo(f"no dataset {dataset_id}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(m, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------


def _period(period_from: str, period_to: str) -> tuple[int, int]:
    from flows.datasets import DatasetError, parse_time_ms

    try:
        lo, hi = parse_time_ms(period_from, "--from"), parse_time_ms(period_to, "--to")
    except DatasetError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    if hi <= lo:
        typer.echo("--to must be after --from", err=True)
        raise typer.Exit(2)
    return lo, hi


def _checked_symbols(symbols: str | None) -> list[str]:
    syms = _symbols(symbols) or list(_settings().symbols)
    bad = [s for s in syms if not s.isalnum()]
    if bad:
        typer.echo(f"bad symbols {bad}: letters and digits only", err=True)
        raise typer.Exit(2)
    return syms


def replay(period_from: str = typer.Option(..., "--from", help="UTC start (ISO or epoch ms)"),
           period_to: str = typer.Option(..., "--to", help="UTC end, exclusive"),
           symbols: str = typer.Option(None, help="comma-separated; default TICKCAST_SYMBOLS"),
           out: str = typer.Option(..., help="output folder (vectors/ and replay.json)"),
           registry: str = typer.Option(None, help="feature registry YAML (default flows/features.yaml)"),
           tail_ms: int = typer.Option(60_000, help="events after --to that close its last windows"),
           lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Replay the Delta archive through the feature dataflow (same code as online) into Parquet."""
    from flows.offline_replay import ReplayError
    from flows.offline_replay import replay as run_replay

    lo, hi = _period(period_from, period_to)
    try:
        report = run_replay(_lake(lake_root), _checked_symbols(symbols), lo, hi, out, registry_path=registry,
                            tail_ms=tail_ms, progress=True)
    except ReplayError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report, indent=2, sort_keys=True))


def parity(period_from: str = typer.Option(..., "--from", help="UTC start (ISO or epoch ms)"),
           period_to: str = typer.Option(..., "--to", help="UTC end, exclusive"),
           symbols: str = typer.Option(None, help="comma-separated; default TICKCAST_SYMBOLS"),
           bootstrap: str = typer.Option(None, help="default: KAFKA_BOOTSTRAP"),
           registry: str = typer.Option(None, help="feature registry YAML the online flow used"),
           json_out: str = typer.Option(None, "--json", help="also write the report as JSON here"),
           lake_root: str = typer.Option(None, help="default: TICKCAST_LAKE_ROOT")) -> None:
    """Compare what features.live published with the offline replay of the archive, per feature
    (exit 1 on any mismatch)."""
    from pathlib import Path

    from flows.parity import parity as run_parity

    lo, hi = _period(period_from, period_to)
    bootstrap = bootstrap or _settings().kafka_bootstrap
    if not bootstrap:
        typer.echo("no broker: set KAFKA_BOOTSTRAP or pass --bootstrap", err=True)
        raise typer.Exit(2)
    try:
        report = run_parity(bootstrap, _lake(lake_root), lo, hi, _checked_symbols(symbols), registry_path=registry,
                            progress=True)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    typer.echo(report.text())
    if json_out:
        Path(json_out).write_text(json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(features)
    app.command()(archive)
    app.command()(replay)
    app.command()(parity)
    app.add_typer(lake_app, name="lake")
    app.add_typer(dataset_app, name="dataset")
