"""Small helpers shared by the CLI modules (typer and the standard library only at import)."""
from __future__ import annotations

import typer


def settings_or_exit(**overrides):
    """The settings, or exit code 2 with the message naming every bad variable."""
    from tickcast.config import ConfigError, get_settings, load_settings

    try:
        return load_settings(**overrides) if overrides else get_settings()
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
