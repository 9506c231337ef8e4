"""``tickcast serve``: the prediction service (FastAPI + the inference loop) under uvicorn."""
from __future__ import annotations

import typer


def serve(host: str = typer.Option(None, help="default: TICKCAST_API_HOST (127.0.0.1)"),
          port: int = typer.Option(None, help="default: TICKCAST_API_PORT (8000)"),
          log_level: str = typer.Option("warning", help="uvicorn's own log level (the service logs JSON)")) -> None:
    """Run the prediction service: ONNX champion every minute, predictions, alerts, SSE, REST."""
    import uvicorn

    from tickcast.clitools import settings_or_exit

    settings = settings_or_exit()
    uvicorn.run("api.main:app", host=host or settings.api_host, port=port or settings.api_port,
                log_level=log_level, timeout_graceful_shutdown=5, access_log=False)


def register(app: typer.Typer) -> None:
    app.command()(serve)
