"""``tickcast gateway`` (market data -> Kafka) and ``tickcast backfill`` (REST klines -> the lake).
Only typer and the standard library at module level."""
from __future__ import annotations

from datetime import UTC

import typer

from tickcast.clitools import settings_or_exit as _settings


def _symbols(value: str | None) -> list[str] | None:
    return [s.strip().upper() for s in value.split(",") if s.strip()] if value else None


def gateway(symbols: str = typer.Option(None, help="comma-separated; default TICKCAST_SYMBOLS"),
            source: str = typer.Option(None, help="auto, bybit or local; default TICKCAST_SOURCE"),
            bootstrap: str = typer.Option(None, help="default: KAFKA_BOOTSTRAP"),
            metrics_port: int = typer.Option(None, help="Prometheus port (0: off); default TICKCAST_GATEWAY_METRICS_PORT"),
            mempool: bool = typer.Option(None, "--mempool/--no-mempool", help="mempool feeds (default: on)"),
            news: bool = typer.Option(None, "--news/--no-news", help="news feeds in this process (default: on)")) -> None:
    """Stream Bybit v5 public market data (or the local exchange) into the Kafka raw topics."""
    import asyncio
    import signal

    from connectors.gateway import serve

    s = _settings(**({"source": source} if source else {}))
    bootstrap = bootstrap or s.kafka_bootstrap
    if not bootstrap:
        typer.echo("no broker: set KAFKA_BOOTSTRAP or pass --bootstrap", err=True)
        raise typer.Exit(2)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await serve(s, bootstrap, stop, symbols=_symbols(symbols), mempool=mempool, news=news,
                           metrics_port=metrics_port)

    raise typer.Exit(asyncio.run(main()))


def backfill(symbols: str = typer.Option(None, help="comma-separated; default TICKCAST_SYMBOLS"),
             days: float = typer.Option(1.0, help="how far back from now (ignored with --start)"),
             start: str = typer.Option(None, help="UTC start, e.g. 2026-11-01 or 2026-11-01T12:00"),
             end: str = typer.Option(None, help="UTC end (default: now)"),
             interval: str = typer.Option("1", help="Bybit interval: 1, 3, 5, 15, 30, 60, ..., D, W"),
             funding: bool = typer.Option(False, help="also import funding settlements"),
             source: str = typer.Option(None, help="bybit or local (default: TICKCAST_SOURCE; auto = bybit)"),
             out: str = typer.Option(None, help="write CSV files (Bybit's layout) into this folder instead of the lake")) -> None:
    """Backfill closed klines from REST /v5/market/kline (pages of 1000, newest first, the open candle
    dropped, deduplicated) into the bronze table raw_kline (idempotent), or CSV with --out."""
    import asyncio
    import csv
    import time
    from datetime import datetime
    from pathlib import Path

    from tqdm import tqdm

    from connectors.gateway import bybit_source, local_source
    from connectors.rest import (
        INTERVAL_MS,
        BybitRest,
        RestError,
        funding_record,
        kline_record,
        resolve_symbols,
    )

    s = _settings()
    if interval not in INTERVAL_MS:
        typer.echo(f"interval must be one of {sorted(INTERVAL_MS)}", err=True)
        raise typer.Exit(2)

    def when(text: str) -> int:
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            typer.echo(f"not an ISO date/time: {text!r}", err=True)
            raise typer.Exit(2) from None
        return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)

    end_ms = when(end) if end else int(time.time() * 1000)
    start_ms = when(start) if start else end_ms - int(days * 86_400_000)
    if start_ms >= end_ms:
        typer.echo("start must be before end", err=True)
        raise typer.Exit(2)
    src = local_source(s) if (source or s.source) == "local" else bybit_source(s)
    venue = f"{src.venue}.rest"
    wanted = _symbols(symbols) or list(s.symbols)
    out_dir = Path(out) if out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    async def fetch() -> dict[str, tuple[list, list]]:
        async with BybitRest(src.rest_url, category=s.category, rate_per_s=s.gateway_rest_rate_per_s) as rest:
            try:
                resolved, _ = resolve_symbols(wanted, await rest.instruments())
            except RestError as exc:
                typer.echo(f"instruments-info failed ({exc}); symbols used as given", err=True)
                resolved, _ = resolve_symbols(wanted, None)
            got = {}
            total = (end_ms - start_ms) // INTERVAL_MS[interval] * len(resolved)
            with tqdm(total=total, unit="candle", desc="backfill") as bar:
                for sym in resolved:
                    rows = await rest.klines(sym, start_ms, end_ms, interval=interval, progress=bar.update)
                    fund = await rest.funding_history(sym, start_ms, end_ms) if funding else []
                    got[sym] = (rows, fund)
            return got

    try:
        got = asyncio.run(fetch())
    except (RestError, ValueError) as exc:
        typer.echo(f"backfill failed: {exc}", err=True)
        raise typer.Exit(1) from None
    if out_dir is not None:
        for sym, (rows, _fund) in got.items():
            path = out_dir / f"{sym}_{interval}_{start_ms}_{end_ms}.csv"
            with open(path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["startTime", "open", "high", "low", "close", "volume", "turnover"])
                w.writerows(rows)
            typer.echo(f"{sym}: {len(rows)} candles -> {path}")
        return
    from flows.kline_history import import_funding, import_klines
    from flows.lake import Lake

    lake = Lake.from_settings(s)
    for sym, (rows, fund) in got.items():
        report = import_klines(lake, (kline_record(sym, venue, r, interval) for r in rows), source=venue,
                               origin=f"rest:{src.rest_url}")
        typer.echo(f"{sym}: {len(rows)} candles fetched; {report}")
        if fund:
            report = import_funding(lake, (funding_record(sym, venue, f) for f in fund), source=venue,
                                    origin=f"rest:{src.rest_url}")
            typer.echo(f"{sym}: {len(fund)} funding settlements; {report}")


def register(app: typer.Typer) -> None:
    app.command()(gateway)
    app.command()(backfill)
