"""The prediction service end to end: a real uvicorn server on 127.0.0.1, the embedded broker, a real
MLflow registry (sqlite under tmp) holding ONNX models that follow model/CONTRACT.md, real Delta tables.

Feature vectors are published on features.live the way the online flow does (Avro, keyed by symbol,
m1 cadence, window_end = end of the minute); the test watches the SSE stream, the REST endpoints and
signals.live. Symbols are test-only names so the session-wide broker's other traffic cannot interfere.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.slow

SYMS = ["TAPIAUSDT", "TAPIBUSDT", "TAPICUSDT", "TAPIDUSDT"]
A, B, C, D = SYMS
VARIATES = ["close", "log_return_1m", "range_rel_1m", "body_rel_1m"]
L, H = 8, 5
TOKEN = "test-token-7c1f"
MODEL = "tickcast-api-test"
MIN = 60_000
# minute grids far apart per test so that tests sharing the server cannot interact
BASE = (int(time.time() * 1000) // MIN) * MIN - 3 * 24 * 60 * MIN


# ------------------------------------------------------------------------------------ helpers
def fv(symbol: str, minute: int, close: float, *, prev: float | None = None, open_: float | None = None,
       spread: float = 0.0002, seq: int = 0, venue: str = "test.api", drop: tuple[str, ...] = ()) -> dict:
    o = open_ if open_ is not None else (prev if prev is not None else close)
    hi = max(o, close) * (1 + spread)
    lo = min(o, close) * (1 - spread)
    values = {"close": close, "log_return_1m": math.log(close / prev) if prev else None,
              "range_rel_1m": (hi - lo) / close, "body_rel_1m": (close - o) / o, "high": hi, "low": lo}
    nulls = {}
    for k in drop:
        values[k] = None
        nulls[k] = "dropped by the test"
    if values["log_return_1m"] is None:
        nulls["log_return_1m"] = "no previous close"
    now_us = time.time_ns() // 1000
    return {"symbol": symbol, "venue": venue, "cadence": "m1", "window_end": minute + MIN, "registry_hash": "",
            "values": values, "nulls": nulls, "book_valid": True, "event_count": 42, "last_gw_seq": seq,
            "close_recv_ts": now_us, "emit_ts": now_us}


class Publisher:
    def __init__(self, bootstrap: str):
        from confluent_kafka import Producer

        from tickcast.kafka import producer_config
        from tickcast.serde import Serde

        self.producer = Producer(producer_config(bootstrap))
        self.serde = Serde()
        self.last: dict[str, float] = {}

    def minute(self, symbol: str, minute: int, close: float, **kw) -> None:
        rec = fv(symbol, minute, close, prev=self.last.get(symbol), **kw)
        self.last[symbol] = close
        self.producer.produce("features.live", key=symbol.encode(), value=self.serde.encode("FeatureVector", rec))

    def raw(self, key: bytes, value: bytes) -> None:
        self.producer.produce("features.live", key=key, value=value)

    def flush(self) -> None:
        assert self.producer.flush(10) == 0


class SSE:
    """A streaming SSE client on its own thread; events: dicts with event, id, data, t (receipt, µs)."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url, self.headers = url, headers or {}
        self.events: list[dict] = []
        self.status: int | None = None
        self._resp = None
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=30.0))
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "SSE connection not established"

    def _run(self) -> None:
        try:
            with self._client.stream("GET", self.url, headers=self.headers) as r:
                self._resp = r
                self.status = r.status_code
                self.ready.set()
                ev: dict = {}
                for line in r.iter_lines():
                    if line == "":
                        if ev:
                            ev["t"] = time.time_ns() // 1000
                            if "data" in ev:
                                try:
                                    ev["data"] = json.loads(ev["data"])
                                except ValueError:
                                    pass
                            self.events.append(ev)
                        ev = {}
                        continue
                    if line.startswith(":"):
                        continue
                    k, _, v = line.partition(":")
                    v = v.removeprefix(" ")
                    ev[k] = ev[k] + "\n" + v if k == "data" and k in ev else v
        except Exception:
            pass
        finally:
            self.ready.set()

    def of(self, event: str, symbol: str | None = None) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == event
                and (symbol is None or (isinstance(e.get("data"), dict) and e["data"].get("symbol") == symbol))]

    def wait(self, pred, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred(self)
            if got:
                return got
            time.sleep(0.05)
        raise AssertionError(f"timed out; events so far: {[(e.get('event'), e.get('id')) for e in self.events][-20:]}")

    def close(self) -> None:
        try:
            if self._resp is not None:
                self._resp.close()
        except Exception:
            pass
        self._client.close()
        self.thread.join(5)


def calm(i: int, level: float = 100.0, drift: float = 0.002) -> float:
    """A calm series: a steady drift of 0.2 %/min (what the test champion v1 forecasts) plus an
    alternating wiggle of +-0.05 %."""
    return level * math.exp(drift * i + 0.0005 * (i % 2))


def training_summary() -> dict:
    """The training distribution the test models ship (tickcast.feature_summary): closes around 100."""
    from api.drift import summarise

    rng = np.random.default_rng(5)
    return summarise({"close": 100 * np.exp(rng.normal(0, 0.01, 5000)),
                      "log_return_1m": rng.normal(0, 0.002, 5000)})


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from api import contract_model

    root = tmp_path_factory.mktemp("api-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    path = contract_model.build(root / "v1" / "model.onnx", VARIATES, lookback=L, horizon=H, drift=0.002,
                                direction_p=(0.1, 0.2, 0.7), model_name=MODEL, model_version="1",
                                extra_metadata={"feature_summary": training_summary()})
    v1 = contract_model.register(uri, MODEL, path, artifact_root=root / "artifacts",
                                 metrics={"val_close_pinball": 0.00123, "val_close_coverage": 0.8})
    return {"root": root, "uri": uri, "v1": v1}


@pytest.fixture(scope="module")
def server(bootstrap, registry, tmp_path_factory):
    import uvicorn

    from api.main import create_app
    from api.service import ApiOptions
    from tickcast.broker import free_port
    from tickcast.config import load_settings

    root = tmp_path_factory.mktemp("api-server")
    settings = load_settings(symbols=SYMS, kafka_bootstrap=bootstrap, lake_root=str(root / "lake"),
                             data_dir=str(root / "data"), mlflow_tracking_uri=registry["uri"], model_name=MODEL,
                             api_token=TOKEN, cors_origins=["http://dash.example"])
    options = ApiOptions(champion_poll_s=0.3, batch_wait_s=0.4, heartbeat_s=1.0, sse_ping_s=5, store_flush_s=0.2,
                         sse_buffer=400, psi_every_minutes=1, psi_window=40)
    app = create_app(settings, options)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                        timeout_graceful_shutdown=2))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            h = httpx.get(f"{base}/health", timeout=2).json()
            if h["components"]["model"]["status"] == "ok" and h["components"]["broker"]["detail"]["caught_up"]:
                break
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    else:
        raise AssertionError("the API did not become ready")
    yield {"base": base, "app": app, "settings": settings, "registry": registry}
    app.state.hub.close_all()
    srv.should_exit = True
    th.join(20)


@pytest.fixture(scope="module")
def pub(bootstrap):
    p = Publisher(bootstrap)
    yield p
    p.producer.flush(5)
    del p.producer


def get(server, path, **params):
    return httpx.get(server["base"] + path, params=params, timeout=30)


def signals_live(bootstrap, symbol: str, idle_s: float = 1.0, timeout: float = 20.0) -> list[tuple[str, dict]]:
    """Every record of ``symbol`` on signals.live: read from the beginning until the topic is quiet."""
    from confluent_kafka import Consumer

    from tickcast.kafka import assign_all, consumer_config
    from tickcast.serde import Serde

    serde = Serde()
    c = Consumer(consumer_config(bootstrap, f"test-api-{time.time_ns()}"))
    assign_all(c, ["signals.live"])
    out = []
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < idle_s:
        m = c.poll(0.1)
        if m is None or m.error():
            continue
        last = time.monotonic()
        name, rec = serde.decode_any(m.value())
        if rec.get("symbol") == symbol:
            out.append((name, rec))
    c.close()
    return out


# ------------------------------------------------------------------------------------ tests
def test_forecast_and_signal_reach_sse_latest_and_kafka_within_the_minute(server, pub, bootstrap):
    sse = SSE(f"{server['base']}/signals/stream?symbol={A},{B}")
    try:
        assert sse.status == 200
        t0 = BASE
        sent_us = {}
        for i in range(L + 1):  # the first vector has no log return: origin L is the first clean window
            for sym in (A, B):
                pub.minute(sym, t0 + i * MIN, calm(i))
            pub.flush()
            sent_us[t0 + i * MIN] = time.time_ns() // 1000
            time.sleep(0.1)  # minutes come one after the other (60 s apart live), not as one burst
        last = t0 + L * MIN
        sse.wait(lambda s: [e for e in s.of("forecast", A) + s.of("forecast", B) if e["data"]["origin_ts"] == last]
                 if len([e for e in s.of("forecast") if e["data"]["origin_ts"] == last]) == 2 else None)
        sse.wait(lambda s: len([e for e in s.of("signal") if e["data"]["origin_ts"] == last]) == 2)
        fc = next(e for e in sse.of("forecast", A) if e["data"]["origin_ts"] == last)
        # within the minute: from the moment the minute's vector was published to receipt on SSE
        assert fc["t"] - sent_us[last] < 5_000_000
        data = fc["data"]
        assert data["model_version"] == server["registry"]["v1"] and not data["degraded"]
        assert data["horizon"] == H and data["quantile_levels"] == [0.1, 0.5, 0.9]
        c_t = calm(L)
        assert data["last_close"] == pytest.approx(c_t)
        # prices follow the contract: C_t * exp(q); the drift model's median is drift * h
        assert data["close_path"][H - 1][1] == pytest.approx(c_t * math.exp(0.002 * H), rel=1e-5)
        for step in data["close_path"]:
            assert step == sorted(step)
        # the first minutes had too little history: a FLAT signal that says why, never a silent gap
        first = [e for e in sse.of("signal", A) if e["data"]["origin_ts"] == t0]
        assert first and first[0]["data"]["action"] == "FLAT" and "no forecast" in first[0]["data"]["reason"]
        assert first[0]["data"]["degraded"]
        # origin 6 has one of its 8 lookback minutes before the data started: degraded, with the reason
        deg = [e for e in sse.of("forecast", A) if e["data"]["origin_ts"] == t0 + 6 * MIN]
        assert deg and deg[0]["data"]["degraded"] and "lookback minutes missing" in deg[0]["data"]["reason"]
        sig = next(e for e in sse.of("signal", A) if e["data"]["origin_ts"] == last)["data"]
        assert sig["action"] == "BUY" and 0 < sig["strength"] <= 1 and "p_up" in sig["reason"]
        # /predictions/latest has the same forecast and signal
        lp = get(server, "/predictions/latest", symbol=A.lower()).json()
        assert lp["status"] == "served" and lp["forecast"]["origin_ts"] == last
        assert lp["forecast"]["close_path"] == data["close_path"] and lp["signal"]["action"] == "BUY"
        # and signals.live carries Forecast and Signal records
        # origins 0-4 lack history (5 FLAT signals saying why), 5-8 have forecasts (4 + 4)
        recs = [(n, r) for n, r in signals_live(bootstrap, B) if t0 <= r["origin_ts"] <= last]
        assert len(recs) == 13
        names = {(n, r["origin_ts"]) for n, r in recs}
        assert ("Forecast", last) in names and ("Signal", last) in names and ("Signal", t0) in names
        # inference ran batched across the two symbols
        text = get(server, "/metrics").text
        batched = [ln for ln in text.splitlines() if ln.startswith('tickcast_api_inference_batch_size_bucket{le="2.0"}')]
        single = [ln for ln in text.splitlines() if ln.startswith('tickcast_api_inference_batch_size_bucket{le="1.0"}')]
        assert float(batched[0].split()[-1]) > float(single[0].split()[-1]), [ln for ln in text.splitlines() if "batch_size" in ln or "inference_seconds_count" in ln]
        assert f'tickcast_api_minutes_served_total{{quality="full",symbol="{A}"}}' in text
        # the latest m1 vector is served back
        fl = get(server, "/features/latest", symbol=A).json()
        assert fl["window_end"] == last + MIN and fl["values"]["close"] == pytest.approx(c_t)
    finally:
        sse.close()


def test_last_event_id_resume(server, pub):
    sse = SSE(f"{server['base']}/signals/stream?symbol={A}")
    t0 = BASE + (L + 1) * MIN
    try:
        pub.minute(A, t0, calm(L + 1))
        pub.flush()
        sse.wait(lambda s: [e for e in s.of("signal", A) if e["data"]["origin_ts"] == t0])
        last_id = max(int(e["id"]) for e in sse.events if "id" in e)
    finally:
        sse.close()
    for i in range(1, 4):  # missed while disconnected
        pub.minute(A, t0 + i * MIN, calm(L + 1 + i))
    pub.flush()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lp = get(server, "/predictions/latest", symbol=A).json()
        if lp["signal"]["origin_ts"] == t0 + 3 * MIN:
            break
        time.sleep(0.1)
    resumed = SSE(f"{server['base']}/signals/stream?symbol={A}", headers={"Last-Event-ID": str(last_id)})
    try:
        resumed.wait(lambda s: s.of("heartbeat"))
        replay = [e for e in resumed.events if "id" in e]
        ids = [int(e["id"]) for e in replay]
        assert ids == sorted(ids) and len(ids) == len(set(ids)) and ids[0] > last_id
        origins = sorted({e["data"]["origin_ts"] for e in replay})
        assert origins == [t0 + i * MIN for i in range(1, 4)]
        assert {e["event"] for e in replay} == {"forecast", "signal"}
        hb = resumed.of("heartbeat")[0]["data"]
        assert not hb.get("gap") and hb["model_version"]
    finally:
        resumed.close()
    # a resume point older than the buffer says so in the first heartbeat
    old = SSE(f"{server['base']}/signals/stream?symbol={A}&last_event_id=1")
    try:
        hb = old.wait(lambda s: s.of("heartbeat"))[0]["data"]
        assert hb["gap"] is True
    finally:
        old.close()
    bad = httpx.get(f"{server['base']}/signals/stream", headers={"Last-Event-ID": "abc"}, timeout=5)
    assert bad.status_code == 422 and "Last-Event-ID" in bad.json()["detail"]


def test_outcome_join_and_alert_on_a_crafted_series(server, pub, bootstrap):
    sse = SSE(f"{server['base']}/signals/stream?symbol={C}")
    t0 = BASE + 10 * 24 * 60 * MIN
    n_calm = L + H  # origin L-1 sees a calm future; the jump comes at minute L+H
    jump_origin = t0 + (L + H - H) * MIN  # the forecast whose horizon ends on the jump
    try:
        for i in range(n_calm):
            pub.minute(C, t0 + i * MIN, calm(i))
        jump_close = calm(n_calm - 1) * 1.05
        pub.minute(C, t0 + n_calm * MIN, jump_close, open_=calm(n_calm - 1))
        pub.flush()
        alerts = sse.wait(lambda s: [e for e in s.of("alert", C) if e["data"]["origin_ts"] == jump_origin]
                          if len([e for e in s.of("alert", C) if e["data"]["origin_ts"] == jump_origin]) >= 3
                          else None)
        by_target = {e["data"]["target"]: e["data"] for e in alerts}
        assert set(by_target) == {"close", "realized_vol", "price_range"}
        close_alert = by_target["close"]
        assert close_alert["direction"] == "above" and close_alert["actual"] == pytest.approx(jump_close)
        assert close_alert["actual"] > close_alert["q_high"]
        assert by_target["realized_vol"]["direction"] == "above"
        # realised values follow flows/targets.py: rv = sqrt(sum r^2) over t+1..t+H
        rets = [math.log(calm(i) / calm(i - 1)) for i in range(L + 1, n_calm)] + \
               [math.log(jump_close / calm(n_calm - 1))]
        assert by_target["realized_vol"]["actual"] == pytest.approx(math.sqrt(math.fsum(r * r for r in rets)))
        # the calm origin's close stayed inside its interval: no close alert for it
        calm_origin = t0 + (L - 1) * MIN
        assert not [e for e in sse.of("alert", C) if e["data"]["origin_ts"] == calm_origin
                    and e["data"]["target"] == "close"]
    finally:
        sse.close()
    # stored: outcomes joined into the history, alerts listed, Alert records on signals.live
    deadline = time.monotonic() + 10
    while True:
        hist = get(server, "/predictions/history", symbol=C, **{"from": str(t0), "to": str(t0 + 30 * MIN)}).json()
        items = {it["origin_ts"]: it for it in hist["items"]}
        if items.get(jump_origin, {}).get("outcome") and items.get(calm_origin, {}).get("outcome"):
            break
        assert time.monotonic() < deadline, hist
        time.sleep(0.2)
    out = items[jump_origin]["outcome"]
    assert out["status"] == "complete" and out["close_h"] == pytest.approx(jump_close)
    assert out["close_inside"] is False and out["rv_inside"] is False and out["range_inside"] is False
    calm_out = items[calm_origin]["outcome"]
    assert calm_out["close_inside"] is True and calm_out["close_h"] == pytest.approx(calm(L - 1 + H))
    # every stored outside-flag has its alert, and no alert lacks one
    al = get(server, "/alerts", symbol=C, **{"from": str(t0), "to": str(t0 + 30 * MIN)}).json()
    flagged = {(t, tgt) for t, it in items.items() if it["outcome"]
               for tgt, key in (("close", "close_inside"), ("realized_vol", "rv_inside"), ("price_range", "range_inside"))
               if it["outcome"][key] is False}
    assert {(a["origin_ts"], a["target"]) for a in al["items"]} == flagged
    recs = signals_live(bootstrap, C)
    kafka_alerts = {(r["origin_ts"], r["target"]) for n, r in recs if n == "Alert"}
    assert kafka_alerts == flagged
    text = get(server, "/metrics").text
    assert f'tickcast_api_interval_coverage{{symbol="{C}",target="close"}}' in text
    assert f'tickcast_api_alerts_total{{direction="above",symbol="{C}",target="close"}} 1.0' in text


def test_data_gap_is_recorded_and_the_next_forecast_is_degraded(server, pub):
    t0 = BASE + 20 * 24 * 60 * MIN
    for i in list(range(L)) + [L + 1, L + 2]:  # minute L is missing
        pub.minute(D, t0 + i * MIN, calm(i))
    pub.flush()
    deadline = time.monotonic() + 15
    while True:
        hist = get(server, "/predictions/history", symbol=D, **{"from": str(t0), "to": str(t0 + 20 * MIN)}).json()
        items = {it["origin_ts"]: it for it in hist["items"]}
        if t0 + (L + 2) * MIN in items and t0 + L * MIN in items:
            break
        assert time.monotonic() < deadline, hist
        time.sleep(0.2)
    gap = items[t0 + L * MIN]
    assert gap["status"] == "skipped" and "data gap" in gap["reason"]
    after = items[t0 + (L + 1) * MIN]
    assert after["status"] == "degraded" and "1 of 8 lookback minutes missing" in after["reason"]
    assert [t for t in range(t0, t0 + (L + 3) * MIN, MIN) if t not in items] == []  # no silent gap
    text = get(server, "/metrics").text
    assert f'tickcast_api_data_gaps_total{{symbol="{D}"}} 1.0' in text
    mon = get(server, "/monitoring").json()["symbols"][D]
    assert mon["data_gap_minutes"] == 1 and mon["minutes_degraded"] >= 1


def test_champion_hot_swap_mid_stream_misses_no_minute(server, pub):
    from api import contract_model

    reg = server["registry"]
    path2 = contract_model.build(reg["root"] / "v2" / "model.onnx", VARIATES, lookback=L, horizon=H, drift=-0.002,
                                 direction_p=(0.7, 0.2, 0.1), model_name=MODEL, model_version="2",
                                 extra_metadata={"signal": {"threshold": 0.2, "hold": 1},
                                                 "feature_summary": training_summary()})
    t0 = BASE + 30 * 24 * 60 * MIN
    n = 40
    swapped_at = None
    for i in range(n):
        for sym in (A, B):
            pub.minute(sym, t0 + i * MIN, calm(i))
        pub.flush()
        if i == 12:
            v2 = contract_model.register(reg["uri"], MODEL, path2, artifact_root=reg["root"] / "artifacts")
            swapped_at = i
        time.sleep(0.08)
    assert swapped_at is not None
    deadline = time.monotonic() + 20
    while True:
        hist = get(server, "/predictions/history", symbol=A, **{"from": str(t0), "to": str(t0 + n * MIN)}).json()
        if len(hist["items"]) >= n and hist["items"][-1]["origin_ts"] == t0 + (n - 1) * MIN:
            break
        assert time.monotonic() < deadline, len(hist["items"])
        time.sleep(0.2)
    items = hist["items"]
    origins = [it["origin_ts"] for it in items]
    assert origins == [t0 + i * MIN for i in range(n)]  # one prediction per minute, none missing
    versions = [it["model_version"] for it in items[L:]]
    assert versions[0] == reg["v1"] and versions[-1] == v2
    k = versions.index(v2)
    assert set(versions[:k]) == {reg["v1"]} and set(versions[k:]) == {v2}  # one clean switch
    assert all(it["status"] == "served" for it in items[L:])
    actions = [it["action"] for it in items[L:]]
    assert set(actions[:k]) == {"BUY"} and set(actions[k:]) == {"SELL"}
    assert "threshold 0.200 tuned on validation" in items[-1]["signal_reason"]
    model = get(server, "/model").json()
    assert model["champion_version"] == v2 and model["swaps"][-1] == {**model["swaps"][-1], "from": reg["v1"], "to": v2}
    assert model["signal"] == {"threshold": 0.2, "hold": 1}


def test_mutating_endpoints_need_the_bearer_token(server):
    base = server["base"]
    for path, body in (("/model/reload", None), ("/feature-registry/reload", None),
                       ("/dataset/build", {"start": "2026-01-01", "end": "2026-01-02"}),
                       ("/model/train", {"dataset_id": "ds-0123456789abcdef"})):
        r = httpx.post(base + path, json=body, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.post(base + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=10)
        assert r.status_code == 401 and r.json()["detail"] == "invalid bearer token"
    ok = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(base + "/model/reload", headers=ok, timeout=30)
    assert r.status_code == 200 and r.json()["champion_version"]
    r = httpx.post(base + "/feature-registry/reload", headers=ok, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["registry_hash"]) == 16 and r.json()["m1_features"] > 0
    r = httpx.post(base + "/dataset/build", headers=ok, json={"start": "2026-01-02", "end": "2026-01-01"}, timeout=30)
    assert r.status_code == 422 and "before" in r.json()["detail"]
    r = httpx.post(base + "/dataset/build", headers=ok, json={"start": "x", "end": "2026-01-01"}, timeout=30)
    assert r.status_code == 422
    r = httpx.post(base + "/dataset/build", headers=ok,
                   json={"start": "2026-01-01", "end": "2026-01-02", "symbols": ["NOPEUSDT"]}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(base + "/model/train", headers=ok, json={"dataset_id": "ds-0123456789abcdef"}, timeout=30)
    assert r.status_code == 404
    r = httpx.post(base + "/model/train", headers=ok, json={"dataset_id": "../../etc/passwd"}, timeout=30)
    assert r.status_code == 422


def test_dataset_build_and_train_jobs_run_in_child_processes(server):
    """A real dataset build from klines in the API's lake (the repo's fixture candles), listed afterwards;
    a training job on it runs model/train.py in a child process and reports its outcome."""
    from flows.kline_history import _parse_ts, import_klines, make_kline
    from flows.lake import Lake
    from tests.test_datasets import ROWS

    settings = server["settings"]
    recs = [make_kline(B, "1", _parse_ts(r[0]), r[1], r[2], r[3], r[4], r[5], None, "bybit.linear.csv") for r in ROWS]
    import_klines(Lake(str(settings.lake_root)), recs, source="test")
    start, end = _parse_ts(ROWS[0][0]), _parse_ts(ROWS[-1][0]) + MIN
    ok = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(server["base"] + "/dataset/build", headers=ok, timeout=30,
                   json={"symbols": [B.lower()], "start": str(start + 61 * MIN), "end": str(end)})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "dataset_build" and job["status"] in ("queued", "running")
    assert job["params"]["symbols"] == [B]
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
        job = get(server, f"/dataset/build/{job['id']}").json()
    assert job["status"] == "succeeded", job
    ds_id = job["result"]["dataset_id"]
    listed = get(server, "/dataset/list").json()
    assert listed["available"] and ds_id in [d["dataset_id"] for d in listed["datasets"]]
    assert (Path(settings.data_dir) / "datasets" / ds_id / "manifest.json").is_file()
    r = httpx.post(server["base"] + "/model/train", headers=ok, timeout=30,
                   json={"dataset_id": ds_id, "config": {"epochs": 1, "threads": 1}})
    assert r.status_code == 202, r.text
    tj = r.json()
    assert tj["kind"] == "train" and tj["params"]["dataset_id"] == ds_id
    deadline = time.monotonic() + 240
    while tj["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, tj
        time.sleep(1.0)
        tj = get(server, f"/model/train/{tj['id']}").json()
    # 240 candles cannot fill a 240-minute lookback plus the horizon: the trainer says so, the job reports it
    assert tj["status"] in ("succeeded", "failed") and tj["finished_ts"] >= tj["started_ts"]
    if tj["status"] == "failed":
        assert tj["returncode"] != 0 and tj["error"] and tj["log_tail"]
    r = httpx.post(server["base"] + "/model/train", headers=ok, timeout=30,
                   json={"dataset_id": ds_id, "config": {"lr": 0.1}})
    assert r.status_code == 422 and "config.lr" in r.json()["detail"]


def test_no_token_configured_refuses_mutations_and_cors(registry, tmp_path):
    import anyio

    from api.main import create_app
    from tickcast.config import load_settings

    settings = load_settings(symbols=SYMS, lake_root=str(tmp_path / "lake"), data_dir=str(tmp_path / "d"),
                             mlflow_tracking_uri=registry["uri"], model_name=MODEL, cors_origins=["http://ok.example"])
    app = create_app(settings)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/model/reload", headers={"Authorization": "Bearer anything"})
            assert r.status_code == 503 and "TICKCAST_API_TOKEN" in r.json()["detail"]
            r = await c.options("/symbols", headers={"Origin": "http://ok.example",
                                                     "Access-Control-Request-Method": "GET"})
            assert r.headers.get("access-control-allow-origin") == "http://ok.example"
            r = await c.options("/symbols", headers={"Origin": "http://evil.example",
                                                     "Access-Control-Request-Method": "GET"})
            assert "access-control-allow-origin" not in r.headers

    anyio.run(go)


def test_bad_parameters_get_clear_4xx(server):
    cases = [
        ("/features/latest", {"symbol": "NOPEUSDT"}, 404, "unknown symbol"),
        ("/predictions/latest", {"symbol": "../../etc"}, 404, "unknown symbol"),
        ("/predictions/history", {"symbol": A, "from": "2026-01-02", "to": "2026-01-01"}, 422, "bad range"),
        ("/predictions/history", {"symbol": A, "from": "yesterday"}, 422, "ISO 8601"),
        ("/predictions/history", {"symbol": A, "from": "2026-01-01", "to": "2026-03-01"}, 422, "at most 31 days"),
        ("/predictions/history", {"symbol": A, "limit": "0"}, 422, "limit"),
        ("/backtest", {"symbol": A, "candles": "0"}, 422, "candles"),
        ("/backtest", {"symbol": A, "candles": "NaN"}, 422, "candles"),
        ("/strategy/pnl", {"symbol": A, "days": "-1"}, 422, "days"),
        ("/features/latest", {"symbol": A, "cadence": "m5"}, 422, "cadence"),
        ("/dataset/build/..%2F..%2Fetc%2Fpasswd", {}, 404, "detail"),
        ("/dataset/build/..", {}, 404, "detail"),
        ("/model/train/0123", {}, 404, "no train job"),
        ("/signals/stream", {"symbol": "NOPE"}, 404, "unknown symbol"),
    ]
    for path, params, code, needle in cases:
        r = httpx.get(server["base"] + path, params=params, timeout=10)
        assert r.status_code == code, (path, params, r.status_code, r.text)
        assert needle in json.dumps(r.json()), (path, r.text)


def test_the_feature_flows_resync_requests_are_counted_per_symbol_and_reason(server, pub):
    before = get(server, "/monitoring").json()["symbols"][A]["sequence_errors"]
    for reason in ("update id gap", "update id gap", "crossed book"):
        pub.producer.produce("tickcast.control", key=A.encode(), value=pub.serde.encode(
            "ControlCommand", {"command": "resync", "symbol": A, "reason": reason, "requester": "features-test",
                               "requested_ts": 1}))
    pub.producer.produce("tickcast.control", key=b"x", value=b"not avro")  # ignored, never a crash
    pub.flush()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        mon = get(server, "/monitoring").json()["symbols"][A]
        if mon["sequence_errors"] >= before + 3:
            break
        time.sleep(0.2)
    assert mon["sequence_errors"] == before + 3
    assert mon["sequence_error_reasons"]["update id gap"] >= 2 and mon["sequence_error_reasons"]["crossed book"] >= 1
    assert get(server, "/monitoring").json()["symbols"][B]["sequence_errors"] == 0


def test_backtest_pnl_monitoring_health_and_model(server):
    # symbol A has the hot-swap test's 40 minutes (or at least the first test's): enough history
    bt = get(server, "/backtest", symbol=A, candles=20).json()
    assert len(bt["rows"]) == 20 and bt["model_version"]
    assert bt["quality"]["forecasts"] + bt["quality"]["no_forecast"] == 20
    assert bt["stats"]["n_minutes"] >= 2 and "sharpe" in bt["stats"]
    pnl = get(server, "/strategy/pnl", symbol=A, days=31).json()
    assert pnl["minutes"] > 0 and sum(pnl["signals"].values()) == pnl["minutes"]
    health = get(server, "/health").json()
    assert health["components"]["broker"]["status"] == "ok"
    assert health["components"]["model"]["status"] == "ok"
    assert set(health["components"]["features"]["detail"]) == set(SYMS)
    mon = get(server, "/monitoring").json()
    assert mon["latency"]["inference"]["n"] > 0 and mon["symbols"][A]["minutes_served"] > 0
    assert mon["symbols"][A]["served_ratio"] > 0
    # drift: the test series climbs 0.2 %/min (closes far above the training's ~100), returns stay small
    psi = mon["symbols"][A]["psi"]
    assert set(psi) == {"close", "log_return_1m"} and psi["close"] > 1.0 and mon["psi_note"] is None
    assert mon["symbols"][A]["psi_max"] == max(psi.values())
    text = get(server, "/metrics").text
    assert f'tickcast_api_feature_psi{{symbol="{A}",variate="close"}}' in text
    model = get(server, "/model").json()
    assert model["name"] == MODEL and model["lookback"] == L and model["variates"] == VARIATES
    assert model["promoted_ts"] and model["loaded_at"]
    # the training run's metrics come along (v1 logged two; a later champion of the hot-swap test none)
    v1_metrics = {"val_close_pinball": 0.00123, "val_close_coverage": 0.8}
    assert model["metrics"] == (v1_metrics if model["champion_version"] == server["registry"]["v1"] else {})
    sy = get(server, "/symbols").json()
    assert [s["symbol"] for s in sy["symbols"]] == SYMS


def test_bad_records_on_features_live_are_dead_lettered(server, pub, bootstrap):
    from confluent_kafka import Consumer

    from tickcast.kafka import assign_all, consumer_config
    from tickcast.serde import Serde

    pub.raw(A.encode(), b"\x00\x00\x00\x00\x01garbage")
    pub.raw(A.encode(), b"not avro at all")
    rec = fv(A, BASE + 5, 100.0)  # window_end not on a minute boundary
    pub.raw(A.encode(), Serde().encode("FeatureVector", rec))
    pub.flush()
    c = Consumer(consumer_config(bootstrap, f"test-api-dl-{time.time_ns()}"))
    assign_all(c, ["tickcast.deadletter"])
    got = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and len(got) < 3:
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        dl = Serde().decode(m.value(), expect="DeadLetter")
        if dl["source"] == "api.features":
            got.append(dl)
    c.close()
    kinds = sorted(d["error_kind"] for d in got)
    assert kinds == ["malformed_payload", "misaligned_window", "unknown_schema"], got
    assert get(server, "/health").json()["components"]["broker"]["status"] == "ok"


def test_openapi_fuzz_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(server["base"] + "/openapi.json")
    schema = schema.exclude(path="/signals/stream")
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        strategy = schema.as_strategy(mode)

        @given(case=strategy)
        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(base_url=server["base"], timeout=30,
                                   checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                           response_schema_conformance])

        run()


def test_import_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, api.main, api.service, api.champion, api.analytics; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_history_vectors_fill_the_lookback_without_forecasts_and_candles_are_served(server, pub):
    """The flow's history vectors (minutes before the live stream, rebuilt from klines) give the
    lookback at once: no forecast or signal for them, a forecast at the first live minute; /candles
    serves the 1-minute OHLCV with the history flag."""
    sym = D
    t0 = BASE + 40 * 24 * 60 * MIN  # after every other test's grid: minutes only move forward
    sse = SSE(f"{server['base']}/signals/stream?symbol={sym}")
    try:
        for i in range(L):
            rec = fv(sym, t0 + i * MIN, calm(i), prev=calm(i - 1) if i else None)
            rec["history"] = True
            rec["values"]["candle_volume_1m"] = 1.5
            pub.producer.produce("features.live", key=sym.encode(), value=pub.serde.encode("FeatureVector", rec))
        pub.last[sym] = calm(L - 1)
        pub.minute(sym, t0 + L * MIN, calm(L))
        pub.flush()
        live = t0 + L * MIN
        sse.wait(lambda s: s.of("forecast", sym) if any(e["data"]["origin_ts"] == live for e in s.of("forecast", sym))
                 else None)
        origins = {e["data"]["origin_ts"] for e in sse.of("forecast", sym) + sse.of("signal", sym)}
        assert origins == {live}, sorted(origins)  # nothing for the history minutes
    finally:
        sse.close()
    deadline = time.monotonic() + 15
    while True:
        body = get(server, "/candles", symbol=sym, **{"from": str(t0), "to": str(live)}).json()
        if body.get("count") == L + 1:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.3)
    items = body["items"]
    assert [it["origin_ts"] for it in items] == [t0 + i * MIN for i in range(L + 1)]
    assert all(it["history"] for it in items[:L]) and not items[L]["history"]
    assert items[0]["volume"] == 1.5 and items[L]["close"] == pytest.approx(calm(L))
    assert get(server, "/candles", symbol="NOPE").status_code == 404
    assert get(server, "/candles", symbol=sym, **{"from": str(live), "to": str(t0)}).status_code == 422
