"""Gateway end to end: a scripted Bybit-protocol WebSocket server on 127.0.0.1 -> the gateway ->
the real embedded broker, read back from Kafka. Each test uses symbols of its own."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict

from connectors.gateway import Gateway, GatewayConfig, wait_restore
from connectors.publisher import now_us
from tests.test_gateway_support import FakeBybitServer, SyntheticMarket, dead_letters, dumps, read_back
from tickcast.serde import Serde
from tickcast.topics import CONTROL, DEAD_LETTER, HEARTBEAT, RAW_TOPIC_OF

SERDE = Serde()
_ids = itertools.count(1)


def symbols(*bases: str) -> list[str]:
    n = next(_ids)
    return [f"T{n}{b}{int(time.time()) % 1000}" for b in bases]


async def until(cond, timeout: float = 15.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)


def config(server: FakeBybitServer, syms: list[str], **kw) -> GatewayConfig:
    base = dict(symbols=syms, ws_url=server.url, heartbeat_ms=50, backoff_base_s=0.05, backoff_max_s=0.2,
                control=False)
    base.update(kw)
    return GatewayConfig(**base)


async def settle(gw: Gateway, timeout: float = 15.0) -> None:
    """Everything accepted so far has been acknowledged by the broker."""
    await until(lambda: gw.publisher.buffered == 0 and gw.publisher.delivered >= sum(gw.publisher.accepted.values()),
                timeout)


def expected_events(sent: list[str], *, with_index: bool = False) -> dict[str, list[tuple]]:
    """Per symbol, the (raw topic, key) the gateway must publish for the data messages sent, in order,
    derived from the raw JSON alone (trades deduplicated on id, funding when rate/next time change);
    ``with_index``: (raw topic, key, index of the message in ``sent``)."""
    out: dict[str, list] = defaultdict(list)
    seen_trades: set = set()
    funding: dict[str, tuple] = {}
    ticker: dict[str, dict] = {}
    for i, text in enumerate(sent):
        n_before = {s: len(v) for s, v in out.items()}
        msg = json.loads(text)
        topic = msg["topic"]
        sym = topic.split(".")[-1]
        if topic.startswith("orderbook."):
            name = "OrderBookSnapshot" if msg["type"] == "snapshot" else "OrderBookDelta"
            out[sym].append((RAW_TOPIC_OF[name], f"u={msg['data']['u']}"))
        elif topic.startswith("publicTrade."):
            for t in msg["data"]:
                if (sym, t["i"]) not in seen_trades:
                    seen_trades.add((sym, t["i"]))
                    out[sym].append((RAW_TOPIC_OF["Trade"], f"i={t['i']}"))
        elif topic.startswith("kline."):
            out[sym] += [(RAW_TOPIC_OF["Kline"], f"start={c['start']}") for c in msg["data"]]
        elif topic.startswith("tickers."):
            ticker[sym] = dict(msg["data"]) if msg["type"] == "snapshot" else {**ticker[sym], **msg["data"]}
            out[sym].append((RAW_TOPIC_OF["Ticker"], f"cs={msg['cs']}"))
            f = (ticker[sym].get("fundingRate"), ticker[sym].get("nextFundingTime"))
            if f[0] and funding.get(sym) != f:
                funding[sym] = f
                out[sym].append((RAW_TOPIC_OF["Funding"], f"rate={f[0]}"))
        if with_index:
            out[sym][n_before.get(sym, 0):] = [(*e, i) for e in out[sym][n_before.get(sym, 0):]]
    return out


def key_of(topic: str, rec: dict) -> str:
    if "update_id" in rec:
        return f"u={rec['update_id']}"
    if "trade_id" in rec:
        return f"i={rec['trade_id']}"
    if "start_ts" in rec:
        return f"start={rec['start_ts']}"
    if "kind" in rec:
        return f"rate={rec['funding_rate']}"
    return f"cs={rec['cross_seq']}"


def by_symbol(records) -> dict[str, list[tuple[str, str, dict]]]:
    out = defaultdict(list)
    for topic, name, rec in records:
        if topic != DEAD_LETTER:
            out[rec["symbol"]].append((topic, name, rec))
    for sym in out:
        out[sym].sort(key=lambda x: x[2]["gw_seq"])
    return out


def check_dense(per_symbol: dict, first: int = 0) -> None:
    for sym, recs in per_symbol.items():
        assert [r["gw_seq"] for _, _, r in recs] == list(range(first, first + len(recs))), sym


async def run_with(gw: Gateway, scenario):
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        await scenario()
    finally:
        stop.set()
        await task


def test_every_message_arrives_once_in_order_on_its_topic_with_dense_gw_seq(bootstrap):
    syms = symbols("BTC", "ETH")
    markets = {s: SyntheticMarket(s, seed=i) for i, s in enumerate(syms)}

    async def main():
        server = await FakeBybitServer(markets).start()
        gw = Gateway(config(server, syms), bootstrap)

        async def scenario():
            await server.wait_subscribed(8)
            await until(lambda: sum(gw.received.values()) >= 4)  # book + ticker snapshots
            for i in range(400):
                m = markets[syms[i % 2]]
                text = m.kline(close=True) if i == 200 else m.ticker_delta("0.0002") if i == 301 else \
                    m.trades(2, repeat_id=None) if i % 37 == 0 else m.random_message()
                await server.push(text)
            await until(lambda: sum(gw.received.values()) >= 404)
            await asyncio.sleep(0.2)  # a few heartbeats after the last message
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return server, gw

    server, gw = asyncio.run(main())
    sent = server.sent_data()
    assert len(sent) == 404
    expected = expected_events(sent)
    total = sum(len(v) for v in expected.values())
    got = by_symbol(read_back(bootstrap, set(syms), until=lambda r: len(r) >= total + gw.heartbeats, idle_s=3.0))
    check_dense(got)
    for sym in syms:
        data = [(t, key_of(t, r)) for t, n, r in got[sym] if t != HEARTBEAT]
        assert data == expected[sym]  # exactly once, in arrival order, on the right topic
        for t, n, r in got[sym]:
            assert t == RAW_TOPIC_OF[n] and r["venue"] == "bybit.linear" and r["recv_ts"] > 0
        # heartbeats: never behind the exchange time already seen, never going back
        max_ts, last_hb = 0, 0
        for _t, n, r in got[sym]:
            if n == "Heartbeat":
                assert r["exchange_ts"] >= max_ts and r["exchange_ts"] >= last_hb
                last_hb = r["exchange_ts"]
            else:
                max_ts = max(max_ts, r["exchange_ts"])
        assert sum(1 for _, n, _ in got[sym] if n == "Heartbeat") >= 3
    assert gw.publisher.dropped == 0 and gw.publisher.failed == 0
    assert sum(gw.publisher.dead_letters.values()) == 0
    assert gw.parser.book_gaps == 0


def test_a_dropped_connection_recovers_with_a_fresh_snapshot(bootstrap):
    syms = symbols("BTC")
    m = SyntheticMarket(syms[0], seed=4)

    async def main():
        server = await FakeBybitServer({syms[0]: m}).start()
        gw = Gateway(config(server, syms), bootstrap)

        async def scenario():
            await server.wait_subscribed(4)
            for _ in range(30):
                await server.push(m.random_message())
            await until(lambda: sum(gw.received.values()) >= 32)
            await server.drop_all()
            await until(lambda: server.subscribes >= 2 and len(server.live()) == 1 and
                        len(server.live()[0].topics) == 4)
            for _ in range(30):
                await server.push(m.random_message())
            await until(lambda: sum(gw.received.values()) >= 64)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return server, gw

    server, gw = asyncio.run(main())
    assert gw.connections[0].reconnects == 1
    assert [e[0] for e in gw.events].count("connected") == 2
    expected = expected_events(server.sent_data())[syms[0]]
    got = by_symbol(read_back(bootstrap, set(syms), idle_s=1.0))
    check_dense(got)
    data = [(t, key_of(t, r)) for t, n, r in got[syms[0]] if t != HEARTBEAT]
    assert data == expected
    snaps = [r for t, n, r in got[syms[0]] if n == "OrderBookSnapshot"]
    assert len(snaps) == 2  # the first subscription's and the fresh one after the reconnect
    assert gw.parser.book_gaps == 0


def test_injected_faults_become_dead_letters_and_the_gateway_keeps_going(bootstrap):
    syms = symbols("BTC")
    sym = syms[0]
    m = SyntheticMarket(sym, seed=6)
    since = now_us()

    def mutate(text, fn):
        msg = json.loads(text)
        fn(msg)
        return dumps(msg)

    faults = {
        "malformed_json": f'{{"topic":"orderbook.50.{sym}","type":"delta","ts":',
        "unknown_topic": dumps({"topic": f"allLiquidation.{sym}", "type": "snapshot", "ts": 1, "data": []}),
        "negative_size": mutate(m.book_delta(), lambda x: x["data"]["b"][0].__setitem__(1, "-3")),
        "not_finite": mutate(m.book_delta(), lambda x: x["data"]["a"][0].__setitem__(1, "NaN")),
        "missing_field": mutate(m.trades(1), lambda x: x["data"][0].pop("p")),
        "wrong_type": mutate(m.kline(), lambda x: x["data"][0].update(start="soon")),
        "unknown_symbol": mutate(m.book_delta(), lambda x: x.update(topic="orderbook.50.NOPEUSDT")),
    }

    async def main():
        server = await FakeBybitServer({sym: m}).start()
        gw = Gateway(config(server, syms), bootstrap)

        async def scenario():
            await server.wait_subscribed(4)
            await until(lambda: sum(gw.received.values()) >= 2)
            for text in faults.values():
                await server.push(text, everyone=True)
            # a skipped delta (u jumps by 2): published as is, counted as a gap
            m.u += 1
            await server.push(m.book_delta())
            for _ in range(20):
                await server.push(m.random_message())
            await until(lambda: sum(gw.received.values()) >= 23)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return server, gw

    server, gw = asyncio.run(main())
    dls = dead_letters(bootstrap, since, until=lambda d: len([x for x in d if x["source"].startswith("gateway")]) >= 7)
    mine = {d["error_kind"]: d for d in dls if d["payload"] in {t.encode() for t in faults.values()}}
    assert set(mine) == set(faults)
    for kind, text in faults.items():
        assert mine[kind]["payload"] == text.encode() and mine[kind]["reason"]
        assert mine[kind]["source"] == "gateway.bybit.parse"
    assert gw.parser.book_gaps == 1
    assert sum(gw.publisher.dead_letters.values()) == len(faults)
    got = by_symbol(read_back(bootstrap, {sym}, idle_s=1.0))
    check_dense(got)
    valid = [t for t in server.sent_data() if t not in faults.values()]
    assert [(t, key_of(t, r)) for t, n, r in got[sym] if t != HEARTBEAT] == expected_events(valid)[sym]


def test_gw_seq_continues_across_a_gateway_restart(bootstrap):
    syms = symbols("BTC", "LTC")
    markets = {s: SyntheticMarket(s, seed=10 + i) for i, s in enumerate(syms)}

    async def one_run(n_msgs: int):
        server = await FakeBybitServer(markets).start()
        next_seq = await wait_restore(bootstrap, syms, SERDE, max_wait_s=10)
        gw = Gateway(config(server, syms), bootstrap, next_seq=next_seq)

        async def scenario():
            await server.wait_subscribed(8)
            for i in range(n_msgs):
                await server.push(markets[syms[i % 2]].random_message())
            await until(lambda: sum(gw.received.values()) >= n_msgs + 4)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return next_seq, gw

    first_seq, gw1 = asyncio.run(one_run(40))
    assert first_seq == {s: 0 for s in syms}
    second_seq, gw2 = asyncio.run(one_run(40))
    assert second_seq == gw1.publisher.next_seq  # continues from max + 1 per symbol
    got = by_symbol(read_back(bootstrap, set(syms), idle_s=1.0))
    check_dense(got)
    for s in syms:
        assert len(got[s]) == gw2.publisher.next_seq[s]
        snaps = [r["gw_seq"] for _, n, r in got[s] if n == "OrderBookSnapshot"]
        assert len(snaps) == 2 and snaps[1] >= second_seq[s]


def test_resync_request_on_the_control_topic_brings_a_fresh_snapshot(bootstrap):
    from confluent_kafka import Producer

    from tickcast.kafka import producer_config

    syms = symbols("ETH")
    sym = syms[0]
    m = SyntheticMarket(sym, seed=8)

    async def main():
        server = await FakeBybitServer({sym: m}).start()
        gw = Gateway(config(server, syms, control=True), bootstrap)

        async def scenario():
            await server.wait_subscribed(4)
            for _ in range(10):
                await server.push(m.book_delta())
            await until(lambda: sum(gw.received.values()) >= 12)
            await asyncio.sleep(0.5)  # the control consumer is assigned
            p = Producer(producer_config(bootstrap))
            for bad in (b"not avro", SERDE.encode("ControlCommand", {
                    "command": "resync", "symbol": "NOTFOLLOWED", "reason": "x", "requester": "test",
                    "requested_ts": now_us()})):
                p.produce(CONTROL, bad)
            p.produce(CONTROL, SERDE.encode("ControlCommand", {"command": "resync", "symbol": sym,
                                                               "reason": "u gap", "requester": "test",
                                                               "requested_ts": now_us()}))
            p.flush(5)
            await until(lambda: gw.resyncs == 1)
            await until(lambda: sum(1 for t in server.conns[0].sent if '"type":"snapshot"' in t and
                                    t.startswith('{"topic":"orderbook')) == 2)
            for _ in range(5):
                await server.push(m.book_delta())
            await until(lambda: sum(gw.received.values()) >= 18)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return server, gw

    server, gw = asyncio.run(main())
    ops = [json.loads(r)["op"] for r in server.conns[0].received]
    assert ops.count("unsubscribe") == 1 and ops.count("subscribe") == 2
    got = by_symbol(read_back(bootstrap, {sym}, idle_s=1.0))
    check_dense(got)
    names = [n for _, n, _ in got[sym] if n != "Heartbeat"]
    assert names.count("OrderBookSnapshot") == 2
    assert names[-6:] == ["OrderBookSnapshot"] + ["OrderBookDelta"] * 5
    assert gw.publisher.dead_letters.get("malformed_payload") == 1
    assert gw.publisher.dead_letters.get("unknown_symbol") == 1


def test_subscriptions_split_across_connections_ping_and_stall_recovery(bootstrap):
    syms = symbols("BTC", "ETH", "LTC")
    markets = {s: SyntheticMarket(s, seed=20 + i) for i, s in enumerate(syms)}

    async def main():
        server = await FakeBybitServer(markets).start()
        gw = Gateway(config(server, syms, topics_per_connection=8, ping_s=0.2, stale_s=1.0), bootstrap)

        async def scenario():
            await server.wait_subscribed(12)
            assert sorted(len(c.topics) for c in server.live()) == [4, 8]
            await until(lambda: all(c.pongs >= 2 for c in gw.connections))
            # the server goes silent on one connection (no data, no pongs): the gateway notices
            victim = server.live()[0]
            victim.ws.send = _mute  # type: ignore[method-assign]
            await until(lambda: sum(c.reconnects for c in gw.connections) == 1, timeout=10)
            await server.wait_subscribed(12)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return gw

    gw = asyncio.run(main())
    assert [c.topics for c in gw.connections] == [
        [t for s in syms[:2] for t in (f"orderbook.50.{s}", f"publicTrade.{s}", f"tickers.{s}", f"kline.1.{s}")],
        [f"orderbook.50.{syms[2]}", f"publicTrade.{syms[2]}", f"tickers.{syms[2]}", f"kline.1.{syms[2]}"]]
    assert ("stalled", "ws0", {}) in gw.events or ("stalled", "ws1", {}) in gw.events


async def _mute(*_a, **_k):
    return None


def test_a_refused_symbol_is_dead_lettered_and_does_not_silence_the_others(bootstrap):
    syms = symbols("BTC", "GONE")
    m = SyntheticMarket(syms[0], seed=30)
    since = now_us()

    async def main():
        server = await FakeBybitServer({syms[0]: m}, known_symbols={syms[0]}).start()
        gw = Gateway(config(server, syms), bootstrap)

        async def scenario():
            # the refused topic is dropped and the rest of the request subscribed again, one by one
            await until(lambda: gw.subscribe_errors >= 4 and sum(gw.received.values()) >= 2)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return gw

    gw = asyncio.run(main())
    assert gw.subscribe_errors == 4 and gw.received  # the known symbol streams on
    assert gw.connections[0].refused == {f"orderbook.50.{syms[1]}", f"publicTrade.{syms[1]}", f"tickers.{syms[1]}",
                                         f"kline.1.{syms[1]}"}
    assert len(gw.connections[0].topics) == 4
    # heartbeats start with a symbol's first exchange time: none for the symbol that never streamed
    assert gw.heartbeats > 0 and syms[1] not in gw.clocks and syms[1] not in gw.last_heartbeat
    assert gw.publisher.next_seq.get(syms[1], 0) == 0
    dls = dead_letters(bootstrap, since, until=lambda d: any(x["error_kind"] == "subscribe_rejected" for x in d))
    assert any(syms[1] in d["reason"] and d["error_kind"] == "subscribe_rejected" for d in dls)


def test_metrics_endpoint_reports_the_counters(bootstrap):
    import httpx

    syms = symbols("BTC")
    m = SyntheticMarket(syms[0], seed=40)

    async def main():
        server = await FakeBybitServer({syms[0]: m}).start()
        gw = Gateway(config(server, syms, metrics_port=0), bootstrap)
        text = {}

        async def scenario():
            await server.wait_subscribed(4)
            for _ in range(20):
                await server.push(m.book_delta())
            await server.push("garbage", everyone=True)
            await until(lambda: sum(gw.received.values()) >= 22)
            await settle(gw)
            await asyncio.sleep(1.1)  # latency samples move into the histogram every second
            async with httpx.AsyncClient() as http:
                text["body"] = (await http.get(f"http://127.0.0.1:{gw.metrics_port}/metrics")).text

        await run_with(gw, scenario)
        await server.stop()
        return gw, text["body"]

    gw, body = asyncio.run(main())
    lines = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in body.splitlines() if ln and not ln.startswith("#")}
    assert lines['tickcast_gateway_ws_messages_total{channel="orderbook"}'] == 21
    assert lines['tickcast_gateway_ws_frames_total{conn="ws0"}'] >= 24  # + ticker snapshot, garbage, acks
    assert lines['tickcast_gateway_events_total{topic="market.orderbook.delta"}'] == 20
    assert lines['tickcast_gateway_dead_letters_total{kind="malformed_json"}'] == 1
    assert 0 <= lines["tickcast_gateway_buffer_depth"] <= 10  # heartbeats keep flowing
    assert lines["tickcast_gateway_delivered_total"] >= 22
    assert 'tickcast_gateway_events_per_second{topic="market.orderbook.delta"}' in lines
    assert lines['tickcast_gateway_connected{conn="ws0"}'] == 1
    assert "tickcast_gateway_publish_latency_seconds_count" in lines


def test_a_failing_side_input_is_restarted_and_market_data_keeps_flowing(bootstrap):
    syms = symbols("BTC")
    m = SyntheticMarket(syms[0], seed=60)
    calls = []

    async def flaky(pub, stop):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("side feed broke")
        await stop.wait()

    async def main():
        server = await FakeBybitServer({syms[0]: m}).start()
        gw = Gateway(config(server, syms), bootstrap, extra_inputs=[flaky])

        async def scenario():
            await server.wait_subscribed(4)
            await until(lambda: len(calls) >= 3, timeout=10)
            for _ in range(5):
                await server.push(m.book_delta())
            await until(lambda: sum(gw.received.values()) >= 7)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        return gw

    gw = asyncio.run(main())
    assert len(calls) == 3  # restarted twice, with exponential backoff (1 s, then 2 s)
    assert calls[1] - calls[0] >= 0.9 and calls[2] - calls[1] >= 1.8
    assert gw.publisher.accepted["market.orderbook.delta"] == 5
