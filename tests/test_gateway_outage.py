"""Broker unreachable for a few seconds, then back: nothing lost, nothing duplicated, gw_seq dense.
Then the same with the buffer bound hit: refused events are counted and leave no gw_seq hole.

tansu keeps its data in memory only, so "broker down" is a TCP proxy in front of it that is cut and
restored; the broker advertises the proxy's address, so every client connection goes through it."""
from __future__ import annotations

import asyncio

import pytest

from connectors.gateway import Gateway
from tests.test_gateway import by_symbol, check_dense, config, expected_events, key_of, symbols, until
from tests.test_gateway_support import FakeBybitServer, SyntheticMarket, read_back
from tickcast.netfault import ProxiedBroker, TcpProxy
from tickcast.topics import HEARTBEAT


@pytest.mark.slow
def test_broker_outage_loses_nothing_and_the_buffer_bound_is_counted():
    sym = symbols("BTC")[0]
    m = SyntheticMarket(sym, seed=50)
    state = {}

    async def main():
        proxy = TcpProxy(target_port=0)
        broker = ProxiedBroker(proxy.port)
        await asyncio.to_thread(broker.start)
        proxy.target_port = broker.port
        await proxy.start()
        await asyncio.to_thread(broker.create_topics)
        server = await FakeBybitServer({sym: m}).start()
        gw = Gateway(config(server, [sym], producer_overrides={"reconnect.backoff.max.ms": 200}), broker.bootstrap)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        try:
            await server.wait_subscribed(4)
            for _ in range(50):
                await server.push(m.random_message())
            await until(lambda: sum(gw.received.values()) >= 52)
            await until(lambda: gw.publisher.buffered == 0)
            # 1. the broker is unreachable for ~3 s while data keeps coming
            await proxy.cut()
            for _ in range(30):
                for _ in range(10):
                    await server.push(m.random_message())
                await asyncio.sleep(0.1)
            await until(lambda: sum(gw.received.values()) >= 352)
            state["buffered_in_outage"] = gw.publisher.buffered
            await proxy.restore()
            await until(lambda: gw.publisher.buffered == 0, timeout=60)
            state["dropped_after_outage"] = gw.publisher.dropped
            # 2. a second outage with a small bound: new events are refused, counted, never numbered
            gw.publisher.buffer_max = gw.publisher.buffered + 40
            await proxy.cut()
            for _ in range(100):
                await server.push(m.random_message())
            await until(lambda: sum(gw.received.values()) >= 452)
            await until(lambda: gw.publisher.dropped > 0)
            await proxy.restore()
            await until(lambda: gw.publisher.buffered == 0, timeout=60)
        finally:
            stop.set()
            await task
            await server.stop()
        state["records"] = await asyncio.to_thread(read_back, broker.bootstrap, {sym}, idle_s=1.0)
        await proxy.stop()
        broker.stop()
        return server, gw

    server, gw = asyncio.run(main())
    assert state["buffered_in_outage"] > 100  # held while the broker was away
    assert state["dropped_after_outage"] == 0  # ... and nothing lost
    assert gw.publisher.dropped > 0 and gw.publisher.failed == 0
    got = by_symbol(state["records"])
    check_dense(got)  # no hole, no duplicate, though events were refused
    assert len(got[sym]) == gw.publisher.next_seq[sym]
    published = [(t, key_of(t, r)) for t, n, r in got[sym] if t != HEARTBEAT]
    sent = server.sent_data()
    expected = expected_events(sent)[sym]
    # everything up to the second outage (its 100 messages are the last ones) arrived exactly once, in order ...
    before = expected_events(sent[:-100])[sym]
    assert published[:len(before)] == before
    # ... and what arrived later is the expected sequence minus the refused events
    it = iter(expected)
    assert all(any(x == e for e in it) for x in published)
    assert len(expected) - len(published) <= gw.publisher.dropped
