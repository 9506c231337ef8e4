"""The gateway against the local exchange (connectors/exchange), as it talks to Bybit (only the URL
differs), into a broker of this module's own (the exchange uses the real symbol names, which other
tests' data on the shared broker would mix with). Every message the exchange's sent log holds must
arrive exactly once, in order, on the right topic, with dense gw_seq; faults give dead letters or
counted gaps; REST paging and rate limits; the mempool.space-compatible feed."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from connectors.exchange import LocalExchange, ModelDriver, RateLimit, ReplayDriver
from connectors.exchange.instruments import InstrumentBook
from connectors.exchange.server import MALFORMED
from connectors.gateway import Gateway, GatewayConfig, local_source, wait_restore
from connectors.publisher import now_us
from tests.test_gateway import by_symbol, check_dense, expected_events, key_of, until
from tests.test_gateway_support import dead_letters, read_back
from tickcast.serde import Serde
from tickcast.topics import HEARTBEAT, RAW_TOPIC_OF

SERDE = Serde()

GEN = InstrumentBook.generated()
START = 1_786_310_760_000  # a minute boundary


@pytest.fixture(scope="module")
def own_bootstrap():
    from tickcast.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b.bootstrap


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def make_gateway(ex: LocalExchange, bootstrap: str, symbols, extra_inputs=None, **kw) -> Gateway:
    """A gateway as ``tickcast gateway`` builds it: gw_seq continued from what the broker holds."""
    next_seq = await wait_restore(bootstrap, list(symbols), SERDE, max_wait_s=10)
    return Gateway(gw_config(ex, symbols, **kw), bootstrap, next_seq=next_seq, extra_inputs=extra_inputs)


def gw_config(ex: LocalExchange, symbols, **kw) -> GatewayConfig:
    base = dict(symbols=list(symbols), ws_url=ex.ws_url, venue="sim.linear", heartbeat_ms=50, backoff_base_s=0.05,
                backoff_max_s=0.3, control=False)
    base.update(kw)
    return GatewayConfig(**base)


async def drain(gw: Gateway, ex: LocalExchange, timeout: float = 60) -> None:
    """The driver is done, the exchange's queues are empty, the gateway has received everything
    (nothing new for 0.5 s) and the broker has acknowledged it all."""
    await until(lambda: ex.driver.done.is_set(), timeout)
    await until(lambda: all(not c.q for c in ex.live), timeout)
    last = (-1, 0.0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = sum(gw.received.values())
        if n != last[0]:
            last = (n, time.monotonic())
        elif time.monotonic() - last[1] > 0.5:
            break
        await asyncio.sleep(0.05)
    await until(lambda: gw.publisher.buffered == 0, timeout)


def test_model_market_through_the_gateway_exactly_once_in_order(own_bootstrap):
    syms = ["BTCUSDT", "ETHUSDT"]

    async def main():
        drv = ModelDriver(syms, seed=7, speed=0.0, start_ms=START, history_days=0.01, duration_s=20.0,
                          autostart=False)
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            gw = await make_gateway(ex, own_bootstrap, syms)
            stop = asyncio.Event()
            task = asyncio.create_task(gw.run(stop))
            await ex.wait_subscribed([t for c in gw.connections for t in c.topics])
            drv.start()
            await drain(gw, ex)
            stop.set()
            await task
            return ex, gw

    since = now_us()
    ex, gw = run(main())
    sent = [r.text for r in ex.sent_data()]
    assert len(sent) > 1000  # 20 s of two symbols at Bybit's cadence
    expected = expected_events(sent)
    got = by_symbol(read_back(own_bootstrap, set(syms), idle_s=1.0))
    check_dense(got)
    for s in syms:
        data = [(t, key_of(t, r)) for t, n, r in got[s] if t != HEARTBEAT and r["recv_ts"] >= since]
        assert data == expected[s]
        assert {r["venue"] for _, _, r in got[s]} == {"sim.linear"}
        assert all(t == RAW_TOPIC_OF[n] for t, n, _ in got[s])
    assert gw.parser.book_gaps == 0 and not gw.publisher.dead_letters and gw.publisher.dropped == 0
    # the model's books are consistent: the ticker's best bid/ask is the book's top
    assert any(n == "Funding" for s in syms for _, n, _ in got[s])


def test_injected_faults_are_dead_letters_or_counted_gaps(own_bootstrap):
    syms = ["BTCUSDT"]  # the exchange's malformed messages name BTCUSDT
    since = now_us()

    async def main():
        drv = ModelDriver(syms, seed=11, speed=2.0, start_ms=START, history_days=0.01, duration_s=16.0,
                          autostart=True)
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            gw = await make_gateway(ex, own_bootstrap, syms, stale_s=1.0, ping_s=0.3)
            stop = asyncio.Event()
            task = asyncio.create_task(gw.run(stop))
            await ex.wait_subscribed(gw.connections[0].topics)
            await asyncio.sleep(0.5)
            for kind in ("gap", "duplicate", "reorder"):
                ex.inject(kind, symbol="BTCUSDT", topic="orderbook.50.BTCUSDT")
                await asyncio.sleep(0.3)
            ex.inject("flood", count=len(MALFORMED))  # every malformed variant once
            await asyncio.sleep(0.3)
            ex.inject("restart", symbol="BTCUSDT", topic="orderbook.50.BTCUSDT")
            await asyncio.sleep(0.3)
            ex.inject("drop")
            await until(lambda: gw.connections[0].reconnects == 1)
            await ex.wait_subscribed(gw.connections[0].topics)
            await asyncio.sleep(0.3)
            ex.inject("stall", seconds=2.0)  # longer than stale_s: the gateway gives up and reconnects
            await until(lambda: gw.connections[0].reconnects == 2, timeout=10)
            await ex.wait_subscribed(gw.connections[0].topics)
            await drain(gw, ex)
            stop.set()
            await task
            return ex, gw

    ex, gw = run(main())
    assert gw.parser.book_gaps >= 2  # the gap and the first of the reordered pair
    assert gw.parser.book_repeats >= 2  # the duplicate (u repeated) and the second of the pair
    malformed = [r for log in ex.sent_log.values() for r in log if r.kind == "malformed"]
    assert len(malformed) == len(MALFORMED)
    dls = dead_letters(own_bootstrap, since, until=lambda d: len(d) >= len(MALFORMED))
    assert {d["payload"] for d in dls} == {r.text.encode() for r in malformed}
    assert {d["error_kind"] for d in dls} >= {"malformed_json", "not_finite", "negative_size", "missing_field",
                                              "wrong_type", "unknown_symbol", "not_an_object"}
    # every data message the exchange sent (faulted copies included) was published once, in order,
    # except what was still in flight when a connection was cut (a drop without close frame, or the
    # gateway closing a stalled socket): only the tail of a cut connection may be missing.
    got = by_symbol(read_back(own_bootstrap, set(syms), idle_s=1.0))
    check_dense(got)  # continued from the earlier test's BTCUSDT sequence
    mine = [(t, key_of(t, r)) for t, n, r in got["BTCUSDT"] if t != HEARTBEAT and r["recv_ts"] >= since]
    logs = [[r.text for r in log if r.kind == "data"] for log in ex.sent_log.values()]
    sent = [t for log in logs for t in log]
    conn_of = [c for c, log in enumerate(logs) for _ in log]
    j, skipped = 0, []
    for topic, key, i in expected_events(sent, with_index=True)["BTCUSDT"]:
        if j < len(mine) and mine[j] == (topic, key):
            j += 1
        else:
            skipped.append(i)
    assert j == len(mine)  # nothing published that was not sent, nothing out of order
    assert len(logs) >= 3 and len(skipped) <= 50
    for i in skipped:
        c = conn_of[i]
        assert c < len(logs) - 1  # the last connection lost nothing
        tail = [k for k in range(i, len(sent)) if conn_of[k] == c]
        assert all(k in skipped or not expected_events([sent[k]]) for k in tail)
    snaps = [r for t, n, r in got["BTCUSDT"] if n == "OrderBookSnapshot" and r["recv_ts"] >= since]
    assert len(snaps) >= 4  # first subscription, the u=1 restart, and one per reconnect
    assert any(r["update_id"] == 1 for r in snaps)
    assert sum(1 for r in ex.sent_data() if r.fault == "duplicate") == 1


@pytest.mark.shared_data
def test_replay_of_the_real_recording_at_full_speed(own_bootstrap, shared_real):
    path = shared_real / "cryptofeed_bybit_v5_20260809" / "linear_ws_raw.jsonl"
    syms = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "DOGEUSDT"]

    async def main():
        drv = ReplayDriver(path, speed=0)
        async with LocalExchange(drv, mempool=False) as ex:
            gw = await make_gateway(ex, own_bootstrap, syms, depth=200)
            stop = asyncio.Event()
            task = asyncio.create_task(gw.run(stop))
            await drain(gw, ex)
            stop.set()
            await task
            return ex, gw

    since = now_us()
    ex, gw = run(main())
    sent = [r.text for r in ex.sent_data()]
    recorded = [ln for ln in path.read_text().splitlines() if '"topic"' in ln]
    assert len(sent) == len(recorded) == 2529
    assert sorted(sent) == sorted(recorded)  # unchanged by the replay
    expected = expected_events(sent)
    got = by_symbol(read_back(own_bootstrap, set(syms), idle_s=1.0))
    check_dense(got)
    for s in syms:
        data = [(t, key_of(t, r)) for t, n, r in got[s] if t != HEARTBEAT and r["recv_ts"] >= since]
        assert data == expected[s]
    assert not gw.publisher.dead_letters and gw.parser.book_gaps == 0


def test_rest_backfill_paging_and_rate_limits_against_the_exchange():
    from connectors.rest import BybitRest, RestError

    async def main():
        drv = ModelDriver(["BTCUSDT"], seed=5, speed=1.0, start_ms=START, history_days=2, autostart=False)
        async with LocalExchange(drv, instruments=GEN, mempool=False, rate_limit=RateLimit(api_per_s=5)) as ex:
            now = drv.now_ms()
            async with BybitRest(ex.base_url, rate_per_s=4) as polite:
                t0 = time.monotonic()
                rows = await polite.klines("BTCUSDT", now - 1500 * 60_000, now)
                inst = await polite.instruments()
                polite_stats = (polite.requests, polite.retries, time.monotonic() - t0)
            async with BybitRest(ex.base_url, rate_per_s=50, backoff_base_s=0.05, backoff_max_s=1.5) as eager:
                books = await asyncio.gather(*(eager.orderbook("BTCUSDT", 50) for _ in range(12)))
                eager_retries = eager.retries
                with pytest.raises(RestError) as err:
                    await eager.klines("NOPEUSDT", now - 60_000, now)
            return rows, inst, polite_stats, books, eager_retries, err.value, ex.rest.limiter.counts, now

    rows, inst, (requests, retries, elapsed), books, eager_retries, err, counts, now = run(main())
    starts = [int(r[0]) for r in rows]
    assert starts == list(range(now - 1500 * 60_000, now - now % 60_000, 60_000))[-len(starts):]
    assert len(starts) >= 1499 and starts == sorted(set(starts))
    assert requests == 2 + 1 and retries == 0  # two kline pages of 1000, one instruments page
    assert {"BTCUSDT", "POLUSDT"} <= set(inst)
    assert all(b["s"] == "BTCUSDT" and b["b"] and b["a"] for b in books)
    assert eager_retries > 0 and counts["api_limited"] == eager_retries  # 10006 answers, each retried
    assert err.ret_code == 10001


def test_source_local_and_the_exchanges_mempool_feed(own_bootstrap):
    from connectors.gateway import mempool_inputs
    from tickcast.config import load_settings

    async def main():
        drv = ModelDriver(["BTCUSDT"], seed=9, speed=1.0, start_ms=START, history_days=0.01, autostart=True)
        async with LocalExchange(drv, instruments=GEN, mempool=True, mempool_speed=20.0) as ex:
            settings = load_settings(gateway_local_url=ex.base_url, source="local", symbols=["BTCUSDT", "LTCUSDT"])
            src = local_source(settings)
            assert src.ws_url == ex.ws_url and src.venue == "sim.linear" and src.mempool_venue == "sim.mempool"
            gw = await make_gateway(ex, own_bootstrap, ["BTCUSDT"],
                                    extra_inputs=mempool_inputs(settings, src, ["BTCUSDT"]))
            stop = asyncio.Event()
            task = asyncio.create_task(gw.run(stop))
            await until(lambda: gw.publisher.accepted["market.mempool"] >= 3, timeout=30)
            stop.set()
            await task
            return gw

    gw = run(main())
    assert gw.publisher.dropped == 0 and not gw.publisher.dead_letters
    got = read_back(own_bootstrap, {"BTCUSDT"}, topics=["market.mempool"], idle_s=1.0)
    recs = [r for _, n, r in got if r["venue"] == "sim.mempool"]
    assert len(recs) >= 3 and all(r["chain"] == "BTC" and r["tx_count"] and r["vsize"] for r in recs)
    assert any(r["fee_fastest"] for r in recs)
    assert json.dumps(recs[-1])  # plain values only


def test_startup_history_klines_come_first_as_live_events(own_bootstrap):
    """At start the gateway publishes the last closed 1-minute klines (REST) as confirmed live Kline
    events with gw_seq, ahead of the WebSocket data: the feature flow's lookback is full at once."""
    from connectors.rest import BybitRest

    syms = ["LTCUSDT"]

    async def main():
        drv = ModelDriver(syms, seed=5, speed=0.0, history_days=1, duration_s=3.0, autostart=False)  # starts now
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            async with BybitRest(ex.base_url, rate_per_s=50) as rest:
                next_seq = await wait_restore(own_bootstrap, syms, SERDE, max_wait_s=10)
                gw = Gateway(gw_config(ex, syms, history_minutes=15), own_bootstrap, next_seq=next_seq, rest=rest)
                stop = asyncio.Event()
                task = asyncio.create_task(gw.run(stop))
                await until(lambda: gw.publisher.counts()["delivered"] >= 15, 30)
                ex.driver.start()
                await drain(gw, ex)
                stop.set()
                await task
            return next_seq.get("LTCUSDT", 0)

    first_seq = run(main())
    recs = read_back(own_bootstrap, {"LTCUSDT"})
    ordered = sorted((r for _, _, r in recs if r["gw_seq"] >= first_seq), key=lambda r: r["gw_seq"])
    history = ordered[:15]
    assert all(r["interval"] == "1" and r["confirm"] for r in history), [r.get("interval") for r in history]
    starts = [r["start_ts"] for r in history]
    assert starts == sorted(starts) and all(b - a == 60_000 for a, b in zip(starts, starts[1:]))
    assert [r["gw_seq"] for r in history] == list(range(first_seq, first_seq + 15))
    assert all(r["exchange_ts"] >= r["end_ts"] for r in history)  # published now, after each candle closed
