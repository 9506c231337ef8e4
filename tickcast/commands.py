"""Core subcommands: the embedded broker, topic creation and the one-command stack."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from tickcast.clitools import settings_or_exit


def broker(port: int = typer.Option(0, help="loopback port (0: a free one)"),
           host: str = typer.Option("127.0.0.1")) -> None:
    """Run the embedded Kafka-compatible broker (tansu, memory storage) with every topic created."""
    import signal
    import threading

    from tickcast.broker import EmbeddedBroker

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmbeddedBroker(port or None, host) as b:
        typer.echo(f"KAFKA_BOOTSTRAP={b.bootstrap}")
        sys.stdout.flush()
        try:
            while b.running and not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        if not b.running:
            typer.echo("broker exited unexpectedly", err=True)
            raise typer.Exit(1)


def topics(bootstrap: str = typer.Option(None, help="default: KAFKA_BOOTSTRAP")) -> None:
    """Create every declared topic on a broker (idempotent) and list them."""
    from tickcast.topics import TOPICS, ensure_topics

    bootstrap = bootstrap or settings_or_exit().kafka_bootstrap
    if not bootstrap:
        typer.echo("no broker: set KAFKA_BOOTSTRAP or pass --bootstrap", err=True)
        raise typer.Exit(2)
    created = set(ensure_topics(bootstrap))
    for t in TOPICS:
        typer.echo(f"{t.name:28s} partitions={t.partitions:<3d} {'created' if t.name in created else 'exists'}")


def up() -> None:
    """Start the whole stack with embedded defaults and supervise it (Ctrl-C stops everything)."""
    from confluent_kafka import KafkaException

    from tickcast.broker import BrokerError
    from tickcast.stack import StackError, run_stack

    settings = settings_or_exit()
    try:
        code = run_stack(settings)
    except KafkaException as exc:
        typer.echo(f"cannot reach the Kafka broker at KAFKA_BOOTSTRAP={settings.kafka_bootstrap}: {exc}", err=True)
        raise typer.Exit(2) from None
    except BrokerError as exc:
        typer.echo(f"the embedded broker (tansu) did not start: {exc}", err=True)
        raise typer.Exit(2) from None
    except StackError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def status() -> None:
    """Each component of a running `tickcast up`: state, restarts, health."""
    from tickcast.stack import status as stack_status

    raise typer.Exit(stack_status(settings_or_exit()))


def bench(only: list[str] = typer.Argument(None, help="script names (default: every bench/*.py)"),
          timeout: float = typer.Option(1800.0, help="seconds per script")) -> None:
    """Run the benchmarks and write bench/RESULTS.md (figure, required figure, ratio, machine)."""
    from tickcast.bench import main

    raise typer.Exit(main(only or None, timeout))


def soak(minutes: float = typer.Option(..., help="minutes of fault injection"),
         fault_every_s: float = typer.Option(60.0, help="seconds between faults"),
         symbols: str = typer.Option(None, help="comma-separated (default: TICKCAST_SYMBOLS)"),
         keep: Path = typer.Option(None, help="run in this (new or empty) dir and keep it"),  # noqa: B008
         train_budget_s: float = typer.Option(150.0, help="time budget of the champion's training"),
         train_days: float = typer.Option(2.0, help="days of the exchange's REST history to train on"),
         drain_s: float = typer.Option(75.0, help="seconds without faults before the audit"),
         cut_s: float = typer.Option(5.0, help="broker partition length (TCP proxy cut)"),
         seed: int = typer.Option(7, help="the exchange model's seed"),
         depth: int = typer.Option(None, help="order-book depth (default: TICKCAST_ORDERBOOK_DEPTH); Bybit "
                                              "pushes depth 50 every 20 ms, depth 200 every 100 ms")) -> None:
    """The whole stack under a fault every N s, then lost/duplicated, parity and served-minutes audit."""
    from tickcast.soak import SoakConfig, passed, run_soak

    cfg = SoakConfig(minutes, fault_every_s, [x.strip().upper() for x in symbols.split(",")] if symbols else None,
                     keep, seed=seed, history_days=max(3.0, train_days + 1), train_days=train_days,
                     train_budget_s=train_budget_s, drain_s=drain_s, cut_s=cut_s, depth=depth)
    raise typer.Exit(0 if passed(run_soak(cfg)) else 1)


def register(app: typer.Typer) -> None:
    app.command()(bench)
    app.command()(broker)
    app.command()(topics)
    app.command()(up)
    app.command()(status)
    app.command()(soak)
