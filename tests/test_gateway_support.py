"""Test support (no tests here): a protocol-faithful Bybit v5 public WebSocket server, a seeded
synthetic market that writes Bybit's messages and Kafka read-back helpers (the TCP proxy that cuts
a broker off and the broker behind it live in ``tickcast.netfault``).

The server speaks what the gateway relies on, as Bybit does (see ../shared/spec/BYBIT_V5.md):
``{"op":"subscribe","args":[...],"req_id":...}`` answered by
``{"success":true,"ret_msg":"","conn_id":...,"req_id":...,"op":"subscribe"}`` (``success:false`` and
``error:handler not found,topic:...`` for unknown topics, ``already subscribed`` twice), the same for
``unsubscribe``, ``{"op":"ping"}`` answered with ``ret_msg":"pong"``, a fresh snapshot of books and
tickers on every subscribe, and per-connection logs of every frame sent. The local exchange in
``connectors/exchange`` is the full simulator; this one is small and scripted so tests control
every message.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field

from tickcast.netfault import ProxiedBroker, TcpProxy  # noqa: F401 - moved; kept importable from here
from tickcast.topics import DEAD_LETTER, RAW_TOPICS

BASE_TS = 1_786_310_816_516


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _px(ticks: int) -> str:
    return f"{ticks // 10}.{ticks % 10}0"


def _sz(lots: int) -> str:
    return f"{lots // 1000}.{lots % 1000:03d}"


class SyntheticMarket:
    """One symbol's book, ticker, trades and candles, written in Bybit's exact message shapes."""

    def __init__(self, symbol: str, seed: int = 1, depth: int = 50, mid_ticks: int = 651_140):
        self.symbol = symbol
        self.depth = depth
        self.rng = random.Random(seed)
        self.ts = BASE_TS
        self.u = 1000
        self.seq = 7_000_000_000
        self.cs = 9_000_000_000
        self.trade_seq = 5_000_000
        mid = mid_ticks
        self.bids = {mid - 1 - i: self.rng.randint(1, 5000) for i in range(depth)}
        self.asks = {mid + i: self.rng.randint(1, 5000) for i in range(depth)}
        self.funding = "0.0001"
        self.next_funding = 1_786_320_000_000
        self.kline_start = (BASE_TS // 60_000) * 60_000

    def tick(self, ms: int = 20) -> int:
        self.ts += ms
        return self.ts

    def book_snapshot(self) -> str:
        self.tick()
        self.u += 1
        self.seq += self.rng.randint(1, 50)
        b = [[_px(p), _sz(self.bids[p])] for p in sorted(self.bids, reverse=True)]
        a = [[_px(p), _sz(self.asks[p])] for p in sorted(self.asks)]
        return dumps({"topic": f"orderbook.{self.depth}.{self.symbol}", "type": "snapshot", "ts": self.ts,
                      "data": {"s": self.symbol, "b": b, "a": a, "u": self.u, "seq": self.seq}, "cts": self.ts - 2})

    def book_delta(self) -> str:
        """Absolute sizes: some updates, one delete and one insert per side (depth stays constant)."""
        self.tick()
        self.u += 1
        self.seq += self.rng.randint(1, 50)
        out = {}
        for side, book, sign in (("b", self.bids, -1), ("a", self.asks, 1)):
            levels = []
            for p in self.rng.sample(sorted(book), 3):
                book[p] = self.rng.randint(1, 5000)
                levels.append((p, book[p]))
            worst = max(book) if sign > 0 else min(book)
            del book[worst]
            levels.append((worst, 0))
            newp = worst + sign * self.rng.randint(1, 3)
            while newp in book:
                newp += sign
            book[newp] = self.rng.randint(1, 5000)
            levels.append((newp, book[newp]))
            levels.sort(reverse=(side == "b"))
            out[side] = [[_px(p), _sz(s)] for p, s in levels]
        return dumps({"topic": f"orderbook.{self.depth}.{self.symbol}", "type": "delta", "ts": self.ts,
                      "data": {"s": self.symbol, "b": out["b"], "a": out["a"], "u": self.u, "seq": self.seq},
                      "cts": self.ts - 1})

    def best(self) -> tuple[str, str]:
        return _px(max(self.bids)), _px(min(self.asks))

    def ticker_snapshot(self) -> str:
        self.tick()
        self.cs += 7
        bid, ask = self.best()
        data = {"symbol": self.symbol, "tickDirection": "ZeroPlusTick", "price24hPcnt": "0.001624",
                "lastPrice": ask, "prevPrice24h": "65008.70", "highPrice24h": "65282.30", "lowPrice24h": "64694.40",
                "prevPrice1h": "65083.80", "markPrice": bid, "indexPrice": ask, "openInterest": "59891.732",
                "openInterestValue": "3899996265.01", "turnover24h": "1142118412.9021", "volume24h": "17573.9120",
                "fundingIntervalHour": "8", "fundingCap": "0.005", "nextFundingTime": str(self.next_funding),
                "fundingRate": self.funding, "bid1Price": bid, "bid1Size": "5.954", "ask1Price": ask,
                "ask1Size": "10.470", "preOpenPrice": "", "preQty": "", "curPreListingPhase": ""}
        return dumps({"topic": f"tickers.{self.symbol}", "type": "snapshot", "data": data, "cs": self.cs,
                      "ts": self.ts})

    def ticker_delta(self, funding_rate: str | None = None) -> str:
        self.tick(100)
        self.cs += 7
        bid, ask = self.best()
        data = {"symbol": self.symbol, "bid1Price": bid, "bid1Size": _sz(self.rng.randint(1, 9000)),
                "ask1Price": ask, "ask1Size": _sz(self.rng.randint(1, 9000))}
        if funding_rate is not None:
            self.funding = funding_rate
            data["fundingRate"] = funding_rate
        return dumps({"topic": f"tickers.{self.symbol}", "type": "delta", "data": data, "cs": self.cs, "ts": self.ts})

    def trades(self, n: int = 2, repeat_id: str | None = None) -> str:
        self.tick(5)
        rows = []
        for i in range(n):
            self.trade_seq += 1
            tid = repeat_id if (repeat_id and i == 0) else str(uuid.UUID(int=self.rng.getrandbits(128)))
            rows.append({"T": self.ts - 1, "s": self.symbol, "S": self.rng.choice(["Buy", "Sell"]),
                         "v": _sz(self.rng.randint(1, 900)), "p": self.best()[self.rng.randint(0, 1)],
                         "L": "PlusTick", "i": tid, "BT": False, "RPI": False, "seq": self.trade_seq})
        return dumps({"topic": f"publicTrade.{self.symbol}", "type": "snapshot", "ts": self.ts, "data": rows})

    def kline(self, close: bool = False) -> str:
        self.tick(50)
        bid, _ = self.best()
        candle = {"start": self.kline_start, "end": self.kline_start + 59_999, "interval": "1", "open": "65119.90",
                  "close": bid, "high": "65200.00", "low": "65000.00", "volume": "1.576", "turnover": "102627.995",
                  "confirm": close, "timestamp": self.ts}
        data = [candle]
        if close:
            self.kline_start += 60_000
            data.append({**candle, "start": self.kline_start, "end": self.kline_start + 59_999, "open": bid,
                         "high": bid, "low": bid, "volume": "0", "turnover": "0", "confirm": False})
        return dumps({"topic": f"kline.1.{self.symbol}", "data": data, "ts": self.ts, "type": "snapshot"})

    def random_message(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return self.book_delta()
        if r < 0.8:
            return self.ticker_delta()
        if r < 0.95:
            return self.trades(self.rng.randint(1, 3))
        return self.kline()


@dataclass
class _Conn:
    ws: object
    conn_id: str
    topics: set = field(default_factory=set)
    sent: list = field(default_factory=list)  # every frame sent on this connection, in order
    received: list = field(default_factory=list)


class FakeBybitServer:
    """A scripted Bybit v5 public WebSocket server on 127.0.0.1 (see the module doc)."""

    def __init__(self, markets: dict[str, SyntheticMarket], *, depth: int = 50, known_symbols: set[str] | None = None):
        self.markets = markets
        self.depth = depth
        self.known = set(known_symbols or markets)
        self.conns: list[_Conn] = []
        self.server = None
        self.port = None
        self.subscribes = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v5/public/linear"

    async def start(self, port: int = 0) -> FakeBybitServer:
        from websockets.asyncio.server import serve

        self.server = await serve(self._handle, "127.0.0.1", port, ping_interval=None, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    def _valid(self, topic: str) -> bool:
        parts = topic.split(".")
        if len(parts) == 3 and parts[0] == "orderbook":
            return parts[1] in ("1", "50", "200", "1000") and parts[2] in self.known
        if len(parts) == 3 and parts[0] == "kline":
            return parts[1] == "1" and parts[2] in self.known
        return len(parts) == 2 and parts[0] in ("publicTrade", "tickers") and parts[1] in self.known

    async def _send(self, conn: _Conn, text: str) -> None:
        conn.sent.append(text)
        await conn.ws.send(text)

    async def _handle(self, ws) -> None:
        conn = _Conn(ws, uuid.uuid4().hex[:20])
        self.conns.append(conn)
        try:
            async for raw in ws:
                conn.received.append(raw)
                try:
                    req = json.loads(raw)
                except ValueError:
                    await self._send(conn, dumps({"success": False, "ret_msg": "Invalid request",
                                                  "conn_id": conn.conn_id, "op": ""}))
                    continue
                op, req_id = req.get("op"), req.get("req_id", "")
                if op == "ping":
                    await self._send(conn, dumps({"success": True, "ret_msg": "pong", "conn_id": conn.conn_id,
                                                  "req_id": req_id, "op": "ping"}))
                elif op in ("subscribe", "unsubscribe"):
                    await self._subscribe(conn, op, req.get("args") or [], req_id)
        except Exception:  # noqa: BLE001 - a client that goes away mid-send is normal here
            pass

    async def _subscribe(self, conn: _Conn, op: str, args: list[str], req_id: str) -> None:
        bad = [t for t in args if not self._valid(t)]
        if bad:
            await self._send(conn, dumps({"success": False, "ret_msg": f"error:handler not found,topic:{bad[0]}",
                                          "conn_id": conn.conn_id, "req_id": req_id, "op": op}))
            return
        if op == "subscribe":
            dup = [t for t in args if t in conn.topics]
            if dup:
                await self._send(conn, dumps({"success": False, "ret_msg": f"error:already subscribed,topic:{dup[0]}",
                                              "conn_id": conn.conn_id, "req_id": req_id, "op": op}))
                return
            conn.topics.update(args)
            self.subscribes += 1
        else:
            conn.topics.difference_update(args)
        await self._send(conn, dumps({"success": True, "ret_msg": "", "conn_id": conn.conn_id, "req_id": req_id,
                                      "op": op}))
        if op == "subscribe":  # fresh snapshots, as Bybit sends on every subscription
            for t in args:
                m = self.markets.get(t.split(".")[-1])
                if m is None:
                    continue
                if t.startswith("orderbook."):
                    await self._send(conn, m.book_snapshot())
                elif t.startswith("tickers."):
                    await self._send(conn, m.ticker_snapshot())

    # -- what tests do --------------------------------------------------------------------------
    async def wait_subscribed(self, topics: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(len(c.topics) for c in self.live()) < topics:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sum(len(c.topics) for c in self.live())} of {topics} topics subscribed")
            await asyncio.sleep(0.01)

    def live(self) -> list[_Conn]:
        from websockets.protocol import State

        return [c for c in self.conns if c.ws.protocol.state is State.OPEN]

    async def push(self, text: str, *, everyone: bool = False) -> int:
        """Send ``text`` to every live connection subscribed to its topic (``everyone``: to all)."""
        topic = None
        if not everyone:
            try:
                topic = json.loads(text).get("topic")
            except ValueError:
                everyone = True
        n = 0
        for c in self.live():
            if everyone or topic in c.topics:
                try:
                    await self._send(c, text)
                    n += 1
                except Exception:  # noqa: BLE001 - closed between the check and the send
                    pass
        return n

    async def drop_all(self) -> None:
        for c in self.live():
            await c.ws.close()

    def sent_data(self) -> list[str]:
        """Every data message (with a topic) sent, over all connections, in order per connection."""
        return [t for c in self.conns for t in c.sent if '"topic"' in t]


# --- Kafka ----------------------------------------------------------------------------------------


def read_back(bootstrap: str, symbols: set[str], *, topics: list[str] | None = None, until=None,
              timeout: float = 30.0, idle_s: float = 1.0) -> list[tuple[str, str, dict]]:
    """(topic, schema, record) of every record keyed by one of ``symbols`` on ``topics`` (default:
    every raw topic and the dead letters), from the beginning. Stops when ``until(records)`` is
    true, or ``idle_s`` after the last new record, or at ``timeout``."""
    from confluent_kafka import Consumer

    from tickcast.kafka import assign_all, consumer_config
    from tickcast.serde import Serde

    serde = Serde()
    topics = topics or [t.name for t in RAW_TOPICS] + [DEAD_LETTER]
    keys = {s.encode() for s in symbols}
    consumer = Consumer(consumer_config(bootstrap, f"test-{uuid.uuid4().hex[:8]}"))
    assign_all(consumer, topics)
    out = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(num_messages=1000, timeout=0.2)
            got = False
            for msg in batch:
                if msg.error() is not None or msg.key() not in keys:
                    continue
                name, rec = serde.decode_any(msg.value())
                out.append((msg.topic(), name, rec))
                got = True
            if got:
                last_new = time.monotonic()
            if until is not None and until(out):
                break
            if out and time.monotonic() - last_new > idle_s:
                break
    finally:
        consumer.close()
    return out


def dead_letters(bootstrap: str, since_us: int, *, timeout: float = 10.0, until=None) -> list[dict]:
    """DeadLetter records written after ``since_us`` (any key)."""
    from confluent_kafka import Consumer

    from tickcast.kafka import assign_all, consumer_config
    from tickcast.serde import Serde

    serde = Serde()
    consumer = Consumer(consumer_config(bootstrap, f"test-dl-{uuid.uuid4().hex[:8]}"))
    assign_all(consumer, [DEAD_LETTER])
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1000, timeout=0.2):
                if msg.error() is None:
                    rec = serde.decode(msg.value(), expect="DeadLetter")
                    if rec["ts"] >= since_us:
                        out.append(rec)
            if until is not None and until(out):
                break
    finally:
        consumer.close()
    return out
