"""tickcast prediction service: FastAPI app ``api.main:app`` (run with ``tickcast serve``).

The lifespan starts the inference loop (api/service.py), the champion watcher (api/champion.py), the
Delta store writer (api/store.py) and the SSE hub (api/sse.py). Endpoints (all documented in
/openapi.json and /docs):

read-only
  GET  /symbols                       configured symbols, last minute seen, feature age
  GET  /features/latest               latest feature vector of a symbol (cadence m1 by default)
  GET  /predictions/latest            latest forecast + signal (+ outcome when joined) of a symbol
  GET  /candles                       1-minute OHLCV as received on features.live, in [from, to]
  GET  /predictions/history           forecasts, signals and outcomes in [from, to]
  GET  /alerts                        alerts (actual outside [q_low, q_high]) in [from, to]
  GET  /backtest                      the champion re-run on the last N candles, backtested
  GET  /strategy/pnl                  P&L of the published signals over the last N days
  GET  /model                         champion version, promotion time, contract, swaps
  GET  /model/train/{job_id}          training job status
  GET  /dataset/list                  datasets built so far
  GET  /dataset/build/{job_id}        dataset build job status
  GET  /monitoring                    served/degraded/skipped minutes, gaps, coverage, PSI, latency
  GET  /health                        per component: broker, model, features per symbol, store, stream
  GET  /metrics                       Prometheus
  GET  /signals/stream                SSE: forecast, signal, alert, heartbeat; ?symbol=; Last-Event-ID
mutating (bearer token TICKCAST_API_TOKEN; none configured = 503, wrong/missing = 401)
  POST /dataset/build                 background dataset build -> job id
  POST /model/train                   background training on a dataset id -> job id
  POST /model/reload                  check the registry's champion alias now
  POST /feature-registry/reload       re-read and validate flows/features.yaml, compare hashes
"""
import datetime as _dt
import gc
import json
import math
import pathlib
import re
import secrets
import sys
import time
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import schemas as S
from api.jobs import JobQueueFull, JobRunner, settings_env
from api.metrics import ApiMetrics
from api.service import ApiOptions, PredictionService
from api.sse import EventHub
from api.store import ALERTS, CANDLES, OUTCOMES, PREDICTIONS
from tickcast.config import Settings, get_settings
from tickcast.logs import get_logger

log = get_logger("api")
REPO = pathlib.Path(__file__).resolve().parent.parent

MAX_RANGE_DAYS = 31
_MS_MAX = 4_102_444_800_000  # 2100-01-01
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
ERRORS = {404: {"model": S.ErrorOut, "description": "unknown symbol or object"},
          422: {"model": S.ErrorOut, "description": "invalid parameter (the detail says which and why)"}}
BODY_ERRORS = {400: {"model": S.ErrorOut, "description": "the body is not valid JSON"}}
AUTH_ERRORS = {401: {"model": S.ErrorOut, "description": "missing or wrong bearer token"},
               503: {"model": S.ErrorOut, "description": "mutating endpoints disabled: no token configured"}}


# ---------------------------------------------------------------------------------------- helpers
def _fin(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def parse_time(raw: str | None, name: str) -> int | None:
    """Epoch ms from epoch milliseconds or an ISO 8601 time (naive = UTC); 422 otherwise."""
    if raw is None:
        return None
    s = raw.strip()
    if re.fullmatch(r"\d{1,13}", s):
        ms = int(s)
    else:
        try:
            dt = _dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            raise HTTPException(422, f"{name}: {raw[:60]!r} is neither epoch milliseconds nor an ISO 8601 time "
                                     "(e.g. 2026-11-21T10:00:00Z)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=_dt.UTC)
        try:
            ms = int(dt.timestamp() * 1000)
        except (OverflowError, OSError, ValueError):
            raise HTTPException(422, f"{name}: {raw[:60]!r} is out of range") from None
    if not 0 <= ms <= _MS_MAX:
        raise HTTPException(422, f"{name}: {raw[:60]!r} is outside 1970..2100")
    return ms


def time_range(frm: str | None, to: str | None, default_to: int, default_span_ms: int,
               max_days: float = MAX_RANGE_DAYS) -> tuple[int, int]:
    t = parse_time(to, "to")
    f = parse_time(frm, "from")
    if t is None:  # the latest minute, as documented (a from in the future gives an empty range)
        t = default_to if f is None else min(_MS_MAX, max(f, default_to))
    if f is None:
        f = max(0, t - default_span_ms)
    if f > t:
        raise HTTPException(422, f"bad range: from ({f}) is after to ({t})")
    if t - f > max_days * 86_400_000:
        raise HTTPException(422, f"bad range: at most {max_days:g} days per request (asked for "
                                 f"{(t - f) / 86_400_000:.1f})")
    return f, t


# ---------------------------------------------------------------------------------------- the app
def create_app(settings: Settings | None = None, options: ApiOptions | None = None) -> FastAPI:
    settings = settings or get_settings()
    options = options or ApiOptions()
    metrics = ApiMetrics()
    hub = EventHub(buffer_size=options.sse_buffer, queue_size=options.sse_queue, heartbeat_s=options.heartbeat_s,
                   on_drop=metrics.sse_dropped.inc)
    hub.on_fanout = metrics.sse_fanout.observe
    service = PredictionService(settings, options, metrics=metrics, hub=hub)
    hub.heartbeat_info = lambda: {"model_version": service.model.spec.version if service.model else None}
    jobs = JobRunner(env=settings_env(settings), cwd=str(REPO))
    symbols = list(settings.symbols)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        hub.start()
        await anyio.to_thread.run_sync(service.start)
        gc.freeze()  # everything loaded so far is permanent: full collections stay short under load
        log.info("api started", extra={"counts": {"symbols": len(symbols)}})
        try:
            yield
        finally:
            hub.close_all()
            jobs.stop()
            await anyio.to_thread.run_sync(service.stop)
            await hub.stop()

    app = FastAPI(
        title="tickcast prediction service",
        version="1.0",
        description=(__doc__ or "").split("\n\n", 1)[1] if __doc__ else "",
        lifespan=lifespan,
        responses={422: ERRORS[422]},
    )
    app.state.service = service
    app.state.hub = hub
    app.state.jobs = jobs
    app.state.settings = settings
    app.state.options = options
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"])

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = []
        if any(e.get("type") == "json_invalid" for e in exc.errors()):  # 400, as documented
            return JSONResponse(status_code=400, content={"detail": "the body is not valid JSON"})
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body", "path", "header"))
            errs.append(f"{loc or 'request'}: {e.get('msg')}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(errs) or "invalid request"})

    # ------------------------------------------------------------------ dependencies
    bearer = HTTPBearer(auto_error=False, description="TICKCAST_API_TOKEN")

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        token = settings.api_token.get_secret_value() if settings.api_token else ""
        if not token:
            raise HTTPException(503, "mutating endpoints are disabled: TICKCAST_API_TOKEN is not configured")
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise HTTPException(401, "a bearer token is required (Authorization: Bearer <TICKCAST_API_TOKEN>)",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def known(symbol: str) -> str:
        s = symbol.strip().upper()
        if s not in symbols:
            raise HTTPException(404, f"unknown symbol {symbol[:40]!r}; this API serves {', '.join(symbols)}")
        return s

    SymbolQ = Annotated[str, Query(min_length=1, max_length=40, description="e.g. BTCUSDT (case-insensitive)")]
    FromQ = Annotated[str | None, Query(alias="from", max_length=40,
                                        description="epoch ms or ISO 8601; default: to - 24 h")]
    ToQ = Annotated[str | None, Query(max_length=40, description="epoch ms or ISO 8601; default: the latest minute")]

    def latest_origin(sym: str) -> int:
        lp = service.latest_prediction.get(sym)
        if lp:
            return lp["signal"]["origin_ts"]
        h = service.history[sym].latest
        return h if h is not None else int(time.time() * 1000)

    # ------------------------------------------------------------------ features and symbols
    @app.get("/symbols", response_model=S.SymbolsOut, tags=["features"])
    def list_symbols() -> dict:
        return {"symbols": [{"symbol": s, "last_minute_ts": service.history[s].latest,
                             "feature_age_s": service.feature_age_s(s)} for s in symbols]}

    feature_json: dict[tuple[str, str], tuple[dict, bytes]] = {}

    @app.get("/features/latest", response_model=S.FeatureVectorOut, responses={404: ERRORS[404]}, tags=["features"])
    async def features_latest(symbol: SymbolQ,
                              cadence: Annotated[Literal["s1", "s3", "s15", "m1"], Query()] = "m1"):
        """The latest feature vector of ``symbol`` at ``cadence`` as received on features.live."""
        sym = known(symbol)
        got = service.latest_features.get((sym, cadence))
        if got is None:
            raise HTTPException(404, f"no {cadence} feature vector for {sym} received yet")
        rec, recv = got
        cached = feature_json.get((sym, cadence))
        if cached is None or cached[0] is not rec:  # serialise each vector once, not per request
            out = {k: rec[k] for k in ("symbol", "venue", "cadence", "window_end", "registry_hash", "nulls",
                                       "book_valid", "event_count", "last_gw_seq", "close_recv_ts", "emit_ts")}
            out["values"] = {k: _fin(v) for k, v in rec["values"].items()}
            body = json.dumps(out, separators=(",", ":"), allow_nan=False).encode()
            cached = feature_json[(sym, cadence)] = (rec, body[:-1])
        age = f',"age_s":{time.time() - recv:.3f}}}'.encode()
        return Response(cached[1] + age, media_type="application/json")

    # ------------------------------------------------------------------ predictions
    @app.get("/predictions/latest", response_model=S.PredictionLatestOut, responses={404: ERRORS[404]},
             tags=["predictions"])
    async def predictions_latest(symbol: SymbolQ) -> dict:
        """The latest minute's forecast and signal (status served, degraded or skipped with the reason)."""
        sym = known(symbol)
        lp = service.latest_prediction.get(sym)
        if lp is None:
            raise HTTPException(404, f"no prediction for {sym} yet (no closed minute seen on features.live)")
        return _clean({"symbol": sym, **lp})

    def _history_item(p: dict, outcome: dict | None, paths: bool) -> dict:
        cp = p.get("close_path")
        levels = p.get("quantile_levels") or []
        mid = min(range(len(levels)), key=lambda i: abs(levels[i] - 0.5)) if levels else None
        item = {k: p.get(k) for k in ("origin_ts", "model_version", "status", "reason", "last_close", "horizon",
                                      "quantile_levels", "realized_vol", "price_range", "p_up", "p_flat", "p_down",
                                      "action", "strength", "signal_reason", "simulated", "issued_ts")}
        item["simulated"] = bool(item["simulated"])
        item["close_h_q"] = cp[-1] if cp else None
        item["median_path"] = [step[mid] for step in cp] if cp and mid is not None else None
        item["close_path"] = cp if (paths and cp) else None
        item["outcome"] = outcome
        return _clean(item)

    @app.get("/candles", response_model=S.CandlesOut, responses={404: ERRORS[404]}, tags=["features"])
    def candles(
            symbol: SymbolQ,
            frm: FromQ = None,
            to: ToQ = None,
            limit: Annotated[int, Query(ge=1, le=10_000)] = 1440,
    ) -> dict:
        """1-minute OHLCV of ``symbol`` as the API received them on features.live (m1 vectors), with
        minute start in [from, to] (at most 31 days), oldest first."""
        sym = known(symbol)
        f, t = time_range(frm, to, latest_origin(sym), 86_400_000)
        rows = sorted(service.store.query(CANDLES, symbols=[sym], origin_from=f, origin_to=t),
                      key=lambda r: r["origin_ts"])
        kept = rows[-limit:]
        items = [{k: r.get(k) for k in ("origin_ts", "open", "high", "low", "close", "volume", "venue")}
                 | {"history": bool(r.get("history"))} for r in kept]
        return _clean({"symbol": sym, "from_ts": f, "to_ts": t, "count": len(items),
                       "truncated": len(rows) > len(kept), "items": items})

    @app.get("/predictions/history", response_model=S.PredictionHistoryOut, responses={404: ERRORS[404]},
             tags=["predictions"])
    def predictions_history(
            symbol: SymbolQ,
            frm: FromQ = None,
            to: ToQ = None,
            limit: Annotated[int, Query(ge=1, le=10_000)] = 1440,
            paths: Annotated[bool, Query(description="include the full [step][quantile] close path")] = False,
    ) -> dict:
        """Forecasts, signals and joined outcomes of ``symbol`` with origin in [from, to] (at most 31 days)."""
        sym = known(symbol)
        f, t = time_range(frm, to, latest_origin(sym), 86_400_000)
        preds = service.store.query(PREDICTIONS, symbols=[sym], origin_from=f, origin_to=t)
        outs = {(o["origin_ts"], o["model_version"]): o
                for o in service.store.query(OUTCOMES, symbols=[sym], origin_from=f, origin_to=t)}
        truncated = len(preds) > limit
        preds = preds[-limit:]
        items = [_history_item(p, outs.get((p["origin_ts"], p["model_version"])), paths) for p in preds]
        return {"symbol": sym, "from_ts": f, "to_ts": t, "count": len(items), "truncated": truncated, "items": items}

    @app.get("/alerts", response_model=S.AlertsOut, responses={404: ERRORS[404]}, tags=["predictions"])
    def alerts(symbol: Annotated[str | None, Query(max_length=40)] = None,
               frm: Annotated[str | None, Query(alias="from", max_length=40)] = None,
               to: Annotated[str | None, Query(max_length=40)] = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> dict:
        """Alerts raised when an actual left the forecast interval, by forecast origin (default: last 24 h)."""
        syms = [known(symbol)] if symbol else symbols
        default_to = max([latest_origin(s) for s in syms], default=int(time.time() * 1000))
        f, t = time_range(frm, to, default_to, 86_400_000)
        rows = service.store.query(ALERTS, symbols=syms, origin_from=f, origin_to=t)
        rows.sort(key=lambda r: (r["origin_ts"], r["symbol"], r["target"]))
        rows = rows[-limit:]
        return {"symbol": syms[0] if symbol else None, "from_ts": f, "to_ts": t, "count": len(rows),
                "items": [{k: r[k] for k in S.AlertOut.model_fields} for r in rows]}

    # ------------------------------------------------------------------ analytics
    @app.get("/backtest", response_model=S.BacktestOut, tags=["analytics"],
             responses={404: ERRORS[404], 409: {"model": S.ErrorOut, "description": "no champion loaded"}})
    def backtest(symbol: SymbolQ,
                 candles: Annotated[int, Query(ge=2, le=1000, description="how many recent minutes")] = 100,
                 fee_bps: Annotated[float, Query(ge=0, le=100)] = 5.5,
                 slippage_bps: Annotated[float, Query(ge=0, le=100)] = 1.0) -> dict:
        """The current champion re-run on the last ``candles`` minutes the API holds, its signals backtested
        by model/backtest.py (T+1 execution at the next open, fees + slippage per side)."""
        from api.analytics import backtest_recent

        sym = known(symbol)
        model = service.model
        if model is None:
            raise HTTPException(409, "no champion model is loaded: nothing to backtest")
        res = backtest_recent(model, service.history[sym].snapshot(), sym, candles,
                              max_missing_frac=options.max_missing_frac, fee_bps=fee_bps, slippage_bps=slippage_bps)
        return _clean({"symbol": sym, "candles": candles, "model_version": model.spec.version, **res})

    @app.get("/strategy/pnl", response_model=S.PnlOut, responses={404: ERRORS[404]}, tags=["analytics"])
    def strategy_pnl(symbol: SymbolQ,
                     days: Annotated[float, Query(gt=0, le=MAX_RANGE_DAYS)] = 30,
                     fee_bps: Annotated[float, Query(ge=0, le=100)] = 5.5,
                     slippage_bps: Annotated[float, Query(ge=0, le=100)] = 1.0) -> dict:
        """Money made or lost by following the published signals over the last ``days`` (analytics only)."""
        from api.analytics import pnl_from_store

        sym = known(symbol)
        t = latest_origin(sym)
        f = int(t - days * 86_400_000)
        cand = service.store.query(CANDLES, symbols=[sym], origin_from=f, origin_to=t)
        preds = service.store.query(PREDICTIONS, symbols=[sym], origin_from=f, origin_to=t,
                                    columns=["symbol", "origin_ts", "model_version", "status", "action", "issued_ts"])
        res = pnl_from_store(cand, preds, fee_bps=fee_bps, slippage_bps=slippage_bps)
        return _clean({"symbol": sym, "days": days, "from_ts": f, "to_ts": t, **res})

    # ------------------------------------------------------------------ model
    @app.get("/model", response_model=S.ModelOut, tags=["model"])
    def model_info() -> dict:
        """The champion being served: version, when it was promoted and loaded, its contract, the swaps."""
        st = service.champion.status() if service.champion else {}
        m = st.get("model") or {}
        rv = st.get("registry_version") or {}
        return _clean({
            "name": settings.model_name, "champion_version": st.get("version"), "loaded_at": m.get("loaded_at"),
            "promoted_ts": rv.get("promoted_ts"), "created_ts": rv.get("created_ts"), "run_id": rv.get("run_id"),
            "tags": {str(k): str(v) for k, v in (rv.get("tags") or {}).items()},
            "variates": m.get("variates") or [], "lookback": m.get("lookback"), "horizon": m.get("horizon"),
            "quantiles": m.get("quantiles") or [], "flat_threshold": m.get("flat_threshold"),
            "registry_hash": m.get("registry_hash"), "signal": m.get("signal"), "providers": m.get("providers") or [],
            "has_feature_summary": bool(m.get("has_feature_summary")), "last_check_ts": st.get("last_check_ts"),
            "last_error": st.get("last_error"), "poll_s": options.champion_poll_s, "swaps": st.get("swaps") or [],
            "metrics": rv.get("metrics") or {}})

    @app.post("/model/reload", response_model=S.ModelOut, tags=["model"],
              responses={**AUTH_ERRORS, 409: {"model": S.ErrorOut, "description": "no champion watcher here"}},
              dependencies=[Depends(require_token)])
    def model_reload() -> dict:
        """Ask the registry for the champion now (instead of at the next poll) and load it if it moved."""
        if service.champion is None:
            raise HTTPException(409, "the champion watcher is not running in this process")
        service.champion.check()
        return model_info()

    def _job_out(job) -> dict:
        return _clean(job.view())

    @app.post("/model/train", response_model=S.JobOut, status_code=202,
              responses={**BODY_ERRORS, **AUTH_ERRORS, **ERRORS, 429: {"model": S.ErrorOut, "description": "queue full"}},
              tags=["model"], dependencies=[Depends(require_token)])
    def model_train(body: S.TrainIn) -> dict:
        """Train on a built dataset in a child process (model/train.py); poll GET /model/train/{id}."""
        _dataset_manifest(body.dataset_id)  # 404 for an unknown id, before any process starts
        argv = [sys.executable, "-m", "model.train", "--dataset", body.dataset_id]
        for k, v in (body.config.model_dump(exclude_none=True) if body.config else {}).items():
            argv += [f"--{k}", str(v)]  # typed and bounded by TrainConfigIn
        try:
            job = jobs.submit("train", argv, body.model_dump())
        except JobQueueFull as exc:
            raise HTTPException(429, str(exc)) from None
        return _job_out(job)

    @app.get("/model/train/{job_id}", response_model=S.JobOut, responses={404: ERRORS[404]}, tags=["model"])
    def model_train_status(job_id: Annotated[str, Path(max_length=64)]) -> dict:
        return _job_out(_job(job_id, "train"))

    # ------------------------------------------------------------------ datasets and registry
    def _datasets_module():
        try:
            from flows import datasets
        except ImportError as exc:
            return None, f"dataset builder not available: {exc}"
        return datasets, None

    def _dataset_manifest(dataset_id: str) -> dict:
        mod, err = _datasets_module()
        if mod is None:
            raise HTTPException(503, err)
        try:
            return mod.get_manifest(dataset_id, settings.data_dir)
        except (KeyError, FileNotFoundError):
            raise HTTPException(404, f"no dataset {dataset_id!r}") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    def _job(job_id: str, kind: str):
        if not _JOB_ID.match(job_id):
            raise HTTPException(404, f"no {kind} job {job_id[:64]!r}")
        job = jobs.get(job_id)
        if job is None or job.kind != kind:
            raise HTTPException(404, f"no {kind} job {job_id!r} (jobs are kept in memory since the API started)")
        return job

    @app.get("/dataset/list", response_model=S.DatasetListOut, tags=["datasets"])
    def dataset_list() -> dict:
        """Manifests of the datasets built so far (flows/datasets.py), oldest first."""
        mod, err = _datasets_module()
        if mod is None:
            return {"available": False, "detail": err, "datasets": []}
        return _clean({"available": True, "detail": None, "datasets": mod.list_datasets(settings.data_dir)})

    @app.post("/dataset/build", response_model=S.JobOut, status_code=202,
              responses={**BODY_ERRORS, **AUTH_ERRORS, **ERRORS, 429: {"model": S.ErrorOut, "description": "queue full"}},
              tags=["datasets"], dependencies=[Depends(require_token)])
    def dataset_build(body: S.DatasetBuildIn) -> dict:
        """Build a dataset (kline or feature rows + targets) in a child process; poll GET /dataset/build/{id}."""
        mod, err = _datasets_module()
        if mod is None:
            raise HTTPException(503, err)
        syms = [known(s) for s in (body.symbols or symbols)]
        spec = {"symbols": syms, "from": parse_time(body.start, "start"), "to": parse_time(body.end, "end"),
                "kind": body.kind, "horizon": body.horizon, "flat_threshold": body.flat_threshold}
        try:
            norm = mod.DatasetSpec.from_dict(spec)  # validate here: a bad spec is a 422, not a failed job
        except (ValueError, TypeError) as exc:
            raise HTTPException(422, str(exc)) from None
        argv = [sys.executable, "-m", "api.jobs", "build-dataset", json.dumps(norm.to_dict())]
        try:
            job = jobs.submit("dataset_build", argv, norm.to_dict())
        except JobQueueFull as exc:
            raise HTTPException(429, str(exc)) from None
        return _job_out(job)

    @app.get("/dataset/build/{job_id}", response_model=S.JobOut, responses={404: ERRORS[404]}, tags=["datasets"])
    def dataset_build_status(job_id: Annotated[str, Path(max_length=64)]) -> dict:
        return _job_out(_job(job_id, "dataset_build"))

    state = {"registry_hash": None}

    @app.post("/feature-registry/reload", response_model=S.RegistryReloadOut,
              responses={**AUTH_ERRORS, 422: ERRORS[422]},
              tags=["features"], dependencies=[Depends(require_token)])
    def feature_registry_reload() -> dict:
        """Re-read and validate the feature registry (flows/features.yaml) and compare its hash with what
        features.live carries and what the champion was trained on. The online flow applies a changed
        registry when it restarts; this endpoint tells whether that is needed."""
        try:
            from flows.registry import RegistryError, load_registry
        except ImportError as exc:
            raise HTTPException(503, f"feature registry module not available: {exc}") from None
        try:
            reg = load_registry()
        except RegistryError as exc:
            raise HTTPException(422, f"the registry file is invalid: {exc}") from None
        prev = state["registry_hash"]
        state["registry_hash"] = reg.hash
        live = {s: got[0]["registry_hash"] for s in symbols if (got := service.latest_features.get((s, "m1")))}
        model = service.model
        stale = sorted(s for s, h in live.items() if h != reg.hash)
        note = ("features.live matches the registry" if live and not stale else
                f"features.live carries another registry for {', '.join(stale)}: restart the feature flow"
                if stale else "no m1 vectors received yet")
        return {"registry_hash": reg.hash, "path": "flows/features.yaml", "features": len(reg.features),
                "m1_features": len(reg.for_cadence("m1")), "changed": prev is not None and prev != reg.hash,
                "previous_hash": prev, "live_hashes": live,
                "model_registry_hash": model.spec.registry_hash if model else None, "note": note}

    # ------------------------------------------------------------------ operations
    @app.get("/monitoring", response_model=S.MonitoringOut, tags=["operations"])
    def monitoring() -> dict:
        """What the dashboard's monitoring tab shows (counts since this process started)."""
        model = service.model
        out = {}
        for s in symbols:
            c = service.counts[s]
            served, degraded, skipped = c.get("served", 0), c.get("degraded", 0), c.get("skipped", 0)
            gaps = c.get("gap_minutes", 0)
            total = served + degraded + skipped + gaps
            psi = service.psi.get(s, {})
            out[s] = {"minutes_served": served, "minutes_degraded": degraded, "minutes_skipped": skipped,
                      "data_gap_minutes": gaps, "served_ratio": (served + degraded) / total if total else None,
                      "alerts": c.get("alerts", 0), "feature_age_s": service.feature_age_s(s),
                      "book_invalid_minutes": c.get("book_invalid_minutes", 0),
                      "sequence_errors": sum(service.seq_errors[s].values()),
                      "sequence_error_reasons": dict(service.seq_errors[s]),
                      "coverage": service.coverage_of(s), "psi": psi, "psi_max": max(psi.values()) if psi else None}
        note = None
        if model is not None and not model.spec.feature_summary:
            note = ("the champion ships no training distribution summary (tickcast.feature_summary metadata or "
                    "feature_summary.json artifact): PSI is not computed")
        latency = service.latency()
        latency["sse_fanout"] = service._pcts([1000 * x for x in list(hub.fanout_s)])
        return _clean({"model_version": model.spec.version if model else None, "latency": latency,
                       "symbols": out, "recent_alerts": list(service.recent_alerts)[-50:],
                       "sse_clients": len(hub.subs), "psi_note": note})

    @app.get("/health", response_model=S.HealthOut, tags=["operations"],
             responses={503: {"model": S.HealthOut, "description": "the broker is down"}})
    def health(response: Response) -> dict:
        """Per component: broker, model, features (age of the last m1 vector per symbol), store, stream.
        HTTP 503 only when the broker is down; no champion yet is ``degraded``."""
        comps: dict[str, dict] = {}
        b = service.broker_state
        comps["broker"] = {"status": b["status"], "detail": {"error": b.get("detail"),
                                                             "caught_up": service.caught_up.is_set(),
                                                             "publish_error": service.publish_error}}
        model = service.model
        ch = service.champion
        if model is not None:
            comps["model"] = {"status": "degraded" if ch and ch.last_error else "ok",
                              "detail": {"version": model.spec.version, "loaded_at": model.loaded_at,
                                         "registry_error": ch.last_error if ch else None}}
        else:
            comps["model"] = {"status": "down" if ch and ch.last_check_ts else "starting",
                              "detail": {"error": ch.last_error if ch else "champion watcher not running"}}
        per = {}
        worst = "ok"
        for s in symbols:
            age = service.feature_age_s(s)
            st = ("down" if age is None else "ok" if age <= options.stale_feature_s else "degraded")
            per[s] = {"status": st, "age_s": age, "last_minute_ts": service.history[s].latest}
            if st != "ok":
                worst = "degraded"
        comps["features"] = {"status": worst, "detail": per}
        stst = service.store.status()
        comps["store"] = {"status": "degraded" if stst["last_error"] else "ok", "detail": stst}
        comps["stream"] = {"status": "ok", "detail": {"clients": len(hub.subs), "last_event_id": hub.last_id,
                                                      "buffered": len(hub.buffer)}}
        if service.loop_error:
            comps["broker"]["detail"]["loop_error"] = service.loop_error
        statuses = [c["status"] for c in comps.values()]
        # down (503) only when the broker is: without features nothing can work, and a restart may help;
        # a missing champion keeps the service up and honest (every minute says "no forecast: ...")
        overall = ("down" if comps["broker"]["status"] == "down"
                   else "starting" if "starting" in statuses
                   else "degraded" if any(s != "ok" for s in statuses) else "ok")
        if overall == "down":
            response.status_code = 503
        return _clean({"status": overall, "components": comps})

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for s in symbols:
            age = service.feature_age_s(s)
            if age is not None:
                metrics.feature_age.labels(s).set(age)
        metrics.sse_clients.set(len(hub.subs))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ the stream
    @app.get("/signals/stream", tags=["stream"], response_class=Response, responses={
        200: {"content": {"text/event-stream": {}},
              "description": "Server-Sent Events: `forecast` (ForecastOut), `signal` (SignalOut), `alert` "
                             "(AlertOut) with an `id`; `heartbeat` (server_ts µs, last_event_id, model_version; "
                             "`gap: true` when a resume point is no longer buffered) without one"},
        404: ERRORS[404], 422: ERRORS[422]})
    async def signals_stream(
            request: Request,
            symbol: Annotated[str | None, Query(max_length=400, description="one symbol or a comma-separated "
                                                                            "list; default: all")] = None,
            last_event_id: Annotated[str | None, Query(max_length=40, description="resume after this event id "
                                                                                  "(same as the header)")] = None,
            last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID", max_length=40)] = None,
    ):
        from sse_starlette import EventSourceResponse

        syms = None
        if symbol:
            syms = {known(s) for s in symbol.split(",") if s.strip()} or None
        raw = last_event_id_header or last_event_id
        lei = None
        if raw is not None and raw.strip():
            if not re.fullmatch(r"\d{1,19}", raw.strip()):
                raise HTTPException(422, f"Last-Event-ID {raw[:40]!r} is not an event id (a non-negative integer)")
            lei = int(raw.strip())
        sub = hub.subscribe(syms, lei)
        return EventSourceResponse(hub.stream(sub), ping=options.sse_ping_s, send_timeout=30,
                                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


app = create_app()
