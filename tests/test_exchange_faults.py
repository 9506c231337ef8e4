"""Fault injection of the local exchange, each kind seen by a real client, and the sent log that
lets end-to-end tests account for every message."""
from __future__ import annotations

import asyncio
import itertools
import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from connectors.exchange import LocalExchange, ModelDriver
from connectors.exchange.instruments import InstrumentBook
from tests.test_exchange_support import START, Book, connect, drain, subscribe

GEN = InstrumentBook.generated()
TOPIC = "orderbook.50.BTCUSDT"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def is_malformed(text: str) -> bool:
    """Not JSON, not one of the topic's messages, or a schema-broken copy of one (u 0)."""
    try:
        d = json.loads(text)
    except ValueError:
        return True
    if not isinstance(d, dict) or d.get("topic") != TOPIC:
        return True
    return d["data"].get("u") == 0


def us(msgs: list[dict]) -> list[int]:
    return [m["data"]["u"] for m in msgs if m.get("topic") == TOPIC]


def test_pending_faults_gap_duplicate_reorder_restart():
    kinds = ["none", "gap", "duplicate", "reorder", "restart"]

    async def body():
        drv = ModelDriver(["BTCUSDT"], seed=5, speed=0, start_ms=START, history_days=1, duration_s=2.0,
                          autostart=False, depths=(1, 50))
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            clients = {}
            for kind in kinds:
                ws = await connect(ex.ws_url)
                cid = (await subscribe(ws, [TOPIC, "tickers.BTCUSDT"]))["conn_id"]
                clients[kind] = (ws, cid)
            # the faults wait for their connection's next matching delta, after a few have gone by
            for kind in kinds[1:]:
                rec = ex.inject(kind, conn_id=clients[kind][1], symbol="BTCUSDT")
                assert rec["conn_ids"] == [clients[kind][1]]
            ex.driver.start()
            out = {}
            for kind, (ws, cid) in clients.items():
                raw = await drain(ws, ex, cid)
                # the client got exactly what the sent log says was sent after the ack
                assert raw == [r.text for r in ex.sent_log[cid][1:]], kind
                out[kind] = ([json.loads(m) for m in raw], ex.sent_log[cid])
            return out, list(ex.faults)

    out, faults = run(body())
    ref = us(out["none"][0])
    assert len(ref) > 50 and all(b == a + 1 for a, b in itertools.pairwise(ref))

    got = us(out["gap"][0])
    jumps = [(a, b) for a, b in itertools.pairwise(got) if b != a + 1]
    assert len(jumps) == 1 and jumps[0][1] == jumps[0][0] + 2 and len(got) == len(ref) - 1
    skipped = next(f for f in faults if f["kind"] == "gap")["skipped"]
    assert len(skipped) == 1 and json.loads(skipped[0]["text"])["data"]["u"] == jumps[0][0] + 1

    got = us(out["duplicate"][0])
    assert len(got) == len(ref) + 1 and sorted(set(got)) == ref
    dups = [r for r in out["duplicate"][1] if r.fault == "duplicate"]
    assert len(dups) == 1 and json.loads(dups[0].text)["data"]["u"] in ref

    got = us(out["reorder"][0])
    assert sorted(got) == ref and got != ref
    swapped = [i for i, (a, b) in enumerate(itertools.pairwise(got)) if b < a]
    assert len(swapped) == 1 and got[swapped[0]] == got[swapped[0] + 1] + 1

    msgs = [m for m in out["restart"][0] if m.get("topic") == TOPIC]
    i = next(k for k, m in enumerate(msgs) if k and m["type"] == "snapshot")
    assert msgs[i]["data"]["u"] == 1
    assert [m["data"]["u"] for m in msgs[i:]] == list(range(1, len(msgs) - i + 1))
    # the book rebuilt from the u = 1 snapshot and the renumbered deltas is the true book
    a, b = Book(), Book()
    for m in msgs:
        a.apply(m)
    for m in out["none"][0]:
        if m.get("topic") == TOPIC:
            b.apply(m)
    assert a.b == b.b and a.a == b.a


def test_immediate_faults_malformed_flood_stall_drop_and_the_control_api():
    async def body():
        drv = ModelDriver(["BTCUSDT"], seed=6, speed=1.0, start_ms=START, history_days=1, depths=(1, 50))
        async with LocalExchange(drv, instruments=GEN, mempool=False, control_token="s3cret") as ex, \
                httpx.AsyncClient(base_url=ex.control_url) as ctl:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, [TOPIC]))["conn_id"]
            got: list[str] = []

            async def recv_until(pred, timeout=10.0):
                while True:
                    m = await asyncio.wait_for(ws.recv(), timeout)
                    got.append(m)
                    if pred(m):
                        return m

            # malformed: one frame that is not valid JSON
            ex.inject("malformed", conn_id=cid)
            bad = await recv_until(is_malformed)
            with pytest.raises(ValueError):
                json.loads(bad)
            # flood over the control API (the bearer token is required)
            r = await ctl.post("/control/fault", json={"kind": "flood", "conn_id": cid, "count": 40})
            assert r.status_code == 401
            hdr = {"Authorization": "Bearer s3cret"}
            r = await ctl.post("/control/fault", json={"kind": "flood", "conn_id": cid, "count": 40}, headers=hdr)
            assert r.status_code == 200 and r.json()["conn_ids"] == [cid]
            assert (await ctl.post("/control/fault", json={"kind": "nope"}, headers=hdr)).status_code == 400
            assert (await ctl.post("/control/fault", content=b"{", headers=hdr)).status_code == 400
            n_bad = 0
            while n_bad < 40:
                m = await asyncio.wait_for(ws.recv(), 10)
                got.append(m)
                n_bad += is_malformed(m)
            variants = {r.fault for r in ex.sent_log[cid] if r.kind == "malformed"}
            assert {"truncated", "not_json", "nan_size", "negative_size", "missing_fields", "wrong_types",
                    "unknown_topic", "not_object"} <= variants
            # stall: nothing, not even a pong, for a while; then everything, in order, nothing lost
            ex.inject("stall", conn_id=cid, seconds=1.2)
            await asyncio.sleep(0.05)  # a frame already being written when the stall began still goes
            while len(got) + 1 < ex.conns[cid].n:  # what was sent before the stall (+ the ack)
                got.append(await asyncio.wait_for(ws.recv(), 5))
            await ws.send('{"op":"ping","req_id":"st"}')
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.8)
            await recv_until(lambda m: '"req_id":"st"' in m)
            assert asyncio.get_running_loop().time() - t0 >= 1.0
            # everything received so far is exactly the sent log (after the ack)
            await asyncio.sleep(0.2)
            n = len(ex.sent_log[cid]) - 1
            while len(got) < n:
                got.append(await asyncio.wait_for(ws.recv(), 5))
            assert got[:n] == [r.text for r in ex.sent_log[cid][1:n + 1]]
            # the sent log over HTTP
            lines = (await ctl.get("/control/sent", params={"conn_id": cid, "kinds": "malformed"})).text.splitlines()
            assert len(lines) == 41 and all(json.loads(x)["kind"] == "malformed" for x in lines)
            # drop: the TCP connection is cut, no close frame
            ex.inject("drop", conn_id=cid)
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    await asyncio.wait_for(ws.recv(), 5)
            assert e.value.rcvd is None
            # close with a code
            ws2 = await connect(ex.ws_url)
            cid2 = (await subscribe(ws2, [TOPIC]))["conn_id"]
            ex.inject("drop", conn_id=cid2, code=1011)
            with pytest.raises(ConnectionClosed) as e:
                while True:
                    await asyncio.wait_for(ws2.recv(), 5)
            assert e.value.rcvd.code == 1011
            st = (await ctl.get("/control/state")).json()
            assert {c["conn_id"]: c["close_reason"] for c in st["connections"]} == \
                {cid: "fault:drop", cid2: "fault:close 1011"}
            assert [f["kind"] for f in ex.faults] == ["malformed", "flood", "stall", "drop", "drop"]
            with pytest.raises(ValueError):
                ex.inject("gap", conn_id="nobody")
    run(body())


def test_global_fault_hits_every_subscriber_of_the_symbol():
    async def body():
        drv = ModelDriver(["BTCUSDT", "ETHUSDT"], seed=8, speed=0, start_ms=START, history_days=1, duration_s=1.0,
                          autostart=False, depths=(1, 50))
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            a = await connect(ex.ws_url)
            ca = (await subscribe(a, [TOPIC]))["conn_id"]
            b = await connect(ex.ws_url)
            cb = (await subscribe(b, [TOPIC, "orderbook.50.ETHUSDT"]))["conn_id"]
            c = await connect(ex.ws_url)
            cc = (await subscribe(c, ["orderbook.50.ETHUSDT"]))["conn_id"]
            rec = ex.inject("gap", symbol="BTCUSDT")
            assert rec["conn_ids"] == sorted([ca, cb])
            ex.driver.start()
            res = {}
            for ws, cid in ((a, ca), (b, cb), (c, cc)):
                res[cid] = [json.loads(m) for m in await drain(ws, ex, cid)]
            return res, ca, cb, cc

    res, ca, cb, cc = run(body())
    for cid in (ca, cb):
        u = us(res[cid])
        assert sum(1 for x, y in itertools.pairwise(u) if y == x + 2) == 1
    eth = [m["data"]["u"] for m in res[cc] if m.get("topic") == "orderbook.50.ETHUSDT"]
    assert all(y == x + 1 for x, y in itertools.pairwise(eth))
