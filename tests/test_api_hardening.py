"""The FastAPI service under hostile or unlucky requests, each test a bug found in a review: train
settings that are no integers or out of range, a NaN metric of the champion's run, a transient load
failure, a non-finite promotion tag, ``from`` without ``to``, malformed JSON bodies, a commit racing a
read, a job child writing non-UTF-8.

The app is the real one (``api.main.create_app``) driven in-process through httpx's ASGI transport
(no lifespan: no broker, no inference loop), with a real Delta store under tmp and, where a champion
is needed, a real MLflow sqlite registry holding a contract ONNX model (api/contract_model.py).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

TOKEN = "audit-token"
SYMS = ["BTCUSDT", "ETHUSDT"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIN = 60_000


def make_app(tmp_path: Path, **settings_kw):
    from api.main import create_app
    from api.service import ApiOptions
    from tickcast.config import load_settings

    kw = {"symbols": SYMS, "lake_root": str(tmp_path / "lake"), "data_dir": str(tmp_path / "data"),
          "api_token": TOKEN, **settings_kw}
    settings = load_settings(**kw)
    return create_app(settings, ApiOptions(start_consumer=False, start_champion=False, store_flush_s=0.1))


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return anyio.run(go)


def fake_dataset(app, ds_id: str = "ds-0123456789abcdef") -> str:
    d = Path(app.state.settings.data_dir) / "datasets" / ds_id
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"dataset_id": ds_id, "created_ts": 1}))
    return ds_id


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry whose champion's training run logged a NaN metric (MLflow accepts it)."""
    from api import contract_model

    root = tmp_path_factory.mktemp("audit-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    path = contract_model.build(root / "v1" / "model.onnx", ["close", "log_return_1m"], lookback=8, horizon=5,
                                model_name="audit-model", model_version="1")
    contract_model.register(uri, "audit-model", path, artifact_root=root / "artifacts",
                            metrics={"val_close_pinball": float("nan"), "val_close_coverage": 0.8})
    # a second model whose version carries a promoted_ts tag that float() reads as inf
    contract_model.register(uri, "audit-model-tag", path, artifact_root=root / "artifacts",
                            tags={"promoted_ts": "1e999"})
    return {"uri": uri, "name": "audit-model", "tagged": "audit-model-tag"}


# ------------------------------------------------------------------------------------ POST /model/train
@pytest.mark.parametrize("value", ["abc", "1.5", float("inf"), float("nan")])
def test_train_config_value_that_is_not_an_integer_is_a_422_not_a_500(tmp_path, value):
    """TrainIn.config accepts float|int|str|bool; main.py:393 does ``str(int(v))`` unguarded, so a
    string, a fraction-as-string, inf or NaN raise ValueError/OverflowError -> 500."""
    app = make_app(tmp_path)
    ds = fake_dataset(app)
    body = json.dumps({"dataset_id": ds, "config": {"epochs": value}})  # NaN/Infinity: Python's json accepts
    r = call(app, "POST", "/model/train", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, (r.status_code, r.text)


@pytest.mark.parametrize("cfg", [{"threads": -3}, {"epochs": 0}, {"epochs": 10 ** 18}, {"epochs": 2.9}])
def test_train_config_out_of_range_values_are_refused_not_queued(tmp_path, cfg):
    """Negative/zero/absurd values (and a silently truncated 2.9 -> 2) are queued as child processes
    that fail later or run until the 6 h job timeout, occupying the single train slot."""
    app = make_app(tmp_path)
    ds = fake_dataset(app)
    jobs = app.state.jobs
    try:
        r = call(app, "POST", "/model/train", json={"dataset_id": ds, "config": cfg}, headers=AUTH)
        assert r.status_code == 422, (r.status_code, r.text)
    finally:
        deadline = time.monotonic() + 10  # let a started child register before stopping it
        while any(j.status == "running" and j.id not in jobs._procs for j in jobs.jobs.values()) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        jobs.stop()


# ------------------------------------------------------------------------------------ GET /model
def test_model_endpoint_survives_a_nan_metric_in_the_champions_run(tmp_path, registry):
    """The champion's training run logged a NaN metric. ``_clean`` turns it into None, but
    ModelOut.metrics is dict[str, float] -> response validation error -> GET /model is a 500 (and so is
    POST /model/reload). README: 'Non-finite numbers are sent as null'."""
    from api.champion import ChampionWatcher

    app = make_app(tmp_path, mlflow_tracking_uri=registry["uri"], model_name=registry["name"])
    w = ChampionWatcher(app.state.settings)
    assert w.check(), w.last_error
    app.state.service.champion = w
    r = call(app, "GET", "/model")
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json()["metrics"]["val_close_coverage"] == 0.8


def test_a_transient_failure_while_loading_the_champion_is_retried_by_model_reload(tmp_path, registry):
    """champion.py:104-112: ANY exception while fetching/loading a version (here the artifact store
    briefly unreachable) puts the version in ``refused`` for good: neither the poll nor
    POST /model/reload ("check the registry now") ever loads it again until the alias moves."""
    from api.champion import ChampionWatcher

    app = make_app(tmp_path, mlflow_tracking_uri=registry["uri"], model_name=registry["name"])
    w = ChampionWatcher(app.state.settings)
    real_load = w._load
    calls = {"n": 0}

    def flaky_load(version, mv):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("artifact store unreachable (connection reset)")
        return real_load(version, mv)

    w._load = flaky_load
    assert not w.check()  # the outage
    app.state.service.champion = w
    r = call(app, "POST", "/model/reload", headers=AUTH)
    assert r.status_code in (200, 500), r.text
    assert w.current is not None, f"still refused after the outage ended: {w.last_error}"


def test_a_non_finite_promoted_ts_tag_does_not_kill_the_champion_watcher(tmp_path, registry):
    """champion.py:251: ``int(float(raw))`` catches ValueError only; a version tag promoted_ts='1e999'
    raises OverflowError inside check() AFTER ``self.current`` was swapped: version_meta, swaps and
    on_swap (the history capacity for the new lookback) are skipped, and in the watcher thread the
    exception ends ``_run`` for good (no more polling)."""
    from api.champion import ChampionWatcher

    app = make_app(tmp_path, mlflow_tracking_uri=registry["uri"], model_name=registry["tagged"])
    swapped = []
    w = ChampionWatcher(app.state.settings, on_swap=lambda old, new: swapped.append(new.spec.version))
    try:
        ok = w.check()
    except OverflowError as exc:
        pytest.fail(f"check() raised {exc!r} with current={w.current.spec.version if w.current else None}, "
                    f"on_swap calls={swapped}")
    assert ok and swapped == ["1"]


# ------------------------------------------------------------------------------------ time ranges
def test_from_without_to_defaults_to_the_latest_minute_as_documented(tmp_path):
    """OpenAPI for ``to``: 'default: the latest minute'. With only ``from`` given, main.py:115 uses
    from + 24 h instead, so '?from=<3 days ago>' silently answers the first day only (truncated=false)."""
    app = make_app(tmp_path)
    now = int(time.time() * 1000)
    frm = now - 3 * 86_400_000
    for path in ("/candles", "/predictions/history"):
        r = call(app, "GET", path, params={"symbol": "BTCUSDT", "from": str(frm)})
        assert r.status_code == 200, r.text
        assert r.json()["to_ts"] >= now - 2 * MIN, (path, r.json()["from_ts"], r.json()["to_ts"])


def test_history_with_from_only_returns_the_rows_after_the_first_day(tmp_path):
    """The same bug seen as data: a stored candle 2 days after ``from`` (and before now) is not returned."""
    from api.store import CANDLES

    app = make_app(tmp_path)
    now = (int(time.time() * 1000) // MIN) * MIN
    store = app.state.service.store
    t_old, t_new = now - 3 * 86_400_000, now - 86_400_000
    store.put(CANDLES, [{"symbol": "BTCUSDT", "origin_ts": t, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0,
                         "venue": "x", "volume": 1.0, "history": False} for t in (t_old, t_new)])
    r = call(app, "GET", "/candles", params={"symbol": "BTCUSDT", "from": str(t_old)})
    assert [i["origin_ts"] for i in r.json()["items"]] == [t_old, t_new], r.json()


# ------------------------------------------------------------------------------------ bodies
def test_malformed_json_body_gets_the_documented_400(tmp_path):
    """OpenAPI (BODY_ERRORS) and README document 400 for a body that is not valid JSON; the app
    answers 422 (and to unauthenticated callers too, before the token is checked)."""
    app = make_app(tmp_path)
    r = call(app, "POST", "/model/train", content=b'{"dataset_id": ', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, (r.status_code, r.text)


# ------------------------------------------------------------------------------------ store reads
def test_rows_being_committed_during_a_read_are_not_lost(tmp_path):
    """store.query reads the Delta snapshot first and the unflushed rows second. When the writer
    thread commits in between (pending -> inflight -> committed -> inflight cleared), the rows are in
    neither: /predictions/history and /candles briefly miss the newest minute. Simulated here by
    letting the flush happen right after the snapshot is taken (what the writer thread does)."""
    from api.store import CANDLES

    app = make_app(tmp_path)
    store = app.state.service.store
    now = (int(time.time() * 1000) // MIN) * MIN
    row = {"symbol": "BTCUSDT", "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "venue": "x", "volume": 1.0,
           "history": False}
    store.put(CANDLES, [{**row, "origin_ts": now - 2 * MIN}])
    store.flush()  # the table exists
    store.put(CANDLES, [{**row, "origin_ts": now - MIN}])  # the newest minute, queued
    real = store._dataset

    def snapshot_then_writer_commits(table):
        ds = real(table)
        store.flush()  # the writer thread's round lands between the two reads
        return ds

    store._dataset = snapshot_then_writer_commits
    r = call(app, "GET", "/candles", params={"symbol": "BTCUSDT"})
    assert [i["origin_ts"] for i in r.json()["items"]] == [now - 2 * MIN, now - MIN], r.json()


# ------------------------------------------------------------------------------------ jobs
def test_a_job_whose_output_is_not_utf8_is_not_left_running_behind_the_next_one(tmp_path):
    """jobs.py:124-137: a child printing a non-UTF-8 byte makes the text-mode reader raise; the job is
    marked failed while its process keeps running (never waited, never killed, its pipe no longer
    read) and the next job of the kind can start beside it ('one job of a kind runs at a time')."""
    import os
    import signal

    from api.jobs import JobRunner

    pidfile = tmp_path / "pid"
    code = (f"import os, sys, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
            "sys.stdout.buffer.write(bytes([255, 254]) + b' bad\\n'); sys.stdout.flush(); time.sleep(1)")
    jr = JobRunner()
    job = jr.submit("train", [sys.executable, "-c", code], {})
    deadline = time.monotonic() + 10
    while job.status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        alive = False
        if pid is not None:
            try:
                os.kill(pid, 0)
                alive = (Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z")
            except ProcessLookupError:
                alive = False
        assert not (job.status == "failed" and alive), (
            f"job reported {job.status} ({job.error}) while its child {pid} still runs unsupervised")
        assert job.status == "succeeded" and any("bad" in line for line in job.output), (job.status, job.error)
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)  # the child this test started, by its id
            except ProcessLookupError:
                pass
        jr.stop()
