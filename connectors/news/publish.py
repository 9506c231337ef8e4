"""News -> NewsItem records through the gateway's publisher (one per market symbol) and dead letters.

The contract (``schemas/avro/news_item.avsc``) routes every item to every configured market
symbol, so each symbol's feature engine sees market-wide news in its own ``gw_seq`` order;
``mentioned`` says whether the item names that symbol's asset. ``gw_seq`` belongs to the gateway's
``connectors.publisher.Publisher`` (per symbol, dense across all raw topics, restored from Kafka at
start): this module never numbers records itself, it hands them to a ``NewsSink``, which the
gateway's Publisher is (``publish(name, rec) -> bool`` assigns gw_seq and produces keyed by symbol;
``dead_letter(...)`` writes ``tickcast.deadletter``).

Wiring: the gateway (one process owns gw_seq) runs ``run_news_input(connector, publisher, symbols,
stop=stop)`` as one of its extra inputs on its event loop (``connectors/gateway.py::news_input``,
on by default, ``TICKCAST_GATEWAY_NEWS``). ``tickcast news`` runs the same loop in a process of its
own with its own Publisher (gw_seq restored from Kafka): correct only while no gateway publishes the
same symbols (two processes would number the same symbols independently).

Delivery and the seen set: the connector's seen set is saved only after the publisher's queue has
been seen empty since the batch was handed over (``wait_delivered``), so a crash re-publishes
rather than loses; the news features ignore a repeated ``item_id``.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from connectors.news.assets import symbol_asset
from connectors.news.connector import NewsConnector, PollResult
from connectors.news.normalise import NewsEntry, Rejected
from tickcast.logs import get_logger

log = get_logger("news.publish")

RECORD = "NewsItem"


class NewsSink(Protocol):
    """What the gateway's Publisher offers (``connectors.publisher.Publisher``)."""

    def publish(self, name: str, rec: dict) -> bool: ...

    def dead_letter(self, source: str, kind: str, reason: str, payload: bytes | str, *,
                    topic: str | None = None, symbol: str | None = None) -> None: ...


def news_records(entry: NewsEntry, symbols: list[str]) -> list[dict]:
    """One NewsItem record per market symbol (``gw_seq`` is the publisher's to assign)."""
    out = []
    for sym in symbols:
        out.append({
            "symbol": sym, "venue": entry.venue, "exchange_ts": entry.exchange_ts, "recv_ts": entry.recv_ts,
            "gw_seq": -1, "item_id": entry.item_id, "source": entry.source, "url": entry.url,
            "title": entry.title, "summary": entry.summary, "published_ts": entry.published_ts,
            "assets": list(entry.assets), "mentioned": symbol_asset(sym) in entry.assets,
            "sentiment": float(entry.sentiment), "source_weight": float(entry.source_weight),
        })
    return out


def dead_letter(sink: NewsSink, r: Rejected) -> None:
    sink.dead_letter(f"news.{r.stage}", r.error_kind, f"{r.source}: {r.reason}", r.payload, topic=r.feed_url)


def publish_result(sink: NewsSink, res: PollResult, symbols: list[str]) -> dict[str, int]:
    """Hand a fetch's new items (one record per symbol, oldest first) and rejections to the sink."""
    counts = {"items": 0, "records": 0, "refused": 0, "dead_letters": 0}
    for entry in res.entries:
        counts["items"] += 1
        for rec in news_records(entry, symbols):
            if sink.publish(RECORD, rec):
                counts["records"] += 1
            else:
                counts["refused"] += 1
    for r in res.rejected:
        dead_letter(sink, r)
        counts["dead_letters"] += 1
    if counts["refused"]:
        log.error("news records refused by the publisher (buffer full)", extra={
            "feed": res.feed.name, "counts": counts})
    return counts


def queue_drained(sink, *, timeout_s: float = 30.0, step_s: float = 0.05) -> Callable[[], Awaitable[bool]]:
    """``wait_delivered`` for a publisher shared with other inputs: polls its ``buffered`` count (the
    records the broker has not acknowledged yet) until it has been 0 once, up to ``timeout_s``."""
    async def wait() -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while getattr(sink, "buffered", 0) > 0:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(step_s)
        return True

    return wait


async def run_news_input(connector: NewsConnector, sink: NewsSink, symbols: list[str], *,
                         wait_delivered: Callable[[], Awaitable[bool]] | None = None,
                         stop: asyncio.Event | None = None, max_batches: int | None = None) -> dict[str, int]:
    """Poll the feeds forever (or ``max_batches`` fetches, or until ``stop``) and publish through
    ``sink``; returns the totals. Meant to run as one task on the gateway's event loop."""
    if not symbols:
        raise ValueError("no market symbols to route news to")
    wait_delivered = wait_delivered or queue_drained(sink)
    totals: dict[str, int] = {}
    batches = 0
    agen = connector.batches()
    try:
        while stop is None or not stop.is_set():
            if stop is None:
                res = await agen.__anext__()
            else:
                nxt = asyncio.ensure_future(agen.__anext__())
                halt = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({nxt, halt}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    await asyncio.gather(nxt, return_exceptions=True)
                    break
                halt.cancel()
                res = nxt.result()
            counts = publish_result(sink, res, symbols)
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
            if (counts["records"] or counts["dead_letters"] or connector.store.dirty):
                if await wait_delivered():
                    connector.commit()
                else:
                    log.warning("publisher queue not drained yet: the seen set is saved after a later batch",
                                extra={"feed": res.feed.name})
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        await agen.aclose()
    return totals
