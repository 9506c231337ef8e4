"""``tickcast ui``: the Panel dashboard (``panel serve ui/app.py``) on 127.0.0.1."""
from __future__ import annotations

from typing import Annotated

import typer


def resolve_api_url(cli_value: str | None = None) -> str:
    """The prediction API's base URL: the given value, else ``TICKCAST_API_URL``, else
    ``http://TICKCAST_API_HOST:TICKCAST_API_PORT`` (a wildcard host means this machine)."""
    import os

    if cli_value:
        return cli_value.rstrip("/")
    env = os.environ.get("TICKCAST_API_URL", "").strip()
    if env:
        return env.rstrip("/")
    from tickcast.config import load_settings, local_http_url

    s = load_settings()
    return local_http_url(s.api_host, s.api_port)


def ui(port: int = typer.Option(None, help="default: TICKCAST_UI_PORT (5006)"),
       address: str = typer.Option("127.0.0.1", help="listen address"),
       api_url: str = typer.Option(None, envvar="TICKCAST_API_URL",
                                   help="the prediction API (default: TICKCAST_API_URL, else "
                                        "http://TICKCAST_API_HOST:TICKCAST_API_PORT)"),
       poll_s: float = typer.Option(1.0, min=0.1, help="how often the shared feed polls the latest features"),
       history_minutes: int = typer.Option(240, min=2, max=1440, help="minutes of history read at start "
                                                                         "(candles, signals, alerts)"),
       allow_origin: Annotated[list[str] | None, typer.Option(help="extra websocket origins (host:port)")] = None,
       show: bool = typer.Option(False, help="open a browser")) -> None:
    """Serve the live dashboard: price, forecast fan, signals, alerts, backtest, strategy P&L, monitoring."""
    import os
    import sys
    from pathlib import Path

    from tickcast.config import ConfigError, get_settings

    try:
        settings = get_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    port = port or settings.ui_port
    url = resolve_api_url(api_url)
    app_path = Path(__file__).resolve().with_name("app.py")
    origins = [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}", *(allow_origin or [])]
    argv = [sys.executable, "-m", "panel", "serve", str(app_path), "--address", address, "--port", str(port),
            "--num-procs", "1", "--index", "app"]
    for o in dict.fromkeys(origins):
        argv += ["--allow-websocket-origin", o]
    if show:
        argv.append("--show")
    argv += ["--args", "--api-url", url, "--poll-s", str(poll_s), "--history-minutes", str(history_minutes)]
    typer.echo(f"dashboard on http://{address}:{port}/app (API {url})", err=True)
    env = {**os.environ, "TICKCAST_API_URL": url}
    os.execve(sys.executable, argv, env)  # panel replaces this process: signals reach it directly


def register(app: typer.Typer) -> None:
    app.command()(ui)
