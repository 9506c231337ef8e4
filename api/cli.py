"""``tickcast serve``: the prediction service (FastAPI + the inference loop) under uvicorn."""
from __future__ import annotations

import typer


def serve(host: str = typer.Option(None, help="default: TICKCAST_API_HOST (127.0.0.1)"),
          port: int = typer.Option(None, help="default: TICKCAST_API_PORT (8000)"),
          log_level: str = typer.Option("warning", help="uvicorn's own log level (the service logs JSON)")) -> None:
    """Run the prediction service: ONNX champion every minute, predictions, alerts, SSE, REST."""
    import uvicorn

    from tickcast.config import ConfigError, get_settings

    try:
        settings = get_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    uvicorn.run("api.main:app", host=host or settings.api_host, port=port or settings.api_port,
                log_level=log_level, timeout_graceful_shutdown=5, access_log=False)


def register(app: typer.Typer) -> None:
    app.command()(serve)
