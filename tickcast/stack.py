"""``tickcast up``: the whole stack as supervised child processes, and ``tickcast status``.

Start order: the embedded broker (unless ``KAFKA_BOOTSTRAP`` is set) -> the market-data source
(``auto``: Bybit when reachable, otherwise the local exchange's market model and the local news
feed, labelled as simulated everywhere) -> gateway -> raw archive and online feature flow -> a local
MLflow server -> on a first run without a champion: history backfill, a kline dataset and a small
champion trained with a progress bar -> the API -> the dashboard.

The supervisor restarts a child that exits with exponential backoff, reports a crash loop (several
exits within a minute) loudly instead of hiding it, writes each component's state to
``<data_dir>/stack/status.json`` for ``tickcast status``, and on Ctrl-C/SIGTERM stops the children
in reverse order (SIGTERM, then SIGKILL after a grace period). Children die with the supervisor
(PR_SET_PDEATHSIG), so no orphan survives even a kill -9 of the supervisor.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tickcast.broker import EmbeddedBroker, _die_with_parent
from tickcast.config import Settings
from tickcast.logs import get_logger

log = get_logger("stack")
PY = sys.executable
TICKCAST = [PY, "-m", "tickcast.cli"]


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None  # shown to the user
    health: str | None = None  # probed by `tickcast status`
    # runtime state
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = 0.0  # monotonic time of the last start
    quick_exits: int = 0  # exits in a row, each less than the crash window after its start
    next_start: float = 0.0
    crash_loop: bool = False
    last_exit: int | None = None


class Supervisor:
    def __init__(self, components: list[Component], log_dir: Path, status_file: Path | None = None, *,
                 backoff_max: float = 30.0, crash_window_s: float = 60.0, crash_exits: int = 5):
        self.components = components
        self.log_dir = log_dir
        self.status_file = status_file
        self.backoff_max = backoff_max
        self.crash_window_s = crash_window_s
        self.crash_exits = crash_exits
        self.stopping = threading.Event()
        self.extra_status: dict = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def log_path(self, c: Component) -> Path:
        return self.log_dir / f"{c.name}.log"

    def spawn(self, c: Component) -> None:
        with open(self.log_path(c), "ab") as out:
            # own process group: a terminal's Ctrl-C reaches only the supervisor, which then stops the
            # components in reverse order (SIGTERM, grace, SIGKILL); PDEATHSIG covers its own death
            c.proc = subprocess.Popen(c.argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **c.env},
                                      preexec_fn=_die_with_parent, process_group=0)
        c.started = time.monotonic()
        log.info("started", extra={"component": c.name, "pid": c.proc.pid, "counts": {"restarts": c.restarts}})

    def check(self, c: Component, now: float) -> None:
        if c.proc is None:
            if now >= c.next_start and not self.stopping.is_set():  # nothing starts once stopping
                self.spawn(c)
                c.started = now
            return
        code = c.proc.poll()
        if code is None:
            return
        c.proc = None
        c.last_exit = code
        c.restarts += 1
        # the backoff doubles with every exit soon after a start and resets only after a run that
        # lasted the crash window: a child that never stays up waits backoff_max, not a cycle of delays
        c.quick_exits = c.quick_exits + 1 if now - c.started < self.crash_window_s else 1
        delay = min(self.backoff_max, 0.5 * 2 ** min(c.quick_exits - 1, 8))
        c.next_start = now + delay
        if c.quick_exits >= self.crash_exits:
            if not c.crash_loop:
                print(f"!! {c.name} is in a crash loop ({c.quick_exits} exits in a row, each within "
                      f"{self.crash_window_s:.0f} s of its start, last code {code}); see {self.log_path(c)}",
                      file=sys.stderr, flush=True)
            c.crash_loop = True
            log.error("crash loop: restarting with backoff", extra={
                "component": c.name, "exit_code": code, "log": str(self.log_path(c)), "delay_s": delay,
                "counts": {"quick_exits": c.quick_exits, "restarts": c.restarts}})
        else:
            c.crash_loop = False
            log.warning("exited; restarting", extra={"component": c.name, "exit_code": code, "delay_s": delay})

    def write_status(self) -> None:
        if not self.status_file:
            return
        now = time.monotonic()
        state = {"pid": os.getpid(), "updated": time.time(), **self.extra_status, "components": {
            c.name: {"pid": c.proc.pid if c.proc else None,
                     "state": "running" if c.proc else ("crash-loop" if c.crash_loop else "restarting"),
                     "restarts": c.restarts, "last_exit": c.last_exit, "url": c.url, "health": c.health,
                     "log": str(self.log_path(c)),
                     "restart_in_s": None if c.proc else round(max(0.0, c.next_start - now), 1)}
            for c in self.components}}
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.status_file)

    def add(self, c: Component) -> None:
        # spawn first: a supervise() thread running meanwhile must never see it without a process
        # (it would start a second copy)
        self.spawn(c)
        self.components.append(c)

    def supervise(self, until: threading.Event | None = None, tick: float = 0.2) -> None:
        self._supervise(lambda: not (until and until.is_set()), tick)

    def supervise_while(self, proc: subprocess.Popen, tick: float = 0.2) -> int | None:
        """Supervise from this (the main) thread until ``proc`` ends; its exit code, or None when
        stopping. Children are started only by the main thread: PR_SET_PDEATHSIG fires when the
        *thread* that started a child exits, so a helper thread's restarts would die with it."""
        self._supervise(lambda: proc.poll() is None, tick)
        return proc.poll()

    def _supervise(self, going_on, tick: float) -> None:
        last_status = 0.0
        while not self.stopping.is_set() and going_on():
            now = time.monotonic()
            for c in self.components:
                self.check(c, now)
            if now - last_status > 1.0:
                self.write_status()
                last_status = now
            self.stopping.wait(tick)

    def run(self) -> int:
        for c in self.components:
            if c.proc is None:
                self.spawn(c)
        self.supervise()
        self.shutdown()
        return 0

    def shutdown(self, grace: float = 10.0) -> None:
        self.stopping.set()  # a supervise() elsewhere starts nothing from now on
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
            c.proc = None
        if self.status_file and self.status_file.exists():
            self.status_file.unlink()


# --- the components ---------------------------------------------------------------------------------
def _port(url: str, default: int) -> int:
    return urlsplit(url).port or default


def resolve_source(settings: Settings) -> str:
    """'bybit' or 'local': ``auto`` probes Bybit's REST quickly and falls back to the simulation."""
    if settings.source != "auto":
        return settings.source
    try:
        with urllib.request.urlopen(f"{settings.bybit_rest_url}/v5/market/time", timeout=3) as resp:
            if resp.status == 200:
                return "bybit"
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable from here"
        log.info("Bybit not reachable: using the local simulated exchange", extra={"error": str(exc)[:200]})
    return "local"


def market_components(settings: Settings, source: str, env: dict,
                      exchange_args: tuple[str, ...] = ()) -> list[Component]:
    """``exchange_args``: extra options of the local exchange (later ones win: ``tickcast soak``
    passes its seed, history length and an unbounded sent log)."""
    out = []
    if source == "local":
        port = _port(settings.gateway_local_url, 8765)
        out.append(Component("exchange", TICKCAST + ["exchange", "--port", str(port), "--history-days", "7",
                                                     *exchange_args], env,
                             url=f"ws://127.0.0.1:{port}/v5/public/linear (SIMULATED market)",
                             health=f"http://127.0.0.1:{port}/v5/market/tickers?category=linear"))
        news_port = _port(settings.news_local_url, 8790)
        out.append(Component("newsfeed", TICKCAST + ["newsfeed", "--port", str(news_port)], env,
                             health=f"http://127.0.0.1:{news_port}/"))
    metrics = settings.gateway_metrics_port
    out.append(Component("gateway", TICKCAST + ["gateway"], {**env, "TICKCAST_SOURCE": source},
                         health=f"http://127.0.0.1:{metrics}/metrics" if metrics else None))
    return out


def pipeline_components(settings: Settings, env: dict, features_args: tuple[str, ...] = ()) -> list[Component]:
    """``features_args``: extra options of the feature flow (``tickcast soak`` pins its registry)."""
    recovery = str(Path(settings.data_dir) / "recovery" / "features")
    return [
        Component("archive", TICKCAST + ["archive"], env),
        Component("features", TICKCAST + ["features", "--recovery-dir", recovery, *features_args], env,
                  health=f"http://127.0.0.1:{settings.features_metrics_port}/metrics"
                  if settings.features_metrics_port else None),
    ]


def mlflow_component(settings: Settings, env: dict, port: int = 5000) -> Component | None:
    exe = shutil.which("mlflow", path=str(Path(PY).parent)) or shutil.which("mlflow")
    uri = settings.mlflow_tracking_uri
    if not exe or not uri.startswith("sqlite:"):
        return None  # a remote tracking server is configured: nothing to run locally
    artifacts = Path(settings.data_dir) / "mlflow" / "artifacts"
    return Component("mlflow", [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", uri,
                                "--default-artifact-root", str(artifacts.resolve()), "--workers", "1"], env,
                     url=f"http://127.0.0.1:{port}", health=f"http://127.0.0.1:{port}/health")


def serving_components(settings: Settings, env: dict) -> list[Component]:
    from tickcast.config import local_http_url

    api = local_http_url(settings.api_host, settings.api_port)
    out = [Component("api", TICKCAST + ["serve"], env, url=f"{api}/docs", health=f"{api}/health")]
    try:
        import ui.cli  # noqa: F401 - the dashboard lands with its own issue

        ui_url = f"http://127.0.0.1:{settings.ui_port}"
        out.append(Component("ui", TICKCAST + ["ui"], {**env, "TICKCAST_API_URL": api}, url=ui_url, health=ui_url))
    except ImportError:
        pass
    return out


def bootstrap_champion(settings: Settings, env: dict, log_dir: Path, args: tuple[str, ...] = (),
                       sup: Supervisor | None = None) -> bool:
    """First run: backfill kline history, build a kline dataset, train a small champion (<= 3 min).
    Runs in the foreground so its progress bars show; returns whether a champion exists afterwards.
    ``args``: options of ``python -m tickcast.bootstrap`` (``--days``, ``--time-budget-s``). With
    ``sup``, this thread supervises the running components meanwhile and a stop ends the bootstrap."""
    from model import registry

    if registry.alias_version(settings, registry.CHAMPION) is not None:
        return True
    print("no champion model yet: backfilling history and training a small one (about 3 minutes)...", flush=True)
    proc = subprocess.Popen([PY, "-m", "tickcast.bootstrap", *args], env={**os.environ, **env},
                            preexec_fn=_die_with_parent)
    try:
        rc = proc.wait() if sup is None else sup.supervise_while(proc)
    finally:
        if proc.poll() is None:  # stopped (SIGTERM, Ctrl-C): no orphan training
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if rc is None:
        return False
    if rc != 0:
        print(f"!! bootstrap failed with code {rc}: the API runs without a model (see the messages above)",
              file=sys.stderr, flush=True)
    return registry.alias_version(settings, registry.CHAMPION) is not None


def _print_urls(sup: Supervisor, bootstrap: str, source: str) -> None:
    print(f"\ntickcast is up ({'SIMULATED market: local exchange' if source == 'local' else 'Bybit live data'}).",
          flush=True)
    print(f"  kafka      {bootstrap}")
    for c in sup.components:
        if c.url:
            print(f"  {c.name:10s} {c.url}")
    print(f"  logs       {sup.log_dir}/\n  status     tickcast status\nCtrl-C stops everything.\n", flush=True)


class StackError(RuntimeError):
    """The stack cannot start as configured (a port taken, another stack in this data dir)."""


def _port_free(host: str, port: int) -> bool:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def check_ports(wanted: list[tuple[str, str, int]]) -> None:
    """StackError naming the setting of every (setting, host, port) whose port is taken: before
    anything starts, instead of a child crash-looping on it."""
    taken = [f"{port} ({name})" for name, host, port in wanted if port and not _port_free(host or "0.0.0.0", port)]
    if taken:
        raise StackError(f"port(s) already in use: {', '.join(taken)}; stop what uses them or change the "
                         f"setting (is another `tickcast up` running?)")


def _lock_stack_dir(stack_dir: Path):
    """One `tickcast up` per data dir: an exclusive lock held for the supervisor's lifetime."""
    import fcntl

    fh = open(stack_dir / "lock", "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise StackError(f"another `tickcast up` is running with this data dir ({stack_dir.parent})") from None
    return fh


def run_stack(settings: Settings) -> int:
    data_dir = Path(settings.data_dir)
    stack_dir = data_dir / "stack"
    stack_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / "logs"
    lock = _lock_stack_dir(stack_dir)  # noqa: F841 - released when the process ends
    check_ports([("TICKCAST_API_PORT", settings.api_host, settings.api_port),
                 ("TICKCAST_UI_PORT", "0.0.0.0", settings.ui_port),
                 ("TICKCAST_GATEWAY_METRICS_PORT", "127.0.0.1", settings.gateway_metrics_port),
                 ("TICKCAST_FEATURES_METRICS_PORT", "127.0.0.1", settings.features_metrics_port)])
    broker = None
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        broker = EmbeddedBroker(log_file=None).start()
        bootstrap = broker.bootstrap
    else:
        from tickcast.topics import ensure_topics

        ensure_topics(bootstrap)
    source = resolve_source(settings)
    env = {"KAFKA_BOOTSTRAP": bootstrap, "TICKCAST_SOURCE": source, "TICKCAST_DATA_DIR": str(data_dir)}
    sup = Supervisor([], log_dir, stack_dir / "status.json")
    sup.extra_status = {"kafka": bootstrap, "source": source, "embedded_broker": broker is not None}
    stop = sup.stopping
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for c in market_components(settings, source, env) + pipeline_components(settings, env):
            sup.add(c)
        from model import registry

        registry.ensure_experiment(settings)  # create/migrate the store once, before any other user
        ml = mlflow_component(settings, env)
        if ml and not _port_free("127.0.0.1", 5000):  # the tracking UI only: the stack works without it
            print("note: port 5000 is in use: the MLflow UI is not started (the registry works without it)",
                  file=sys.stderr, flush=True)
            ml = None
        if ml:
            sup.add(ml)
        bootstrap_champion(settings, env, log_dir, sup=sup)  # the pipeline stays supervised meanwhile
        if stop.is_set():
            return 0
        for c in serving_components(settings, env):
            sup.add(c)
        _print_urls(sup, bootstrap, source)
        return sup.run()
    except KeyboardInterrupt:
        sup.shutdown()
        return 0
    finally:
        sup.shutdown()
        if broker:
            broker.stop()
        print("tickcast stopped.", flush=True)


# --- tickcast status ---------------------------------------------------------------------------------
def _probe(url: str | None) -> str:
    if not url:
        return "-"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return f"ok ({resp.status})"
    except urllib.error.HTTPError as exc:
        return f"http {exc.code}"
    except Exception as exc:  # noqa: BLE001
        return f"down ({type(exc).__name__})"


def status(settings: Settings) -> int:
    path = Path(settings.data_dir) / "stack" / "status.json"
    if not path.exists():
        print("tickcast is not running (no stack status file; start it with `make up`).")
        return 1
    st = json.loads(path.read_text())
    age = time.time() - st["updated"]
    alive = _pid_alive(st["pid"])
    print(f"supervisor pid {st['pid']} {'running' if alive and age < 10 else 'NOT RESPONDING'} "
          f"(updated {age:.0f} s ago), kafka {st.get('kafka')}, source {st.get('source')}")
    worst = 0
    for name, c in st["components"].items():
        health = _probe(c["health"]) if c["state"] == "running" else "-"
        print(f"  {name:10s} {c['state']:11s} pid={c['pid'] or '-':<7} restarts={c['restarts']:<3} health={health}"
              f"{'  ' + c['url'] if c['url'] else ''}")
        if c["state"] != "running" or health.startswith(("down", "http 5")):
            worst = 1
    return worst if alive else 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
