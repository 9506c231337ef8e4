"""Bybit v5 public WebSocket connections: subscribe, ping, reconnect with backoff, resubscribe.

A :class:`BybitConnection` owns one socket and a fixed list of topics. It hands every received text
frame to ``on_message(raw, recv_ts_us, conn)`` untouched (the gateway parses it), sends
``{"op":"ping"}`` every ``ping_s`` (Bybit cuts idle connections), treats a socket without any
traffic for ``stale_s`` as dead, and after any disconnect reconnects with exponential backoff and
full jitter, then subscribes again, which makes Bybit send fresh snapshots of books and tickers.

:func:`plan_connections` splits the topics of all symbols across connections within Bybit's limits
(the args of one connection total at most 21,000 characters; at most 10 args per request).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import time
from collections.abc import Callable

from tickcast.logs import get_logger

log = get_logger("gateway.ws")

MAX_ARGS_CHARS_PER_CONNECTION = 21_000
MAX_ARGS_PER_REQUEST = 10


def topics_for(symbol: str, depth: int, kline_interval: str = "1") -> list[str]:
    """The four public channels the gateway follows for one symbol."""
    return [f"orderbook.{depth}.{symbol}", f"publicTrade.{symbol}", f"tickers.{symbol}",
            f"kline.{kline_interval}.{symbol}"]


def plan_connections(symbols: list[str], depth: int, *, max_topics: int = 200,
                     max_chars: int = MAX_ARGS_CHARS_PER_CONNECTION) -> list[list[str]]:
    """Topics grouped per connection: all channels of a symbol on one connection (so its messages
    keep their relative arrival order), at most ``max_topics`` topics and ``max_chars`` characters of
    args per connection."""
    groups: list[list[str]] = [[]]
    chars = 0
    for sym in symbols:
        topics = topics_for(sym, depth)
        size = sum(len(t) for t in topics)
        if groups[-1] and (len(groups[-1]) + len(topics) > max_topics or chars + size > max_chars):
            groups.append([])
            chars = 0
        groups[-1].extend(topics)
        chars += size
    return [g for g in groups if g]


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


class BybitConnection:
    """One WebSocket to Bybit's public stream (or the local exchange: only the URL differs)."""

    _ids = itertools.count(1)

    def __init__(self, url: str, topics: list[str], on_message: Callable[[str, int, BybitConnection], None], *,
                 name: str | None = None, ping_s: float = 20.0, stale_s: float | None = None,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0, connect_timeout_s: float = 10.0,
                 on_event: Callable[[str, BybitConnection, dict], None] | None = None,
                 rng: random.Random | None = None):
        self.url = url
        self.topics = list(topics)
        self.on_message = on_message
        self.on_event = on_event or (lambda kind, conn, info: None)
        self.name = name or f"ws{next(self._ids)}"
        self.ping_s = ping_s
        self.stale_s = stale_s if stale_s is not None else max(2.5 * ping_s, 5.0)
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.rng = rng or random.Random()
        self.ws = None
        self.connected = asyncio.Event()
        self.connects = 0
        self.reconnects = 0
        self.received = 0
        self.last_recv = 0.0
        self.pongs = 0
        self._req = itertools.count(1)
        self._stop = asyncio.Event()
        self._failures = 0
        self._requests: dict[str, tuple[str, list[str]]] = {}  # req_id -> (op, args) awaiting an answer
        self.refused: set[str] = set()  # topics the exchange refused: not subscribed again

    # -- sending --------------------------------------------------------------------------------
    async def send_op(self, op: str, args: list[str] | None = None) -> str:
        req_id = f"{self.name}-{next(self._req)}"
        msg = {"op": op, "req_id": req_id}
        if args is not None:
            msg["args"] = args
            if len(self._requests) > 1000:
                self._requests.clear()
            self._requests[req_id] = (op, list(args))
        await self.ws.send(json.dumps(msg, separators=(",", ":")))
        return req_id

    async def subscribe(self, topics: list[str]) -> None:
        for i in range(0, len(topics), MAX_ARGS_PER_REQUEST):
            await self.send_op("subscribe", topics[i:i + MAX_ARGS_PER_REQUEST])

    async def unsubscribe(self, topics: list[str]) -> None:
        for i in range(0, len(topics), MAX_ARGS_PER_REQUEST):
            await self.send_op("unsubscribe", topics[i:i + MAX_ARGS_PER_REQUEST])

    async def resubscribe(self, topics: list[str]) -> bool:
        """Unsubscribe and subscribe again: Bybit answers with a fresh snapshot. False if offline."""
        if self.ws is None or not self.connected.is_set():
            return False  # the reconnect's own subscribe brings the fresh snapshot
        try:
            await self.unsubscribe(topics)
            await self.subscribe(topics)
            return True
        except Exception as exc:  # noqa: BLE001 - the socket died between the check and the send
            log.warning("resubscribe failed; the reconnect will resubscribe", extra={
                "conn": self.name, "error": repr(exc)})
            return False

    # -- running --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self.ws is not None:
            asyncio.ensure_future(self.ws.close())

    async def run(self) -> None:
        """Connect, subscribe, read; reconnect with backoff until ``stop()``."""
        from connectors.bybit.transport import FrameStream

        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ws = await FrameStream.open(self.url, self._on_text, on_data=self._on_data,
                                            timeout=self.connect_timeout_s)
            except Exception as exc:  # noqa: BLE001 - DNS, TLS, refused, timeout, bad handshake: all retried
                self._failures += 1
                self.on_event("connect_failed", self, {"error": repr(exc)})
                log.warning("connect failed", extra={"conn": self.name, "url": self.url, "error": repr(exc),
                                                     "counts": {"attempt": attempt}})
            else:
                self.ws = ws
                self.connects += 1
                if self.connects > 1:
                    self.reconnects += 1
                self.last_recv = time.monotonic()
                try:
                    await self.subscribe(self.topics)
                    self.connected.set()
                    self.on_event("connected", self, {"topics": len(self.topics)})
                    log.info("connected and subscribed", extra={
                        "conn": self.name, "url": self.url, "counts": {"topics": len(self.topics),
                                                                         "reconnects": self.reconnects}})
                    code = await self._read(ws)
                    if not self._stop.is_set():
                        log.warning("the exchange closed the connection", extra={"conn": self.name,
                                                                                 "close_code": code})
                except Exception as exc:  # noqa: BLE001 - whatever ended the socket, reconnect
                    if not self._stop.is_set():
                        log.warning("connection lost", extra={"conn": self.name, "error": repr(exc)})
                finally:
                    self.connected.clear()
                    self.ws = None
                    await ws.close()
                    self.on_event("disconnected", self, {})
                # a connection that lived a while resets the backoff
                if time.monotonic() - started > max(10.0, self.backoff_max_s):
                    attempt = 0
            if self._stop.is_set():
                break
            delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, self.rng)
            attempt += 1
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    def _on_data(self) -> None:
        self.last_recv = time.monotonic()

    def _on_text(self, raw: str) -> None:
        """Every message, in order, straight from the transport's ``data_received``."""
        self.received += 1
        self.on_message(raw, time.time_ns() // 1000, self)

    async def _read(self, ws) -> int | None:
        """Until the connection ends (messages are delivered by the transport meanwhile)."""
        pinger = asyncio.create_task(self._pinger(ws))
        try:
            return await ws.wait_closed()
        finally:
            pinger.cancel()

    async def _pinger(self, ws) -> None:
        """App-level ping every ping_s; a socket silent for stale_s is closed (and reconnected)."""
        last_ping = time.monotonic()
        tick = min(1.0, self.ping_s / 4)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self.last_recv > self.stale_s:
                log.warning("no traffic: closing the stalled connection", extra={
                    "conn": self.name, "silent_s": round(now - self.last_recv, 1)})
                self.on_event("stalled", self, {})
                await ws.close()
                return
            if now - last_ping >= self.ping_s:
                last_ping = now
                try:
                    await self.send_op("ping")
                except Exception:  # noqa: BLE001 - the reader sees the closed socket and reconnects
                    return

    def note_pong(self) -> None:
        self.pongs += 1

    def rejected(self, msg: dict) -> list[str]:
        """The exchange refused a subscribe (e.g. ``error:handler not found,topic:orderbook.50.XUSDT``):
        drop the refused topic for good and subscribe the rest of that request again, so one bad
        symbol does not silence the others. Returns the topics given up."""
        op, args = self._requests.pop(str(msg.get("req_id")), ("", []))
        if op != "subscribe" or not args:
            return []
        ret = str(msg.get("ret_msg", ""))
        if "already subscribed" in ret:
            return []  # the topic is live on this connection: nothing is lost
        if "not found" not in ret and "invalid" not in ret.lower():
            # not a verdict on a topic (rate limit, a passing server error): the same request again, later
            log.warning("subscribe refused for a reason that names no bad topic: retrying in 5 s",
                        extra={"conn": self.name, "topics": args, "ret_msg": ret[:300]})
            asyncio.ensure_future(self._retry(args, delay_s=5.0))
            return []
        m = re.search(r"topic:([A-Za-z0-9.]+)", ret)
        if m and m.group(1) in args:
            bad = [m.group(1)]
        elif len(args) == 1:
            bad = list(args)
        else:  # the reason names no topic: ask for each one alone to find out which
            for t in args:
                asyncio.ensure_future(self._retry([t]))
            return []
        self.refused.update(bad)
        self.topics = [t for t in self.topics if t not in self.refused]
        rest = [t for t in args if t not in self.refused]
        if rest:
            asyncio.ensure_future(self._retry(rest))
        log.error("the exchange refused a subscription: not subscribed again", extra={
            "conn": self.name, "topics": bad, "ret_msg": msg.get("ret_msg")})
        return bad

    def acknowledged(self, msg: dict) -> None:
        """A successful reply: its request no longer waits for an answer."""
        self._requests.pop(str(msg.get("req_id")), None)

    async def _retry(self, topics: list[str], delay_s: float = 0.0) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        if self.ws is None:
            return  # the reconnect subscribes what is left
        try:
            await self.subscribe(topics)
        except Exception:  # noqa: BLE001 - the socket died: the reconnect subscribes what is left
            pass


async def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a WebSocket handshake with ``url`` succeeds within ``timeout`` seconds."""
    from websockets.asyncio.client import connect

    try:
        async with asyncio.timeout(timeout):
            ws = await connect(url, ping_interval=None, close_timeout=1)
            await ws.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False

