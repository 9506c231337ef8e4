"""The single ``tickcast`` CLI. Each component registers its own subcommands from a small module that
imports only typer and the standard library at top level (heavy imports happen inside commands), so
``tickcast --help`` stays fast. Add a component by appending its module to COMMAND_MODULES."""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="tickcast: real-time crypto-market features, forecasts and signals (analytics only).")

COMMAND_MODULES = [
    "tickcast.commands",  # broker, topics, up, status
    "connectors.news.cli",  # news (feed poller), newsfeed (local RSS/Atom server)
    "connectors.cli",  # gateway (market data -> Kafka), backfill (REST klines -> lake)
    "flows.cli",  # archive (raw topics -> Delta bronze), lake, dataset
    "api.cli",  # serve (the prediction service: FastAPI + inference loop)
    "connectors.exchange.cli",  # exchange (the local Bybit/mempool exchange), exchange-record
    "model.cli",  # train, evaluate, model (list, champion, promote, rollback, log, quick-champion)
    "ui.cli",  # ui (the Panel dashboard)
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
