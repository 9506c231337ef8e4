"""REST of the local exchange: Bybit v5 market endpoints, the mempool REST API and the control API.

Bybit's envelope is ``{"retCode","retMsg","result","retExtInfo","time"}`` with HTTP 200 for answers and
parameter errors alike (``retCode`` 10001). Rate limits answer as Bybit does: over the IP limit,
HTTP 403 ``access too frequent`` and a ban for ``ban_s``; over the per-endpoint API limit (off by
default), ``retCode`` 10006 ``Too many visits!`` with the ``X-Bapi-Limit*`` headers. The ``retMsg``
texts of parameter errors are ours where Bybit's exact wording is not documented.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass
from urllib.parse import quote, unquote

from connectors.exchange import protocol as P
from connectors.exchange.drivers import RestError
from connectors.exchange.mempool import js_dumps

JSON = ("Content-Type", "application/json; charset=utf-8")
CATEGORIES = ("linear", "spot", "inverse", "option")


@dataclass
class RateLimit:
    """``ip_requests`` per ``ip_window_s`` per client IP (Bybit: 600 per 5 s; over it: HTTP 403 and a ban
    of ``ban_s``), and optionally ``api_per_s`` requests per endpoint per second (retCode 10006)."""
    ip_requests: int = 600
    ip_window_s: float = 5.0
    ban_s: float = 600.0
    api_per_s: int | None = None


class RateLimiter:
    def __init__(self, cfg: RateLimit | None = None):
        self.cfg = cfg or RateLimit()
        self.reset()

    def reset(self) -> None:
        self.hits: dict[str, deque] = {}
        self.banned_until: dict[str, float] = {}
        self.api: dict[tuple[str, str, int], int] = {}
        self.counts = {"allowed": 0, "ip_limited": 0, "api_limited": 0}

    def check(self, ip: str, path: str) -> tuple[str, dict[str, str]]:
        """``ok``, ``ip`` (403) or ``api`` (10006), with the X-Bapi headers when the API limit is on."""
        now = time.monotonic()
        cfg = self.cfg
        if self.banned_until.get(ip, 0.0) > now:
            self.counts["ip_limited"] += 1
            return "ip", {}
        dq = self.hits.setdefault(ip, deque())
        while dq and dq[0] <= now - cfg.ip_window_s:
            dq.popleft()
        dq.append(now)
        if len(dq) > cfg.ip_requests:
            self.banned_until[ip] = now + cfg.ban_s
            self.counts["ip_limited"] += 1
            return "ip", {}
        headers: dict[str, str] = {}
        if cfg.api_per_s:
            sec = int(time.time())
            key = (ip, path, sec)
            n = self.api.get(key, 0) + 1
            self.api[key] = n
            if len(self.api) > 10_000:
                self.api = {k: v for k, v in self.api.items() if k[2] >= sec - 1}
            headers = {"X-Bapi-Limit": str(cfg.api_per_s), "X-Bapi-Limit-Status": str(max(0, cfg.api_per_s - n)),
                       "X-Bapi-Limit-Reset-Timestamp": str((sec + 1) * 1000 if n > cfg.api_per_s
                                                           else int(time.time() * 1000))}
            if n > cfg.api_per_s:
                self.counts["api_limited"] += 1
                return "api", headers
        self.counts["allowed"] += 1
        return "ok", headers


def _q(query: dict, name: str) -> str | None:
    v = query.get(name)
    return v[-1] if v else None


def _int(query: dict, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
    raw = _q(query, name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise RestError(10001, f"params error: {name} must be an integer, got {raw!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise RestError(10001, f"params error: {name} must be between {lo} and {hi}, got {v}")
    return v


class RestApi:
    def __init__(self, exchange):
        self.ex = exchange
        self.limiter = RateLimiter(exchange.rate_limit)

    # ------------------------------------------------------------------ entry point
    async def handle(self, method: str, path: str, query: dict, headers: dict, body: bytes, ip: str):
        if path.startswith("/control/") or path == "/control":
            return await self._control(method, path, query, headers, body)
        if path in ("/health", "/"):
            return 200, [JSON], json.dumps({"status": "ok", **self.ex.urls()}).encode()
        if path.startswith("/v5/"):
            if method not in ("GET", "HEAD"):
                return 405, [JSON], self._env_error(10001, f"{method} is not supported on {path}")
            verdict, hdrs = self.limiter.check(ip, path)
            extra = list(hdrs.items())
            if verdict == "ip":
                return 403, [("Content-Type", "text/plain; charset=utf-8")], b"403 Forbidden: access too frequent\n"
            if verdict == "api":
                return 200, [JSON, *extra], self._env_error(10006, "Too many visits!")
            status, out = self._bybit(path, query)
            return status, [JSON, *extra], out
        coin, rest = self._mempool_route(path)
        if coin is not None:
            if method not in ("GET", "HEAD"):
                return 405, [("Content-Type", "text/plain")], b"method not allowed\n"
            return self._mempool(coin, rest)
        return 404, [("Content-Type", "text/plain; charset=utf-8")], f"not found: {path}\n".encode()

    def handle_get_sync(self, path: str, query: dict, ip: str):
        """The GET subset for the WebSocket port (process_request is synchronous there)."""
        if path.startswith("/v5/"):
            verdict, hdrs = self.limiter.check(ip, path)
            if verdict == "ip":
                return 403, [("Content-Type", "text/plain; charset=utf-8")], b"403 Forbidden: access too frequent\n"
            if verdict == "api":
                return 200, [JSON, *hdrs.items()], self._env_error(10006, "Too many visits!")
            status, out = self._bybit(path, query)
            return status, [JSON, *hdrs.items()], out
        coin, rest = self._mempool_route(path)
        if coin is not None:
            return self._mempool(coin, rest)
        if path in ("/health", "/"):
            return 200, [JSON], json.dumps({"status": "ok", **self.ex.urls()}).encode()
        return 404, [("Content-Type", "text/plain; charset=utf-8")], f"not found: {path}\n".encode()

    # ------------------------------------------------------------------ Bybit market endpoints
    def _env(self, result) -> bytes:
        return json.dumps({"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {},
                           "time": self.ex.driver.now_ms()}, separators=(",", ":"), ensure_ascii=False).encode()

    def _env_error(self, code: int, msg: str) -> bytes:
        return json.dumps({"retCode": code, "retMsg": msg, "result": {}, "retExtInfo": {},
                           "time": self.ex.driver.now_ms()}, separators=(",", ":")).encode()

    def _bybit(self, path: str, query: dict) -> tuple[int, bytes]:
        routes = {"/v5/market/kline": self._kline, "/v5/market/instruments-info": self._instruments,
                  "/v5/market/orderbook": self._orderbook, "/v5/market/funding/history": self._funding,
                  "/v5/market/tickers": self._tickers}
        fn = routes.get(path)
        if fn is None:
            return 404, json.dumps({"retCode": 10001, "retMsg": f"path not found: {path}", "result": {},
                                    "retExtInfo": {}, "time": self.ex.driver.now_ms()}).encode()
        try:
            return 200, self._env(fn(query))
        except RestError as e:
            return 200, self._env_error(e.ret_code, e.ret_msg)

    def _category(self, query: dict, default: str | None = None, allowed=("linear", "spot")) -> str:
        cat = _q(query, "category") or default
        if not cat:
            raise RestError(10001, "params error: category is required")
        if cat not in CATEGORIES:
            raise RestError(10001, f"params error: illegal category {cat!r}")
        if cat not in allowed:
            raise RestError(10001, f"category {cat} is not served by the local exchange")
        return cat

    def _symbol(self, query: dict, category: str, required: bool = True) -> str | None:
        sym = _q(query, "symbol")
        if not sym:
            if required:
                raise RestError(10001, "params error: symbol is required")
            return None
        if not self.ex.driver.known_symbol(category, sym) and not self._driver_has(category, sym):
            raise RestError(10001, "Not supported symbols")
        return sym

    def _driver_has(self, category: str, sym: str) -> bool:
        return self.ex.driver.serves(category, P.Topic("tickers", sym))

    def _kline(self, query: dict) -> dict:
        cat = self._category(query, default="linear")
        sym = self._symbol(query, cat)
        interval = _q(query, "interval")
        if not interval:
            raise RestError(10001, "params error: interval is required")
        if interval in ("W", "M"):
            raise RestError(10001, f"interval {interval} is not served by the local exchange")
        if interval not in P.KLINE_INTERVALS:
            raise RestError(10001, f"params error: invalid interval {interval!r}")
        start, end = _int(query, "start"), _int(query, "end")
        if start is not None and end is not None and start > end:
            raise RestError(10001, "params error: start must not be after end")
        limit = _int(query, "limit", 200, 1, 1000)
        rows = self.ex.driver.rest_klines(cat, sym, interval, start, end, limit)
        return {"symbol": sym, "category": cat, "list": rows}

    def _instruments(self, query: dict) -> dict:
        cat = self._category(query)
        items = self.ex.instruments.lists.get(cat, [])
        sym = _q(query, "symbol")
        status = _q(query, "status")
        base = _q(query, "baseCoin")
        if sym:
            items = [i for i in items if i.get("symbol") == sym]
        if status:
            items = [i for i in items if i.get("status") == status]
        if base:
            items = [i for i in items if i.get("baseCoin") == base]
        limit = _int(query, "limit", 500, 1, 1000)
        start = 0
        cursor = _q(query, "cursor")
        if cursor:
            fields = dict(kv.split("=", 1) for kv in unquote(cursor).split("&") if "=" in kv)
            last = fields.get("last")
            idx = next((i for i, it in enumerate(items) if it.get("symbol") == last), None)
            if last is None or idx is None:
                raise RestError(10001, f"params error: invalid cursor {cursor!r}")
            start = idx + 1
        page = items[start:start + limit]
        nxt = ""
        if start + limit < len(items) and page:
            nxt = quote(f"first={page[0]['symbol']}&last={page[-1]['symbol']}", safe="")
        return {"category": cat, "list": page, "nextPageCursor": nxt}

    def _orderbook(self, query: dict) -> dict:
        cat = self._category(query)
        sym = self._symbol(query, cat)
        hi, default = (500, 25) if cat == "linear" else (200, 1)
        limit = _int(query, "limit", default, 1, hi)
        return self.ex.driver.rest_orderbook(cat, sym, limit)

    def _funding(self, query: dict) -> dict:
        cat = self._category(query, allowed=("linear",))
        sym = self._symbol(query, cat)
        start, end = _int(query, "startTime"), _int(query, "endTime")
        if start is not None and end is None:
            raise RestError(10001, "params error: endTime is required when startTime is passed")
        if start is not None and end is not None and start > end:
            raise RestError(10001, "params error: startTime must not be after endTime")
        limit = _int(query, "limit", 200, 1, 200)
        return {"category": cat, "list": self.ex.driver.rest_funding(cat, sym, start, end, limit)}

    def _tickers(self, query: dict) -> dict:
        cat = self._category(query)
        sym = self._symbol(query, cat, required=False)
        return {"category": cat, "list": self.ex.driver.rest_tickers(cat, sym)}

    # ------------------------------------------------------------------ mempool REST
    @staticmethod
    def _mempool_route(path: str) -> tuple[str | None, str]:
        if path.startswith("/ltc/api/"):
            return "LTC", path[len("/ltc"):]
        if path.startswith("/api/"):
            return "BTC", path
        return None, path

    def _mempool(self, coin: str, path: str):
        model = self.ex.mempools.get(coin)
        if model is None:
            return 404, [("Content-Type", "text/plain")], b"mempool feed disabled\n"
        if path == "/api/mempool":
            return 200, [JSON], js_dumps(model.rest_mempool()).encode()
        if path == "/api/v1/fees/recommended":
            return 200, [JSON], js_dumps(model.recommended_fees()).encode()
        if path == "/api/v1/fees/mempool-blocks":
            return 200, [JSON], js_dumps(model.projected_blocks()).encode()
        if path == "/api/blocks/tip/height":
            return 200, [("Content-Type", "text/plain")], str(model.height).encode()
        return 404, [("Content-Type", "text/plain")], f"not found: {path}\n".encode()

    # ------------------------------------------------------------------ control API
    async def _control(self, method: str, path: str, query: dict, headers: dict, body: bytes):
        ex = self.ex

        def ok(obj, status=200):
            return status, [JSON], json.dumps(obj, default=str).encode()

        if method == "GET":
            if path == "/control/state":
                return ok(ex.state())
            if path == "/control/faults":
                return ok(ex.faults)
            if path == "/control/sent":
                conn_id = _q(query, "conn_id")
                since = int(_q(query, "since") or 0)
                kinds = set((_q(query, "kinds") or "").split(",")) - {""}
                lines = []
                for cid, recs in ex.sent_log.items():
                    if conn_id and cid != conn_id:
                        continue
                    for r in recs[since:] if conn_id else recs:
                        if kinds and r.kind not in kinds:
                            continue
                        lines.append(json.dumps({"conn_id": cid, "n": r.n, "topic": r.topic, "kind": r.kind,
                                                 "fault": r.fault, "text": r.text}))
                return 200, [("Content-Type", "application/x-ndjson")], ("\n".join(lines) + "\n").encode()
            return ok({"error": f"unknown control path {path}"}, 404)
        if method != "POST":
            return ok({"error": "use GET or POST"}, 405)
        token = ex.control_token
        if token and headers.get("authorization", "") != f"Bearer {token}":
            return ok({"error": "missing or wrong bearer token"}, 401)
        try:
            req = json.loads(body or b"{}")
            if not isinstance(req, dict):
                raise TypeError("the body must be a JSON object")
        except (ValueError, TypeError) as e:
            return ok({"error": f"bad JSON body: {e}"}, 400)
        try:
            if path == "/control/fault":
                return ok(await ex.inject_async(**req))
            if path == "/control/ratelimit":
                if req.pop("reset", False):
                    self.limiter.reset()
                if req:
                    cfg = asdict(self.limiter.cfg)
                    unknown = set(req) - set(cfg)
                    if unknown:
                        raise ValueError(f"unknown rate-limit fields {sorted(unknown)}")
                    cfg.update(req)
                    self.limiter.cfg = RateLimit(**cfg)
                    ex.rate_limit = self.limiter.cfg
                return ok({"rate_limit": asdict(self.limiter.cfg), "counts": self.limiter.counts})
            if path == "/control/start":
                ex.driver.start()
                return ok(ex.driver.describe())
        except (TypeError, ValueError) as e:
            return ok({"error": str(e)}, 400)
        return ok({"error": f"unknown control path {path}"}, 404)
