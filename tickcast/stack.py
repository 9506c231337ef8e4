"""``tickcast up``: start every component as a supervised child process.

The supervisor restarts a child that exits with exponential backoff, reports a crash loop
(several exits within a short time) loudly instead of hiding it, and on Ctrl-C/SIGTERM stops the
children in reverse start order (SIGTERM, then SIGKILL after a grace period). Children die with the
supervisor (PR_SET_PDEATHSIG), so no orphan survives even a kill -9 of the supervisor.

Components are added here as they land (gateway, archive, features, api, ui, mlflow).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tickcast.broker import EmbeddedBroker, _die_with_parent
from tickcast.config import Settings
from tickcast.logs import get_logger

log = get_logger("stack")


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # printed for the user
    # runtime state
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exits: list[float] = field(default_factory=list)
    next_start: float = 0.0
    crash_loop: bool = False


class Supervisor:
    def __init__(self, components: list[Component], log_dir: Path, *, backoff_max: float = 30.0,
                 crash_window_s: float = 60.0, crash_exits: int = 5):
        self.components = components
        self.log_dir = log_dir
        self.backoff_max = backoff_max
        self.crash_window_s = crash_window_s
        self.crash_exits = crash_exits
        self.stopping = threading.Event()
        log_dir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, c: Component) -> None:
        out = open(self.log_dir / f"{c.name}.log", "ab")
        c.proc = subprocess.Popen(c.argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **c.env},
                                  preexec_fn=_die_with_parent)
        out.close()
        log.info("started", extra={"component": c.name, "pid": c.proc.pid, "counts": {"restarts": c.restarts}})

    def _check(self, c: Component, now: float) -> None:
        if c.proc is None:
            if now >= c.next_start:
                self._spawn(c)
            return
        code = c.proc.poll()
        if code is None:
            return
        c.proc = None
        c.exits = [t for t in c.exits if now - t < self.crash_window_s] + [now]
        c.restarts += 1
        delay = min(self.backoff_max, 0.5 * 2 ** min(len(c.exits) - 1, 8))
        c.next_start = now + delay
        if len(c.exits) >= self.crash_exits and not c.crash_loop:
            c.crash_loop = True
            log.error("crash loop: restarting with backoff; see its log", extra={
                "component": c.name, "exit_code": code, "log": str(self.log_dir / f"{c.name}.log"),
                "counts": {"exits_in_window": len(c.exits)}})
        else:
            log.warning("exited; restarting", extra={"component": c.name, "exit_code": code, "delay_s": delay})
        if len(c.exits) == 1:
            c.crash_loop = False

    def run(self) -> int:
        for c in self.components:
            self._spawn(c)
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            for c in self.components:
                self._check(c, now)
        self.shutdown()
        return 0

    def shutdown(self, grace: float = 10.0) -> None:
        for c in reversed(self.components):
            if c.proc and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in reversed(self.components):
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("did not stop in time: killed", extra={"component": c.name})
                c.proc.kill()
                c.proc.wait()


def build_components(settings: Settings, bootstrap: str) -> list[Component]:
    """The children of ``tickcast up``; grows as components land."""
    env = {"KAFKA_BOOTSTRAP": bootstrap}
    py = sys.executable
    del py, env  # no child components yet beyond the broker
    return []


def run_stack(settings: Settings) -> int:
    broker = None
    bootstrap = settings.kafka_bootstrap
    data_dir = Path(settings.data_dir)
    if not bootstrap:
        broker = EmbeddedBroker(log_file=None).start()
        bootstrap = broker.bootstrap
    else:
        from tickcast.topics import ensure_topics

        ensure_topics(bootstrap)
    sup = Supervisor(build_components(settings, bootstrap), data_dir / "logs")
    signal.signal(signal.SIGTERM, lambda *_: sup.stopping.set())
    print(f"tickcast is up. Kafka bootstrap: {bootstrap}  (Ctrl-C stops everything)", flush=True)
    for c in sup.components:
        if c.url:
            print(f"  {c.name:10s} {c.url}", flush=True)
    try:
        return sup.run()
    except KeyboardInterrupt:
        sup.shutdown()
        return 0
    finally:
        if broker:
            broker.stop()
        print("tickcast stopped.", flush=True)
