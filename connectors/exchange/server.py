"""The local exchange: Bybit v5 public WebSocket + REST and mempool feeds on 127.0.0.1, with faults.

    async with LocalExchange(ModelDriver(seed=7), port=0) as ex:
        ex.base_url        # http://127.0.0.1:P  (TICKCAST_GATEWAY_LOCAL_URL: REST GETs and mempool REST)
        ex.ws_url          # ws://127.0.0.1:P/v5/public/linear
        ex.control_url     # http://127.0.0.1:H  (control API, GET and POST; the REST again, keep-alive)
        ex.sent_log        # {conn_id: [Sent(n, topic, kind, fault, text, t), ...]}
        ex.inject("gap", symbol="BTCUSDT")

Every message a connection is sent goes through its own queue and writer task, in order; the
sent log records it once it has been handed to the socket. Faults act on that queue, per
connection: ``gap`` skips the next matching delta, ``duplicate`` sends it twice, ``reorder`` swaps it
with the next one of the same topic, ``restart`` replaces it with a snapshot whose ``u`` is 1 and
renumbers that topic's later deltas on that connection (2, 3, ...), ``malformed`` and ``flood``
send broken messages, ``stall`` holds the queue for N seconds, ``drop`` cuts the TCP connection
(no close frame) or closes it with a code.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import struct
import threading
import time
from collections import deque
from typing import NamedTuple, Self

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response
from websockets.protocol import State

from connectors.exchange import protocol as P
from connectors.exchange.drivers import Driver, ModelDriver
from connectors.exchange.http import HttpServer, reason, split_target
from connectors.exchange.instruments import InstrumentBook
from connectors.exchange.mempool import MempoolClient, MempoolModel, update_cache
from connectors.exchange.model import Out
from connectors.exchange.rest import RateLimit, RestApi
from tickcast.logs import get_logger

log = get_logger("exchange")

BYBIT_PATHS = {"/v5/public/linear": "linear", "/v5/public/spot": "spot"}
MEMPOOL_PATHS = {"/api/v1/ws": "BTC", "/ltc/api/v1/ws": "LTC"}
HIGH_WATER = 20_000     # queued messages per connection before the driver waits
LOW_WATER = 5_000
WRITE_BATCH_BYTES = 256 * 1024
FAULT_KINDS = ("drop", "gap", "duplicate", "reorder", "restart", "malformed", "stall", "flood")
_U = re.compile(r'"u":(\d+)')


def _frame(text: str) -> bytes:
    """One unmasked, unfragmented RFC 6455 text frame (server to client)."""
    b = text.encode()
    n = len(b)
    if n < 126:
        return bytes((0x81, n)) + b
    if n < 65536:
        return _H16.pack(0x81, 126, n) + b
    return _H64.pack(0x81, 127, n) + b


_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


class Sent(NamedTuple):
    """One message handed to a connection's socket, exactly as sent.

    ``kind``: ``data`` (a topic's message), ``ack``, ``pong``, ``error`` (a refused request),
    ``malformed`` (injected), ``mempool``. ``fault``: ``""``, or what a fault made of it: ``duplicate``
    (the second copy), ``reordered`` (sent after its successor), ``restart`` (the ``u = 1`` snapshot),
    ``renumbered`` (a delta after a restart), or the malformed variant.
    """
    n: int
    topic: str
    kind: str
    fault: str
    text: str
    t: float


class _Pending:
    """A fault waiting for the next matching message on one connection."""
    __slots__ = ("held", "kind", "left", "record", "symbol", "topic")

    def __init__(self, record: dict, kind: str, topic: str | None, symbol: str | None, count: int):
        self.record, self.kind, self.topic, self.symbol, self.left, self.held = record, kind, topic, symbol, count, None

    def matches(self, out: Out) -> bool:
        if self.topic:
            if out.topic != self.topic:
                return False
            return out.kind == "delta" or not out.topic.startswith(("orderbook.", "tickers."))
        if not out.topic.startswith("orderbook.") or out.kind != "delta":
            return False
        return self.symbol is None or out.symbol == self.symbol


MALFORMED = {
    "truncated": '{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":{ts},"data":{"s":"BTCUSDT","b":[["6511',
    "not_json": "<html><body><h1>502 Bad Gateway</h1></body></html>",
    "nan_size": '{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":{ts},"data":{"s":"BTCUSDT",'
                '"b":[["65000.10","NaN"]],"a":[],"u":0,"seq":0},"cts":{ts}}',
    "negative_size": '{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":{ts},"data":{"s":"BTCUSDT",'
                     '"b":[],"a":[["65000.20","-1.000"]],"u":0,"seq":0},"cts":{ts}}',
    "missing_fields": '{"topic":"publicTrade.BTCUSDT","type":"snapshot","ts":{ts},"data":[{"T":{ts},"s":"BTCUSDT"}]}',
    "wrong_types": '{"topic":"tickers.BTCUSDT","type":"delta","data":{"symbol":"BTCUSDT","bid1Price":65000.1,'
                   '"bid1Size":true},"cs":"x","ts":"{ts}"}',
    "unknown_topic": '{"topic":"orderbook.50.NOPEUSDT","type":"delta","ts":{ts},"data":{"s":"NOPEUSDT","b":[],'
                     '"a":[],"u":1,"seq":1},"cts":{ts}}',
    "not_object": "[1,2,3]",
}


class Conn:
    """One client connection: its subscriptions, outbound queue, writer task, faults and sent log."""

    def __init__(self, ex: LocalExchange, ws: ServerConnection, kind: str, path: str):
        self.ex = ex
        self.ws = ws
        self.kind = kind            # linear | spot | mempool
        self.coin = MEMPOOL_PATHS.get(path)
        self.path = path
        self.id = ex._new_conn_id()
        self.topics: set[str] = set()
        self.args_chars = 0
        self.q: deque = deque()
        self.wake = asyncio.Event()
        self.drained = asyncio.Event()
        self.drained.set()
        self.sent: list[Sent] | deque = deque(maxlen=ex.sent_log_max) if ex.sent_log_max else []
        self.n = 0
        self.stall_until = 0.0
        self.pending: list[_Pending] = []
        self.renumber: dict[str, int] = {}
        self.last_recv = time.monotonic()
        self.opened = time.time()
        self.closed = False
        self.close_reason = ""
        self.mempool = MempoolClient() if self.coin else None
        self.writer: asyncio.Task | None = None

    # ---- queueing
    def enqueue(self, text: str, topic: str, kind: str, fault: str = "") -> None:
        if self.closed:
            return
        self.q.append((text, topic, kind, fault))
        self.wake.set()
        if len(self.q) >= HIGH_WATER:
            self.drained.clear()

    def deliver(self, out: Out) -> None:
        """A data message of a subscribed topic, through this connection's pending faults."""
        if self.pending or self.renumber:
            self._deliver_faulted(out)
        else:
            self.enqueue(out.text, out.topic, "data")

    def _deliver_faulted(self, out: Out) -> None:
        for f in self.pending:
            if not f.matches(out):
                continue
            ex = self.ex
            if f.kind == "gap":
                f.left -= 1
                f.record.setdefault("skipped", []).append({"conn_id": self.id, "topic": out.topic, "text": out.text})
                if f.left <= 0:
                    self.pending.remove(f)
                return
            if f.kind == "duplicate":
                self.pending.remove(f)
                text = self._renumbered(out)
                self.enqueue(text, out.topic, "data", "renumbered" if text is not out.text else "")
                self.enqueue(text, out.topic, "data", "duplicate")
                f.record.setdefault("duplicated", []).append({"conn_id": self.id, "topic": out.topic})
                return
            if f.kind == "reorder":
                if f.held is None:
                    f.held = out
                    return
                if f.held.topic != out.topic:
                    continue
                self.pending.remove(f)
                self.enqueue(self._renumbered(out), out.topic, "data")
                self.enqueue(self._renumbered(f.held), f.held.topic, "data", "reordered")
                f.record.setdefault("reordered", []).append({"conn_id": self.id, "topic": out.topic})
                return
            if f.kind == "restart":
                self.pending.remove(f)
                topic = P.parse_topic(out.topic, self.kind)
                snap = ex.driver.snapshot(self.kind, topic) if topic else None
                if snap is None:
                    break
                m = _U.search(snap.text)
                if not m:
                    break
                u = int(m.group(1))
                self.renumber[out.topic] = u - 1
                text = snap.text[:m.start()] + '"u":1' + snap.text[m.end():]
                self.enqueue(text, out.topic, "data", "restart")
                f.record.setdefault("restarted", []).append({"conn_id": self.id, "topic": out.topic, "from_u": u})
                return
        text = self._renumbered(out)
        self.enqueue(text, out.topic, "data", "renumbered" if text is not out.text else "")

    def _renumbered(self, out: Out) -> str:
        off = self.renumber.get(out.topic)
        if not off:
            return out.text
        m = _U.search(out.text)
        if not m:
            return out.text
        return out.text[:m.start()] + f'"u":{int(m.group(1)) - off}' + out.text[m.end():]

    async def run_writer(self) -> None:
        """Send the queue in order. Without extensions (the server negotiates no compression) frames are
        written in batches: RFC 6455 server text frames (unmasked), several per socket write; the
        websockets protocol object still owns the connection (handshake, pings, close)."""
        loop = asyncio.get_running_loop()
        q = self.q
        ws = self.ws
        proto = ws.protocol
        raw = not proto.extensions
        log_sent = self.ex.log_sent
        sent = self.sent
        try:
            while True:
                while not q:
                    self.wake.clear()
                    self.drained.set()
                    await self.wake.wait()
                if self.stall_until:
                    wait = self.stall_until - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                        continue
                    self.stall_until = 0.0
                if proto.state is not State.OPEN:
                    break
                if raw:
                    batch = []
                    size = 0
                    while q and size < WRITE_BATCH_BYTES:
                        item = q.popleft()
                        batch.append(item)
                        size += len(item[0])
                    ws.transport.write(b"".join([_frame(item[0]) for item in batch]))
                    await ws.drain()
                else:
                    batch = [q.popleft()]
                    await ws.send(batch[0][0])
                if log_sent:
                    now = time.time()
                    n = self.n
                    for text, topic, kind, fault in batch:
                        sent.append(Sent(n, topic, kind, fault, text, now))
                        n += 1
                self.n += len(batch)
                if len(q) < LOW_WATER:
                    self.drained.set()
        except (ConnectionClosed, ConnectionError):
            pass
        finally:
            self.closed = True
            self.drained.set()

    def abort(self, reason: str) -> None:
        self.close_reason = reason
        self.closed = True
        self.drained.set()
        transport = getattr(self.ws, "transport", None)
        if transport is not None:
            transport.abort()

    def info(self) -> dict:
        return {"conn_id": self.id, "path": self.path, "kind": self.kind, "topics": sorted(self.topics),
                "sent": self.n, "queued": len(self.q), "closed": self.closed, "close_reason": self.close_reason,
                "pending_faults": [f.kind for f in self.pending], "renumbered_topics": sorted(self.renumber)}


class LocalExchange:
    """Bybit v5 public WS/REST and mempool.space-compatible feeds on 127.0.0.1, from one driver.

    ``port``: the WebSocket port (also answers REST GETs); ``http_port``: REST + control API (GET and
    POST). ``idle_timeout``: seconds without any client message after which a Bybit connection is cut
    (no close frame), as Bybit cuts connections that stop pinging; None disables it.
    ``rate_limit``: :class:`RateLimit`. ``log_sent``: keep every sent message per connection
    (``sent_log_max`` keeps only the last N per connection). ``control_token``: bearer token the
    control API's POSTs require (None: none required; the server only listens on loopback).
    ``mempool_speed``: run the mempool feeds on their own clock that many times real time (default: the
    model's virtual time, or the wall clock under replay).
    """

    def __init__(self, driver: Driver | None = None, *, host: str = "127.0.0.1", port: int = 0, http_port: int = 0,
                 instruments: InstrumentBook | None = None, shared_real=None, mempool: bool = True,
                 rate_limit: RateLimit | None = None, idle_timeout: float | None = 60.0, log_sent: bool = True,
                 sent_log_max: int | None = None, seed: int = 1, control_token: str | None = None,
                 max_new_connections: tuple[int, float] | None = (500, 300.0), mempool_speed: float | None = None):
        self.driver = driver or ModelDriver(seed=seed)
        self.host = host
        self.port = port
        self.http_port = http_port
        self.instruments = instruments or InstrumentBook.load(shared_real)
        self.rate_limit = rate_limit or RateLimit()
        self.idle_timeout = idle_timeout
        self.log_sent = log_sent
        self.sent_log_max = sent_log_max
        self.control_token = control_token
        self.max_new_connections = max_new_connections
        self.seed = seed
        self.mempool_enabled = mempool
        self.mempool_speed = mempool_speed
        self._mempool_t0: tuple[float, int] | None = None
        self.mempools: dict[str, MempoolModel] = {}
        self.conns: dict[str, Conn] = {}          # every connection ever opened (the sent log outlives them)
        self.live: set[Conn] = set()
        self.subs: dict[tuple[str, str], list[Conn]] = {}
        self.faults: list[dict] = []
        self._fault_seq = 0
        self._conn_rng = random.Random(f"{seed}:conn-ids")
        self._conn_times: deque = deque()
        self._tasks: list[asyncio.Task] = []
        self._ws_server = None
        self._http: HttpServer | None = None
        self.rest: RestApi | None = None
        self.counts = {"connections": 0, "refused_connections": 0, "idle_cuts": 0, "published": 0}
        self.started = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> LocalExchange:
        self.driver.attach(self, self.instruments)
        if self.mempool_enabled:
            now = self._mempool_now()
            self.mempools = {c: MempoolModel(c, self.seed, now) for c in ("BTC", "LTC")}
        self.rest = RestApi(self)
        self._ws_server = await serve(self._ws_handler, self.host, self.port, process_request=self._process_request,
                                      ping_interval=None, compression=None, max_size=1 << 20,
                                      server_header="tickcast-local-exchange")
        self.port = self._ws_server.sockets[0].getsockname()[1]
        self._http = HttpServer(self.rest.handle, self.host, self.http_port)
        await self._http.start()
        self.http_port = self._http.port
        self._tasks = [asyncio.create_task(self.driver.run(), name="exchange-driver"),
                       asyncio.create_task(self._housekeeping(), name="exchange-housekeeping")]
        self.started = True
        log.info("local exchange up", extra={"driver": self.driver.name, **self.urls()})
        return self

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in list(self.live):
            if c.writer:
                c.writer.cancel()
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        if self._http is not None:
            await self._http.stop()
        self.started = False

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # ------------------------------------------------------------------ URLs and state
    @property
    def ws_base(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{self.ws_base}/v5/public/linear"

    @property
    def spot_ws_url(self) -> str:
        return f"{self.ws_base}/v5/public/spot"

    @property
    def base_url(self) -> str:
        """One base URL for everything a client GETs: ``TICKCAST_GATEWAY_LOCAL_URL``."""
        return f"http://{self.host}:{self.port}"

    @property
    def rest_url(self) -> str:
        """Bybit's REST (``https://api.bybit.com``'s role): the WebSocket port answers the GETs."""
        return self.base_url

    @property
    def control_url(self) -> str:
        """The second port: the control API (GET and POST) and the same REST with keep-alive."""
        return f"http://{self.host}:{self.http_port}"

    def mempool_ws_url(self, coin: str = "BTC") -> str:
        return f"{self.ws_base}{'/ltc' if coin.upper() == 'LTC' else ''}/api/v1/ws"

    def mempool_rest_url(self, coin: str = "BTC") -> str:
        """mempool.space's (BTC) or litecoinspace's (LTC) base URL: ``/api/...`` below it."""
        return f"{self.base_url}{'/ltc' if coin.upper() == 'LTC' else ''}"

    def urls(self) -> dict[str, str]:
        return {"base": self.base_url, "ws_linear": self.ws_url, "ws_spot": self.spot_ws_url, "rest": self.rest_url,
                "mempool_btc": self.mempool_rest_url("BTC"), "mempool_btc_ws": self.mempool_ws_url("BTC"),
                "mempool_ltc": self.mempool_rest_url("LTC"), "mempool_ltc_ws": self.mempool_ws_url("LTC"),
                "control": self.control_url}

    @property
    def sent_log(self) -> dict[str, list[Sent]]:
        return {cid: list(c.sent) for cid, c in self.conns.items()}

    def sent_data(self, conn_id: str | None = None) -> list[Sent]:
        """The data messages (``kind == "data"``) sent, for one connection or all of them in order."""
        out = []
        for cid, c in self.conns.items():
            if conn_id is None or cid == conn_id:
                out.extend(r for r in c.sent if r.kind == "data")
        return out

    def connections(self) -> list[dict]:
        return [c.info() for c in self.conns.values()]

    def subscribed_topics(self) -> set[tuple[str, str]]:
        return {k for k, v in self.subs.items() if v}

    def state(self) -> dict:
        return {"driver": self.driver.describe(), "urls": self.urls(), "connections": self.connections(),
                "faults": len(self.faults), "counts": self.counts, "rate_limit": vars(self.rate_limit),
                "instruments": self.instruments.source}

    async def wait_subscribed(self, topics, category: str = "linear", timeout: float = 10.0) -> None:
        """Wait until every topic in ``topics`` has at least one live subscriber."""
        want = {(category, t) for t in topics}
        deadline = time.monotonic() + timeout
        while not want <= self.subscribed_topics():
            if time.monotonic() > deadline:
                raise TimeoutError(f"not subscribed within {timeout}s: {sorted(want - self.subscribed_topics())}")
            await asyncio.sleep(0.01)

    def _new_conn_id(self) -> str:
        r = self._conn_rng
        a = "".join(r.choice("0123456789abcdefghijklmnopqrstuv") for _ in range(20))
        b = "".join(r.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(5))
        return f"{a}-{b}"

    # ------------------------------------------------------------------ fan-out (called by the driver)
    def publish(self, category: str, out: Out) -> None:
        conns = self.subs.get((category, out.topic))
        if conns:
            for c in conns:
                c.deliver(out)

    async def backpressure(self) -> None:
        """Wait while a live connection has more than HIGH_WATER messages queued."""
        for c in list(self.live):
            if not c.drained.is_set() and not c.closed:
                await c.drained.wait()

    # ------------------------------------------------------------------ HTTP on the WebSocket port
    def _process_request(self, connection: ServerConnection, request):
        path, query = split_target(request.path)
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if upgrade and (path in BYBIT_PATHS or (path in MEMPOOL_PATHS and self.mempool_enabled)):
            if self.max_new_connections:
                limit, window = self.max_new_connections
                now = time.monotonic()
                while self._conn_times and self._conn_times[0] <= now - window:
                    self._conn_times.popleft()
                if len(self._conn_times) >= limit:
                    self.counts["refused_connections"] += 1
                    return self._response(429, [("Content-Type", "text/plain")],
                                          b"too many new connections: at most %d per %d s\n" % (limit, window))
                self._conn_times.append(now)
            return None
        if upgrade:
            return self._response(404, [("Content-Type", "text/plain")], f"no WebSocket at {path}\n".encode())
        peer = connection.remote_address
        status, headers, body = self.rest.handle_get_sync(path, query, peer[0] if peer else "?")
        return self._response(status, headers, body)

    @staticmethod
    def _response(status: int, headers: list[tuple[str, str]], body: bytes) -> Response:
        h = Headers()
        for k, v in headers:
            h[k] = v
        h["Content-Length"] = str(len(body))
        h["Connection"] = "close"
        return Response(status, reason(status), h, body)

    # ------------------------------------------------------------------ WebSocket connections
    async def _ws_handler(self, ws: ServerConnection) -> None:
        path, _ = split_target(ws.request.path)
        kind = BYBIT_PATHS.get(path) or "mempool"
        conn = Conn(self, ws, kind, path)
        self.conns[conn.id] = conn
        self.live.add(conn)
        self.counts["connections"] += 1
        conn.writer = asyncio.create_task(conn.run_writer())
        log.info("connection opened", extra={"conn_id": conn.id, "path": path})
        try:
            async for message in ws:
                conn.last_recv = time.monotonic()
                if isinstance(message, bytes):
                    message = message.decode("utf-8", "replace")
                if conn.mempool is not None:
                    if not self._on_mempool_message(conn, message):
                        break
                else:
                    self._on_bybit_message(conn, message)
        except ConnectionClosed:
            pass
        finally:
            conn.closed = True
            self.live.discard(conn)
            for topic in list(conn.topics):
                self._unsub(conn, topic)
            # let already-queued messages go out when the client closed cleanly; the writer ends itself
            if conn.writer is not None and not conn.writer.done():
                conn.writer.cancel()
            log.info("connection closed", extra={"conn_id": conn.id, "reason": conn.close_reason or "client",
                                                 "counts": {"sent": conn.n}})

    def _unsub(self, conn: Conn, topic: str) -> None:
        conn.topics.discard(topic)
        conn.renumber.pop(topic, None)
        lst = self.subs.get((conn.kind, topic))
        if lst and conn in lst:
            lst.remove(conn)

    def _on_bybit_message(self, conn: Conn, text: str) -> None:
        cat = conn.kind
        try:
            req = json.loads(text)
        except ValueError as e:
            conn.enqueue(P.response(cat, success=False, ret_msg=f"Failed to decode incoming data:{e}",
                                    conn_id=conn.id, req_id=None, op=""), "", "error")
            return
        if not isinstance(req, dict):
            conn.enqueue(P.response(cat, success=False, ret_msg="Failed to decode incoming data:not an object",
                                    conn_id=conn.id, req_id=None, op=""), "", "error")
            return
        op = req.get("op")
        rid = req.get("req_id")
        rid = None if rid is None else str(rid)

        def refuse(msg: str) -> None:
            conn.enqueue(P.response(cat, success=False, ret_msg=msg, conn_id=conn.id, req_id=rid,
                                    op=str(op) if op is not None else ""), "", "error")

        if op == "ping":
            conn.enqueue(P.pong(cat, conn.id, rid), "", "pong")
            return
        if op not in ("subscribe", "unsubscribe"):
            refuse("error:invalid op")
            return
        args = req.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            refuse("error:args invalid")
            return
        if cat == "spot" and len(args) > P.SPOT_ARGS_PER_REQUEST:
            refuse(f"args size >{P.SPOT_ARGS_PER_REQUEST}")
            return
        if op == "unsubscribe":
            for a in args:
                if a in conn.topics:
                    conn.args_chars -= len(a)
                    self._unsub(conn, a)
            conn.enqueue(P.ack(cat, conn.id, rid, "unsubscribe"), "", "ack")
            return
        topics = []
        for a in args:
            t = P.parse_topic(a, cat)
            if t is None or not self.driver.serves(cat, t):
                refuse(f"error:handler not found,topic:{a}")
                return
            if a in conn.topics or a in (x.name for x in topics):
                refuse(f"error:already subscribed,topic:{a}")
                return
            topics.append(t)
        chars = sum(len(a) for a in args)
        if conn.args_chars + chars > P.ARGS_CHARS_LIMIT:
            refuse(f"args length >{P.ARGS_CHARS_LIMIT}")
            return
        conn.args_chars += chars
        conn.enqueue(P.ack(cat, conn.id, rid, "subscribe"), "", "ack")
        # subscribe and queue the snapshots in one synchronous block: no delta can come in between
        for t in topics:
            conn.topics.add(t.name)
            self.subs.setdefault((cat, t.name), []).append(conn)
            snap = self.driver.snapshot(cat, t)
            if snap is not None:
                conn.enqueue(snap.text, t.name, "data")
        on_sub = getattr(self.driver, "on_subscribe", None)
        if on_sub:
            on_sub()

    def _on_mempool_message(self, conn: Conn, text: str) -> bool:
        model = self.mempools.get(conn.coin)
        try:
            answer = conn.mempool.handle(model, text)
        except (ValueError, TypeError):
            log.info("mempool client sent unparseable data: closing, as mempool.space does",
                     extra={"conn_id": conn.id})
            return False
        if answer is not None:
            conn.enqueue(answer, "", "mempool")
        return True

    # ------------------------------------------------------------------ background work
    def _mempool_now(self) -> int:
        """The mempool clock: the model's virtual time, else the wall clock; with ``mempool_speed``,
        its own clock running that many times faster than real time from the driver's start time."""
        if self.mempool_speed:
            if self._mempool_t0 is None:
                self._mempool_t0 = (time.monotonic(), self.driver.now_ms())
            wall0, v0 = self._mempool_t0
            return v0 + int((time.monotonic() - wall0) * 1000 * self.mempool_speed)
        if isinstance(self.driver, ModelDriver):
            return self.driver.now_ms()
        return int(time.time() * 1000)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            if self.idle_timeout:
                for c in list(self.live):
                    if c.kind != "mempool" and now - c.last_recv > self.idle_timeout:
                        self.counts["idle_cuts"] += 1
                        log.info("idle connection cut", extra={"conn_id": c.id, "idle_s": round(now - c.last_recv, 1)})
                        c.abort("idle")
            if self.mempools:
                vnow = self._mempool_now()
                for coin, model in self.mempools.items():
                    events = model.advance(vnow)
                    if not events:
                        continue
                    cache = update_cache(model)
                    clients = [c for c in self.live if c.coin == coin]
                    for ev, payload in events[-8:]:
                        for c in clients:
                            text = c.mempool.update(model, cache) if ev == "update" else c.mempool.block(payload, cache)
                            if text is not None:
                                c.enqueue(text, "", "mempool")

    # ------------------------------------------------------------------ faults
    def inject(self, kind: str, *, conn_id: str | None = None, symbol: str | None = None, topic: str | None = None,
               count: int | None = None, seconds: float | None = None, variant: str | None = None,
               code: int | None = None) -> dict:
        """Inject a fault now (immediate kinds) or on the next matching message (gap, duplicate,
        reorder, restart), on ``conn_id`` or on every live Bybit connection (that subscribes to
        ``symbol``/``topic`` when given). Returns the fault record (also in :attr:`faults`)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {', '.join(FAULT_KINDS)}")
        if variant is not None and variant not in MALFORMED:
            raise ValueError(f"unknown malformed variant {variant!r}; one of {', '.join(MALFORMED)}")
        targets = []
        for c in self.live:
            if c.kind == "mempool" or c.closed:
                continue
            if conn_id is not None and c.id != conn_id:
                continue
            if topic and topic not in c.topics:
                continue
            if symbol and not any(t.endswith("." + symbol) for t in c.topics):
                continue
            targets.append(c)
        if conn_id is not None and not targets:
            raise ValueError(f"no live connection {conn_id} matching the fault")
        self._fault_seq += 1
        rec = {"id": self._fault_seq, "kind": kind, "conn_ids": sorted(c.id for c in targets), "symbol": symbol,
               "topic": topic, "count": count, "seconds": seconds, "variant": variant, "code": code,
               "at_ms": self.driver.now_ms(), "at_wall": time.time()}
        self.faults.append(rec)
        ts = self.driver.now_ms()
        for c in targets:
            if kind == "drop":
                if code is None:
                    c.abort("fault:drop")
                else:
                    c.close_reason = f"fault:close {code}"
                    asyncio.ensure_future(c.ws.close(code=code, reason="local exchange fault"))
            elif kind == "stall":
                c.stall_until = asyncio.get_running_loop().time() + float(seconds if seconds is not None else 5.0)
            elif kind in ("malformed", "flood"):
                names = [variant] if variant else list(MALFORMED)
                n = (count or 1) if kind == "malformed" else (count or 100)
                for i in range(n):
                    name = names[i % len(names)] if kind == "flood" or variant else "truncated"
                    c.enqueue(MALFORMED[name].replace("{ts}", str(ts)), "", "malformed", name)
            else:
                c.pending.append(_Pending(rec, kind, topic, symbol, max(1, count or 1)))
        log.info("fault injected", extra={"fault": {k: v for k, v in rec.items() if k != "at_wall"}})
        return rec

    async def inject_async(self, **kw) -> dict:
        return self.inject(**kw)


class ThreadedExchange:
    """A :class:`LocalExchange` on its own event loop in a background thread, for synchronous code
    (the gateway's tests, benchmarks). Same URLs; ``inject``/``sent_log`` are thread-safe calls."""

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ex: LocalExchange | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> ThreadedExchange:
        self._thread = threading.Thread(target=self._main, name="local-exchange", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the local exchange did not start")
        if self._error:
            raise self._error
        return self

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

        async def body():
            self._stop = asyncio.Event()
            try:
                self.ex = LocalExchange(*self._args, **self._kwargs)
                await self.ex.start()
            except Exception as e:  # noqa: BLE001 - reported to the starting thread
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self._stop.wait()
            await self.ex.stop()

        self.loop.run_until_complete(body())
        self.loop.close()

    def stop(self) -> None:
        if self.loop and self._stop and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(30)

    def call(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the exchange's loop and return its result."""
        async def run():
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def __getattr__(self, name):
        if name in ("ws_url", "spot_ws_url", "ws_base", "base_url", "rest_url", "control_url", "port", "http_port",
                    "driver", "instruments"):
            return getattr(self.ex, name)
        raise AttributeError(name)

    def mempool_ws_url(self, coin: str = "BTC") -> str:
        return self.ex.mempool_ws_url(coin)

    def mempool_rest_url(self, coin: str = "BTC") -> str:
        return self.ex.mempool_rest_url(coin)

    def urls(self) -> dict[str, str]:
        return self.ex.urls()

    def inject(self, kind: str, **kw) -> dict:
        return self.call(self.ex.inject, kind, **kw)

    @property
    def sent_log(self) -> dict[str, list[Sent]]:
        return self.call(lambda: self.ex.sent_log)

    def sent_data(self, conn_id: str | None = None) -> list[Sent]:
        return self.call(self.ex.sent_data, conn_id)

    @property
    def faults(self) -> list[dict]:
        return self.call(lambda: [dict(f) for f in self.ex.faults])

    def connections(self) -> list[dict]:
        return self.call(self.ex.connections)

    def start_driver(self) -> None:
        self.call(self.ex.driver.start)

    def wait_done(self, timeout: float = 60.0) -> None:
        async def w():
            await asyncio.wait_for(self.ex.driver.done.wait(), timeout)
        asyncio.run_coroutine_threadsafe(w(), self.loop).result(timeout + 5)

    def wait_subscribed(self, topics, category: str = "linear", timeout: float = 10.0) -> None:
        asyncio.run_coroutine_threadsafe(self.ex.wait_subscribed(topics, category, timeout),
                                         self.loop).result(timeout + 5)
