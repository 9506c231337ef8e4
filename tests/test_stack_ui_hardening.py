"""The supervisor (tickcast/stack.py), the CLI/config and the dashboard (ui/), each test a bug found
in a review: crash-loop backoff, restarts during shutdown or by a helper thread, SIGTERM during the
first-run bootstrap, an orphan backfill, broker problems and busy ports at `tickcast up`, IPv6 API
hosts, a non-JSON storage setting, the simulated banner over REST history.

Nothing here starts the real stack, a broker or a browser: the supervisor is exercised with tiny
``python -c 'sleep'`` children (cleaned up by pid) and run_stack with its heavy parts replaced.
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tickcast import stack as ST
from tickcast.config import ConfigError, load_settings

MIN = 60_000
T0 = 1_795_000_000_000 - (1_795_000_000_000 % MIN)
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _kill(pid: int | None) -> None:
    if pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# ============================================================================ supervisor
def test_crash_loop_backoff_reaches_the_maximum_and_stays_reported():
    """A child that never stays up: the restart delay must grow to ``backoff_max`` and stay there, and
    the crash loop must stay reported (one "!!" line, state "crash-loop"), not flap.

    stack.py:87-101 computes the delay from the exits inside the 60 s window only; since the delay
    itself reaches 16-30 s, old exits fall out of the window, the count drops below ``crash_exits``
    and the delay falls back to 4-8 s: the supervisor cycles 5/9/17 s restarts forever, flips the
    component between "crash-loop" and "restarting" and prints the "!! crash loop" line again every
    minute or so."""
    sup = ST.Supervisor([], Path("/tmp"), None)
    c = ST.Component("x", ["false"])
    clock = {"now": 0.0}

    class DeadOnArrival:
        pid = 1

        def __init__(self):
            self.dies_at = clock["now"] + 1.0

        def poll(self):
            return 1 if clock["now"] >= self.dies_at else None

    starts: list[float] = []

    def spawn(comp):
        starts.append(clock["now"])
        comp.proc = DeadOnArrival()

    sup.spawn = spawn
    states = []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        while clock["now"] < 900:
            sup.check(c, clock["now"])
            if c.proc is None and c.restarts >= sup.crash_exits:
                states.append(c.crash_loop)
            clock["now"] = round(clock["now"] + 0.2, 1)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    late = gaps[len(gaps) // 2:]  # the steady state, long after the crash loop was detected
    assert min(late) >= sup.backoff_max, f"restart gaps in the steady state: {late}"
    assert all(states), "the component flips back from crash-loop to restarting while it keeps dying"
    assert err.getvalue().count("crash loop") == 1, err.getvalue()


def test_shutdown_while_a_watcher_thread_supervises_leaves_no_respawned_child(tmp_path):
    """run_stack supervises from a watcher thread while the first-run bootstrap trains
    (stack.py:291-296). A Ctrl-C (KeyboardInterrupt) or any error during the bootstrap goes to
    ``sup.shutdown()`` (stack.py:301-305) without stopping that thread: ``stopping`` is never set and
    ``done`` is never set, so the watcher sees the children it just lost (c.proc = None after
    shutdown) and starts them again, after "tickcast stopped." too."""
    sup = ST.Supervisor([], tmp_path / "logs", tmp_path / "status.json")
    c = ST.Component("sleeper", SLEEPER)
    sup.add(c)
    first = c.proc.pid
    done = threading.Event()
    watcher = threading.Thread(target=sup.supervise, args=(done,), daemon=True)
    watcher.start()
    seen: set[int] = {first}
    try:
        time.sleep(0.5)
        sup.shutdown(grace=5.0)  # what run_stack's `except KeyboardInterrupt` / `finally` do
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if c.proc is not None:
                seen.add(c.proc.pid)
            time.sleep(0.05)
        respawned = c.proc is not None
        status_back = (tmp_path / "status.json").exists()
    finally:
        done.set()
        watcher.join(5)
        for pid in seen:
            _kill(pid)
        if c.proc:
            c.proc.wait(5)
    assert not respawned and len(seen) == 1, f"children started after shutdown: {sorted(seen - {first})}"
    assert not status_back, "the watcher re-created status.json after shutdown removed it"


def test_a_child_restarted_while_the_bootstrap_runs_survives_the_bootstrap(tmp_path):
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process
    (prctl(2)): a component restarted by a helper thread during the first-run bootstrap died when
    that thread ended. The main thread now supervises while the bootstrap runs
    (``Supervisor.supervise_while``): the restarted child outlives the bootstrap."""
    marker = tmp_path / "second-start"
    code = ("import pathlib, sys, time; m = pathlib.Path(sys.argv[1])\n"
            "if not m.exists():\n    m.write_text('x'); sys.exit(3)\n"
            "time.sleep(60)")
    sup = ST.Supervisor([], tmp_path / "logs", None)
    c = ST.Component("flaky", [sys.executable, "-c", code, str(marker)])
    sup.add(c)  # it exits at once; the supervision restarts it while the "bootstrap" runs
    boot = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    pid = None
    try:
        assert sup.supervise_while(boot) == 0
        assert c.restarts >= 1 and c.proc is not None, "the component was not restarted"
        pid = c.proc.pid
        time.sleep(1.0)
        code_after = c.proc.poll()
    finally:
        _kill(pid)
        if c.proc:
            c.proc.wait(5)
    assert code_after is None, f"the restarted child died when the bootstrap ended (exit {code_after})"


# ============================================================================ run_stack
class _FakeBroker:
    def __init__(self, *a, **kw):
        self.bootstrap = "127.0.0.1:1"

    def start(self):
        return self

    def stop(self):
        pass


@pytest.fixture
def light_stack(monkeypatch, tmp_path):
    """run_stack with the broker, the network probe, MLflow and the real components replaced: one
    sleeper component stands for the pipeline. Returns the settings and a record of the calls."""
    from model import registry

    rec: dict = {"added": [], "serving_called": False, "pids": []}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ST, "EmbeddedBroker", _FakeBroker)
    monkeypatch.setattr(ST, "resolve_source", lambda s: "local")
    monkeypatch.setattr(ST, "market_components", lambda s, src, env, *a: [ST.Component("sleeper", SLEEPER, env)])
    monkeypatch.setattr(ST, "pipeline_components", lambda s, env, *a: [])
    monkeypatch.setattr(ST, "mlflow_component", lambda s, env, *a: None)
    monkeypatch.setattr(registry, "ensure_experiment", lambda s, *a, **k: "0")
    settings = load_settings(data_dir=tmp_path / "data")
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: None)  # a safety net until run_stack installs its own
    yield settings, rec
    signal.signal(signal.SIGTERM, old)
    for pid in rec["pids"]:
        _kill(pid)


def test_sigterm_during_first_run_bootstrap_stops_promptly(light_stack, monkeypatch, tmp_path):
    """SIGTERM (``kill``, systemd, docker stop) while the first-run champion trains: the handler
    only sets an event (stack.py:281) while the main thread blocks in ``subprocess.call`` on the
    bootstrap (stack.py:244) for up to several minutes; afterwards run_stack even starts the API and
    the dashboard (stack.py:297-298) before it notices it should stop. A service manager SIGKILLs it
    long before (and the bootstrap's own ``tickcast backfill`` child is then orphaned, see below)."""
    from model import registry

    settings, rec = light_stack
    fake_py = tmp_path / "fake-python"
    fake_py.write_text("#!/bin/sh\necho $$ >> \"$AUDIT_PIDS\"\nexec sleep 12\n")
    fake_py.chmod(0o755)
    pids = tmp_path / "pids"
    monkeypatch.setenv("AUDIT_PIDS", str(pids))
    monkeypatch.setattr(ST, "PY", str(fake_py))  # the bootstrap command: `PY -m tickcast.bootstrap`
    monkeypatch.setattr(registry, "alias_version", lambda s, alias: None)  # no champion yet

    def serving(s, env):
        rec["serving_called"] = True
        return []

    monkeypatch.setattr(ST, "serving_components", serving)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    t0 = time.monotonic()
    timer.start()
    try:
        ST.run_stack(settings)
    finally:
        timer.cancel()  # never a stray SIGTERM after run_stack (and its handler) are gone
        if pids.exists():
            rec["pids"] += [int(p) for p in pids.read_text().split()]
    took = time.monotonic() - t0
    assert took < 8.0, f"run_stack took {took:.1f} s to honour SIGTERM during the bootstrap"
    assert not rec["serving_called"], "the API and dashboard were started after SIGTERM"


def test_bootstrap_backfill_child_dies_with_the_bootstrap(tmp_path):
    """tickcast/bootstrap.py:27 runs ``tickcast backfill`` with a plain ``subprocess.call``: no
    PR_SET_PDEATHSIG, same process group. When the bootstrap gets SIGTERM (the supervisor's death
    signal, stack.py:245, or a kill), the backfill child survives as an orphan."""
    fake_py = tmp_path / "fake-python"
    pidfile = tmp_path / "child.pid"
    fake_py.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 30\n")
    fake_py.chmod(0o755)
    code = (f"import sys, tickcast.bootstrap as b; sys.executable = {str(fake_py)!r}; "
            "b.backfill(1.0, 'local', attempts=1)")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    child = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not pidfile.exists():
            time.sleep(0.05)
        child = int(pidfile.read_text())
        parent.send_signal(signal.SIGTERM)
        parent.wait(10)
        time.sleep(1.0)
        orphan = _alive(child)
    finally:
        _kill(child)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert not orphan, f"the backfill child {child} outlived the bootstrap"


@pytest.mark.parametrize("case", ["unreachable KAFKA_BOOTSTRAP", "embedded broker fails"])
def test_up_reports_broker_problems_without_a_traceback(light_stack, monkeypatch, capsys, case):
    """``tickcast up`` with KAFKA_BOOTSTRAP pointing nowhere: ensure_topics (stack.py:275) raises
    KafkaException after 30 s and the CLI dies with a traceback that never names KAFKA_BOOTSTRAP.
    Likewise a BrokerError of the embedded broker (stack.py:270) surfaces as a traceback."""
    import typer
    from confluent_kafka import KafkaError, KafkaException

    import tickcast.commands as CMD
    import tickcast.topics as T
    from tickcast.broker import BrokerError
    from tickcast.config import get_settings

    if case == "unreachable KAFKA_BOOTSTRAP":
        monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:1")

        def boom(*a, **k):
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker "
                                                                   "transport failure"))
        monkeypatch.setattr(T, "ensure_topics", boom)
        needle = "KAFKA_BOOTSTRAP"
    else:
        monkeypatch.delenv("KAFKA_BOOTSTRAP", raising=False)

        class Failing(_FakeBroker):
            def start(self):
                raise BrokerError("tansu did not answer on 127.0.0.1:4242 within 30 s")
        monkeypatch.setattr(ST, "EmbeddedBroker", Failing)
        needle = "tansu"
    monkeypatch.setenv("TICKCAST_DATA_DIR", str(light_stack[0].data_dir))
    get_settings.cache_clear()
    try:
        with pytest.raises((typer.Exit, SystemExit)) as ei:
            CMD.up()
    finally:
        get_settings.cache_clear()
    code = getattr(ei.value, "exit_code", getattr(ei.value, "code", None))
    assert code not in (0, None)
    assert needle in capsys.readouterr().err


def test_up_checks_its_ports_before_starting(light_stack, monkeypatch):
    """A port the stack needs is taken (TICKCAST_API_PORT here; 5000 for MLflow is hard-coded and is
    macOS's AirPlay receiver): run_stack has no pre-flight check, starts everything and the API then
    crash-loops forever behind a generic "!! api is in a crash loop ... see data/logs/api.log". A
    second ``tickcast up`` in the same directory does the same and, on Ctrl-C, deletes the first
    one's status.json. Expected: a clear error naming the variable and the port, nothing started."""
    from model import registry

    settings, rec = light_stack
    monkeypatch.setattr(registry, "alias_version", lambda s, alias: "1")  # a champion exists
    monkeypatch.setattr(ST.Supervisor, "add", lambda self, c: rec["added"].append(c.name))
    monkeypatch.setattr(ST.Supervisor, "run", lambda self: 0)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = settings.model_copy(update={"api_port": port})
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = ST.run_stack(s)
            except Exception as exc:  # noqa: BLE001 - a clear error is fine too
                rc, msg = 2, str(exc)
            else:
                msg = err.getvalue()
    assert "api" not in rec["added"], "the API was started on a port that is already in use"
    assert rc != 0 and str(port) in msg


def test_stack_gives_the_dashboard_a_usable_api_url_for_wildcard_and_ipv6_hosts():
    """stack.py:223 builds ``http://{api_host}:{api_port}`` and hands it to the dashboard as
    TICKCAST_API_URL (and to ``tickcast status`` as the health URL). TICKCAST_API_HOST=:: (all
    interfaces, IPv6) gives ``http://:::8000``, ``::1`` gives ``http://::1:8000``: invalid URLs, so
    every dashboard session fails (httpx.InvalidURL) and ``tickcast status`` reports the API down.
    (ui/cli.py resolve_api_url maps wildcards but the stack bypasses it; neither brackets IPv6.)"""
    import httpx

    for host in ("::", "::1"):
        comps = {c.name: c for c in ST.serving_components(load_settings(api_host=host), {})}
        for url in (comps["api"].health, comps["ui"].env["TICKCAST_API_URL"] + "/health"):
            u = httpx.URL(url)  # raises InvalidURL today
            assert u.port == 8000 and u.host in ("127.0.0.1", "::1", "localhost"), url


# ============================================================================ config
def test_non_json_lake_storage_options_is_a_config_error(monkeypatch, tmp_path):
    """``lake_storage_options`` is a dict field without ``NoDecode`` (config.py:59): pydantic-settings
    JSON-decodes the variable itself before the field's validator runs, so a value that is not JSON
    (``key=val``, the form the other dict settings accept) raises pydantic_settings.SettingsError:
    every command dies with a traceback that names the field, not TICKCAST_LAKE_STORAGE_OPTIONS."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TICKCAST_LAKE_STORAGE_OPTIONS", "region=eu-west-1")
    try:
        load_settings()
    except ConfigError as exc:
        assert "TICKCAST_LAKE_STORAGE_OPTIONS" in str(exc)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"traceback instead of a ConfigError: {type(exc).__name__}: {exc}")
    # (accepting name=value pairs like TICKCAST_NEWS_SOURCE_WEIGHTS would be fine as well)


# ============================================================================ dashboard
def test_simulated_banner_when_the_chart_shows_only_rest_history():
    """The banner looks only at the latest forecasts and m1 vectors (dashboard.py:672). After a
    restart of the API while the feature flow is down (or before the first vector), the chart draws
    the /candles and /predictions/history backfill, whose venue is ``sim.linear`` and whose items are
    flagged ``simulated``, without the SIMULATED DATA banner."""
    pytest.importorskip("panel")
    from ui import feed as F
    from ui import shaping as S
    from ui.dashboard import Dashboard

    f = F.LiveFeed("http://127.0.0.1:9")
    f.api_error = None
    f.symbols = ["BTCUSDT"]
    f.model, f.model_checked = {"champion_version": "1", "horizon": 30}, True
    items = [{"origin_ts": T0 + i * MIN, "open": 100.0, "high": 101.0, "low": 99.0, "close": 100.5,
              "volume": 3.0, "venue": "sim.linear"} for i in range(60)]
    with f.lock:
        b = f.buf.setdefault("BTCUSDT", F.SymbolBuffers())
        f._put_candles(b, S.candles_from_api(items))
        for i in range(60):
            f._put_signal(b, {"symbol": "BTCUSDT", "origin_ts": T0 + i * MIN, "action": "FLAT", "strength": 0.0,
                              "reason": "", "model_version": "1", "degraded": False, "simulated": True,
                              "issued_ts": 1})
    dash = Dashboard(f)
    dash.tick()
    assert len(dash.src_candles.data["x"]) > 0 and dash.live_charts.visible  # simulated prices are drawn
    assert "banner-simulated" in dash.banner.div.text
