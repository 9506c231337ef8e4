"""Bybit v5 public REST: kline backfill, instruments-info, order-book snapshots, funding history.

Every request goes through one token-bucket :class:`RateLimiter` (10 requests/s by default, far
under Bybit's 600 per 5 s per IP) and is retried with exponential backoff and jitter on HTTP 429,
403 ("access too frequent", or a region block), 5xx, timeouts, transport errors and Bybit's
rate-limit ``retCode``s. A 403 backs off much longer (Bybit asks for minutes). When the retries run
out the caller gets a :class:`RestError` that says what happened; the live stream does not depend
on REST and keeps running.

Conversions to the Avro records of ``schemas/avro`` (``kline_record``, ``orderbook_record``,
``funding_record``) keep the exchange's decimal strings verbatim.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from connectors.bybit.parse import ParseError, check_decimal, check_signed, levels
from tickcast.logs import get_logger

log = get_logger("gateway.rest")

# Bybit retCodes worth retrying: too many visits, server timeout/busy, internal errors
RETRY_RET_CODES = {10006, 10016, 10000, 10002}
# symbols Bybit replaced: the MVP list names MATICUSDT, which became POLUSDT
RENAMED_SYMBOLS = {"MATICUSDT": "POLUSDT", "MATICPERP": "POLPERP"}
INTERVAL_MS = {"1": 60_000, "3": 180_000, "5": 300_000, "15": 900_000, "30": 1_800_000, "60": 3_600_000,
               "120": 7_200_000, "240": 14_400_000, "360": 21_600_000, "720": 43_200_000,
               "D": 86_400_000, "W": 604_800_000}


def _reset_wait(header: str | None) -> float:
    """Seconds until ``X-Bapi-Limit-Reset-Timestamp`` (ms), 0 when absent or past."""
    try:
        return max(0.0, int(header) / 1000 - time.time()) if header else 0.0
    except ValueError:
        return 0.0


class RestError(RuntimeError):
    def __init__(self, message: str, *, status: int | None = None, ret_code: int | None = None):
        super().__init__(message)
        self.status = status
        self.ret_code = ret_code


class RateLimiter:
    """Token bucket: at most ``rate`` requests per second on average, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, int(rate))
        self.clock = clock
        self.tokens = float(self.burst)
        self.updated = clock()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    async def acquire(self) -> None:
        async with self._lock:  # FIFO: waiters are served in arrival order
            while True:
                now = self.clock()
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
                self.waited_s += wait
                await asyncio.sleep(wait)


@dataclass(frozen=True)
class Instrument:
    symbol: str
    status: str
    tick_size: str
    qty_step: str
    base_coin: str
    quote_coin: str
    funding_interval_min: int | None


class BybitRest:
    """Async client of Bybit's public market endpoints (or the local exchange's: only the URL differs)."""

    def __init__(self, base_url: str, *, category: str = "linear", rate_per_s: float = 10.0,
                 max_retries: int = 5, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 backoff_403_s: float = 60.0, backoff_403_max_s: float = 300.0, timeout_s: float = 10.0,
                 rng: random.Random | None = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.category = category
        self.limiter = RateLimiter(rate_per_s)
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.backoff_403_s = backoff_403_s
        self.backoff_403_max_s = backoff_403_max_s  # Bybit: HTTP 403 "access too frequent" -> minutes
        self.rng = rng or random.Random()
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s,
                                      headers={"User-Agent": "tickcast/0.1 (analytics)"})
        self.requests = 0
        self.retries = 0

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _delay(self, attempt: int, status: int | None) -> float:
        base = self.backoff_403_s if status == 403 else self.backoff_base_s
        cap = max(self.backoff_403_max_s, self.backoff_403_s) if status == 403 else self.backoff_max_s
        return self.rng.uniform(base / 2, min(cap, base * 2 ** attempt))

    async def get(self, path: str, params: dict[str, Any]) -> dict:
        """The body of a successful (retCode 0) response; retries what is worth retrying."""
        import httpx

        params = {k: v for k, v in params.items() if v is not None}
        last = "no attempt"
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            await self.limiter.acquire()
            self.requests += 1
            status = None
            reset_at = 0.0
            try:
                resp = await self.http.get(path, params=params)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                status = resp.status_code
                if status == 200:
                    try:
                        body = resp.json()
                    except ValueError:
                        raise RestError(f"GET {path}: the response is not JSON", status=status) from None
                    code = body.get("retCode") if isinstance(body, dict) else None
                    if code == 0:
                        return body
                    if code not in RETRY_RET_CODES:
                        msg = body.get("retMsg") if isinstance(body, dict) else body
                        raise RestError(f"GET {path} {params}: retCode {code}: {msg!r}", status=status, ret_code=code)
                    last = f"retCode {code} {body.get('retMsg')}"
                    reset_at = _reset_wait(resp.headers.get("X-Bapi-Limit-Reset-Timestamp"))
                elif status in (403, 429) or status >= 500:
                    last = f"HTTP {status}"
                    if status == 403:
                        last += (" (Bybit: access too frequent, or requests from this region are blocked; "
                                 "the WebSocket stream is not affected)")
                else:
                    raise RestError(f"GET {path} {params}: HTTP {status}: {resp.text[:200]}", status=status)
            if attempt == self.max_retries:
                break
            self.retries += 1
            # Bybit says when its per-endpoint limit resets: wait for that (bounded), not less
            delay = max(self._delay(attempt, status), min(reset_at, self.backoff_max_s))
            log.warning("REST request failed; retrying", extra={
                "path": path, "error": last, "delay_s": round(delay, 2), "counts": {"attempt": attempt + 1}})
            await asyncio.sleep(delay)
        raise RestError(f"GET {path} failed after {self.max_retries + 1} attempts: {last}", status=status)

    # -- endpoints ------------------------------------------------------------------------------
    async def instruments(self) -> dict[str, Instrument]:
        """Every instrument of the category (follows ``nextPageCursor``)."""
        out: dict[str, Instrument] = {}
        cursor = None
        for _ in range(100):
            body = await self.get("/v5/market/instruments-info",
                                  {"category": self.category, "limit": 1000, "cursor": cursor})
            result = body.get("result") or {}
            for item in result.get("list") or []:
                try:
                    out[item["symbol"]] = Instrument(
                        item["symbol"], item.get("status", ""), item["priceFilter"]["tickSize"],
                        item["lotSizeFilter"].get("qtyStep") or item["lotSizeFilter"].get("basePrecision", ""),
                        item.get("baseCoin", ""), item.get("quoteCoin", ""), item.get("fundingInterval"))
                except (KeyError, TypeError) as exc:
                    log.warning("instrument without tick/lot size skipped", extra={"item": str(item)[:200],
                                                                                 "error": repr(exc)})
            cursor = result.get("nextPageCursor")
            if not cursor:
                return out
        raise RestError("instruments-info: more than 100 pages (cursor loop?)")

    async def orderbook(self, symbol: str, limit: int) -> dict:
        body = await self.get("/v5/market/orderbook", {"category": self.category, "symbol": symbol,
                                                        "limit": limit})
        return body["result"]

    async def klines(self, symbol: str, start_ms: int, end_ms: int, *, interval: str = "1", limit: int = 1000,
                     progress: Callable[[int], None] | None = None) -> list[list[str]]:
        """Closed candles with start in [start_ms, end_ms], ascending, deduplicated on start time.

        Bybit returns pages newest first; the newest row may be the candle still open (dropped).
        """
        if interval not in INTERVAL_MS:
            raise ValueError(f"interval {interval!r} is not one of {sorted(INTERVAL_MS)}")
        if not 1 <= limit <= 1000:  # Bybit's bounds: a larger page would end the paging after one page
            raise ValueError(f"limit {limit} is outside Bybit's 1..1000")
        step = INTERVAL_MS[interval]
        rows: dict[int, list[str]] = {}
        end = end_ms
        while end >= start_ms:
            body = await self.get("/v5/market/kline", {"category": self.category, "symbol": symbol,
                                                        "interval": interval, "start": start_ms, "end": end,
                                                        "limit": limit})
            page = (body.get("result") or {}).get("list") or []
            server_ms = int(body.get("time") or time.time() * 1000)
            if not page:
                break
            oldest = None
            added = 0
            for row in page:
                ts = int(row[0])
                oldest = ts if oldest is None else min(oldest, ts)
                if ts < start_ms or ts > end_ms or ts + step > server_ms or ts in rows:
                    continue  # outside the period, still open, or already seen
                rows[ts] = row
                added += 1
            if progress:
                progress(added)
            if oldest is None or oldest <= start_ms or len(page) < limit:
                break
            end = oldest - 1
        return [rows[k] for k in sorted(rows)]

    async def funding_history(self, symbol: str, start_ms: int, end_ms: int, *, limit: int = 200) -> list[dict]:
        """Funding settlements in [start_ms, end_ms], ascending (pages newest first by endTime)."""
        out: dict[int, dict] = {}
        end = end_ms
        while end >= start_ms:
            body = await self.get("/v5/market/funding/history", {
                "category": self.category, "symbol": symbol, "startTime": start_ms, "endTime": end, "limit": limit})
            page = (body.get("result") or {}).get("list") or []
            if not page:
                break
            oldest = min(int(r["fundingRateTimestamp"]) for r in page)
            for r in page:
                ts = int(r["fundingRateTimestamp"])
                if start_ms <= ts <= end_ms:
                    out[ts] = r
            if oldest <= start_ms or len(page) < limit:
                break
            end = oldest - 1
        return [out[k] for k in sorted(out)]

    async def resolve_symbols(self, symbols: list[str]) -> tuple[list[str], dict[str, Instrument]]:
        """Validate symbols against instruments-info; replaced ones (MATICUSDT) map to their successor."""
        instruments = await self.instruments()
        return resolve_symbols(symbols, instruments)


def resolve_symbols(symbols: list[str], instruments: dict[str, Instrument] | None) -> tuple[list[str], dict]:
    """(resolved symbols, instrument of each). ``instruments`` None: REST unavailable, apply the known
    renames only. Raises ValueError naming symbols that do not trade."""
    out: list[str] = []
    info: dict[str, Instrument] = {}
    unknown = []
    for sym in symbols:
        target = sym
        if instruments is not None and sym in instruments and instruments[sym].status == "Trading":
            pass
        elif sym in RENAMED_SYMBOLS:
            target = RENAMED_SYMBOLS[sym]
            log.warning(f"{sym} no longer trades on Bybit: it was replaced by {target}; using {target}",
                        extra={"symbol": sym, "replacement": target})
        elif instruments is not None:
            unknown.append(sym)
            continue
        if instruments is not None:
            inst = instruments.get(target)
            if inst is None or inst.status != "Trading":
                unknown.append(sym)
                continue
            info[target] = inst
        if target not in out:
            out.append(target)
    if unknown:
        raise ValueError(f"symbols not trading in this category on Bybit: {unknown}")
    return out, info


# --- records -----------------------------------------------------------------------------------


def kline_record(symbol: str, venue: str, row: list[str], interval: str) -> dict:
    """A closed candle of ``/v5/market/kline`` ([start, open, high, low, close, volume, turnover]).

    Historical load (``gw_seq`` -1), as ``flows.kline_history`` writes it: ``exchange_ts`` is the
    candle's last millisecond and ``recv_ts`` the same instant in µs, so a re-import is identical."""
    if not isinstance(row, list) or len(row) < 6:
        raise ParseError("wrong_type", f"kline row {row!r} is not [start, open, high, low, close, volume, ...]")
    start = int(row[0])
    end = start + INTERVAL_MS[interval] - 1
    return {"symbol": symbol, "venue": venue, "exchange_ts": end, "recv_ts": end * 1000, "gw_seq": -1,
            "interval": interval, "start_ts": start, "end_ts": end,
            "open": check_decimal(row[1], "open"), "high": check_decimal(row[2], "high"),
            "low": check_decimal(row[3], "low"), "close": check_decimal(row[4], "close"),
            "volume": check_decimal(row[5], "volume"),
            "turnover": check_decimal(row[6], "turnover") if len(row) > 6 else None, "confirm": True}


def orderbook_record(symbol: str, venue: str, result: dict, depth: int, recv_ts: int) -> dict:
    """``/v5/market/orderbook`` result -> OrderBookSnapshot (bids descending, asks ascending)."""
    if result.get("s") != symbol:
        raise ParseError("symbol_mismatch", f"REST order book is for {result.get('s')!r}, not {symbol}")
    bid_px, bid_sz = levels(result["b"], "bid")
    ask_px, ask_sz = levels(result["a"], "ask")
    for name in ("ts", "u", "seq"):
        if type(result.get(name)) is not int:
            raise ParseError("wrong_type", f"REST order book {name} must be an integer, got {result.get(name)!r}")
    cts = result.get("cts")
    return {"symbol": symbol, "venue": venue, "exchange_ts": result["ts"], "recv_ts": recv_ts, "gw_seq": -1,
            "depth": depth, "update_id": result["u"], "cross_seq": result["seq"],
            "match_ts": cts if type(cts) is int else None,
            "bid_px": bid_px, "bid_sz": bid_sz, "ask_px": ask_px, "ask_sz": ask_sz}


def funding_record(symbol: str, venue: str, item: dict) -> dict:
    """A settlement of ``/v5/market/funding/history`` (historical: gw_seq -1, recv_ts = its time)."""
    ts = int(item["fundingRateTimestamp"])
    return {"symbol": symbol, "venue": venue, "exchange_ts": ts, "recv_ts": ts * 1000, "gw_seq": -1,
            "kind": "settlement", "funding_rate": check_signed(item["fundingRate"], "fundingRate"),
            "next_funding_time": None, "funding_interval_hour": None}
