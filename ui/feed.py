"""The dashboard's one connection to the prediction API per server process.

``LiveFeed`` runs two daemon threads, whatever the number of browser sessions:

- the SSE reader: one ``GET /signals/stream`` (all symbols) that resumes with ``Last-Event-ID`` after
  a drop and re-reads history over REST when the API says its replay buffer no longer covers the gap;
- the poller: the latest m1 feature vector of every symbol (``GET /features/latest``, which becomes
  the live candles, the features table and the flow's latency), ``/health`` and ``/model``; the
  history backfill of a symbol (``/predictions/history``, ``/predictions/latest``, ``/alerts``,
  ``/candles``); and the REST views the open tabs asked for (backtest, strategy P&L,
  monitoring, ...), each refreshed at its own interval only while some session still wants it.

Everything lands in bounded per-symbol buffers (dicts trimmed to ``max_minutes``, deques). Browser
sessions never call the API: a session's periodic callback reads these buffers (under one lock) and
streams what is new into its own Bokeh sources. Network I/O never runs on Panel's event loop.
"""
from __future__ import annotations

import threading
import time
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tickcast.logs import get_logger
from ui import shaping as S

log = get_logger("ui.feed")

MIN = S.MIN


# ---------------------------------------------------------------------------------------------- SSE
class SSEParser:
    """Incremental text/event-stream parser (the WHATWG rules: ``field: value`` lines, ``data`` lines
    joined with newlines, a blank line dispatches, ``:`` starts a comment)."""

    def __init__(self):
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: str | None = None

    def feed(self, line: str) -> dict | None:
        """One line without its terminator; returns an event dict on a dispatching blank line."""
        if line == "":
            if not self._data and self._event is None:
                self._id = None
                return None
            ev = {"event": self._event or "message", "data": "\n".join(self._data), "id": self._id}
            if self._id is not None:
                self.last_id = self._id
            self._event, self._data, self._id = None, [], None
            return ev
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


# ---------------------------------------------------------------------------------------------- state
@dataclass
class SymbolBuffers:
    candles: dict[int, dict] = field(default_factory=dict)
    times: list[int] = field(default_factory=list)  # sorted candle minutes
    candle_reset: int = 0  # bumped when a change is not an append at the end
    signals: dict[int, dict] = field(default_factory=dict)  # origin -> signal
    signal_times: list[int] = field(default_factory=list)
    alerts: dict[tuple, dict] = field(default_factory=dict)  # (origin, target, version) -> alert
    latest_forecast: dict | None = None
    latest_signal: dict | None = None
    vector: dict | None = None  # the latest m1 FeatureVectorOut
    emit_us: dict[int, int] = field(default_factory=dict)  # minute -> emit_ts of its m1 vector
    issued_us: dict[int, int] = field(default_factory=dict)  # minute -> issued_ts of its forecast
    rev: int = 0  # bumped on any change
    backfilled: float = 0.0  # when the REST backfill last succeeded (monotonic)
    candle_backfill_due: bool = True
    last_candle_backfill: float = 0.0
    forecasts_seen: int = 0
    signals_seen: int = 0
    alerts_seen: int = 0


@dataclass
class View:
    data: Any = None
    error: str | None = None
    status: int | None = None
    fetched: float = 0.0  # monotonic
    rev: int = 0
    wanted: float = 0.0
    ttl: float = 10.0


class ApiError(Exception):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def describe_http_error(exc: Exception) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection refused or host unreachable ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class LiveFeed:
    """One per dashboard process; see the module doc. ``start()`` once, read with the snapshot
    methods from any thread."""

    def __init__(self, api_url: str, *, poll_s: float = 1.0, max_minutes: int = 1440, history_minutes: int = 240,
                 latency_samples: int = 2000, timeout_s: float = 10.0):
        self.api_url = api_url.rstrip("/")
        self.poll_s = poll_s
        self.max_minutes = max_minutes
        self.history_minutes = min(history_minutes, max_minutes)
        self.lock = threading.RLock()
        self.symbols: list[str] = []
        self.buf: dict[str, SymbolBuffers] = {}
        self.views: dict[tuple, View] = {}
        self.latency: dict[str, deque] = {k: deque(maxlen=latency_samples)
                                          for k in ("feature_emit", "forecast", "sse_delivery")}
        self.api_error: str | None = "not contacted yet"
        self.api_ok_at: float | None = None
        self.sse_state = "connecting"
        self.sse_detail: str | None = None
        self.sse_connects = 0
        self.last_event_at: float | None = None
        self.last_event_id: str | None = None
        self.health: dict | None = None
        self.model: dict | None = None
        self.model_checked = False
        self.heartbeat: dict | None = None
        self.rev = 0
        self.events_total = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._timeout = httpx.Timeout(timeout_s, connect=3.0)
        self._client = httpx.Client(base_url=self.api_url, timeout=self._timeout)
        self._next = {"symbols": 0.0, "health": 0.0, "model": 0.0}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LiveFeed:
        if self._threads:
            return self
        for name, target in (("ui-sse", self._sse_loop), ("ui-poll", self._poll_loop)):
            th = threading.Thread(target=target, name=name, daemon=True)
            th.start()
            self._threads.append(th)
        log.info("dashboard feed started", extra={"api_url": self.api_url})
        return self

    def stop(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(5)
        self._client.close()

    # ------------------------------------------------------------------ REST
    def _get(self, path: str, **params) -> Any:
        try:
            r = self._client.get(path, params={k: v for k, v in params.items() if v is not None})
        except httpx.HTTPError as exc:
            raise ApiError(describe_http_error(exc)) from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail")
            except ValueError:
                detail = r.text[:200]
            raise ApiError(f"HTTP {r.status_code}: {detail}", r.status_code)
        try:
            data = r.json()
        except ValueError:
            raise ApiError(f"HTTP {r.status_code}: not JSON", r.status_code) from None
        if not isinstance(data, dict):  # every endpoint answers an object
            raise ApiError(f"HTTP {r.status_code}: unexpected answer ({type(data).__name__})", r.status_code)
        return data

    def _mark_api(self, err: ApiError | None) -> None:
        with self.lock:
            if err is None:
                if self.api_error is not None:
                    self.rev += 1
                self.api_error = None
                self.api_ok_at = time.time()
            elif err.status is None:  # transport failure: the API is unreachable
                if self.api_error != str(err):
                    self.rev += 1
                self.api_error = str(err)

    # ------------------------------------------------------------------ the poller
    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self._poll_once(t0)
            except Exception as exc:  # never let one bad answer stop the feed
                log.exception("poll step failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            self._stop.wait(max(0.05, self.poll_s - (time.monotonic() - t0)))

    def _poll_once(self, now: float) -> None:
        if now >= self._next["symbols"] or not self.symbols:
            try:
                syms = [s["symbol"] for s in self._get("/symbols")["symbols"]]
                self._mark_api(None)
                with self.lock:
                    if syms != self.symbols:
                        self.symbols = syms
                        for s in syms:
                            self.buf.setdefault(s, SymbolBuffers())
                        self.rev += 1
                self._next["symbols"] = now + 30.0
            except (ApiError, KeyError, TypeError) as exc:
                # without the symbol list nothing works: any failure here counts as "unreachable"
                self._mark_api(ApiError(str(exc) if isinstance(exc, ApiError) else f"/symbols: unexpected answer "
                                        f"({type(exc).__name__}: {exc})"))
                self._next["symbols"] = now + 1.0
                return
        if now >= self._next["health"]:
            self._next["health"] = now + 2.0
            self._fetch_simple("health", "/health")
        if now >= self._next["model"]:
            self._next["model"] = now + 5.0
            self._fetch_simple("model", "/model")
        for sym in list(self.symbols):
            if self._stop.is_set():
                return
            self._poll_vector(sym)
            self._maybe_backfill(sym, now)
        self._refresh_views(now)

    def _fetch_simple(self, attr: str, path: str) -> None:
        try:
            data = self._get(path)
            self._mark_api(None)
        except ApiError as exc:
            self._mark_api(exc)
            if exc.status != 503:  # /health answers 503 with its body when a component is down
                return
            try:
                data = self._client.get(path).json()
            except (httpx.HTTPError, ValueError):
                return
        with self.lock:
            if getattr(self, attr) != data:
                setattr(self, attr, data)
                self.rev += 1
            if attr == "model":
                self.model_checked = True

    def _poll_vector(self, sym: str) -> None:
        try:
            fv = self._get("/features/latest", symbol=sym, cadence="m1")
        except ApiError as exc:
            self._mark_api(exc)
            return
        self._mark_api(None)
        self.add_vector(fv)

    def add_vector(self, fv: dict) -> None:
        """A polled m1 vector: the live candle, the features table, the flow's emit latency."""
        sym = fv.get("symbol")
        cdl = S.candle_from_vector(fv)
        with self.lock:
            b = self.buf.setdefault(sym, SymbolBuffers())
            old = b.vector
            if old is not None and old.get("window_end") == fv.get("window_end") \
                    and old.get("emit_ts") == fv.get("emit_ts"):
                return
            b.vector = fv
            b.rev += 1
            self.rev += 1
            if cdl is None:
                return
            minute = cdl["t"]
            emit, recv = fv.get("emit_ts"), fv.get("close_recv_ts")
            if isinstance(emit, int) and minute not in b.emit_us:
                if isinstance(recv, int) and recv > 0:
                    self.latency["feature_emit"].append((emit - recv) / 1000.0)
                self._pair_latency(b, minute, emit=emit)
            if b.times and minute > b.times[-1] + MIN:
                b.candle_backfill_due = True  # the poll missed minutes (or the data has a gap)
            self._put_candles(b, [cdl])

    def _put_candles(self, b: SymbolBuffers, candles: list[dict]) -> None:
        """Merge candles into a symbol's buffer (caller holds the lock)."""
        changed = False
        for c in candles:
            t = c["t"]
            old = b.candles.get(t)
            new = S.merge_candle(old, c)
            if old == new:
                continue
            b.candles[t] = new
            changed = True
            if old is None:
                if b.times and t < b.times[-1]:
                    b.candle_reset += 1
                insort(b.times, t)
            else:
                b.candle_reset += 1  # an existing minute changed: sessions redraw
        if changed:
            drop = len(b.times) - self.max_minutes
            if drop > 0:
                for t in b.times[:drop]:
                    b.candles.pop(t, None)
                del b.times[:drop]
            b.rev += 1
            self.rev += 1

    # ------------------------------------------------------------------ backfill
    def _maybe_backfill(self, sym: str, now: float) -> None:
        with self.lock:
            b = self.buf[sym]
            need_hist = b.backfilled == 0.0
            need_candles = b.candle_backfill_due and now - b.last_candle_backfill > 5.0
        if need_hist:
            self._backfill_history(sym)
        if need_candles:
            self._backfill_candles(sym, now)

    def _backfill_history(self, sym: str) -> None:
        try:
            hist = self._get("/predictions/history", symbol=sym, limit=self.history_minutes)
            alerts = self._get("/alerts", symbol=sym, limit=2000)
        except ApiError as exc:
            self._mark_api(exc)
            return
        latest = None
        try:
            latest = self._get("/predictions/latest", symbol=sym)
        except ApiError as exc:
            if exc.status != 404:
                self._mark_api(exc)
                return
        with self.lock:
            b = self.buf[sym]
            items = [it for it in hist.get("items") or [] if isinstance(it, dict)
                     and isinstance(it.get("origin_ts"), int)]
            for it in items:
                self._put_signal(b, {"symbol": sym, "origin_ts": it["origin_ts"], "action": it.get("action") or "FLAT",
                                     "strength": it.get("strength") or 0.0, "reason": it.get("signal_reason") or "",
                                     "model_version": it.get("model_version"), "degraded": it.get("status") != "served",
                                     "simulated": bool(it.get("simulated")), "issued_ts": it.get("issued_ts")})
            for a in alerts.get("items") or []:
                if isinstance(a, dict) and isinstance(a.get("origin_ts"), int):
                    self._put_alert(b, a)
            self._put_candles(b, S.candles_from_history(items))
            if isinstance(latest, dict):
                if isinstance(latest.get("forecast"), dict) and isinstance(latest["forecast"].get("origin_ts"), int):
                    self._put_forecast(b, latest["forecast"])
                if isinstance(latest.get("signal"), dict) and isinstance(latest["signal"].get("origin_ts"), int):
                    self._put_signal(b, latest["signal"])
                    if not latest.get("forecast"):
                        b.latest_signal = {**latest["signal"], "status": latest.get("status"),
                                           "status_reason": latest.get("reason")}
            b.backfilled = time.monotonic()
            b.rev += 1
            self.rev += 1

    def _backfill_candles(self, sym: str, now: float) -> None:
        with self.lock:
            b = self.buf[sym]
            b.last_candle_backfill = now
        try:
            got = self._get("/candles", symbol=sym, limit=max(2, self.history_minutes))
        except ApiError as exc:
            self._mark_api(exc)
            return
        with self.lock:
            b = self.buf[sym]
            self._put_candles(b, S.candles_from_api(got.get("items") or []))
            b.candle_backfill_due = False

    def request_backfill(self, sym: str | None = None) -> None:
        with self.lock:
            for s, b in self.buf.items():
                if sym is None or s == sym:
                    b.backfilled = 0.0
                    b.candle_backfill_due = True

    # ------------------------------------------------------------------ SSE
    def _sse_loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            headers = {"Accept": "text/event-stream"}
            if self.last_event_id:
                headers["Last-Event-ID"] = self.last_event_id
            try:
                with httpx.Client(base_url=self.api_url, timeout=httpx.Timeout(5.0, read=60.0)) as c, \
                        c.stream("GET", "/signals/stream", headers=headers) as r:
                    if r.status_code != 200:
                        raise ApiError(f"HTTP {r.status_code} on /signals/stream", r.status_code)
                    with self.lock:
                        self.sse_state, self.sse_detail = "live", None
                        self.sse_connects += 1
                        self.rev += 1
                    if "Last-Event-ID" not in headers:
                        self.request_backfill()  # nothing to resume from: REST covers what came before
                    backoff = 0.5
                    parser = SSEParser()
                    for line in r.iter_lines():
                        ev = parser.feed(line)
                        if ev is not None:
                            self.on_event(ev)
                        if self._stop.is_set():
                            return
                raise ApiError("the stream ended")
            except (httpx.HTTPError, ApiError) as exc:
                msg = describe_http_error(exc) if isinstance(exc, httpx.HTTPError) else str(exc)
                with self.lock:
                    if self.sse_state != "down" or self.sse_detail != msg:
                        self.rev += 1
                    self.sse_state, self.sse_detail = "down", msg
            except Exception as exc:
                log.exception("SSE reader failed", extra={"error": f"{type(exc).__name__}: {exc}"})
                with self.lock:
                    self.sse_state, self.sse_detail = "down", f"{type(exc).__name__}: {exc}"
            self._stop.wait(backoff)
            backoff = min(5.0, backoff * 2)

    def on_event(self, ev: dict) -> None:
        """One parsed SSE event (forecast, signal, alert or heartbeat)."""
        import json

        try:
            data = json.loads(ev["data"]) if ev.get("data") else {}
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        kind = ev.get("event")
        now_us = time.time_ns() // 1000
        with self.lock:
            self.last_event_at = time.time()
            self.events_total += 1
            if ev.get("id"):
                self.last_event_id = ev["id"]
            if kind == "heartbeat":
                self.heartbeat = data
                if data.get("gap"):
                    for b in self.buf.values():
                        b.backfilled = 0.0  # events were lost: re-read the history over REST
                self.rev += 1
                return
            sym = data.get("symbol")
            if not isinstance(sym, str) or not isinstance(data.get("origin_ts"), int):
                return
            b = self.buf.setdefault(sym, SymbolBuffers())
            if kind == "forecast":
                b.forecasts_seen += 1
                self._put_forecast(b, data)
                issued = data.get("issued_ts")
                if isinstance(issued, int) and issued > 0:
                    self.latency["sse_delivery"].append((now_us - issued) / 1000.0)
                    self._pair_latency(b, data["origin_ts"], issued=issued)
            elif kind == "signal":
                b.signals_seen += 1
                self._put_signal(b, data)
            elif kind == "alert":
                b.alerts_seen += 1
                self._put_alert(b, data)
            else:
                return
            b.rev += 1
            self.rev += 1

    def _pair_latency(self, b: SymbolBuffers, minute: int, emit: int | None = None, issued: int | None = None) -> None:
        """features -> forecast latency of a minute, once both its vector's emit time (poller) and its
        forecast's issue time (SSE) are known, whichever arrived first (caller holds the lock)."""
        if emit is not None:
            b.emit_us[minute] = emit
        if issued is not None:
            b.issued_us[minute] = issued
        e, i = b.emit_us.get(minute), b.issued_us.get(minute)
        if e is not None and i is not None:
            self.latency["forecast"].append((i - e) / 1000.0)
            del b.issued_us[minute]
        for d in (b.emit_us, b.issued_us):
            while len(d) > 240:
                d.pop(next(iter(d)))

    def _put_forecast(self, b: SymbolBuffers, fc: dict) -> None:
        cur = b.latest_forecast
        if cur is None or (fc["origin_ts"], fc.get("issued_ts") or 0) >= (cur["origin_ts"], cur.get("issued_ts") or 0):
            b.latest_forecast = fc

    def _put_signal(self, b: SymbolBuffers, sig: dict) -> None:
        t = sig["origin_ts"]
        if t not in b.signals:
            insort(b.signal_times, t)
        b.signals[t] = sig
        if b.latest_signal is None or t >= b.latest_signal["origin_ts"]:
            b.latest_signal = sig
        drop = len(b.signal_times) - self.max_minutes
        if drop > 0:
            for x in b.signal_times[:drop]:
                b.signals.pop(x, None)
            del b.signal_times[:drop]

    def _put_alert(self, b: SymbolBuffers, a: dict) -> None:
        b.alerts[(a["origin_ts"], a.get("target"), a.get("model_version"))] = a
        if len(b.alerts) > 2000:
            for k in sorted(b.alerts)[:len(b.alerts) - 2000]:
                b.alerts.pop(k, None)

    # ------------------------------------------------------------------ REST views for the tabs
    def view(self, key: tuple, ttl: float = 10.0) -> View:
        """The cached answer for ``key`` (see ``_view_request``), registering that a session wants it:
        the poller keeps it fresh (every ``ttl`` s) while it is asked for."""
        with self.lock:
            v = self.views.get(key)
            if v is None:
                v = self.views[key] = View(ttl=ttl)
            v.wanted = time.monotonic()
            v.ttl = min(v.ttl, ttl)
            return v

    @staticmethod
    def _view_request(key: tuple) -> tuple[str, dict]:
        kind = key[0]
        if kind == "backtest":
            return "/backtest", {"symbol": key[1], "candles": key[2]}
        if kind == "strategy":
            return "/strategy/pnl", {"symbol": key[1], "days": key[2]}
        if kind == "history":
            return "/predictions/history", {"symbol": key[1], "limit": key[2]}
        if kind == "monitoring":
            return "/monitoring", {}
        raise ValueError(f"unknown view {key!r}")

    def _refresh_views(self, now: float) -> None:
        with self.lock:
            due = [(k, v) for k, v in self.views.items()
                   if now - v.wanted < max(30.0, 3 * v.ttl) and now - v.fetched >= v.ttl]
            for k in [k for k, v in self.views.items() if now - v.wanted > 600]:
                del self.views[k]  # nobody has asked for it in a while
        for key, v in due:
            path, params = self._view_request(key)
            try:
                data = self._get(path, **params)
                err, status = None, 200
                self._mark_api(None)
            except ApiError as exc:
                self._mark_api(exc)
                data, err, status = None, str(exc), exc.status
            with self.lock:
                v.fetched = time.monotonic()
                if data != v.data or err != v.error:
                    v.data, v.error, v.status = data, err, status
                    v.rev += 1
                    self.rev += 1

    # ------------------------------------------------------------------ reads for sessions
    def snapshot(self, sym: str | None) -> dict:
        """Everything a Live tab needs for ``sym`` (copies, safe to use without the lock)."""
        with self.lock:
            b = self.buf.get(sym) if sym else None
            out = {"symbols": list(self.symbols), "api_error": self.api_error, "sse_state": self.sse_state,
                   "sse_detail": self.sse_detail, "last_event_at": self.last_event_at, "rev": self.rev,
                   "model": self.model, "model_checked": self.model_checked, "health": self.health,
                   "heartbeat": self.heartbeat, "events_total": self.events_total}
            if b is None:
                out.update({"sym_rev": -1, "candle_reset": 0, "times": [], "vector": None, "latest_forecast": None,
                            "latest_signal": None})
                return out
            out.update({"sym_rev": b.rev, "candle_reset": b.candle_reset, "times": b.times[:],
                        "vector": b.vector, "latest_forecast": b.latest_forecast, "latest_signal": b.latest_signal,
                        "backfilled": b.backfilled > 0})
            return out

    def candles_between(self, sym: str, start: int | None, after: int | None = None) -> list[dict]:
        """Candles of ``sym`` with minute >= start (and > after when given), oldest first."""
        with self.lock:
            b = self.buf.get(sym)
            if b is None:
                return []
            lo = 0 if start is None else bisect_right(b.times, start - 1)
            if after is not None:
                lo = max(lo, bisect_right(b.times, after))
            return [dict(b.candles[t]) for t in b.times[lo:]]

    def last_candles(self, sym: str, n: int) -> list[dict]:
        """The newest ``n`` candles of ``sym``, oldest first."""
        with self.lock:
            b = self.buf.get(sym)
            return [dict(b.candles[t]) for t in b.times[-n:]] if b else []

    def signals_list(self, sym: str) -> list[dict]:
        with self.lock:
            b = self.buf.get(sym)
            return [b.signals[t] for t in b.signal_times] if b else []

    def alerts_list(self, sym: str) -> list[dict]:
        with self.lock:
            b = self.buf.get(sym)
            return sorted(b.alerts.values(), key=lambda a: (a["origin_ts"], str(a.get("target")))) if b else []

    def vectors(self) -> dict[str, dict]:
        with self.lock:
            return {s: b.vector for s, b in self.buf.items() if b.vector}

    def latest_forecasts(self) -> list[dict]:
        with self.lock:
            return [b.latest_forecast for b in self.buf.values() if b.latest_forecast]

    def latency_samples(self) -> dict[str, list[float]]:
        with self.lock:
            return {k: list(v) for k, v in self.latency.items()}


# ---------------------------------------------------------------------------------------------- singleton
_FEEDS: dict[str, LiveFeed] = {}
_FEEDS_LOCK = threading.Lock()


def get_feed(api_url: str, factory: Callable[[str], LiveFeed] | None = None, **kw) -> LiveFeed:
    """The process-wide feed for ``api_url`` (created and started on first use)."""
    with _FEEDS_LOCK:
        feed = _FEEDS.get(api_url)
        if feed is None:
            feed = (factory or (lambda u: LiveFeed(u, **kw)))(api_url)
            _FEEDS[api_url] = feed.start()
        return feed
