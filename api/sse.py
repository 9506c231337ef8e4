"""Server-Sent Events fan-out: one hub, one bounded queue per client, a bounded replay buffer.

Events ``forecast``, ``signal`` and ``alert`` carry an ``id`` (an integer that only grows, also across
restarts: it starts from the boot time in µs) and are kept in a bounded replay buffer, so a client
that reconnects with ``Last-Event-ID`` gets what it missed while that is still buffered, then a
``heartbeat``; when part of it is no longer buffered, that heartbeat (right after what could be
replayed) carries ``"gap": true``. ``heartbeat`` events (no id,
never replayed) go to every client every ``heartbeat_s`` and carry the server time and the champion
version. Each event is encoded once, whatever the number of clients, and a batch (a minute's
forecasts and signals) reaches each client as one chunk, one write. A client whose queue is full
(it stopped reading for ``queue_size`` batches) is disconnected and can resume with ``Last-Event-ID``.

Everything here runs on the event loop thread; other threads call ``publish_threadsafe``.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

_CLOSE = object()


@dataclass(frozen=True)
class Event:
    id: int | None
    event: str
    symbol: str | None
    raw: bytes  # the encoded SSE frame


def encode(event: str, data: str, event_id: int | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines += [f"data: {chunk}" for chunk in data.split("\n")]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(eq=False)
class Subscription:
    symbols: frozenset[str] | None
    queue: asyncio.Queue
    dropped: bool = False
    replay: list[Event] = field(default_factory=list)
    gap: bool = False

    def wants(self, ev: Event) -> bool:
        return self.symbols is None or ev.symbol is None or ev.symbol in self.symbols


class EventHub:
    def __init__(self, *, buffer_size: int = 2048, queue_size: int = 1024, heartbeat_s: float = 15.0,
                 heartbeat_info: Callable[[], dict] | None = None, on_drop: Callable[[], None] | None = None):
        self.buffer: deque[Event] = deque(maxlen=buffer_size)
        self.queue_size = queue_size
        self.heartbeat_s = heartbeat_s
        self.heartbeat_info = heartbeat_info or (dict)
        self.on_drop = on_drop
        self.subs: set[Subscription] = set()
        self._next_id = int(time.time() * 1_000_000)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._hb_task: asyncio.Task | None = None
        self.published = 0
        # publish -> written to the client's socket, per client and batch (seconds): the server's share
        # of the delivery delay, without the network and the client
        self.fanout_s: deque[float] = deque(maxlen=20_000)
        self.on_fanout: Callable[[float], None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self.heartbeat_s > 0:
            self._hb_task = self.loop.create_task(self._heartbeats())

    async def stop(self) -> None:
        if self._hb_task:
            self._hb_task.cancel()
            try:
                await self._hb_task
            except (asyncio.CancelledError, Exception):
                pass
        self.close_all()

    def close_all(self) -> None:
        for sub in list(self.subs):
            sub.dropped = True
            try:
                sub.queue.put_nowait(_CLOSE)
            except asyncio.QueueFull:
                pass

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.heartbeat()

    # ------------------------------------------------------------------ publishing
    @property
    def last_id(self) -> int:
        return self._next_id - 1

    def heartbeat(self, sub: Subscription | None = None, **extra) -> None:
        info = {"server_ts": int(time.time() * 1_000_000), "last_event_id": self.last_id,
                **self.heartbeat_info(), **extra}
        raw = encode("heartbeat", json.dumps(info, separators=(",", ":")))
        targets = [sub] if sub is not None else list(self.subs)
        for s in targets:
            self._offer(s, raw, None)

    def _event(self, event: str, data: dict, symbol: str | None) -> Event:
        eid = self._next_id
        self._next_id += 1
        ev = Event(eid, event, symbol, encode(event, json.dumps(data, separators=(",", ":"), allow_nan=False), eid))
        self.buffer.append(ev)
        self.published += 1
        return ev

    def publish(self, event: str, data: dict, symbol: str | None = None) -> int:
        """Buffer and fan out one event; returns its id."""
        return self.publish_many([(event, data, symbol)])[0]

    def publish_many(self, items: list[tuple[str, dict, str | None]]) -> list[int]:
        """Buffer a batch (a minute's forecasts and signals) and hand each client its share as one chunk:
        encoded once, joined once per distinct symbol filter, one queue item per client."""
        t = time.perf_counter()
        evs = [self._event(event, data, symbol) for event, data, symbol in items]
        everything = b"".join(e.raw for e in evs)
        per_filter: dict[frozenset, bytes] = {}
        for sub in list(self.subs):
            if sub.symbols is None:
                chunk = everything
            else:
                chunk = per_filter.get(sub.symbols)
                if chunk is None:
                    chunk = per_filter[sub.symbols] = b"".join(e.raw for e in evs if sub.wants(e))
            if chunk:
                self._offer(sub, chunk, t)
        return [e.id for e in evs]

    def publish_threadsafe(self, items: list[tuple[str, dict, str | None]]) -> bool:
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(self.publish_many, items)
        except RuntimeError:  # loop closed between the check and the call
            return False
        return True

    def _offer(self, sub: Subscription, chunk: bytes, t: float | None) -> None:
        if sub.dropped:
            return
        try:
            sub.queue.put_nowait((t, chunk))
        except asyncio.QueueFull:
            sub.dropped = True  # its stream ends at the next wake-up (or its 30 s send timeout)
            while not sub.queue.empty():  # free what it never read
                sub.queue.get_nowait()
            sub.queue.put_nowait(_CLOSE)
            if self.on_drop:
                self.on_drop()

    # ------------------------------------------------------------------ subscribing
    def subscribe(self, symbols: set[str] | None, last_event_id: int | None) -> Subscription:
        sub = Subscription(frozenset(symbols) if symbols else None, asyncio.Queue(self.queue_size))
        if last_event_id is not None:
            oldest = self.buffer[0].id if self.buffer else self._next_id
            sub.gap = last_event_id < oldest - 1
            sub.replay = [e for e in self.buffer if e.id > last_event_id and sub.wants(e)]
        self.subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subs.discard(sub)

    async def stream(self, sub: Subscription):
        """The body iterator for sse-starlette: replay, a first heartbeat, then live events."""
        try:
            for ev in sub.replay:
                yield ev.raw
            info = {"server_ts": int(time.time() * 1_000_000), "last_event_id": self.last_id,
                    **self.heartbeat_info()}
            if sub.gap:
                info["gap"] = True
                info["note"] = "events between Last-Event-ID and the oldest buffered event are no longer buffered"
            yield encode("heartbeat", json.dumps(info, separators=(",", ":")))
            closing = False
            while not sub.dropped and not closing:
                item = await sub.queue.get()
                if item is _CLOSE:
                    break
                t, chunk = item
                # everything already queued goes out in one write
                if not sub.queue.empty():
                    chunks = [chunk]
                    while not sub.queue.empty():
                        nxt = sub.queue.get_nowait()
                        if nxt is _CLOSE:
                            closing = True
                            break
                        chunks.append(nxt[1])
                        t = nxt[0] if t is None else t
                    chunk = b"".join(chunks)
                yield chunk
                if t is not None:  # resumed: sse-starlette has handed the chunk to the socket
                    dt = time.perf_counter() - t
                    self.fanout_s.append(dt)
                    if self.on_fanout is not None:
                        self.on_fanout(dt)
        finally:
            self.unsubscribe(sub)
