"""``tickcast exchange`` (serve the local exchange) and ``tickcast exchange-record`` (write the model's
messages to a JSONL file). Only typer and the standard library at module level."""
from __future__ import annotations

import sys
from pathlib import Path

import typer


def _default_port() -> int:
    """The port of ``TICKCAST_GATEWAY_LOCAL_URL`` (the gateway's local source), else 8765."""
    try:
        from urllib.parse import urlsplit

        from tickcast.config import get_settings

        return urlsplit(get_settings().gateway_local_url).port or 8765
    except Exception:  # noqa: BLE001 - no settings: the documented default
        return 8765


def _parse_prices(items: list[str]) -> dict[str, str]:
    out = {}
    for it in items or []:
        sym, _, px = it.partition("=")
        if not px:
            raise typer.BadParameter(f"--price wants SYMBOL=PRICE, got {it!r}")
        out[sym.upper()] = px
    return out


def exchange(
    replay: Path = typer.Option(None, help="replay this JSONL recording (raw Bybit messages or "  # noqa: B008
                                                 "{recv_ts, msg} lines) instead of running the model"),
    replay_spot: Path = typer.Option(None, help="a spot recording to replay on /v5/public/spot"),  # noqa: B008
    symbols: str = typer.Option(None, help="model symbols, comma-separated (default: TICKCAST_SYMBOLS)"),
    speed: float = typer.Option(1.0, help="1 = real time (Bybit's cadence), 10 = ten times faster, "
                                          "0 = as fast as possible"),
    seed: int = typer.Option(1, help="model seed: the same seed and start give the same messages"),
    start_ms: int = typer.Option(None, help="model start time in ms (default: now; the clock then follows "
                                            "the wall clock at speed 1)"),
    duration_s: float = typer.Option(None, help="stop the model after this much exchange time"),
    history_days: float = typer.Option(30.0, help="days of 1-minute kline history before the start (REST)"),
    price: list[str] = typer.Option(None, help="start price of a non-MVP symbol: SYMBOL=PRICE (repeatable)"),  # noqa: B008
    host: str = typer.Option("127.0.0.1", help="listen address (keep it on loopback)"),
    port: int = typer.Option(None, help="WebSocket + REST GET port (default: the port of "
                                        "TICKCAST_GATEWAY_LOCAL_URL, 8765)"),
    http_port: int = typer.Option(None, help="REST + control API port (default: port + 1)"),
    idle_timeout: float = typer.Option(60.0, help="cut a Bybit connection after this many seconds without "
                                                  "a client message (0: never)"),
    rate_ip: int = typer.Option(600, help="REST requests per --rate-window-s per IP before HTTP 403"),
    rate_window_s: float = typer.Option(5.0, help="REST IP limit window"),
    ban_s: float = typer.Option(600.0, help="how long an IP over the limit gets 403"),
    api_per_s: int = typer.Option(0, help="per-endpoint requests per second before retCode 10006 (0: off)"),
    no_mempool: bool = typer.Option(False, help="do not serve the mempool feeds"),
    sent_log_max: int = typer.Option(100_000, help="messages kept in each connection's sent log (0: all)"),
    start: str = typer.Option("subscribed", help="replay start: subscribed, immediate or manual"),
    shared_real: Path = typer.Option(None, envvar="TICKCAST_SHARED_REAL",  # noqa: B008
                                     help="../shared/data/real (instruments-info responses)"),
) -> None:
    """Run the local exchange: Bybit v5 public WS/REST and mempool.space-compatible feeds on loopback."""
    import asyncio
    import json
    import signal

    from connectors.exchange.drivers import ModelDriver, ReplayDriver
    from connectors.exchange.instruments import MVP, InstrumentBook
    from connectors.exchange.model import params_for
    from connectors.exchange.rest import RateLimit
    from connectors.exchange.server import LocalExchange

    instruments = InstrumentBook.load(shared_real)
    token = None
    try:
        from tickcast.config import get_settings

        s = get_settings()
        sym_list = [x.strip().upper() for x in symbols.split(",")] if symbols else list(s.symbols)
        token = s.api_token.get_secret_value() if s.api_token else None
    except Exception:  # noqa: BLE001 - settings are optional here
        sym_list = [x.strip().upper() for x in symbols.split(",")] if symbols else list(MVP)
    renamed = {"MATICUSDT": "POLUSDT"}
    for i, sym in enumerate(sym_list):
        if sym in renamed and instruments.get(sym) is None:
            typer.echo(f"{sym} is not listed any more; serving its successor {renamed[sym]}", err=True)
            sym_list[i] = renamed[sym]
    if replay:
        sources = {"linear": replay}
        if replay_spot:
            sources["spot"] = replay_spot
        for p in sources.values():
            if not Path(p).is_file():
                typer.echo(f"no such recording: {p}", err=True)
                raise typer.Exit(2)
        driver = ReplayDriver(sources, speed=speed, start=start)
    else:
        prices = _parse_prices(price)
        try:
            params = {sym: params_for(instruments.require(sym), prices.get(sym)) for sym in sym_list}
        except (KeyError, ValueError) as e:
            typer.echo(str(e).strip("'\""), err=True)
            raise typer.Exit(2) from None
        driver = ModelDriver(sym_list, seed=seed, speed=speed, start_ms=start_ms, history_days=history_days,
                             duration_s=duration_s, params=params)
    port = _default_port() if port is None else port
    http_port = (port + 1 if port else 0) if http_port is None else http_port
    rl = RateLimit(ip_requests=rate_ip, ip_window_s=rate_window_s, ban_s=ban_s, api_per_s=api_per_s or None)

    async def main() -> None:
        ex = LocalExchange(driver, host=host, port=port, http_port=http_port, instruments=instruments,
                           mempool=not no_mempool, rate_limit=rl, idle_timeout=idle_timeout or None,
                           sent_log_max=sent_log_max or None, seed=seed, control_token=token)
        await ex.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        typer.echo(f"local exchange ({driver.name}) on {host}; instruments: {instruments.source}")
        for name, url in ex.urls().items():
            typer.echo(f"  {name:18s} {url}")
        typer.echo(f"  TICKCAST_GATEWAY_LOCAL_URL={ex.base_url}")
        typer.echo(json.dumps({"urls": ex.urls()}))
        sys.stdout.flush()
        bar = None
        if isinstance(driver, ReplayDriver):
            from tqdm import tqdm

            bar = tqdm(total=len(driver.items), unit="msg", desc="replay", file=sys.stderr)
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), 0.5)
                except TimeoutError:
                    pass
                if bar is not None:
                    bar.update(driver.pos - bar.n)
        finally:
            if bar is not None:
                bar.close()
            await ex.stop()

    asyncio.run(main())


def exchange_record(
    out: Path = typer.Option(..., help="JSONL file to write (one raw Bybit message per line)"),  # noqa: B008
    seconds: float = typer.Option(60.0, help="exchange time to simulate"),
    seed: int = typer.Option(1),
    start_ms: int = typer.Option(1_786_310_760_000, help="virtual start time (ms, a multiple of 10)"),
    symbols: str = typer.Option("BTCUSDT,ETHUSDT,LTCUSDT,POLUSDT"),
    topics: str = typer.Option("orderbook.50,publicTrade,tickers,kline.1",
                               help="topic prefixes to keep (orderbook.{1,50,200,1000}, publicTrade, "
                                    "tickers, kline.1)"),
    snapshots: bool = typer.Option(True, help="start each book/ticker topic with a snapshot, as a subscriber "
                                              "would get it"),
    recv_form: bool = typer.Option(False, help='write {"recv_ts", "msg"} lines instead of raw messages'),
    history_days: float = typer.Option(1.0),
) -> None:
    """Run the market model flat out in virtual time and write its messages (replay input, fixtures,
    benchmarks); the same arguments always write the same bytes."""
    from tqdm import tqdm

    from connectors.exchange.recording import record_model

    sym_list = [x.strip().upper() for x in symbols.split(",") if x.strip()]
    prefixes = [x.strip() for x in topics.split(",") if x.strip()]
    with tqdm(total=int(seconds * 1000), unit="ms", desc="model", file=sys.stderr) as bar:
        n = record_model(out, sym_list, seed=seed, start_ms=start_ms, seconds=seconds, prefixes=prefixes,
                         snapshots=snapshots, recv_form=recv_form, history_days=history_days,
                         progress=bar.update)
    typer.echo(f"wrote {n} messages to {out}")


def register(app: typer.Typer) -> None:
    app.command(name="exchange")(exchange)
    app.command(name="exchange-record")(exchange_record)
