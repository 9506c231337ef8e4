"""``tickcast train``, ``tickcast evaluate`` and ``tickcast model ...`` (list, champion, promote,
rollback, log, quick-champion). Only typer and the standard library are imported at module level."""
from __future__ import annotations

import json
import sys

import typer

from tickcast.clitools import settings_or_exit

model_app = typer.Typer(no_args_is_help=True, help="Model registry: champion/challenger, promotion, rollback.")


def train(dataset: str = typer.Option(..., help="dataset id, Parquet/Delta path or kline CSV"),
          config: str = typer.Option("kline.yaml", help="training config (YAML/JSON; name in model/configs or a path)"),
          out: str = typer.Option(None, help="output folder"),
          no_register: bool = typer.Option(False, "--no-register", help="skip MLflow logging and registration"),
          quick: bool = typer.Option(False, "--quick", help="small model within ~3 minutes (fresh machine)")) -> None:
    """Train the iTransformer, export ONNX, register it as challenger and apply the promotion rule."""
    from model.train import main

    argv = ["--dataset", dataset, "--config", config]
    if out:
        argv += ["--out", out]
    if no_register:
        argv.append("--no-register")
    if quick:
        argv.append("--quick")
    raise typer.Exit(main(argv))


def evaluate(dataset: str = typer.Option(..., help="dataset id or path"),
             onnx: str = typer.Option(None, help="ONNX file (default: the champion)"),
             version: str = typer.Option(None, help="registered version (default: the champion)"),
             out: str = typer.Option(None, help="report folder")) -> None:
    """Evaluate a model against every baseline on the dataset's test part; write a report."""
    from model.evaluate import main

    argv = ["--dataset", dataset]
    for flag, val in (("--onnx", onnx), ("--version", version), ("--out", out)):
        if val:
            argv += [flag, val]
    raise typer.Exit(main(argv))


@model_app.command("list")
def list_versions() -> None:
    """Registered versions with their aliases."""
    from model import registry

    for v in registry.list_versions(settings_or_exit()):
        typer.echo(f"v{v['version']:>4}  {','.join(v['aliases']) or '-':22s} run {v['run_id']}")


@model_app.command("champion")
def champion() -> None:
    """Print the champion's version and local ONNX path (downloads it once)."""
    from model import registry

    try:
        version, path = registry.champion_onnx_path(settings_or_exit())
    except registry.NoChampionError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps({"version": version, "path": str(path)}))


@model_app.command("promote")
def promote(version: str = typer.Argument(..., help="registered version number"),
            force: bool = typer.Option(False, "--force", help="promote even if the rule says no (logged)")) -> None:
    """Apply the promotion rule to a version and make it champion if it passes."""
    from model import registry

    if not version.isdigit():
        typer.echo(f"version must be a number, got {version!r}", err=True)
        raise typer.Exit(2)
    d = registry.promote(settings_or_exit(), version, force=force)
    typer.echo(("promoted: " if d.promote else "not promoted: ") + d.reason)
    raise typer.Exit(0 if d.promote else 1)


@model_app.command("rollback")
def rollback(to: str = typer.Option(None, "--to", help="version (default: the previous champion)")) -> None:
    """Move the champion alias back to the previous champion (or --to VERSION)."""
    from model import registry

    if to is not None and not to.isdigit():
        typer.echo(f"version must be a number, got {to!r}", err=True)
        raise typer.Exit(2)
    try:
        entry = registry.rollback(settings_or_exit(), to)
    except LookupError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"champion: v{entry['from']} -> v{entry['to']}")


@model_app.command("log")
def log() -> None:
    """The promotion log (every alias move and rejected promotion), oldest first."""
    from model import registry

    for e in registry.promotion_log(settings_or_exit()):
        typer.echo(json.dumps(e, sort_keys=True))


@model_app.command("quick-champion")
def quick(dataset: str = typer.Option(..., help="dataset id/path or kline CSV"),
          budget: float = typer.Option(150.0, help="time budget, seconds"),
          force: bool = typer.Option(False, "--force", help="train even if a champion exists")) -> None:
    """Train a small champion from kline history within the time budget (fresh machines)."""
    from model.train import quick_champion

    s = quick_champion(dataset, settings_or_exit(), time_budget_s=budget, force=force)
    typer.echo(json.dumps({k: s.get(k) for k in ("version", "onnx", "promoted", "skipped", "train_seconds")},
                          default=str))


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(evaluate)
    app.add_typer(model_app, name="model")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
