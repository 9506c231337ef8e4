"""The dashboard end to end in a real browser: the real API (uvicorn on 127.0.0.1, the embedded broker,
an MLflow registry under tmp holding contract ONNX models), the dashboard as a ``tickcast ui``
subprocess (``panel serve``), and Debian's headless Chromium driven by Playwright.

The story: the dashboard starts before the API (it must say the API is unreachable), the API then
starts with an empty registry (no model yet), a champion is registered and m1 feature vectors from a
simulated venue flow on features.live, one minute every ~1.1 s, with the champion moved between a
BUY-leaning and a SELL-leaning version (signals fire) and price jumps (alerts). The browser must show
candles, the fan, markers and numbers that change over time, an empty state for a symbol without data,
and every tab with its charts; a screenshot of each goes to tests/artifacts/.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SYMS = ["TUIAUSDT", "TUIBUSDT", "TUICUSDT"]  # C never gets data: the "symbol without data" state
A, B, C = SYMS
VARIATES = ["close", "log_return_1m", "range_rel_1m", "body_rel_1m"]
L, H = 8, 5
MODEL = "tickcast-ui-test"
MIN = 60_000


# ------------------------------------------------------------------------------------ helpers
def chromium_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, capture_output=True, timeout=300, env=env)
        subprocess.run(["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=600, env=env)
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium failed or needs root); "
                    "the browser test needs /usr/bin/chromium")
    return CHROMIUM


class Market:
    """A seeded 1-minute market: a random walk with occasional jumps, emitted as m1 FeatureVector
    records the way the online flow does (close, returns, candle shape, volume, a few book features),
    from a simulated venue."""

    def __init__(self, symbol: str, start: int, level: float, seed: int, venue: str = "sim.linear"):
        self.symbol, self.minute, self.close, self.venue = symbol, start, level, venue
        self.rng = random.Random(seed)
        self.seq = 0

    def next(self, jump: float = 0.0) -> dict:
        o = self.close
        c = o * math.exp(self.rng.gauss(0.0, 0.0012) + jump)
        hi = max(o, c) * (1 + abs(self.rng.gauss(0.0, 0.0006)))
        lo = min(o, c) * (1 - abs(self.rng.gauss(0.0, 0.0006)))
        vol = 50 + 400 * self.rng.random() + (3000 if jump else 0)
        self.seq += 1000
        now_us = time.time_ns() // 1000
        values = {"close": c, "log_return_1m": math.log(c / o), "range_rel_1m": (hi - lo) / c,
                  "body_rel_1m": (c - o) / o, "high": hi, "low": lo, "volume_1m": vol,
                  "log_volume_1m": math.log1p(vol), "trade_count_1m": float(int(vol / 3)),
                  "spread_rel": 1e-4 * (1 + self.rng.random()), "depth_imbalance_top5": self.rng.uniform(-1, 1),
                  "vpin_5m": self.rng.random(), "funding_rate": None}
        rec = {"symbol": self.symbol, "venue": self.venue, "cadence": "m1", "window_end": self.minute + MIN,
               "registry_hash": "", "values": values, "nulls": {"funding_rate": "no ticker yet"},
               "book_valid": True, "event_count": int(vol), "last_gw_seq": self.seq,
               "close_recv_ts": now_us - 900, "emit_ts": now_us}
        self.minute += MIN
        self.close = c
        return rec


class Publisher:
    def __init__(self, bootstrap: str):
        from confluent_kafka import Producer

        from tickcast.kafka import producer_config
        from tickcast.serde import Serde

        self.producer = Producer(producer_config(bootstrap))
        self.serde = Serde()

    def send(self, rec: dict) -> None:
        self.producer.produce("features.live", key=rec["symbol"].encode(),
                              value=self.serde.encode("FeatureVector", rec))

    def flush(self) -> None:
        assert self.producer.flush(10) == 0


def build_models(root: Path) -> dict[str, Path]:
    """Two contract models (a BUY-leaning and a SELL-leaning one) that ship a training distribution
    summary, so the API computes feature drift (PSI) for the Monitoring tab."""
    from api import contract_model, drift

    rng = random.Random(3)
    train = {"log_return_1m": [rng.gauss(0, 0.001) for _ in range(2000)],
             "range_rel_1m": [abs(rng.gauss(0.002, 0.0005)) for _ in range(2000)],
             "body_rel_1m": [rng.gauss(0, 0.001) for _ in range(2000)]}
    meta = {"feature_summary": drift.summarise(train)}
    up = contract_model.build(root / "up" / "model.onnx", VARIATES, lookback=L, horizon=H, drift=0.0006,
                              direction_p=(0.1, 0.2, 0.7), model_name=MODEL, model_version="up", extra_metadata=meta)
    down = contract_model.build(root / "down" / "model.onnx", VARIATES, lookback=L, horizon=H, drift=-0.0006,
                                direction_p=(0.7, 0.2, 0.1), model_name=MODEL, model_version="down",
                                extra_metadata=meta)
    return {"up": up, "down": down}


def set_champion(uri: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", version)


class ApiServer:
    """uvicorn api.main:app in a thread of the test process (as tests/test_api_server.py does)."""

    def __init__(self, bootstrap: str, registry_uri: str, root: Path, port: int):
        import uvicorn

        from api.main import create_app
        from api.service import ApiOptions
        from tickcast.config import load_settings

        settings = load_settings(symbols=SYMS, kafka_bootstrap=bootstrap, lake_root=str(root / "lake"),
                                 data_dir=str(root / "data"), mlflow_tracking_uri=registry_uri, model_name=MODEL)
        options = ApiOptions(champion_poll_s=0.3, batch_wait_s=0.3, heartbeat_s=2.0, sse_ping_s=5,
                             store_flush_s=0.2, psi_every_minutes=1, psi_window=40, model_wait_s=5.0)
        self.app = create_app(settings, options)
        self.base = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = httpx.get(f"{self.base}/health", timeout=2).json()
                if h["components"]["broker"]["detail"]["caught_up"]:
                    return self
            except (httpx.HTTPError, KeyError, ValueError, TypeError):
                pass
            time.sleep(0.2)
        raise AssertionError("the API did not become ready")

    def stop(self) -> None:
        self.app.state.hub.close_all()
        self.server.should_exit = True
        self.thread.join(20)


def start_dashboard(api_url: str, port: int, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "TICKCAST_API_URL": api_url, "TICKCAST_UI_PORT": str(port), "BOKEH_PY_LOG_LEVEL": "warning"}
    with open(log_path, "wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "tickcast.cli", "ui", "--poll-s", "0.4"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_listening(port: int, timeout: float, proc: subprocess.Popen, log_path: Path) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the dashboard exited: {log_path.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the dashboard did not listen on {port}: {log_path.read_text()[-3000:]}")


JS_SOURCE = """(name) => {
  for (const doc of (window.Bokeh && window.Bokeh.documents) || []) {
    const m = doc.get_model_by_name(name);
    if (m) { const d = m.data; const out = {}; for (const k of Object.keys(d)) out[k] = Array.from(d[k]); return out; }
  }
  return null;
}"""


class Page:
    """Small helpers over a Playwright page: Bokeh sources by name, texts by data-testid."""

    def __init__(self, page):
        self.page = page

    def source(self, name: str) -> dict | None:
        return self.page.evaluate(JS_SOURCE, name)

    def n(self, name: str, col: str = "x") -> int:
        d = self.source(name)
        return len(d[col]) if d and col in d else 0

    def text(self, testid: str) -> str | None:
        loc = self.page.locator(f"[data-testid='{testid}']")
        return loc.first.inner_text() if loc.count() else None

    def visible(self, testid: str) -> bool:
        loc = self.page.locator(f"[data-testid='{testid}']")
        return loc.count() > 0 and loc.first.is_visible()

    def wait(self, pred, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = pred()
            except Exception as exc:  # noqa: BLE001 - the page may be mid-update
                last = exc
            if last and not isinstance(last, Exception):
                return last
            self.page.wait_for_timeout(200)
        shot = self.shot("timeout_" + "".join(c if c.isalnum() else "_" for c in what)[:40])
        status = self.text("status-line")
        raise AssertionError(f"timed out waiting for {what} (last: {last!r}; status: {status}; screenshot {shot})")

    def tab(self, name: str) -> None:
        self.page.locator(".bk-tab", has_text=name).first.click()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"ui_{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


# ------------------------------------------------------------------------------------ the test
def test_dashboard_live_in_chromium(bootstrap, tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    from api import contract_model
    from tickcast.broker import free_port

    api_port, ui_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    log_path = tmp_path / "dashboard.log"
    dash = start_dashboard(api_url, ui_port, log_path)
    api = None
    pub = Publisher(bootstrap)
    try:
        models = build_models(tmp_path / "models")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        wait_listening(ui_port, 60, dash, log_path)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{ui_port}/app", timeout=60_000)
            P = Page(page)
            # 1. no API yet: a clear unreachable state, not blank plots
            P.wait(lambda: P.visible("banner-unreachable"), 25, "the API-unreachable banner")
            assert P.visible("live-state-unreachable")
            assert "unreachable" in P.text("banner-unreachable").lower()
            P.shot("unreachable")

            # 2. the API starts with an empty registry: "no model yet" once data flows
            api = ApiServer(bootstrap, uri, tmp_path / "api", api_port).start()
            t0 = (int(time.time() * 1000) // MIN) * MIN - 40 * MIN
            mkts = {A: Market(A, t0, 64_000.0, 1), B: Market(B, t0, 3_100.0, 2)}
            for _ in range(3):
                for m in mkts.values():
                    pub.send(m.next())
            pub.flush()
            P.wait(lambda: P.visible("live-state-no_model"), 40, "the no-model state")
            P.shot("no_model")

            # 3. a champion, a backlog of minutes, then live minutes with champion moves and jumps
            # both carry a baseline-vs-main comparison (what model.compare logs on a champion's run)
            cmp = {f"cmp_{m}_{t}_{k}": v * (0.97 if m == "main" else 1.0) for m in ("baseline", "main")
                   for t in ("close", "rv", "range") for k, v in (("pinball", 0.001), ("coverage", 0.8))}
            cmp_tags = {"cmp_main_extra_variates": "mempool_tx_count,mempool_fee_fastest"}
            v_up = contract_model.register(uri, MODEL, models["up"], artifact_root=tmp_path / "artifacts",
                                           metrics=cmp, tags=cmp_tags)
            v_down = contract_model.register(uri, MODEL, models["down"], artifact_root=tmp_path / "artifacts",
                                             alias=None, metrics=cmp, tags=cmp_tags)
            deadline = time.monotonic() + 20
            while httpx.get(f"{api.base}/model", timeout=5).json()["champion_version"] != v_up:
                assert time.monotonic() < deadline, "the API did not load the champion"
                time.sleep(0.2)
            for _ in range(22):
                for m in mkts.values():
                    pub.send(m.next())
                pub.flush()
                time.sleep(0.05)
            P.wait(lambda: P.n("live_candles") >= 15, 25, "candles")
            P.wait(lambda: P.n("live_fan") == H + 1, 15, "the forecast fan")

            state = {"i": 0, "stop": False}

            def live():
                while not state["stop"]:
                    i = state["i"]
                    if i % 6 == 3:
                        set_champion(uri, v_down if (i // 6) % 2 == 0 else v_up)
                    jump = 0.02 if i % 7 == 5 else 0.0
                    for m in mkts.values():
                        pub.send(m.next(jump))
                    pub.flush()
                    state["i"] += 1
                    time.sleep(1.1)

            feeder = threading.Thread(target=live, daemon=True)
            feeder.start()
            try:
                first = {"candles": P.source("live_candles"), "fan": P.source("live_fan"),
                         "close": P.text("last-close-value"), "median": P.text("fc-median-value")}
                assert first["close"] and first["close"] != "n/a" and first["median"] != "n/a"
                P.wait(lambda: state["i"] >= 5 and P.source("live_candles")["x"][-1] > first["candles"]["x"][-1],
                       30, "new candles streaming in")
                P.wait(lambda: P.source("live_fan")["x"][0] > first["fan"]["x"][0], 20, "the fan moving on")
                P.wait(lambda: {"BUY", "SELL"} <= set(P.source("live_signals")["action"]), 30,
                       "BUY and SELL markers")
                P.wait(lambda: P.n("live_alerts") >= 1, 30, "an alert marker")
                later = {"candles": P.source("live_candles"), "close": P.text("last-close-value")}
                assert later["close"] != first["close"]
                assert P.text("signal-action") in ("BUY", "SELL", "FLAT")
                assert int(P.text("n-fired-value")) >= 2 and int(P.text("n-alerts-value")) >= 1
                # candles are real OHLC: a wick spans the body
                cd = later["candles"]
                assert all(lo <= min(o, c) + 1e-9 and hi >= max(o, c) - 1e-9 for lo, hi, o, c in
                           zip(cd["wick_lo"], cd["wick_hi"], cd["top"], cd["bottom"]))
                assert page.locator("[data-testid='live-features'] tbody tr").count() >= 8
                assert P.visible("banner-simulated") and "SIMULATED" in P.text("banner-simulated")
                assert "live" in P.text("status-line")
                P.shot("live")

                # a second browser session: the dashboard still holds ONE SSE connection to the API
                page2 = browser.new_page(viewport={"width": 1200, "height": 800})
                page2.goto(f"http://127.0.0.1:{ui_port}/app", timeout=60_000)
                P2 = Page(page2)
                P2.wait(lambda: P2.n("live_candles") >= 15, 30, "candles in the second session")
                stream = httpx.get(f"{api.base}/health", timeout=10).json()["components"]["stream"]["detail"]
                assert stream["clients"] == 1, stream
                page2.close()

                # a symbol without data says so
                page.locator("select").first.select_option(C)
                P.wait(lambda: P.visible("live-state-no_data"), 15, "the no-data state of a symbol without data")
                assert C in P.text("live-state-no_data")
                page.locator("select").first.select_option(A)
                P.wait(lambda: P.n("live_candles") >= 15 and not P.visible("live-state-no_data"), 15,
                       "symbol A back")

                P.tab("Backtest")
                P.wait(lambda: P.n("bt_candles") >= 25 and P.n("bt_equity") >= 2, 30, "the backtest charts")
                P.wait(lambda: P.n("bt_trades") >= 1, 30, "trades on the backtest chart")
                assert P.text("bt-pnl-value") not in (None, "n/a")
                assert "%" in P.text("bt-hit-value")
                P.shot("backtest")

                P.tab("Strategy")
                P.wait(lambda: P.n("st_equity") >= 2 and P.n("st_monthly", "month") >= 1, 30, "the strategy P&L")
                assert P.text("st-sharpe-value") not in (None, "n/a")
                assert P.text("st-mdd-value").endswith("%")
                P.shot("strategy")

                P.tab("Model")
                P.wait(lambda: (P.text("model-version-value") or "").startswith("v"), 20, "the champion card")
                P.wait(lambda: P.n("model_calibration", "level") == 3, 30, "the calibration curve")
                assert P.text("skill-cov-value").endswith("%")
                assert P.visible("model-offline-missing") or P.visible("model-metrics")
                P.wait(lambda: P.visible("model-compare"), 20, "the baseline-vs-main comparison")
                assert "mempool_tx_count" in P.text("model-compare-title")
                assert "-3.0 %" in P.text("model-compare")
                P.shot("model")

                P.tab("Monitoring")
                P.wait(lambda: P.visible("mon-symbols") and P.n("mon_served", "symbol") == 3, 20, "monitoring")
                P.wait(lambda: P.n("mon_coverage") >= 1, 20, "coverage over time")
                health = P.text("mon-health")
                assert "broker" in health and "model" in health
                assert "inference" in P.text("mon-latency")
                P.wait(lambda: P.visible("mon-psi") and "log_return_1m" in P.text("mon-psi"), 20, "feature drift")
                P.shot("monitoring")
            finally:
                state["stop"] = True
                feeder.join(10)
            assert not errors, errors
            browser.close()
    finally:
        if api is not None:
            api.stop()
        pub.producer.flush(5)
        pub.producer = None  # frees the client before the session's broker stops
        if dash.poll() is None:
            dash.terminate()
            try:
                dash.wait(10)
            except subprocess.TimeoutExpired:
                dash.kill()
