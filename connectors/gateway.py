"""The market-data gateway: Bybit v5 public WebSocket (or the local exchange) -> Kafka raw topics.

    exchange WS frames --on_message--> parse (connectors.bybit.parse) --> Publisher (gw_seq, Avro)
                                    \\-> dead letters (bad input, with the raw bytes and the reason)
    heartbeats every 250 ms per symbol, resync requests from tickcast.control, mempool and other
    inputs (news) on the same event loop, so one process numbers each symbol's events.

Everything runs on one asyncio event loop in one thread: arrival order is processing order, and
``gw_seq`` is assigned in that order. The per-message path (``on_message``) is plain synchronous
code: JSON decode, parse, encode, produce (librdkafka queues and sends on its own threads).

Heartbeat clock: for each symbol the gateway remembers the largest exchange ``ts`` seen and the
monotonic time it was received; a heartbeat's ``exchange_ts`` is that ts plus the time elapsed
since, never lower than the symbol's previous heartbeat. Heartbeats start once a symbol has seen an
exchange timestamp.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from connectors.bybit.parse import BybitParser, ParseError, control_kind, decode
from connectors.bybit.ws import BybitConnection, plan_connections
from connectors.publisher import Publisher, now_us
from tickcast.logs import get_logger
from tickcast.topics import CONTROL

log = get_logger("gateway")

ExtraInput = Callable[[Publisher, asyncio.Event], Awaitable[Any]]


@dataclass
class GatewayConfig:
    symbols: list[str]
    ws_url: str  # full URL, e.g. wss://stream.bybit.com/v5/public/linear
    venue: str = "bybit.linear"
    depth: int = 50
    heartbeat_ms: int = 250
    ping_s: float = 20.0
    stale_s: float | None = None
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    buffer_max: int = 200_000
    topics_per_connection: int = 200
    resync: str = "resubscribe"  # or "rest"
    resync_min_interval_s: float = 1.0
    control: bool = True  # listen on tickcast.control
    metrics_port: int | None = None  # Prometheus /metrics (0: a free port); None: off
    # closed 1-minute klines of the last N minutes published at start as live Kline events (REST):
    # the feature flow turns them into history vectors, so lookbacks are full from the first minute
    history_minutes: int = 240  # >= the longest model lookback (120) + the candle warm-up (62)
    # one time budget for that history over every symbol: a blocked REST API (HTTP 403, retried with
    # minutes of back-off) must not hold the live stream back for symbols x a timeout each
    history_budget_s: float = 20.0
    resync_rest_timeout_s: float = 5.0  # then resubscribe instead (a blocked REST retries for minutes)
    # a fresh order-book snapshot at least this often (Bybit sends one only on subscribe): the offline
    # replay starts from the last snapshot within a day, so a connection that lives for days would
    # otherwise leave the replay without a book where the live flow had one
    snapshot_every_s: float = 6 * 3600.0
    metrics_addr: str = "127.0.0.1"
    producer_overrides: dict = field(default_factory=dict)


async def _unless_stopped(coro, timeout_s: float, stop: asyncio.Event | None):
    """``coro``'s result; TimeoutError after ``timeout_s`` or as soon as ``stop`` is set."""
    task = asyncio.ensure_future(coro)
    stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
    try:
        await asyncio.wait({task} | ({stopper} if stopper else set()), timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if stopper is not None:
            stopper.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise TimeoutError("stopped" if stop is not None and stop.is_set() else f"no answer in {timeout_s:.1f} s")
    return task.result()


class Gateway:
    """One gateway process: connections, parser, publisher, heartbeats, control, extra inputs."""

    def __init__(self, config: GatewayConfig, bootstrap: str, *, next_seq: dict[str, int] | None = None,
                 serde=None, rest=None, extra_inputs: list[ExtraInput] | None = None):
        from tickcast.serde import Serde

        self.config = config
        self.bootstrap = bootstrap
        self.serde = serde or Serde()
        self.symbols = list(config.symbols)
        self.parser = BybitParser(config.venue, self.symbols)
        self.publisher = Publisher(bootstrap, serde=self.serde, next_seq=next_seq, buffer_max=config.buffer_max,
                                   producer_overrides=config.producer_overrides)
        self.rest = rest
        self.extra_inputs = list(extra_inputs or [])
        self.connections: list[BybitConnection] = []
        self.topic_conn: dict[str, BybitConnection] = {}
        for i, topics in enumerate(plan_connections(self.symbols, config.depth,
                                                     max_topics=config.topics_per_connection)):
            conn = BybitConnection(config.ws_url, topics, self.on_message, name=f"ws{i}", ping_s=config.ping_s,
                                   stale_s=config.stale_s, backoff_base_s=config.backoff_base_s,
                                   backoff_max_s=config.backoff_max_s, on_event=self._on_conn_event)
            self.connections.append(conn)
            for t in topics:
                self.topic_conn[t] = conn
        # per-symbol exchange clock: (max exchange ts ms, monotonic receive time of it)
        self.clocks: dict[str, tuple[int, float]] = {}
        self.last_heartbeat: dict[str, int] = {}
        self.received: dict[str, int] = {}  # per exchange topic (data messages)
        self.control_msgs: dict[str, int] = {}  # pong, subscribe, unsubscribe, ...
        self.subscribe_errors = 0
        self.heartbeats = 0
        self.resyncs = 0
        self.resyncs_coalesced = 0
        self._last_resync: dict[str, float] = {}
        self.started_us = now_us()
        self.events: list[tuple[str, str, dict]] = []  # connection events (for tests and logs), bounded
        self.stop_event: asyncio.Event | None = None
        self.rates: dict[str, float] = {}  # events/s per raw topic over the last few seconds
        self._tasks: list[asyncio.Task] = []
        self._side_tasks: set[asyncio.Task] = set()  # periodic snapshot requests in flight
        self.snapshot_at: dict[str, float] = {}  # symbol -> monotonic time of its last book snapshot
        self.metrics = None
        self.metrics_port: int | None = None

    # -- the hot path ---------------------------------------------------------------------------
    def on_message(self, raw: str, recv_ts: int, conn: BybitConnection | None = None) -> None:
        """One WebSocket text frame, as received."""
        try:
            msg = decode(raw)
        except ParseError as exc:
            self._dead(exc, raw)
            return
        topic = msg.get("topic")
        if topic is None:
            self._control(msg, raw, conn)
            return
        try:
            events = self.parser.events(msg, recv_ts)
        except ParseError as exc:
            self._dead(exc, raw)
            return
        except Exception as exc:  # noqa: BLE001 - a parser bug: keep the message and the connection
            log.exception("parser failed on a message: dead-lettered", extra={"topic": str(topic)[:200]})
            self._dead(ParseError("internal_error", f"parser failed: {exc!r}"[:2000]), raw)
            return
        received = self.received
        received[topic] = received.get(topic, 0) + 1
        symbol = self.parser.route(topic)[1]
        ts = msg["ts"]
        clock = self.clocks.get(symbol)
        if clock is None or ts > clock[0]:
            self.clocks[symbol] = (ts, time.monotonic())
        publish = self.publisher.publish
        for name, rec in events:
            publish(name, rec)
            if name == "OrderBookSnapshot":
                self.snapshot_at[symbol] = time.monotonic()

    def _dead(self, exc: ParseError, raw: str) -> None:
        self.publisher.dead_letter("gateway.bybit.parse", exc.kind, exc.reason, raw, topic=exc.topic,
                                   symbol=exc.symbol)

    def _control(self, msg: dict, raw: str, conn: BybitConnection | None) -> None:
        kind = control_kind(msg)
        if kind is None:
            self._dead(ParseError("unknown_message", "neither a data message (topic) nor a reply (op)"), raw)
            return
        self.control_msgs[kind] = self.control_msgs.get(kind, 0) + 1
        if kind == "pong":
            if conn is not None:
                conn.note_pong()
            return
        if msg.get("success") is False:
            self.subscribe_errors += 1
            log.error("the exchange refused a request", extra={
                "op": kind, "ret_msg": msg.get("ret_msg"), "conn": getattr(conn, "name", None)})
            if conn is not None and kind == "subscribe":
                conn.rejected(msg)
            self.publisher.dead_letter("gateway.bybit.control", f"{kind}_rejected", str(msg.get("ret_msg")), raw,
                                       topic=None)
        elif conn is not None:
            conn.acknowledged(msg)

    # -- heartbeats -----------------------------------------------------------------------------
    def heartbeat_once(self) -> int:
        """Publish one heartbeat per symbol that has an exchange clock; returns how many."""
        now_mono = time.monotonic()
        recv_ts = now_us()
        venue = self.config.venue
        n = 0
        for sym in self.symbols:
            clock = self.clocks.get(sym)
            if clock is None:
                continue
            est = clock[0] + int((now_mono - clock[1]) * 1000)
            last = self.last_heartbeat.get(sym)
            if last is not None and est < last:
                est = last
            self.last_heartbeat[sym] = est
            if self.publisher.publish("Heartbeat", {"symbol": sym, "venue": venue, "exchange_ts": est,
                                                    "recv_ts": recv_ts, "gw_seq": -1}):
                n += 1
        self.heartbeats += n
        return n

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        interval = self.config.heartbeat_ms / 1000
        nxt = time.monotonic() + interval
        while not stop.is_set():
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            nxt += interval
            if time.monotonic() > nxt:  # fell behind (a long stall): do not burst to catch up
                nxt = time.monotonic() + interval
            self.heartbeat_once()

    # -- resync ---------------------------------------------------------------------------------
    async def resync(self, symbol: str, reason: str = "") -> str:
        """A fresh order-book snapshot for ``symbol``: resubscribe (default) or REST."""
        if symbol not in self.symbols:
            return "unknown_symbol"
        now = time.monotonic()
        if now - self._last_resync.get(symbol, -1e9) < self.config.resync_min_interval_s:
            self.resyncs_coalesced += 1
            return "coalesced"
        self._last_resync[symbol] = now
        self.resyncs += 1
        log.info("resync requested", extra={"symbol": symbol, "reason": reason, "mode": self.config.resync})
        if self.config.resync == "rest" and self.rest is not None:
            from connectors.rest import RestError, orderbook_record

            try:
                result = await asyncio.wait_for(self.rest.orderbook(symbol, min(self.config.depth, 500)),
                                                self.config.resync_rest_timeout_s)
                rec = orderbook_record(symbol, self.config.venue, result, self.config.depth, now_us())
            except (RestError, ParseError, KeyError, TimeoutError) as exc:
                log.error("REST snapshot for resync failed; resubscribing instead", extra={
                    "symbol": symbol, "error": str(exc) or type(exc).__name__})
            else:
                self.publisher.publish("OrderBookSnapshot", rec)
                return "rest"
        topic = f"orderbook.{self.config.depth}.{symbol}"
        conn = self.topic_conn[topic]
        ok = await conn.resubscribe([topic])
        return "resubscribed" if ok else "offline"

    def _control_consumer(self):
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        from tickcast.kafka import consumer_config

        # resync requests are rare and 100 ms is soon enough: no 1 ms fetch loop on an idle topic
        consumer = Consumer(consumer_config(self.bootstrap, "tickcast-gateway-control", low_latency=False))
        consumer.assign([TopicPartition(CONTROL, 0, OFFSET_END)])
        return consumer

    def handle_control_record(self, value: bytes) -> tuple[str, str] | None:
        """(symbol, reason) of a valid, current resync request; dead letters otherwise."""
        from tickcast.serde import SerdeError

        try:
            cmd = self.serde.decode(value, expect="ControlCommand")
        except SerdeError as exc:
            self.publisher.dead_letter("gateway.control", exc.kind, str(exc), value, topic=CONTROL)
            return None
        if cmd["requested_ts"] < self.started_us - 5_000_000:
            return None  # from before this gateway started: its own subscriptions brought fresh snapshots
        if cmd["symbol"] not in self.symbols:
            self.publisher.dead_letter("gateway.control", "unknown_symbol",
                                       f"resync for {cmd['symbol']!r}, which this gateway does not follow",
                                       value, topic=CONTROL, symbol=cmd["symbol"])
            return None
        return cmd["symbol"], f"{cmd['requester']}: {cmd['reason']}"

    async def _control_loop(self, stop: asyncio.Event) -> None:
        consumer = await asyncio.to_thread(self._control_consumer)
        try:
            while not stop.is_set():
                msgs = consumer.consume(num_messages=100, timeout=0)
                for m in msgs:
                    if m.error() is not None:
                        continue
                    req = self.handle_control_record(m.value())
                    if req is not None:
                        await self.resync(*req)
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(consumer.close)

    async def _guarded(self, extra: ExtraInput, stop: asyncio.Event, name: str) -> None:
        """Run an extra input (mempool, news); if it fails, log it and start it again with backoff:
        a broken side feed never takes the market data down with it."""
        delay = 1.0
        while not stop.is_set():
            started = time.monotonic()
            try:
                await extra(self.publisher, stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of a side feed is contained here
                if stop.is_set():  # torn down mid-await by the shutdown: not a failure
                    log.info("input ended at stop", extra={"input": name, "error": repr(exc)})
                    return
                log.error("input failed; restarting it", extra={"input": name, "error": repr(exc),
                                                                "delay_s": delay})
            if time.monotonic() - started > 60:
                delay = 1.0
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 60.0)

    # -- housekeeping ---------------------------------------------------------------------------
    def _on_conn_event(self, kind: str, conn: BybitConnection, info: dict) -> None:
        if len(self.events) < 10_000:
            self.events.append((kind, conn.name, info))

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        history: list[tuple[float, dict[str, int]]] = []
        last_log = time.monotonic()
        while not stop.is_set():
            self.publisher.poll(0)
            await asyncio.sleep(0.02)
            now = time.monotonic()
            if not history or now - history[-1][0] >= 1.0:
                if self.metrics is not None:
                    self.metrics.update()
                history.append((now, dict(self.publisher.accepted)))
                history = history[-6:]
                t0, c0 = history[0]
                if now > t0:
                    self.rates = {k: (v - c0.get(k, 0)) / (now - t0) for k, v in history[-1][1].items()}
                for sym in self.snapshots_due(now):
                    task = asyncio.ensure_future(self.resync(sym, "periodic snapshot"))
                    self._side_tasks.add(task)
                    task.add_done_callback(self._side_tasks.discard)
            if now - last_log >= 60.0:
                last_log = now
                log.info("gateway counts", extra={"counts": self.counts()})

    def snapshots_due(self, now: float) -> list[str]:
        """Symbols whose last order-book snapshot is older than ``snapshot_every_s`` (marked as asked)."""
        due = [s for s, t in self.snapshot_at.items() if now - t >= self.config.snapshot_every_s]
        for s in due:
            self.snapshot_at[s] = now  # asked once; the snapshot that answers sets it again
        return due

    def counts(self) -> dict:
        return {"frames": sum(c.received for c in self.connections), "received": sum(self.received.values()),
                **self.publisher.counts(), "heartbeats": self.heartbeats,
                "duplicate_trades": self.parser.duplicate_trades, "book_gaps": self.parser.book_gaps,
                "book_repeats": self.parser.book_repeats, "reconnects": sum(c.reconnects for c in self.connections),
                "resyncs": self.resyncs, "subscribe_errors": self.subscribe_errors}

    # -- running --------------------------------------------------------------------------------
    async def publish_history(self, stop: asyncio.Event | None = None) -> int:
        """Publish the closed 1-minute klines of the last ``history_minutes`` of every symbol (REST)
        as live, confirmed Kline events, before the WebSocket data: the stream then starts with
        enough candle history for every per-minute variate and lookback. A failure is logged and the
        gateway goes on without history (the features warm up from live data instead). All symbols
        share ``history_budget_s``; ``stop`` ends the wait at once."""
        minutes = self.config.history_minutes
        if not minutes or self.rest is None:
            return 0
        from connectors.rest import RestError, kline_record

        now = now_us()
        end = now // 1000 - 60_000
        published = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.history_budget_s
        for i, sym in enumerate(self.symbols):
            left = deadline - loop.time()
            if left <= 0 or (stop is not None and stop.is_set()):
                log.warning("start-up kline history: time budget spent, the rest warm up from live data",
                            extra={"symbols": self.symbols[i:], "budget_s": self.config.history_budget_s})
                break
            try:
                rows = await _unless_stopped(self.rest.klines(sym, end - minutes * 60_000, end), left, stop)
            except (RestError, TimeoutError, OSError, ValueError) as exc:
                log.warning("start-up kline history unavailable: features warm up from live data",
                            extra={"symbol": sym, "error": str(exc)[:300] or type(exc).__name__})
                continue
            for row in rows:
                try:
                    rec = kline_record(sym, self.config.venue, row, "1")
                except ParseError as exc:
                    self._dead(exc, json.dumps(row))
                    continue
                rec["exchange_ts"], rec["recv_ts"] = now // 1000, now  # published now, as live events
                published += self.publisher.publish("Kline", rec)
            log.info("start-up kline history published", extra={"symbol": sym, "counts": {"klines": len(rows)}})
        return published

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then close the sockets and flush the producer."""
        self.stop_event = stop
        if self.config.metrics_port is not None:
            from connectors.metrics import GatewayMetrics

            self.metrics = GatewayMetrics(self)
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_addr)
            log.info("metrics served", extra={"url": f"http://{self.config.metrics_addr}:{self.metrics_port}/metrics"})
        await self.publish_history(stop)
        tasks = [asyncio.create_task(c.run(), name=c.name) for c in self.connections]
        tasks.append(asyncio.create_task(self._heartbeats(stop), name="heartbeats"))
        tasks.append(asyncio.create_task(self._housekeeping(stop), name="housekeeping"))
        if self.config.control:
            tasks.append(asyncio.create_task(self._control_loop(stop), name="control"))
        for i, extra in enumerate(self.extra_inputs):
            tasks.append(asyncio.create_task(self._guarded(extra, stop, f"input{i}"), name=f"input{i}"))
        self._tasks = tasks
        log.info("gateway running", extra={"symbols": self.symbols, "venue": self.config.venue,
                                           "url": self.config.ws_url,
                                           "counts": {"connections": len(self.connections)}})
        try:
            stopper = asyncio.create_task(stop.wait())
            pending = set(tasks) | {stopper}
            while not stop.is_set():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if t is not stopper and not t.cancelled() and t.exception() is not None:
                        log.error("gateway task failed", extra={"task": t.get_name(), "error": repr(t.exception())})
                        raise t.exception()
        finally:
            for c in self.connections:
                c.stop()
            for t in [*tasks, *self._side_tasks]:
                t.cancel()
            await asyncio.gather(*tasks, *self._side_tasks, return_exceptions=True)
            left = await asyncio.to_thread(self.publisher.close, 10.0)
            if left:
                log.error("stopped with records the broker never acknowledged: they are lost", extra={
                    "counts": {"undelivered": left}})
            if self.metrics is not None:
                self.metrics.close()
            log.info("gateway stopped", extra={"counts": {**self.counts(), "undelivered": left}})


# --- source selection and the CLI's entry point -------------------------------------------------


@dataclass
class Source:
    kind: str  # bybit or local
    ws_url: str
    rest_url: str
    venue: str
    mempool_venue: str
    mempool_urls: dict[str, str]  # chain -> mempool.space-API base URL


def local_source(settings) -> Source:
    base = settings.gateway_local_url.rstrip("/")
    ws_base = "ws" + base[len("http"):] if base.startswith("http") else base
    return Source("local", f"{ws_base}/v5/public/{settings.category}", base, f"sim.{settings.category}",
                  "sim.mempool", {"BTC": base, "LTC": f"{base}/ltc"})


def bybit_source(settings) -> Source:
    return Source("bybit", f"{settings.bybit_ws_url.rstrip('/')}/{settings.category}", settings.bybit_rest_url,
                  f"bybit.{settings.category}", "", {"BTC": settings.mempool_btc_url, "LTC": settings.mempool_ltc_url})


async def choose_source(settings, probe_timeout: float = 5.0) -> Source:
    """``source``: bybit, local, or auto (Bybit when its WebSocket answers, else the local exchange,
    whose data is labelled simulated: venue sim.*)."""
    from connectors.bybit.ws import reachable

    if settings.source == "bybit":
        return bybit_source(settings)
    if settings.source == "local":
        return local_source(settings)
    bybit = bybit_source(settings)
    if await reachable(bybit.ws_url, probe_timeout):
        log.info("source: Bybit is reachable", extra={"url": bybit.ws_url})
        return bybit
    local = local_source(settings)
    log.warning("source: Bybit is not reachable; using the local simulated exchange (venue sim.*)",
                extra={"url": local.ws_url})
    return local


async def wait_restore(bootstrap: str, symbols: list[str], serde, stop: asyncio.Event | None = None,
                       max_wait_s: float | None = None) -> dict[str, int]:
    """``restore_next_seq`` retried with backoff until the broker answers: the gateway publishes
    nothing before it knows where each symbol's gw_seq continues."""
    from connectors.publisher import restore_next_seq

    delay = 0.5
    deadline = None if max_wait_s is None else time.monotonic() + max_wait_s
    while True:
        try:
            return await asyncio.to_thread(restore_next_seq, bootstrap, symbols, serde)
        except Exception as exc:
            if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() > deadline):
                raise
            log.warning("cannot read the raw topics yet; retrying", extra={"error": str(exc), "delay_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def mempool_inputs(settings, source: Source, symbols: list[str]) -> list[ExtraInput]:
    """mempool.space / litecoinspace (or the local exchange's compatible feed) and, with an
    ALCHEMY_API_KEY, Alchemy pending transactions for ETH and POL; each under the market symbols
    it informs that this gateway follows."""
    from connectors.mempool import CHAIN_SYMBOLS, AlchemyPendingFeed, MempoolSpaceFeed

    out: list[ExtraInput] = []
    names = {"BTC": "mempool.space", "LTC": "litecoinspace"}
    for chain, url in source.mempool_urls.items():
        syms = [s for s in CHAIN_SYMBOLS[chain] if s in symbols]
        if not syms or not url:
            continue
        venue = source.mempool_venue or names[chain]

        def run(pub, stop, url=url, chain=chain, syms=syms, venue=venue):
            return MempoolSpaceFeed(url, chain, syms, venue, pub.publish, pub.dead_letter).run(stop)
        out.append(run)
    key = settings.alchemy_api_key.get_secret_value() if settings.alchemy_api_key else ""
    if key and source.kind == "bybit":
        for chain, base in (("ETH", settings.alchemy_eth_url), ("POL", settings.alchemy_pol_url)):
            syms = [s for s in CHAIN_SYMBOLS[chain] if s in symbols]
            if not syms:
                continue
            large = float(settings.alchemy_large_transfer.get(chain, 100.0))

            url = f"{base.rstrip('/')}/{key}"

            def run(pub, stop, url=url, chain=chain, syms=syms, large=large):
                return AlchemyPendingFeed(url, chain, syms, pub.publish, pub.dead_letter,
                                          large_transfer=large).run(stop)
            out.append(run)
    elif not key:
        log.info("ALCHEMY_API_KEY not set: no ETH/POL pending-transaction feed")
    return out


def news_input(settings, source: Source, symbols: list[str]) -> ExtraInput:
    """The news poller on the gateway's loop (connectors.news), so one process numbers gw_seq."""
    async def run(pub, stop):
        from connectors.news.connector import FeedSpec, NewsConnector, SourceWeights, parse_feed_specs
        from connectors.news.dedupe import SeenStore
        from connectors.news.feedserver import DEFAULT_FORMATS
        from connectors.news.publish import run_news_input

        if source.kind == "local":
            base = settings.news_local_url.rstrip("/")
            feeds = [FeedSpec(n, f"{base}/feeds/{n}.{fmt}", f"sim.news.{n}") for n, fmt in DEFAULT_FORMATS.items()]
        else:
            feeds = parse_feed_specs(settings.news_feeds)
        connector = NewsConnector(feeds, store=SeenStore(settings.data_dir / "news" / "seen.json"),
                                  weights=SourceWeights(settings.news_source_weights, settings.news_default_weight),
                                  poll_interval_s=settings.news_poll_interval_s)
        async with connector:
            return await run_news_input(connector, pub, symbols, stop=stop)
    return run


async def serve(settings, bootstrap: str, stop: asyncio.Event, *, symbols: list[str] | None = None,
                mempool: bool | None = None, news: bool | None = None, metrics_port: int | None = None) -> int:
    """``tickcast gateway``: choose the source, resolve the symbols, restore gw_seq, run until stop."""
    from connectors.rest import BybitRest, RestError, resolve_symbols
    from tickcast.serde import default_serde

    source = await choose_source(settings)
    wanted = list(symbols or settings.symbols)
    probe = BybitRest(source.rest_url, category=settings.category, rate_per_s=settings.gateway_rest_rate_per_s,
                      max_retries=1, backoff_base_s=0.5, backoff_403_s=1.0, timeout_s=10.0)
    try:
        instruments = await asyncio.wait_for(probe.instruments(), timeout=30)
    except (RestError, TimeoutError, OSError) as exc:
        log.warning("instruments-info unavailable: symbols not validated (known renames still applied)",
                    extra={"error": str(exc), "url": source.rest_url})
        instruments = None
    finally:
        await probe.aclose()
    try:
        resolved, info = resolve_symbols(wanted, instruments)
    except ValueError as exc:
        log.error(str(exc))
        return 2
    for sym, inst in info.items():
        log.info("instrument", extra={"symbol": sym, "tick_size": inst.tick_size, "qty_step": inst.qty_step})
    serde = default_serde()
    next_seq = await wait_restore(bootstrap, resolved, serde, stop)
    log.info("gw_seq restored from Kafka", extra={"next_seq": next_seq})
    extra: list[ExtraInput] = []
    if settings.gateway_mempool if mempool is None else mempool:
        extra += mempool_inputs(settings, source, resolved)
    if settings.gateway_news if news is None else news:
        extra.append(news_input(settings, source, resolved))
    rest = BybitRest(source.rest_url, category=settings.category, rate_per_s=settings.gateway_rest_rate_per_s)
    port = settings.gateway_metrics_port if metrics_port is None else metrics_port
    config = GatewayConfig(symbols=resolved, ws_url=source.ws_url, venue=source.venue,
                           depth=settings.orderbook_depth, heartbeat_ms=settings.gateway_heartbeat_ms,
                           ping_s=settings.gateway_ping_s, buffer_max=settings.gateway_buffer_max,
                           resync=settings.gateway_resync, metrics_port=port or None,
                           metrics_addr="0.0.0.0" if settings.api_host == "0.0.0.0" else "127.0.0.1")
    gw = Gateway(config, bootstrap, next_seq=next_seq, serde=serde, rest=rest, extra_inputs=extra)
    try:
        await gw.run(stop)
    finally:
        await rest.aclose()
    return 0
