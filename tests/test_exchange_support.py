"""Helpers for the local exchange's tests (no tests here): real websockets clients against a real server."""
from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import websockets

from connectors.exchange import LocalExchange

START = 1_786_310_760_000  # a minute boundary (2026-08-09 21:26 UTC, the real recording's minute)


async def subscribe(ws, args, req_id: str | None = None) -> dict:
    msg = {"op": "subscribe", "args": list(args)}
    if req_id is not None:
        msg["req_id"] = req_id
    await ws.send(json.dumps(msg))
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 10))
        ws.consumed = getattr(ws, "consumed", 0) + 1  # frames taken here, which drain() will not see
        if m.get("op") == "subscribe":
            return m


async def drain(ws, ex: LocalExchange, conn_id: str, got: list[str] | None = None, timeout: float = 60.0) -> list[str]:
    """Receive until the driver is done and the client has everything the exchange sent it."""
    got = [] if got is None else got
    deadline = time.monotonic() + timeout
    while True:
        c = ex.conns[conn_id]
        if ex.driver.done.is_set() and not c.q and len(got) + getattr(ws, "consumed", 0) >= c.n:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain: {len(got)} received, {c.n} sent")
        try:
            got.append(await asyncio.wait_for(ws.recv(), 0.2))
        except TimeoutError:
            continue


async def connect(url: str):
    return await websockets.connect(url, max_size=None, ping_interval=None)


class Book:
    """A client-side book from Bybit messages (Decimal prices), checked as it goes."""

    def __init__(self):
        self.b: dict[Decimal, str] = {}
        self.a: dict[Decimal, str] = {}
        self.u = None

    def apply(self, msg: dict) -> None:
        d = msg["data"]
        if msg["type"] == "snapshot":
            self.b, self.a = {}, {}
        for side, book in (("b", self.b), ("a", self.a)):
            for p, q in d[side]:
                if Decimal(q) == 0:
                    assert Decimal(p) in book, f"delete of a missing level {p}"
                    del book[Decimal(p)]
                else:
                    book[Decimal(p)] = q
        self.u = d["u"]
        if self.b and self.a:
            assert max(self.b) < min(self.a), "crossed book"

    def top(self) -> tuple[str, str, str, str]:
        bp, ap = max(self.b), min(self.a)
        return str(bp), self.b[bp], str(ap), self.a[ap]
