"""The replay driver: recordings served unchanged (byte for byte) to the subscribers of each topic,
with original timing or a speed factor; snapshots rebuilt for late subscribers."""
from __future__ import annotations

import asyncio
import itertools
import json
import time

import httpx

from connectors.exchange import LocalExchange, ReplayDriver
from connectors.exchange.instruments import InstrumentBook
from connectors.exchange.recording import read_jsonl, record_model
from tests.conftest import FIXTURES
from tests.test_exchange_support import Book, connect, drain, subscribe

GEN = InstrumentBook.generated()
FIXTURE = FIXTURES / "exchange" / "model_seed7_btc_eth_3s.jsonl"
FIXTURE_ARGS = {"seed": 7, "start_ms": 1_786_310_760_000, "seconds": 3.0,
                "prefixes": ["orderbook.50", "publicTrade", "tickers", "kline.1"], "history_days": 1.0}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def topics_of(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        t = json.loads(line).get("topic")
        if t and t not in out:
            out.append(t)
    return out


async def replay_all(sources, category="linear", speed=0.0, instruments=GEN, split=4):
    """Subscribe one client to every topic of the recording (in a few requests) and receive it all."""
    drv = ReplayDriver(sources, speed=speed)
    async with LocalExchange(drv, instruments=instruments, mempool=False) as ex:
        ws = await connect(ex.spot_ws_url if category == "spot" else ex.ws_url)
        topics = sorted(drv.topics[category])
        cid = None
        for i in range(0, len(topics), split):
            cid = (await subscribe(ws, topics[i:i + split]))["conn_id"]
        t0 = time.monotonic()
        got = await drain(ws, ex, cid)
        return got, time.monotonic() - t0, drv


def test_the_fixture_is_the_models_own_output(tmp_path):
    out = tmp_path / "again.jsonl"
    record_model(out, ["BTCUSDT", "ETHUSDT"], **FIXTURE_ARGS)
    assert out.read_bytes() == FIXTURE.read_bytes()


def test_replay_of_the_fixture_is_byte_for_byte_in_both_line_forms(tmp_path):
    lines = read_jsonl(FIXTURE)
    got, _, drv = run(replay_all(FIXTURE))
    assert got == lines and drv.skipped == 0
    recv = tmp_path / "recv.jsonl"
    record_model(recv, ["BTCUSDT", "ETHUSDT"], recv_form=True, **FIXTURE_ARGS)
    assert json.loads(read_jsonl(recv)[0])["recv_ts"] > 1.7e9
    got2, _, _ = run(replay_all(recv))
    assert got2 == lines


def test_replay_of_the_real_recording_is_byte_for_byte(shared_real):
    rec = shared_real / "cryptofeed_bybit_v5_20260809"
    ib = InstrumentBook.load(shared_real)
    lines = read_jsonl(rec / "linear_ws_raw.jsonl")
    data = [x for x in lines if x.startswith('{"topic"')]
    assert len(lines) - len(data) == 17  # the recorder's own subscribe acks are not replayed
    got, _, drv = run(replay_all(rec / "linear_ws_raw.jsonl", instruments=ib))
    assert got == data and drv.skipped == 17
    got2, _, _ = run(replay_all(rec / "linear_ws_recv.jsonl", instruments=ib))
    assert got2 == data
    spot = [x for x in read_jsonl(rec / "spot_ws_raw.jsonl") if "topic" in json.loads(x)]  # spot klines: type first
    got3, _, _ = run(replay_all({"spot": rec / "spot_ws_raw.jsonl"}, category="spot", instruments=ib, split=10))
    assert got3 == spot


def test_speed_factor_and_as_fast_as_possible():
    span_s = 3.0
    _, fast, _ = run(replay_all(FIXTURE, speed=0))
    _, timed, _ = run(replay_all(FIXTURE, speed=2.0))
    assert timed >= 0.9 * span_s / 2 and timed > fast
    assert fast < span_s / 2


def test_replay_starts_after_a_timeout_when_not_every_topic_is_subscribed():
    async def body():
        drv = ReplayDriver(FIXTURE, speed=0, start_timeout=0.3)
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, ["publicTrade.BTCUSDT"]))["conn_id"]
            got = await drain(ws, ex, cid)
            return got
    got = run(body())
    want = [x for x in read_jsonl(FIXTURE) if x.startswith('{"topic":"publicTrade.BTCUSDT"')]
    assert got == want and len(want) > 5


def test_a_late_subscriber_gets_a_rebuilt_snapshot_and_the_stream_continues():
    async def body():
        drv = ReplayDriver(FIXTURE, speed=1.0, start="immediate")
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            early = await connect(ex.ws_url)
            ce = (await subscribe(early, ["orderbook.50.BTCUSDT", "tickers.BTCUSDT"]))["conn_id"]
            await asyncio.sleep(1.5)
            late = await connect(ex.ws_url)
            cl = (await subscribe(late, ["orderbook.50.BTCUSDT", "tickers.BTCUSDT"]))["conn_id"]
            a = await drain(early, ex, ce)
            b = await drain(late, ex, cl)
            async with httpx.AsyncClient(base_url=ex.base_url) as http:
                ob = (await http.get("/v5/market/orderbook",
                                     params={"category": "linear", "symbol": "BTCUSDT", "limit": 50})).json()
            return a, b, ob, [r.kind for r in ex.sent_log[cl]]

    a, b, ob, kinds = run(body())
    assert kinds[0] == "ack"
    mb = [json.loads(m) for m in b]
    books = [m for m in mb if m["topic"].startswith("orderbook")]
    assert books[0]["type"] == "snapshot" and books[0]["data"]["u"] > 1
    assert all(y["data"]["u"] == x["data"]["u"] + 1 for x, y in itertools.pairwise(books))
    ea, eb = Book(), Book()
    for m in (json.loads(x) for x in a):
        if m["topic"].startswith("orderbook"):
            ea.apply(m)
    for m in books:
        eb.apply(m)
    assert ea.b == eb.b and ea.a == eb.a and ea.u == eb.u
    ta, tb = {}, {}
    for m in (json.loads(x) for x in a):
        if m["topic"].startswith("tickers"):
            ta.update(m["data"])
    for m in mb:
        if m["topic"].startswith("tickers"):
            tb.update(m["data"])
    assert ta == tb
    res = ob["result"]
    assert res["u"] == ea.u and res["b"] == [[str(p), q] for p, q in sorted(ea.b.items(), reverse=True)]
