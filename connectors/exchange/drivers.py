"""The two drivers of the local exchange: the seeded market model and the replay of recordings.

A driver owns the exchange's clock and data. The server asks it which topics it serves, for the
snapshot a new subscriber gets, and for the REST data; the driver pushes every data message to the
server with ``server.publish(category, out)``.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from decimal import Decimal
from pathlib import Path

from connectors.exchange import protocol as P
from connectors.exchange.instruments import MVP, InstrumentBook
from connectors.exchange.model import MINUTE, STEP, MarketModel, Out, Params
from tickcast.logs import get_logger

log = get_logger("exchange")


class RestError(Exception):
    """A REST request Bybit would refuse: retCode and retMsg."""

    def __init__(self, ret_code: int, ret_msg: str):
        super().__init__(ret_msg)
        self.ret_code = ret_code
        self.ret_msg = ret_msg


class Driver:
    """Common clock/start handling. Subclasses implement ``_run`` and the data methods."""

    name = "driver"

    def __init__(self, speed: float = 1.0, autostart: bool = True):
        if speed < 0:
            raise ValueError("speed must be >= 0 (0: as fast as possible)")
        self.speed = speed
        self.autostart = autostart
        self.server = None
        self.started = asyncio.Event()
        self.done = asyncio.Event()
        self.instruments: InstrumentBook | None = None

    def attach(self, server, instruments: InstrumentBook) -> None:
        self.server = server
        self.instruments = instruments

    def start(self) -> None:
        """Start the clock (drivers created with ``autostart=False`` wait for this)."""
        self.started.set()

    async def run(self) -> None:
        if self.autostart:
            self.started.set()
        await self.started.wait()
        await self._run()

    async def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- what the server asks
    def serves(self, category: str, topic: P.Topic) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def snapshot(self, category: str, topic: P.Topic) -> Out | None:
        return None

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def describe(self) -> dict:
        return {"driver": self.name, "speed": self.speed, "started": self.started.is_set(),
                "done": self.done.is_set(), "now_ms": self.now_ms()}

    # ---- REST data (validated parameters)
    def rest_klines(self, category: str, symbol: str, interval: str, start: int | None, end: int | None,
                    limit: int) -> list[list[str]]:
        raise RestError(10001, "klines are not available from this driver")

    def rest_orderbook(self, category: str, symbol: str, limit: int) -> dict:
        raise RestError(10001, "order book not available from this driver")

    def rest_tickers(self, category: str, symbol: str | None) -> list[dict]:
        return []

    def rest_funding(self, category: str, symbol: str, start: int | None, end: int | None,
                     limit: int) -> list[dict]:
        return []

    def known_symbol(self, category: str, symbol: str) -> bool:
        return self.instruments is not None and self.instruments.get(symbol, category) is not None


def _now_ms10() -> int:
    now = int(time.time() * 1000)
    return now - now % STEP


class ModelDriver(Driver):
    """The seeded market model (linear) at Bybit's cadence, ``speed`` times real time (0: flat out).

    ``start_ms`` is the virtual start (default: now, and at speed 1 the exchange clock then follows the
    wall clock, so exchange timestamps are real ones); ``duration_s`` stops the
    model after that much virtual time (benchmarks, determinism tests); ``history_days`` of 1-minute
    history precede the start on the REST kline endpoint.
    """

    name = "model"

    def __init__(self, symbols: list[str] | None = None, seed: int = 1, speed: float = 1.0,
                 start_ms: int | None = None, history_days: float = 30.0, duration_s: float | None = None,
                 autostart: bool = True, params: dict[str, Params] | None = None, batch_ms: int = 100,
                 depths: tuple[int, ...] = P.LINEAR_DEPTHS):
        super().__init__(speed, autostart)
        self.symbols = list(symbols or MVP)
        self.seed = seed
        self.live_clock = start_ms is None
        self.start_ms = _now_ms10() if start_ms is None else int(start_ms)
        self.history_days = history_days
        self.duration_s = duration_s
        self.params = params
        self.depths = tuple(depths)
        self.batch_ms = max(STEP, batch_ms - batch_ms % STEP)
        self.model: MarketModel | None = None
        self.published = 0

    def attach(self, server, instruments: InstrumentBook) -> None:
        super().attach(server, instruments)
        insts = {s: instruments.require(s, "linear") for s in self.symbols}
        self.model = MarketModel(insts, seed=self.seed, start_ms=self.start_ms, history_days=self.history_days,
                                 params=self.params, depths=self.depths)

    def now_ms(self) -> int:
        return self.model.t if self.model else self.start_ms

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed, "symbols": self.symbols, "start_ms": self.start_ms,
                "published": self.published}

    async def _run(self) -> None:
        m = self.model
        loop = asyncio.get_running_loop()
        wall0 = loop.time()
        if self.live_clock and self.speed > 0:  # catch up the start-up time: exchange time = wall time
            wall0 -= max(0.0, time.time() * 1000 - self.start_ms) / 1000 / self.speed
        end = None if self.duration_s is None else self.start_ms + int(self.duration_s * 1000)
        publish = self.server.publish
        while True:
            if self.speed > 0:
                target = self.start_ms + int((loop.time() - wall0) * 1000 * self.speed)
                target -= target % STEP
                if target <= m.t:
                    await asyncio.sleep(max(0.002, STEP / 1000 / self.speed))
                    continue
            else:
                target = m.t + self.batch_ms
            if end is not None:
                target = min(target, end)
            for batch in m.steps(target):
                for out in batch:
                    publish("linear", out)
                self.published += len(batch)
            await self.server.backpressure()
            if end is not None and m.t >= end:
                break
            if self.speed == 0:
                await asyncio.sleep(0)
        self.done.set()
        log.info("model run finished", extra={"counts": {"published": self.published}})

    def serves(self, category: str, topic: P.Topic) -> bool:
        if category != "linear" or self.model is None or topic.symbol not in self.model.sims:
            return False
        return topic.channel != "orderbook" or topic.depth in self.model.sims[topic.symbol].views

    def snapshot(self, category: str, topic: P.Topic) -> Out | None:
        return self.model.snapshot(topic)

    # ---- REST
    def _sim(self, symbol: str):
        sim = self.model.sims.get(symbol)
        if sim is None:
            raise RestError(10001, "Not supported symbols")
        return sim

    def rest_klines(self, category, symbol, interval, start, end, limit):
        sim = self._sim(symbol)
        ms = P.KLINE_INTERVALS[interval]
        now = self.model.t
        sim._candle_for(now)
        first = sim.history.start_ms
        if ms > MINUTE:
            first = first - first % ms + (ms if first % ms else 0)
        hi = now - now % ms
        if end is not None:
            hi = min(hi, end - end % ms)
        lo = first if start is None else max(first, start + (-start) % ms)
        rows = []
        s = hi
        while s >= lo and len(rows) < limit:
            c = sim.kline_candle(interval, s, now)
            if c is not None:
                inst = sim.inst
                rows.append([str(s), inst.px_trim(c.o), inst.px_trim(c.h), inst.px_trim(c.l), inst.px_trim(c.c),
                             inst.qty_trim(c.vol), inst.turnover_trim(c.turn)])
            s -= ms
        return rows

    def rest_orderbook(self, category, symbol, limit):
        sim = self._sim(symbol)
        v = sim.views[max(sim.views)]  # the deepest stream's state and u, as Bybit's REST book
        bl, al = sim.view_levels(v)
        inst = sim.inst
        return {"s": symbol, "a": [[inst.px(p), inst.qty(q)] for p, q in al[:limit]],
                "b": [[inst.px(p), inst.qty(q)] for p, q in bl[:limit]], "ts": self.model.t, "u": v.u,
                "seq": v.seq, "cts": v.cts}

    def rest_tickers(self, category, symbol):
        sims = [self._sim(symbol)] if symbol else list(self.model.sims.values())
        out = []
        for sim in sims:
            st = sim.ticker_pub
            out.append({
                "symbol": sim.sym, "lastPrice": st["lastPrice"], "indexPrice": st["indexPrice"],
                "markPrice": st["markPrice"], "prevPrice24h": st["prevPrice24h"], "price24hPcnt": st["price24hPcnt"],
                "highPrice24h": st["highPrice24h"], "lowPrice24h": st["lowPrice24h"],
                "prevPrice1h": st["prevPrice1h"], "openInterest": st["openInterest"],
                "openInterestValue": st["openInterestValue"], "turnover24h": st["turnover24h"],
                "volume24h": st["volume24h"], "fundingRate": st["fundingRate"],
                "nextFundingTime": st["nextFundingTime"], "predictedDeliveryPrice": "", "basisRate": "",
                "deliveryFeeRate": "", "deliveryTime": "0", "ask1Size": st["ask1Size"], "bid1Price": st["bid1Price"],
                "ask1Price": st["ask1Price"], "bid1Size": st["bid1Size"], "basis": "", "preOpenPrice": "",
                "preQty": "", "curPreListingPhase": "", "fundingIntervalHour": st["fundingIntervalHour"],
                "basisRateYear": "", "fundingCap": st["fundingCap"]})
        return out

    def rest_funding(self, category, symbol, start, end, limit):
        from connectors.exchange.instruments import fmt_trim

        sim = self._sim(symbol)
        rows = [(t, r) for t, r in sim.funding_log
                if (start is None or t >= start) and (end is None or t <= end)]
        rows.sort(reverse=True)
        return [{"symbol": symbol, "fundingRate": fmt_trim(r, 8), "fundingRateTimestamp": str(t)}
                for t, r in rows[:limit]]


# ------------------------------------------------------------------------------------------------ replay

_TS = re.compile(r'"ts":(\d+)')
_TOPIC_HEAD = re.compile(r'^\{"(?:topic|type|ts)')


class ReplayItem:
    __slots__ = ("category", "kind", "symbol", "t", "text", "topic")

    def __init__(self, category, topic, t, text, kind, symbol):
        self.category, self.topic, self.t, self.text, self.kind, self.symbol = category, topic, t, text, kind, symbol


def load_recording(path: str | Path, category: str = "linear") -> tuple[list[ReplayItem], int]:
    """Data messages of a JSONL recording (raw Bybit messages, or ``{"recv_ts", "msg"}`` lines) in file
    order, with the time each was received (``recv_ts``) or pushed (``ts``), in ms; acks are skipped."""
    items: list[ReplayItem] = []
    skipped = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith('{"recv_ts"'):
                d = json.loads(line)
                msg = d.get("msg")
                if not isinstance(msg, dict) or "topic" not in msg:
                    skipped += 1
                    continue
                text = json.dumps(msg, separators=(",", ":"), ensure_ascii=False)
                t = round(float(d["recv_ts"]) * 1000)
            else:
                text = line
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    skipped += 1
                    continue
                if not isinstance(msg, dict) or "topic" not in msg:
                    skipped += 1
                    continue
                t = int(msg.get("ts") or 0)
            topic = msg["topic"]
            kind = msg.get("type", "snapshot")
            sym = topic.rsplit(".", 1)[-1]
            items.append(ReplayItem(category, topic, t, text, kind, sym))
    return items, skipped


class _Book:
    __slots__ = ("a", "b", "cts", "seq", "symbol", "ts", "u")

    def __init__(self):
        self.b: dict[str, str] = {}
        self.a: dict[str, str] = {}
        self.u = self.seq = self.cts = self.ts = 0
        self.symbol = ""


class ReplayDriver(Driver):
    """Replays recorded messages unchanged, to the clients subscribed to each message's topic.

    ``sources``: a path (linear) or ``{"linear": path, "spot": path}``. ``speed``: 1 = original timing,
    10 = ten times faster, 0 = as fast as possible. ``start``: ``"subscribed"`` (default) begins when every
    topic of the recording has a subscriber, or ``start_timeout`` seconds after the first subscription;
    ``"immediate"`` at server start; ``"manual"`` on :meth:`start`. A client that subscribes after a
    book's or ticker's first message gets a snapshot rebuilt from the replayed messages (``synth``).
    """

    name = "replay"

    def __init__(self, sources: str | Path | dict[str, str | Path], speed: float = 1.0, start: str = "subscribed",
                 start_timeout: float = 2.0, synth_snapshots: bool = True):
        if start not in ("subscribed", "immediate", "manual"):
            raise ValueError("start must be subscribed, immediate or manual")
        super().__init__(speed, autostart=start == "immediate")
        if not isinstance(sources, dict):
            sources = {"linear": sources}
        self.sources = {cat: Path(p) for cat, p in sources.items()}
        self.start_mode = start
        self.start_timeout = start_timeout
        self.synth_snapshots = synth_snapshots
        self.items: list[ReplayItem] = []
        self.skipped = 0
        for cat, p in self.sources.items():
            items, skipped = load_recording(p, cat)
            self.items.extend(items)
            self.skipped += skipped
        if len(self.sources) > 1:
            self.items.sort(key=lambda it: it.t)  # stable: file order kept within a category
        self.topics: dict[str, set[str]] = {}
        self.first_index: dict[tuple[str, str], int] = {}
        for i, it in enumerate(self.items):
            self.topics.setdefault(it.category, set()).add(it.topic)
            self.first_index.setdefault((it.category, it.topic), i)
        self.pos = 0           # index of the next message to replay
        self.now = self.items[0].t if self.items else int(time.time() * 1000)
        self.sent = 0
        self._state_pos = 0
        self._books: dict[tuple[str, str], _Book] = {}
        self._tickers: dict[tuple[str, str], dict] = {}
        self._ticker_meta: dict[tuple[str, str], tuple[int, int]] = {}
        self._klines: dict[tuple[str, str], dict[int, dict]] = {}
        self._first_sub_at: float | None = None

    def describe(self) -> dict:
        return {**super().describe(), "sources": {k: str(v) for k, v in self.sources.items()},
                "messages": len(self.items), "position": self.pos, "skipped_lines": self.skipped}

    def now_ms(self) -> int:
        return self.now

    def serves(self, category: str, topic: P.Topic) -> bool:
        return topic.name in self.topics.get(category, ())

    def on_subscribe(self) -> None:
        """Called by the server after every successful subscription."""
        if self.start_mode != "subscribed" or self.started.is_set():
            return
        if self._first_sub_at is None:
            self._first_sub_at = time.monotonic()
        wanted = {(c, t) for c, ts in self.topics.items() for t in ts}
        if wanted <= self.server.subscribed_topics():
            self.started.set()

    async def run(self) -> None:
        if self.start_mode == "subscribed":
            while not self.started.is_set():
                if self._first_sub_at is not None and time.monotonic() - self._first_sub_at >= self.start_timeout:
                    self.started.set()
                    break
                try:
                    await asyncio.wait_for(self.started.wait(), 0.05)
                except TimeoutError:
                    pass
        await super().run()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        items = self.items
        if not items:
            self.done.set()
            return
        wall0 = loop.time()
        t0 = items[0].t
        publish = self.server.publish
        last_t = t0
        n = len(items)
        for i in range(n):
            it = items[i]
            t = max(last_t, it.t)
            last_t = t
            if self.speed > 0:
                due = wall0 + (t - t0) / 1000.0 / self.speed
                delay = due - loop.time()
                if delay > 0.0005:
                    await asyncio.sleep(delay)
            self.pos = i + 1
            self.now = t
            publish(it.category, Out(it.topic, it.text, it.kind, it.symbol, 0, t))
            self.sent += 1
            if (i & 255) == 255:
                await self.server.backpressure()
                if self.speed == 0:
                    await asyncio.sleep(0)
        self.done.set()
        log.info("replay finished", extra={"counts": {"sent": self.sent}})

    # ---- state rebuilt from the replayed messages (snapshots for late subscribers, REST)
    def _advance_state(self) -> None:
        items = self.items
        while self._state_pos < self.pos:
            it = items[self._state_pos]
            self._state_pos += 1
            ch = it.topic.split(".", 1)[0]
            if ch not in ("orderbook", "tickers", "kline"):
                continue
            msg = json.loads(it.text)
            key = (it.category, it.topic)
            if ch == "orderbook":
                d = msg.get("data") or {}
                bk = self._books.get(key)
                if bk is None or msg.get("type") == "snapshot" or d.get("u") == 1:
                    bk = self._books[key] = _Book()
                for side, book in (("b", bk.b), ("a", bk.a)):
                    for p, q in d.get(side) or []:
                        if Decimal(q) == 0:
                            book.pop(p, None)
                        else:
                            book[p] = q
                bk.u, bk.seq = d.get("u", bk.u), d.get("seq", bk.seq)
                bk.cts, bk.ts, bk.symbol = msg.get("cts", bk.cts), msg.get("ts", bk.ts), d.get("s", bk.symbol)
            elif ch == "tickers":
                st = self._tickers.setdefault(key, {})
                if msg.get("type") == "snapshot":
                    st.clear()
                st.update(msg.get("data") or {})
                self._ticker_meta[key] = (msg.get("cs", 0), msg.get("ts", 0))
            else:
                kl = self._klines.setdefault((it.category, it.symbol), {})
                for c in msg.get("data") or []:
                    if c.get("interval") == "1":
                        kl[int(c["start"])] = c

    def _book_levels(self, bk: _Book) -> tuple[list, list]:
        bids = sorted(bk.b.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        asks = sorted(bk.a.items(), key=lambda kv: Decimal(kv[0]))
        return bids, asks

    def snapshot(self, category: str, topic: P.Topic) -> Out | None:
        if not self.synth_snapshots:
            return None
        first = self.first_index.get((category, topic.name))
        if first is None or first >= self.pos:
            return None  # the recording's own first message (a snapshot) is still to come
        self._advance_state()
        key = (category, topic.name)
        if topic.channel == "orderbook":
            bk = self._books.get(key)
            if bk is None:
                return None
            bids, asks = self._book_levels(bk)
            spot_style = category == "spot" or topic.depth == 1
            text = P.orderbook_msg(topic.name, "snapshot", self.now, bk.symbol, P.levels(bids), P.levels(asks),
                                   bk.u, bk.seq, bk.cts, level1=spot_style)
            return Out(topic.name, text, "snapshot", topic.symbol, bk.u, self.now)
        if topic.channel == "tickers" and category == "linear":
            st = self._tickers.get(key)
            if not st:
                return None
            cs, _ = self._ticker_meta.get(key, (0, 0))
            text = P.ticker_msg(topic.name, "snapshot", [(k, v) for k, v in st.items()], cs, self.now)
            return Out(topic.name, text, "snapshot", topic.symbol, 0, self.now)
        return None

    # ---- REST from the replayed state
    def rest_orderbook(self, category, symbol, limit):
        self._advance_state()
        best = None
        for (cat, topic), bk in self._books.items():
            if cat == category and bk.symbol == symbol:
                depth = int(topic.split(".")[1])
                if best is None or depth > best[0]:
                    best = (depth, bk)
        if best is None:
            raise RestError(10001, "Not supported symbols")
        bids, asks = self._book_levels(best[1])
        bk = best[1]
        return {"s": symbol, "a": [list(x) for x in asks[:limit]], "b": [list(x) for x in bids[:limit]],
                "ts": self.now, "u": bk.u, "seq": bk.seq, "cts": bk.cts}

    def rest_klines(self, category, symbol, interval, start, end, limit):
        if interval != "1":
            raise RestError(10001, "replay serves interval 1 only")
        self._advance_state()
        kl = self._klines.get((category, symbol))
        if not kl:
            raise RestError(10001, "Not supported symbols")
        rows = []
        for s in sorted(kl, reverse=True):
            if (start is not None and s < start) or (end is not None and s > end):
                continue
            c = kl[s]
            rows.append([str(s), c["open"], c["high"], c["low"], c["close"], c["volume"], c["turnover"]])
            if len(rows) >= limit:
                break
        return rows

    def rest_tickers(self, category, symbol):
        self._advance_state()
        out = []
        for (cat, _topic), st in sorted(self._tickers.items()):
            if cat == category and (symbol is None or st.get("symbol") == symbol):
                out.append(dict(st))
        if symbol and not out:
            raise RestError(10001, "Not supported symbols")
        return out
