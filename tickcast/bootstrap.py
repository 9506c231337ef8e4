"""First-run champion for ``tickcast up``: backfill kline history from the market source's REST API,
build a kline dataset with the dataset builder, train a small champion within ~3 minutes on 2 cores.

    python -m tickcast.bootstrap [--days 5]

The source is ``TICKCAST_SOURCE`` (the supervisor resolves ``auto`` first): Bybit's REST history, or
the local exchange's consistent simulated history (labelled ``sim.linear.rest``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from tickcast.broker import _die_with_parent
from tickcast.config import get_settings
from tickcast.logs import get_logger

log = get_logger("bootstrap")
MINUTE_MS = 60_000


def backfill(days: float, source: str, attempts: int = 10) -> None:
    """``tickcast backfill`` into the lake; the local exchange may still be starting: retry."""
    cmd = [sys.executable, "-m", "tickcast.cli", "backfill", "--days", str(days), "--source", source]
    for i in range(attempts):
        if subprocess.call(cmd, preexec_fn=_die_with_parent) == 0:  # no orphan backfill if we are killed
            return
        time.sleep(min(2 ** i, 10))
    raise SystemExit(f"backfill failed {attempts} times: {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tickcast.bootstrap", description=__doc__.split("\n")[0])
    p.add_argument("--days", type=float, default=5.0, help="days of 1-minute history to train on")
    p.add_argument("--time-budget-s", type=float, default=150.0)
    a = p.parse_args(argv)
    settings = get_settings()
    source = "bybit" if settings.source == "bybit" else "local"
    t0 = time.monotonic()
    backfill(a.days, source)
    from flows.datasets import DatasetError, build_dataset
    from model.train import quick_champion

    now = int(time.time() * 1000) // MINUTE_MS * MINUTE_MS
    spec = {"symbols": list(settings.symbols), "from": now - int(a.days * 86_400_000), "to": now, "kind": "klines",
            "venues": [("bybit" if source == "bybit" else "sim") + ".linear.rest"]}
    try:
        manifest = build_dataset(spec, data_dir=settings.data_dir, progress=True)
    except DatasetError as exc:
        print(f"cannot build the bootstrap dataset: {exc}", file=sys.stderr)
        return 2
    log.info("bootstrap dataset ready", extra={"dataset": manifest["dataset_id"], "counts": {"rows": manifest["rows"]}})
    summary = quick_champion(manifest["dataset_id"], settings, time_budget_s=a.time_budget_s)
    print(f"champion {summary.get('version')} ready after {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
