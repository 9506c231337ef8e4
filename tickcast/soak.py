"""``tickcast soak``: the whole stack under injected faults, then an exactly-once, parity and
served-minutes audit.

    tickcast soak --minutes 30 [--fault-every-s 60] [--symbols BTCUSDT,ETHUSDT] [--keep DIR]
    make soak MINUTES=30

1. A complete stack in a fresh data dir with free ports, built from ``tickcast.stack``'s own
   component definitions and supervisor: the embedded tansu broker behind a cuttable TCP proxy
   (``tickcast.netfault``: the broker advertises the proxy, so every client connection goes through
   it), the local exchange's market model at real cadence (speed 1) with an unbounded sent log, the
   local news feed, gateway, raw archive, online feature flow with recovery, a champion trained on
   the local exchange's REST history (``tickcast.bootstrap``: backfill, kline dataset,
   ``model.train.quick_champion``), the API and the dashboard.
2. A fault every ``--fault-every-s`` seconds, cycling through ``FAULTS``: kill -9 of the gateway,
   feature flow, archive, API and dashboard (the supervisor restarts them), and over the exchange's
   control API a WebSocket drop, a sequence gap, a duplicated delta, a u=1 restart, a stall and a
   malformed-message flood, and a broker partition (the proxy cut for ``--cut-s`` seconds: tansu
   keeps its data in memory, so a broker *process* restart would lose everything and is not what
   is simulated). Each fault's recovery is measured: the time until the killed component answers its
   health check again, and until fresh feature vectors with a valid book flow for every targeted
   symbol (``features.live``, s1 windows ending after the fault).
3. Drain, then stop the exchange's sockets (a long stall: nothing is in flight), stop the gateway
   gracefully, wait for the archive and the feature flow to catch up, and audit:

   - **lost / duplicated**: every data frame in the exchange's sent log (all connections) parsed
     with the gateway's parser (``connectors.bybit.parse``) into events, matched as a multiset
     against the raw archive's rows (book: symbol, snapshot/delta, u, seq, ts; trade: id; ticker:
     cs, ts, snapshot/delta; kline: start, ts, confirm; funding: ts, rate, next time). Frames
     written to a socket that an injected WebSocket drop or a gateway kill -9 was cutting (the last
     ``--tail-s`` seconds of such a connection) that never reached the archive are *transport loss*,
     reported separately with the fault; any other missing event is lost. Archive rows with more
     copies than frames sent, and rows no frame explains, are duplicated (the gateway's start-up
     kline history from REST is recognised and excluded). Malformed frames are matched against the
     archived dead letters the same way.
   - **parity**: every FeatureVector published on ``features.live`` vs an uninterrupted offline
     replay of the archive (``flows.parity``/``flows.offline_replay``), over the whole run (both
     started from the same empty topics, so no window needs excluding): the % of (symbol, cadence,
     window_end, feature) values that are bit-identical; windows only one side has count as
     mismatches with all their features.
   - **served**: per symbol, the % of minutes from its first live 1-minute feature vector to the last
     closed minute that have a forecast (served or degraded) in the API's ``api_predictions`` table.

The report (faults with their recoveries, the audit) is printed and written to ``report.txt`` /
``report.json`` in the run dir (``--keep DIR``; otherwise a temporary data dir is removed afterwards
and the report, fault log and component logs are kept under ``<TICKCAST_DATA_DIR>/soak/<time>/``).
Its last line is ``lost=<n> duplicated=<n> served=<lowest %> parity=<%>``.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tickcast import stack
from tickcast.broker import free_port
from tickcast.logs import get_logger

log = get_logger("soak")
MINUTE_MS = 60_000

# the fault cycle: component kills interleaved with exchange faults, the broker partition last
FAULTS = ("kill:gateway", "ws_drop", "kill:features", "gap", "kill:archive", "duplicate", "kill:api",
          "u1_restart", "kill:ui", "stall", "flood", "broker_cut")
FAULT_LABEL = {"kill:gateway": "kill -9 gateway", "kill:features": "kill -9 feature flow",
               "kill:archive": "kill -9 raw archive", "kill:api": "kill -9 API", "kill:ui": "kill -9 dashboard",
               "ws_drop": "WebSocket drop", "gap": "sequence gap", "duplicate": "duplicate delta",
               "u1_restart": "u=1 restart", "stall": "stall", "flood": "malformed flood",
               "broker_cut": "broker partition"}


@dataclass
class SoakConfig:
    minutes: float
    fault_every_s: float = 60.0
    symbols: list[str] | None = None  # default: TICKCAST_SYMBOLS
    keep: Path | None = None  # run dir to keep (data, logs, report); None: a temporary one
    seed: int = 7  # the exchange model's seed
    depth: int | None = None  # order-book depth subscribed (Bybit pushes .50 every 20 ms, .200 every 100 ms)
    history_days: float = 3.0  # the exchange's 1-minute REST history
    train_days: float = 2.0  # of which the champion trains on
    train_budget_s: float = 150.0
    drain_s: float = 75.0  # after the last fault, before the audit
    cut_s: float = 5.0  # broker partition length
    stall_s: float = 5.0
    flood_count: int = 100
    tail_s: float = 5.0  # transport-loss window before a cut connection's end
    recovery_timeout_s: float = 120.0  # at most; never longer than the fault interval (min 20 s)
    progress: bool = True


@dataclass
class FaultRecord:
    n: int
    kind: str
    label: str
    target: str
    at: float  # wall clock, s
    t_rel: float  # seconds since the fault phase began
    detail: dict = field(default_factory=dict)
    healthy_s: float | None = None  # the killed component answers its health check again
    data_s: float | None = None  # fresh, book-valid s1 vectors for every targeted symbol
    recovered: bool = False
    note: str = ""


# ----------------------------------------------------------------------------------------- helpers
def _free_pair() -> int:
    """A port p with p + 1 free as well (the exchange serves its control API on port + 1)."""
    for _ in range(200):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except Exception:  # noqa: BLE001 - down, refused, timed out
        return None


def http_json(url: str, body: dict | None = None, token: str | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    if token and body is not None:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def pct_text(x: float | None) -> str:
    """A percentage that never rounds up to 100: 99.9996 -> 99.999."""
    if x is None:
        return "n/a"
    if x >= 100.0:
        return "100"
    return f"{math.floor(x * 1000) / 1000:.3f}"


def utc(ts_s: float) -> str:
    return datetime.fromtimestamp(ts_s, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------- features watcher
class FeatureWatch(threading.Thread):
    """Follows ``features.live``: per symbol, the newest book-valid s1 window and when it arrived."""

    def __init__(self, bootstrap: str, symbols: list[str]):
        super().__init__(name="soak-feature-watch", daemon=True)
        self.bootstrap = bootstrap
        self.symbols = list(symbols)
        self.lock = threading.Lock()
        self.valid_s1: dict[str, int] = {}  # symbol -> newest window_end with book_valid
        self.invalid_s1: Counter = Counter()  # s1 windows published with book_valid false
        self.records = 0
        self.last_record = 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        from confluent_kafka import Consumer

        from tickcast.kafka import assign_all, consumer_config
        from tickcast.serde import Serde, SerdeError
        from tickcast.topics import FEATURES_LIVE

        serde = Serde()
        c = Consumer(consumer_config(self.bootstrap, "tickcast-soak-watch", low_latency=False))
        while not self.stop_event.is_set():
            try:
                assign_all(c, [FEATURES_LIVE])
                break
            except Exception:  # noqa: BLE001 - the broker may be starting
                self.stop_event.wait(1.0)
        while not self.stop_event.is_set():
            for m in c.consume(2000, 0.2):
                if m.error() is not None:
                    continue
                try:
                    r = serde.decode(m.value(), "FeatureVector")
                except SerdeError:
                    continue
                with self.lock:
                    self.records += 1
                    self.last_record = time.monotonic()
                    if r["cadence"] != "s1":
                        continue
                    if r["book_valid"]:
                        if r["window_end"] > self.valid_s1.get(r["symbol"], 0):
                            self.valid_s1[r["symbol"]] = r["window_end"]
                    else:
                        self.invalid_s1[r["symbol"]] += 1
        c.close()

    def fresh(self, symbols: list[str], after_ms: int) -> bool:
        with self.lock:
            return all(self.valid_s1.get(s, 0) > after_ms for s in symbols)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


# ----------------------------------------------------------------------------------- the run
class Soak:
    def __init__(self, cfg: SoakConfig, out=None):
        from tickcast.config import get_settings

        self.cfg = cfg
        self.out = out or sys.stdout
        base = get_settings()
        self.symbols = list(cfg.symbols or base.symbols)
        self.token = base.api_token.get_secret_value() if base.api_token else None
        self.started = time.time()
        stamp = datetime.fromtimestamp(self.started, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
        if cfg.keep:
            self.run_dir = Path(cfg.keep).resolve()
            if self.run_dir.exists() and any(self.run_dir.iterdir()):
                raise SystemExit(f"--keep {self.run_dir}: the directory is not empty (a soak needs a fresh one)")
            self.temp = None
            self.report_dir = self.run_dir
        else:
            self.temp = tempfile.mkdtemp(prefix="tickcast-soak-")
            self.run_dir = Path(self.temp)
            self.report_dir = (Path(base.data_dir) / "soak" / stamp).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.report_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.run_dir / "data"
        self.log_dir = self.run_dir / "logs"
        self.faults: list[FaultRecord] = []
        self.proxy = None
        self.broker = None
        self.sup: stack.Supervisor | None = None
        self.watch: FeatureWatch | None = None
        self.sup_stop = threading.Event()
        self.sup_thread: threading.Thread | None = None
        self.conn_fault: dict[str, str] = {}  # exchange conn_id -> the fault that cut it
        self.timings: dict[str, float] = {}
        self.bar = None

    # -- output ----------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
            self._tick()

    def _tick(self) -> None:
        if self.bar is not None and self.phase_t0 is not None:
            done = min(self.bar.total, int(time.monotonic() - self.phase_t0))
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)

    phase_t0: float | None = None

    # -- the stack -------------------------------------------------------------------------------
    def setup(self) -> None:
        from tickcast.config import Settings
        from tickcast.netfault import ProxiedBroker, ProxyThread

        ex_port = _free_pair()
        ports = {"api": free_port(), "ui": free_port(), "gw_metrics": free_port(), "features_metrics": free_port(),
                 "news": free_port()}
        self.proxy = ProxyThread(0).start()
        self.broker = ProxiedBroker(self.proxy.port, log_file=self.run_dir / "broker.log").start()
        self.proxy.proxy.target_port = self.broker.port
        self.broker.create_topics()
        bootstrap = self.broker.bootstrap
        self.exchange_url = f"http://127.0.0.1:{ex_port}"
        self.control_url = f"http://127.0.0.1:{ex_port + 1}/control"
        self.env = {
            "KAFKA_BOOTSTRAP": bootstrap, "TICKCAST_SOURCE": "local", "TICKCAST_DATA_DIR": str(self.data_dir),
            "TICKCAST_LAKE_ROOT": str(self.data_dir / "lake"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.data_dir / 'mlflow' / 'mlflow.db'}",
            "TICKCAST_SYMBOLS": ",".join(self.symbols), "TICKCAST_GATEWAY_LOCAL_URL": self.exchange_url,
            "TICKCAST_NEWS_LOCAL_URL": f"http://127.0.0.1:{ports['news']}", "TICKCAST_API_HOST": "127.0.0.1",
            "TICKCAST_API_PORT": str(ports["api"]), "TICKCAST_UI_PORT": str(ports["ui"]),
            "TICKCAST_GATEWAY_METRICS_PORT": str(ports["gw_metrics"]),
            "TICKCAST_FEATURES_METRICS_PORT": str(ports["features_metrics"]), "PYTHONUNBUFFERED": "1",
            # Bytewax's dataflow API caches the rendered flow in this *directory* (dataflow.json)
            "BYTEWAX_DATAFLOW_API_CACHE_PATH": str(self.run_dir / "bytewax"),
        }
        if self.cfg.depth:
            self.env["TICKCAST_ORDERBOOK_DEPTH"] = str(self.cfg.depth)
        (self.run_dir / "bytewax").mkdir(exist_ok=True)
        (self.data_dir / "mlflow").mkdir(parents=True, exist_ok=True)
        self.settings = Settings(
            kafka_bootstrap=bootstrap, source="local", data_dir=self.data_dir, lake_root=str(self.data_dir / "lake"),
            mlflow_tracking_uri=self.env["MLFLOW_TRACKING_URI"], symbols=self.symbols,
            gateway_local_url=self.exchange_url, news_local_url=self.env["TICKCAST_NEWS_LOCAL_URL"],
            api_host="127.0.0.1", api_port=ports["api"], ui_port=ports["ui"],
            gateway_metrics_port=ports["gw_metrics"], features_metrics_port=ports["features_metrics"],
            **({"orderbook_depth": self.cfg.depth} if self.cfg.depth else {}))
        self.sup = stack.Supervisor([], self.log_dir, self.data_dir / "stack" / "status.json")
        (self.data_dir / "stack").mkdir(parents=True, exist_ok=True)
        self.sup.extra_status = {"kafka": bootstrap, "source": "local (soak)", "embedded_broker": True}

    def start(self) -> None:
        t0 = time.monotonic()
        self.setup()
        s, env = self.settings, self.env
        self.say(f"soak: run dir {self.run_dir}; broker {self.broker.bootstrap} (tansu on :{self.broker.port} "
                 f"behind a TCP proxy); symbols {','.join(self.symbols)}")
        self.watch = FeatureWatch(self.broker.bootstrap, self.symbols)
        self.watch.start()
        exchange_args = ("--seed", str(self.cfg.seed), "--history-days", str(self.cfg.history_days),
                         "--sent-log-max", "0", "--speed", "1")
        # the feature registry is pinned for the run (the replay must use the one the live flow used,
        # and a restarted flow must not pick up an edit made meanwhile)
        from flows.registry import DEFAULT_PATH

        self.registry = self.run_dir / "features.yaml"
        shutil.copyfile(DEFAULT_PATH, self.registry)
        for c in (stack.market_components(s, "local", env, exchange_args)
                  + stack.pipeline_components(s, env, ("--registry", str(self.registry)))):
            self.sup.add(c)
        self.sup_thread = threading.Thread(target=self.sup.supervise, args=(self.sup_stop,), name="soak-supervisor",
                                           daemon=True)
        self.sup_thread.start()
        self._wait(lambda: http_status(self.component("exchange").health) == 200, 60, "the local exchange")
        from model import registry

        registry.ensure_experiment(s)
        t_train = time.monotonic()
        ok = stack.bootstrap_champion(s, env, self.log_dir, ("--days", str(self.cfg.train_days),
                                                             "--time-budget-s", str(self.cfg.train_budget_s)))
        self.timings["champion_s"] = time.monotonic() - t_train
        if not ok:
            raise RuntimeError("no champion could be trained: see the messages above")
        self.champion = registry.alias_version(s, registry.CHAMPION)
        for c in stack.serving_components(s, env):
            self.sup.add(c)
        self._wait(lambda: self.watch.fresh(self.symbols, 0), 120, "the first feature vectors")
        self._wait(self._api_ready, 120, "the API")
        if self.component("ui"):
            self._wait(lambda: http_status(self.component("ui").health) == 200, 120, "the dashboard")
        self.timings["startup_s"] = time.monotonic() - t0
        self.say(f"soak: stack up in {self.timings['startup_s']:.0f} s (champion v{self.champion} trained in "
                 f"{self.timings['champion_s']:.0f} s); API {self.component('api').url}")

    def _api_ready(self) -> bool:
        try:
            h = http_json(self.component("api").health, timeout=3)
        except Exception:  # noqa: BLE001
            return False
        return h.get("status") in ("ok", "degraded") and h["components"]["model"]["status"] == "ok"

    def _wait(self, pred, timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while not pred():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (logs: {self.log_dir})")
            self._check_crash_loops()
            time.sleep(0.5)
        return time.monotonic() - t0

    def _check_crash_loops(self) -> None:
        bad = [c.name for c in self.sup.components if c.crash_loop]
        if bad:
            raise RuntimeError(f"crash loop: {', '.join(bad)} (logs: {self.log_dir})")

    def component(self, name: str) -> stack.Component | None:
        return next((c for c in self.sup.components if c.name == name), None)

    # -- faults ----------------------------------------------------------------------------------
    def fault(self, kind: str, body: dict) -> dict:
        return http_json(self.control_url + "/fault", {"kind": kind, **body}, self.token)

    def live_conns(self) -> list[str]:
        st = http_json(self.control_url + "/state")
        return [c["conn_id"] for c in st["connections"] if c["kind"] == "linear" and not c["closed"] and c["topics"]]

    def inject(self, n: int, kind: str) -> FaultRecord:
        sym = self.symbols[n % len(self.symbols)]
        now = time.time()
        rec = FaultRecord(n + 1, kind, FAULT_LABEL[kind], "", now, time.monotonic() - self.phase_t0)
        targets = list(self.symbols)
        t_data = now  # fresh data must be newer than this (wall s; the model's clock follows it at speed 1)
        if kind.startswith("kill:"):
            name = kind.split(":", 1)[1]
            c = self.component(name)
            rec.target = name
            if c is None or c.proc is None:
                rec.note = f"{name} was not running (state {'missing' if c is None else 'restarting'})"
                return rec
            if name == "gateway":
                for cid in self.live_conns():
                    self.conn_fault[cid] = f"#{rec.n} gateway kill -9"
            if name == "archive":
                rec.detail["archive_version"] = self._archive_version()
            old = c.proc.pid
            os.kill(old, signal.SIGKILL)
            rec.detail["pid"] = old
            self._recover_kill(rec, c, old, targets if name in ("gateway", "features") else None)
            return rec
        if kind == "broker_cut":
            rec.target = "broker (TCP proxy)"
            self.proxy.cut()
            self._sleep(self.cfg.cut_s)
            self.proxy.restore()
            rec.detail["cut_s"] = self.cfg.cut_s
            t_data = time.time()
        else:
            body: dict = {}
            if kind == "ws_drop":
                conns = self.live_conns()
                for cid in conns:
                    self.conn_fault[cid] = f"#{rec.n} WebSocket drop"
                r = self.fault("drop", body)
            elif kind in ("gap", "duplicate", "u1_restart"):
                targets = [sym]
                r = self.fault({"u1_restart": "restart"}.get(kind, kind), {"symbol": sym})
            elif kind == "stall":
                r = self.fault("stall", {"seconds": self.cfg.stall_s})
                t_data = now + self.cfg.stall_s
            elif kind == "flood":
                r = self.fault("flood", {"count": self.cfg.flood_count})
            else:
                raise ValueError(kind)
            what = sym if kind in ("gap", "duplicate", "u1_restart") else "all symbols"
            rec.target = f"{what} on {len(r['conn_ids'])} connection(s)"
            rec.detail.update({"fault_id": r["id"], "conn_ids": r["conn_ids"]})
        invalid0 = {s: self.watch.invalid_s1[s] for s in targets}
        rec.data_s = self._until(lambda: self.watch.fresh(targets, int(t_data * 1000)), rec.at)
        rec.recovered = rec.data_s is not None
        rec.detail["invalid_s1_windows"] = sum(self.watch.invalid_s1[s] - invalid0[s] for s in targets)
        return rec

    def _until(self, pred, since: float) -> float | None:
        # a fault that has not recovered by the next one is reported as such; the schedule goes on
        deadline = time.monotonic() + min(self.cfg.recovery_timeout_s, max(20.0, self.cfg.fault_every_s))
        while time.monotonic() < deadline:
            if pred():
                return time.time() - since
            time.sleep(0.2)
            self._tick()
        return None

    def _recover_kill(self, rec: FaultRecord, c: stack.Component, old_pid: int, data_symbols) -> None:
        def healthy() -> bool:
            if c.proc is None or c.proc.pid == old_pid:
                return False
            if c.name == "api":
                return self._api_ready()
            if c.name == "archive":  # no health endpoint: a new Delta commit after the restart
                return self._archive_version() > rec.detail["archive_version"]
            return c.health is None or http_status(c.health) == 200

        rec.healthy_s = self._until(healthy, rec.at)
        rec.detail["new_pid"] = c.proc.pid if c.proc else None
        ok = rec.healthy_s is not None
        if data_symbols:
            rec.data_s = self._until(lambda: self.watch.fresh(data_symbols, int(rec.at * 1000)), rec.at)
            ok = ok and rec.data_s is not None
        rec.recovered = ok

    def _archive_version(self) -> int:
        from flows.lake import Lake

        dt = Lake(self.settings.lake_root).table("raw_heartbeats")
        return -1 if dt is None else dt.version()

    def run_faults(self) -> None:
        from tqdm import tqdm

        total = self.cfg.minutes * 60
        self.phase_t0 = time.monotonic()
        self.faults_from = time.time()
        self.bar = tqdm(total=round(total), desc="soak", unit="s", disable=not self.cfg.progress, file=sys.stderr,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}]"
                                   "{postfix}")
        try:
            k = 0
            while True:
                due = self.phase_t0 + (k + 1) * self.cfg.fault_every_s
                if due >= self.phase_t0 + total:
                    break
                self._sleep(due - time.monotonic())
                kind = FAULTS[k % len(FAULTS)]
                rec = self.inject(k, kind)
                self.faults.append(rec)
                self._log_fault(rec)
                self._check_crash_loops()
                k += 1
            self._sleep(self.phase_t0 + total - time.monotonic())
        finally:
            self.faults_to = time.time()
            self.bar.close()
            self.bar = None

    def _log_fault(self, rec: FaultRecord) -> None:
        with open(self.report_dir / "faults.jsonl", "a") as fh:
            fh.write(json.dumps(asdict(rec)) + "\n")
        self.say(f"  fault {rec.n:3d} t+{rec.t_rel:6.1f}s {rec.label:22s} {rec.target:32s} " + _recovery_text(rec))
        if self.bar is not None:
            self.bar.set_postfix_str(f"{len(self.faults)} faults, last: {rec.label}", refresh=False)

    # -- the end ---------------------------------------------------------------------------------
    def stop_feed(self) -> None:
        """Hold the exchange's sockets (a long stall: nothing more is written to them, so nothing is
        in flight), then stop the gateway gracefully (it flushes its producer). The supervisor
        thread keeps running (the children it restarted die with it: PR_SET_PDEATHSIG is per
        thread); the gateway just leaves its list first, so it is not restarted."""
        gw = self.component("gateway")
        self.sup.components.remove(gw)
        try:
            self.fault("stall", {"seconds": 3600})
        except Exception as exc:  # noqa: BLE001
            self.say(f"soak: could not stall the exchange's connections: {exc}")
        time.sleep(2.0)
        self.stop_ms = int(time.time() * 1000)
        if gw.proc is not None:
            gw.proc.send_signal(signal.SIGTERM)
            try:
                gw.proc.wait(60)
            except Exception:  # noqa: BLE001
                gw.proc.kill()
                gw.proc.wait()
            gw.proc = None

    def sent_log(self) -> dict[str, list[dict]]:
        """conn_id -> its data and malformed frames, in order."""
        st = http_json(self.control_url + "/state", timeout=120)
        out = {}
        self.conn_info = {c["conn_id"]: c for c in st["connections"] if c["kind"] == "linear"}
        for cid in self.conn_info:
            with urllib.request.urlopen(f"{self.control_url}/sent?conn_id={cid}&kinds=data,malformed",
                                        timeout=300) as resp:
                out[cid] = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
        return out

    def wait_archive(self, timeout: float = 300.0) -> float:
        """Until the archive holds every raw message: committed offsets reach the topics' ends and
        stay put (tansu's high watermark can lag by one batch, so also wait for no new commit)."""
        from confluent_kafka import Consumer, TopicPartition

        from flows.lake import ARCHIVED_TOPICS, TABLE_OF_TOPIC, Lake
        from tickcast.kafka import consumer_config

        lake = Lake(self.settings.lake_root)
        c = Consumer(consumer_config(self.broker.bootstrap, "tickcast-soak-ends"))
        md = c.list_topics(timeout=30)
        ends = {}
        for t in ARCHIVED_TOPICS:
            for p in md.topics[t].partitions:
                _lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=30)
                if hi > 0:
                    ends[(t, p)] = hi
        c.close()
        t0 = time.monotonic()
        last, stable_since = None, time.monotonic()
        while time.monotonic() - t0 < timeout:
            tables = {}
            got = {}
            for t, p in ends:
                name = TABLE_OF_TOPIC[t]
                if name not in tables:
                    tables[name] = lake.table(name)
                got[(t, p)] = lake.committed_offset(name, t, p, dt=tables[name]) if tables[name] else None
            reached = all(got[tp] is not None and got[tp] >= hi - 1 for tp, hi in ends.items())
            if got != last:
                last, stable_since = got, time.monotonic()
            if reached and time.monotonic() - stable_since > 4.0:
                return time.monotonic() - t0
            time.sleep(1.0)
        raise RuntimeError(f"the archive did not catch up within {timeout:.0f} s: {last} vs ends {ends}")

    def wait_features_idle(self, quiet_s: float = 4.0, timeout: float = 300.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            with self.watch.lock:
                last = self.watch.last_record
            if time.monotonic() - last > quiet_s:
                return
            time.sleep(1.0)

    def shutdown(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        if self.sup is not None:
            self.sup.stopping.set()  # no more restarts; then stop everything in reverse order
            self.sup.shutdown()
        self.sup_stop.set()
        if self.broker is not None:
            self.broker.stop()
        if self.proxy is not None:
            self.proxy.stop()

    def collect_logs(self) -> None:
        if self.temp is None:
            return
        if self.log_dir.is_dir():
            shutil.copytree(self.log_dir, self.report_dir / "logs", dirs_exist_ok=True)
        shutil.rmtree(self.temp, ignore_errors=True)


def _recovery_text(rec: FaultRecord) -> str:
    parts = []
    if rec.note:
        parts.append(rec.note)
    if rec.kind.startswith("kill:"):
        parts.append(f"healthy after {rec.healthy_s:.1f} s" if rec.healthy_s is not None else "NOT HEALTHY again")
    if rec.data_s is not None:
        parts.append(f"data flows after {rec.data_s:.1f} s")
    elif not rec.kind.startswith("kill:") or rec.target in ("gateway", "features"):
        parts.append("data did NOT flow again (within the fault interval)")
    if rec.detail.get("invalid_s1_windows"):
        parts.append(f"{rec.detail['invalid_s1_windows']} s1 windows without a valid book meanwhile")
    return "; ".join(parts)


# ------------------------------------------------------------------------------- the audit
def event_key(name: str, rec: dict) -> tuple:
    """The identity of a raw event, from a parsed message or an archived row alike."""
    s = rec["symbol"]
    if name in ("OrderBookSnapshot", "OrderBookDelta"):
        return ("book", s, name == "OrderBookSnapshot", rec["update_id"], rec["cross_seq"], rec["exchange_ts"])
    if name == "Trade":
        return ("trade", s, rec["trade_id"])
    if name == "Ticker":
        return ("ticker", s, rec["cross_seq"], rec["exchange_ts"], rec["is_snapshot"])
    if name == "Kline":
        return ("kline", s, rec["start_ts"], rec["exchange_ts"], rec["confirm"])
    if name == "Funding":
        return ("funding", s, rec["exchange_ts"], rec["funding_rate"], rec["next_funding_time"])
    raise ValueError(name)


ARCHIVE_TABLES = {  # bronze table -> (record name, key columns)
    "raw_orderbook_snapshots": ("OrderBookSnapshot", ["update_id", "cross_seq", "exchange_ts"]),
    "raw_orderbook_deltas": ("OrderBookDelta", ["update_id", "cross_seq", "exchange_ts"]),
    "raw_trades": ("Trade", ["trade_id"]),
    "raw_ticker": ("Ticker", ["cross_seq", "exchange_ts", "is_snapshot"]),
    "raw_kline": ("Kline", ["start_ts", "exchange_ts", "confirm", "recv_ts", "end_ts"]),
    "raw_funding": ("Funding", ["exchange_ts", "funding_rate", "next_funding_time", "kind"]),
}


@dataclass
class ExactlyOnce:
    frames: int = 0
    connections: int = 0
    events_sent: Counter = field(default_factory=Counter)  # by kind
    archived: Counter = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    extra: int = 0  # archive rows no frame explains (counted in duplicated)
    history_klines: int = 0
    optional_funding_archived: int = 0
    transport_loss: dict = field(default_factory=dict)  # fault -> {"events", "frames", "max_age_s"}
    examples: list = field(default_factory=list)
    malformed_sent: int = 0
    malformed_transport_loss: int = 0
    dead_letters: int = 0
    malformed_lost: int = 0
    parse_errors: int = 0


def audit_exactly_once(sent: dict[str, list[dict]], lake, symbols: list[str], conn_fault: dict[str, str],
                       tail_s: float, venue: str = "sim.linear") -> ExactlyOnce:
    import pyarrow.compute as pc

    from connectors.bybit.parse import BybitParser, ParseError, decode

    res = ExactlyOnce(connections=len(sent))
    # 1. what the exchange sent, as events (a parser per connection: the gateway's ticker state
    #    starts again from each connection's snapshot)
    instances: dict[tuple, list[tuple]] = defaultdict(list)  # key -> [(conn, ts, tail_fault)]
    optional: Counter = Counter()  # funding derived from a snapshot: depends on the gateway's earlier state
    malformed: dict[bytes, list[tuple]] = defaultdict(list)
    for cid, frames in sent.items():
        parser = BybitParser(venue, symbols)
        data_ts = [json.loads(f["text"]).get("ts") for f in frames if f["kind"] == "data"]
        last_ts = max((t for t in data_ts if isinstance(t, int)), default=0)
        cut_by = conn_fault.get(cid)
        prev_ts = 0
        for f in frames:
            if f["kind"] == "malformed":
                # no timestamp of its own: the one of the data frame before it
                tail = cut_by if cut_by and prev_ts >= last_ts - tail_s * 1000 else None
                malformed[f["text"].encode()].append((cid, prev_ts, tail))
                res.malformed_sent += 1
                continue
            res.frames += 1
            try:
                msg = decode(f["text"])
                events = parser.events(msg, 0)
            except ParseError:
                res.parse_errors += 1
                continue
            prev_ts = msg["ts"]
            tail = cut_by if cut_by and msg["ts"] >= last_ts - tail_s * 1000 else None
            for name, rec in events:
                key = event_key(name, rec)
                if name == "Funding" and msg.get("type") == "snapshot":
                    optional[key] += 1
                    continue
                res.events_sent[key[0]] += 1
                instances[key].append((cid, msg["ts"], tail, last_ts))
    # 2. what the archive holds (rows that came through Kafka)
    archived: Counter = Counter()
    history = 0
    for table, (name, cols) in ARCHIVE_TABLES.items():
        t = lake.read(table, symbols=symbols, columns=["symbol", "ingest", *cols])
        if t.num_rows == 0:
            continue
        t = t.filter(pc.equal(t.column("ingest"), "kafka"))
        for row in t.to_pylist():
            if name == "Funding" and row["kind"] != "ticker":
                continue
            key = event_key(name, row)
            if name == "Kline" and key not in instances and row["exchange_ts"] == row["recv_ts"] // 1000 \
                    and row["confirm"] and row["end_ts"] < row["exchange_ts"]:
                history += 1  # the gateway's start-up history (REST), published at its start
                continue
            archived[key] += 1
            res.archived[key[0]] += 1
    res.history_klines = history
    # 3. match
    for key, inst in instances.items():
        a = archived.pop(key, 0)
        if a > len(inst):
            res.duplicated += a - len(inst)
            _example(res, "duplicated", key, a - len(inst))
        missing = len(inst) - a
        if missing <= 0:
            continue
        # byte-identical instances: the missing ones are those a cut explains, when any
        for cid, ts, tail, last_ts in sorted(inst, key=lambda i: i[2] is None)[:missing]:
            if tail is not None:
                d = res.transport_loss.setdefault(tail, {"events": 0, "conn_id": cid, "max_age_s": 0.0})
                d["events"] += 1
                d["max_age_s"] = max(d["max_age_s"], (last_ts - ts) / 1000)
            else:
                res.lost += 1
                _example(res, "lost", key, 1)
    for key, a in archived.items():
        if key[0] == "funding" and optional.get(key, 0) >= a:
            res.optional_funding_archived += a
            continue
        res.extra += a - optional.get(key, 0) if key[0] == "funding" else a
        _example(res, "extra", key, a)
    res.duplicated += res.extra
    # 4. malformed frames -> dead letters
    dl = lake.read("raw_dead_letters", columns=["source", "payload", "ingest"])
    have: Counter = Counter(bytes(r["payload"]) for r in dl.to_pylist()
                            if r["ingest"] == "kafka" and r["source"] == "gateway.bybit.parse")
    for payload, inst in malformed.items():
        a = have.pop(payload, 0)
        res.dead_letters += min(a, len(inst))
        if a > len(inst):
            res.duplicated += a - len(inst)
        for _cid, _ts, tail in sorted(inst, key=lambda i: i[2] is None)[:max(0, len(inst) - a)]:
            if tail is not None:
                res.malformed_transport_loss += 1
            else:
                res.malformed_lost += 1
    res.lost += res.malformed_lost
    return res


def _example(res: ExactlyOnce, what: str, key: tuple, n: int) -> None:
    if len(res.examples) < 20:
        res.examples.append({"what": what, "key": list(key), "n": n})


@dataclass
class Parity:
    from_ms: int
    to_ms: int
    windows_online: int = 0
    windows_offline: int = 0
    windows_compared: int = 0
    only_online: int = 0
    only_offline: int = 0
    online_inconsistent: int = 0
    values_total: int = 0
    values_identical: int = 0
    meta_mismatches: dict = field(default_factory=dict)
    null_reason_mismatches: int = 0
    by_cadence: dict = field(default_factory=dict)
    mismatches_by_feature: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    @property
    def pct(self) -> float | None:
        return 100.0 * self.values_identical / self.values_total if self.values_total else None


def audit_parity(bootstrap: str, lake, symbols: list[str], to_ms: int, work_dir: Path, progress: bool,
                 dump: Path | None = None, registry_path: str | None = None) -> tuple[Parity, dict]:
    """Every vector published up to ``to_ms`` (the start-up history vectors included) vs the replay."""
    from flows.offline_replay import iter_vectors, replay
    from flows.parity import ParityReport, compare, read_published, records_equal

    online, inconsistent = read_published(bootstrap, 0, to_ms, symbols, seek_margin_ms=None)
    from_ms = min((k[2] for k in online), default=to_ms - MINUTE_MS) - 1
    out = work_dir / "parity-replay"
    replay(lake, symbols, from_ms, to_ms, out, progress=progress, registry_path=registry_path, tail_ms=3_000)
    offline = {(r["symbol"], r["cadence"], r["window_end"]): r for r in iter_vectors(out, symbols=symbols)}
    shutil.rmtree(out, ignore_errors=True)
    rep = compare(online, offline, ParityReport((from_ms, to_ms), list(symbols)))
    p = Parity(from_ms, to_ms, rep.windows_online, rep.windows_offline, rep.windows_compared, rep.only_online,
               rep.only_offline, inconsistent)
    one_sided = sum(len(online[k]["values"]) for k in set(online) - set(offline)) + \
        sum(len(offline[k]["values"]) for k in set(offline) - set(online))
    p.values_total = rep.values_compared + one_sided
    p.values_identical = rep.values_compared - rep.value_mismatches
    p.meta_mismatches = dict(rep.meta_mismatches)
    p.null_reason_mismatches = rep.null_reason_mismatches
    p.by_cadence = dict(rep.by_cadence)
    p.mismatches_by_feature = dict(rep.mismatches_by_feature)
    p.examples = rep.examples[:10]
    if dump is not None:  # the windows that differ, both sides, for the post-mortem
        with open(dump, "w") as fh:
            n = 0
            for key in sorted(set(online) | set(offline)):
                a, b = online.get(key), offline.get(key)
                if a is not None and b is not None and records_equal(a, b):
                    continue
                fh.write(json.dumps({"key": list(key), "online": a, "offline": b}, default=str) + "\n")
                n += 1
                if n >= 1000:
                    break
    return p, online


@dataclass
class Served:
    per_symbol: dict = field(default_factory=dict)  # symbol -> {minutes, served, degraded, skipped, missing, pct}

    @property
    def lowest(self) -> float | None:
        vals = [v["pct"] for v in self.per_symbol.values() if v["pct"] is not None]
        return min(vals) if vals else None


def audit_served(lake_root: str, online: dict, symbols: list[str], last_minute: int, wait_s: float = 30.0) -> Served:
    """Minutes from each symbol's first live m1 vector to ``last_minute`` (inclusive) with a forecast."""
    from deltalake import DeltaTable

    from api.store import PREDICTIONS

    uri = str(Path(lake_root) / PREDICTIONS)
    first = {}
    for (sym, cadence, wend), rec in online.items():
        if cadence == "m1" and not rec.get("history"):
            first[sym] = min(first.get(sym, wend), wend)
    deadline = time.monotonic() + wait_s
    while True:
        rows = []
        if DeltaTable.is_deltatable(uri):
            rows = DeltaTable(uri).to_pyarrow_table(columns=["symbol", "origin_ts", "status", "reason"]).to_pylist()
        status: dict[tuple, set] = defaultdict(set)
        reasons: dict[tuple, str] = {}
        for r in rows:
            status[(r["symbol"], r["origin_ts"])].add(r["status"])
            if r["status"] == "degraded" and r["reason"]:
                reasons[(r["symbol"], r["origin_ts"])] = r["reason"]
        if all((s, last_minute) in status for s in symbols if s in first) or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    out = Served()
    for s in symbols:
        if s not in first:
            out.per_symbol[s] = {"minutes": 0, "served": 0, "degraded": 0, "skipped": 0, "missing": 0, "pct": None,
                                 "from": None, "to": last_minute}
            continue
        start = first[s] - MINUTE_MS
        minutes = list(range(start, last_minute + MINUTE_MS, MINUTE_MS))
        c = Counter()
        why = Counter()  # what degraded the degraded minutes, numbers stripped so that alike reasons add up
        missing = []
        for m in minutes:
            st = status.get((s, m), set())
            if "served" in st:
                c["served"] += 1
            elif "degraded" in st:
                c["degraded"] += 1
                for part in reasons.get((s, m), "").split("; "):
                    if part:
                        why[re.sub(r"\d+", "N", part)] += 1
            elif "skipped" in st:
                c["skipped"] += 1
                missing.append(m)
            else:
                c["missing"] += 1
                missing.append(m)
        n = len(minutes)
        out.per_symbol[s] = {"minutes": n, "served": c["served"], "degraded": c["degraded"], "skipped": c["skipped"],
                             "missing": c["missing"], "pct": 100.0 * (c["served"] + c["degraded"]) / n if n else None,
                             "from": start, "to": last_minute, "without_forecast": missing[:20],
                             "degraded_reasons": why.most_common(3)}
    return out


# ------------------------------------------------------------------------------- the report
def report_text(soak: Soak, eo: ExactlyOnce, par: Parity, served: Served) -> str:
    cfg = soak.cfg
    L = []
    L.append("tickcast soak report")
    L.append(f"run      {utc(soak.faults_from)} .. {utc(soak.faults_to)}: {cfg.minutes:g} min, a fault every "
             f"{cfg.fault_every_s:g} s, symbols {','.join(soak.symbols)}")
    L.append(f"stack    tansu (memory storage) behind a cuttable TCP proxy; local exchange model seed {cfg.seed} at "
             f"speed 1 (Bybit's cadence), order book depth {soak.settings.orderbook_depth}; gateway, raw archive, feature flow (recovery), API with champion v{soak.champion} "
             f"(trained in {soak.timings.get('champion_s', 0):.0f} s on {cfg.train_days:g} days of the exchange's "
             f"REST history), dashboard; up in {soak.timings.get('startup_s', 0):.0f} s")
    L.append(f"run dir  {soak.run_dir if soak.temp is None else str(soak.report_dir) + ' (data removed)'}; "
             f"audit {soak.timings.get('audit_s', 0):.0f} s (archive caught up "
             f"{soak.timings.get('archive_catch_up_s', 0):.0f} s after the gateway stopped)")
    L.append("")
    L.append(f"faults injected: {len(soak.faults)}  (broker partition = the TCP proxy in front of tansu cut for "
             f"{cfg.cut_s:g} s: tansu keeps its data in memory only, so a broker process restart would lose it all)")
    L.append(f"  {'#':>3} {'t+s':>7}  {'fault':22s} {'target':34s} recovery")
    for r in soak.faults:
        L.append(f"  {r.n:3d} {r.t_rel:7.1f}  {r.label:22s} {r.target[:34]:34s} {_recovery_text(r)}")
    kinds = Counter(r.kind for r in soak.faults)
    not_rec = [r.n for r in soak.faults if not r.recovered]
    L.append(f"  per kind: {', '.join(f'{FAULT_LABEL[k]} x{kinds[k]}' for k in FAULTS if kinds[k])}")
    L.append(f"  recovered: {len(soak.faults) - len(not_rec)}/{len(soak.faults)}"
             + (f"; NOT recovered: {not_rec}" if not_rec else ""))
    for label, vals in (("healthy", [r.healthy_s for r in soak.faults if r.healthy_s is not None]),
                        ("data flows", [r.data_s for r in soak.faults if r.data_s is not None])):
        if vals:
            vals = sorted(vals)
            L.append(f"  time until {label}: median {vals[len(vals) // 2]:.1f} s, max {vals[-1]:.1f} s")
    L.append("")
    L.append("exactly once: the exchange's sent log (every connection) parsed with the gateway's parser vs the "
             "raw archive")
    L.append(f"  data frames sent {eo.frames} over {eo.connections} connections -> events "
             f"{dict(sorted(eo.events_sent.items()))}; archived {dict(sorted(eo.archived.items()))}")
    L.append(f"  lost {eo.lost}, duplicated {eo.duplicated} (of which {eo.extra} archive rows no frame explains)")
    L.append(f"  excluded: {eo.history_klines} start-up history klines (REST, published by each gateway start); "
             f"{eo.optional_funding_archived} funding events derived from a reconnect's ticker snapshot")
    tl = sum(d["events"] for d in eo.transport_loss.values())
    L.append(f"  transport loss at injected cuts: {tl} events (frames the exchange wrote to a socket that was being "
             f"cut, never received by a gateway)")
    for fault, d in sorted(eo.transport_loss.items()):
        L.append(f"    {fault}: {d['events']} events, written within {d['max_age_s']:.2f} s before the "
                 f"connection ended (conn {d['conn_id']})")
    L.append(f"  malformed frames sent {eo.malformed_sent}: dead letters archived {eo.dead_letters}, lost "
             f"{eo.malformed_lost}, lost in transport {eo.malformed_transport_loss}")
    if eo.parse_errors:
        L.append(f"  data frames the parser refused (dead letters, not matched): {eo.parse_errors}")
    for ex in eo.examples[:10]:
        L.append(f"    e.g. {ex}")
    L.append("")
    L.append(f"parity: every vector on features.live (start-up history included) vs an uninterrupted offline "
             f"replay of the archive, windows ending in "
             f"({utc(par.from_ms / 1000)}, {utc(par.to_ms / 1000)}]")
    L.append(f"  windows online {par.windows_online}, offline {par.windows_offline}, compared {par.windows_compared} "
             f"{dict(sorted(par.by_cadence.items()))}, only online {par.only_online}, only offline "
             f"{par.only_offline}, published twice with different values {par.online_inconsistent}")
    L.append(f"  values bit-identical {par.values_identical}/{par.values_total} = {pct_text(par.pct)} %; "
             f"null-reason mismatches {par.null_reason_mismatches}, metadata mismatches {par.meta_mismatches}")
    for name, n in sorted(par.mismatches_by_feature.items(), key=lambda kv: -kv[1])[:10]:
        L.append(f"    {name}: {n}")
    for ex in par.examples[:5]:
        L.append(f"    e.g. {ex}")
    L.append("")
    L.append("minutes served (api_predictions; from each symbol's first live 1-minute vector to the last closed "
             "minute)")
    for s, v in served.per_symbol.items():
        L.append(f"  {s:10s} {v['served'] + v['degraded']}/{v['minutes']} = {pct_text(v['pct'])} % "
                 f"(degraded {v['degraded']}, skipped {v['skipped']}, no row {v['missing']})"
                 + (f"; without a forecast: {[utc(m / 1000)[11:16] for m in v['without_forecast']]}"
                    if v.get("without_forecast") else ""))
        for reason, n in v.get("degraded_reasons", []):
            L.append(f"    degraded {n}x: {reason}")
    L.append("")
    L.append(f"lost={eo.lost} duplicated={eo.duplicated} served={pct_text(served.lowest)} parity={pct_text(par.pct)}")
    return "\n".join(L)


def run_soak(cfg: SoakConfig, out=None) -> dict:
    """Run the soak; returns the report as a dict (``text`` is the printed report)."""
    soak = Soak(cfg, out)
    result: dict = {}
    try:
        soak.start()
        soak.say(f"soak: injecting a fault every {cfg.fault_every_s:g} s for {cfg.minutes:g} min")
        soak.run_faults()
        soak.say(f"soak: faults stopped; draining {cfg.drain_s:g} s")
        soak.phase_t0 = None
        time.sleep(cfg.drain_s)
        soak.stop_feed()
        soak.say("soak: gateway stopped; reading the exchange's sent log and waiting for the archive")
        t_audit = time.monotonic()
        sent = soak.sent_log()
        archive_s = soak.wait_archive()
        soak.wait_features_idle()
        soak.timings["archive_catch_up_s"] = archive_s
        from flows.lake import Lake

        lake = Lake(soak.settings.lake_root)
        eo = audit_exactly_once(sent, lake, soak.symbols, soak.conn_fault, cfg.tail_s)
        del sent
        soak.say(f"soak: archive caught up in {archive_s:.0f} s; replaying the archive for parity")
        # every window that closed before the feed stopped (heartbeats close them up to the stop)
        to_ms = (soak.stop_ms - 5_000) // 1000 * 1000
        par, online = audit_parity(soak.broker.bootstrap, lake, soak.symbols, to_ms, soak.run_dir, cfg.progress,
                                   soak.report_dir / "parity-mismatches.jsonl", str(soak.registry))
        last_minute = (soak.stop_ms - 5_000) // MINUTE_MS * MINUTE_MS - MINUTE_MS  # its window closed before the stop
        served = audit_served(soak.settings.lake_root, online, soak.symbols, last_minute)
        soak.timings["audit_s"] = time.monotonic() - t_audit
        text = report_text(soak, eo, par, served)
        result = {"lost": eo.lost, "duplicated": eo.duplicated, "served": served.lowest, "parity": par.pct,
                  "faults": [asdict(r) for r in soak.faults], "exactly_once": _jsonable(vars(eo)),
                  "parity_detail": _jsonable(vars(par)), "served_detail": served.per_symbol,
                  "timings": soak.timings, "run_dir": str(soak.run_dir), "report_dir": str(soak.report_dir),
                  "text": text}
        (soak.report_dir / "report.txt").write_text(text + "\n")
        (soak.report_dir / "report.json").write_text(json.dumps(result, indent=1, default=str))
        print(text, file=soak.out, flush=True)
        return result
    finally:
        soak.shutdown()
        soak.collect_logs()


def _jsonable(d):
    """Plain JSON values (not dataclasses.asdict: it rebuilds a Counter from its items)."""
    if isinstance(d, dict):
        return {str(k): _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def passed(result: dict) -> bool:
    """The issue's bar: nothing lost or duplicated, parity 100 %, >= 99 % of minutes served, every
    fault recovered."""
    return (result.get("lost") == 0 and result.get("duplicated") == 0 and result.get("parity") == 100.0
            and (result.get("served") or 0) >= 99.0 and all(f["recovered"] for f in result.get("faults", [])))
