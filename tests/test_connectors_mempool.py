"""Mempool feeds against local servers that speak the real protocols: a mempool.space-compatible
WebSocket + REST server (``/api/v1/ws`` want stats/mempool-blocks, ``/api/mempool``,
``/api/v1/fees/recommended``) and an Ethereum JSON-RPC WebSocket (``eth_subscribe`` with Alchemy's
``alchemy_pendingTransactions`` or the standard ``newPendingTransactions``)."""
from __future__ import annotations

import asyncio
import json
import time
from http import HTTPStatus

import pytest

from connectors.mempool import (
    AlchemyPendingFeed,
    MempoolSpaceFeed,
    PendingAggregate,
    aggregate_record,
    ws_url_of,
)

INFO = {"loaded": True, "size": 41234, "bytes": 17_654_321, "usage": 98_765_432, "total_fee": 0.41234567,
        "maxmempool": 300_000_000, "mempoolminfee": 0.00001, "minrelaytxfee": 0.00001}
FEES = {"fastestFee": 21, "halfHourFee": 15, "hourFee": 12, "economyFee": 6, "minimumFee": 3}
BLOCKS = [{"blockSize": 1_580_000, "blockVSize": 997_000, "nTx": 3100, "totalFees": 11_000_000, "medianFee": 18.4,
           "feeRange": [14, 15, 17, 19, 25, 40, 300]},
          {"blockSize": 1_700_000, "blockVSize": 998_000, "nTx": 2800, "totalFees": 7_000_000, "medianFee": 9.1,
           "feeRange": [6, 7, 8, 9, 10, 12, 14]}]
REST_MEMPOOL = {"count": 41240, "vsize": 17_660_000, "total_fee": 41_240_000,
                "fee_histogram": [[53.2, 50_000], [20.1, 120_000], [10.0, 3_000_000], [3.0, 9_000_000]]}


class Sink:
    def __init__(self):
        self.records: list[tuple[str, dict]] = []
        self.dead: list[tuple] = []

    def publish(self, name, rec):
        self.records.append((name, dict(rec)))
        return True

    def dead_letter(self, source, kind, reason, payload, *, topic=None, symbol=None):
        self.dead.append((source, kind, reason, payload, topic))


class MempoolSpaceLike:
    """mempool.space's WebSocket and REST on one port, as its backend answers (want -> initial data)."""

    def __init__(self):
        self.clients = []
        self.wants = []
        self.rest_hits = []

    async def start(self):
        from websockets.asyncio.server import serve

        self.server = await serve(self._ws, "127.0.0.1", 0, process_request=self._http, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _http(self, connection, request):
        if request.path == "/api/v1/ws":
            return None
        self.rest_hits.append(request.path)
        body = {"/api/mempool": REST_MEMPOOL, "/api/v1/fees/recommended": FEES}.get(request.path)
        if body is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        resp = connection.respond(HTTPStatus.OK, json.dumps(body))
        resp.headers["Content-Type"] = "application/json"
        return resp

    async def _ws(self, ws):
        self.clients.append(ws)
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("action") == "want":
                self.wants.append(msg["data"])
                out = {}
                if "stats" in msg["data"]:
                    out.update({"mempoolInfo": INFO, "vBytesPerSecond": 1523, "fees": FEES,
                                "da": {"progressPercent": 41.2}})
                if "mempool-blocks" in msg["data"]:
                    out["mempool-blocks"] = BLOCKS
                await ws.send(json.dumps(out))

    async def push(self, obj_or_text):
        text = obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text)
        for ws in list(self.clients):
            await ws.send(text)

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


async def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.02)


def test_ws_url_of():
    assert ws_url_of("https://mempool.space") == "wss://mempool.space/api/v1/ws"
    assert ws_url_of("http://127.0.0.1:8765/ltc/") == "ws://127.0.0.1:8765/ltc/api/v1/ws"


def test_mempool_space_feed_publishes_merged_stats_under_the_market_symbol():
    sink = Sink()

    async def main():
        srv = await MempoolSpaceLike().start()
        feed = MempoolSpaceFeed(srv.url, "BTC", ["BTCUSDT"], "mempool.space", sink.publish, sink.dead_letter,
                                rest_interval_s=0.2, backoff_base_s=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        await until(lambda: len(sink.records) >= 1 and feed.state.histogram)
        await srv.push({"mempoolInfo": {**INFO, "size": 50_000}, "fees": {**FEES, "fastestFee": 30},
                        "vBytesPerSecond": 2000, "transactions": []})
        await srv.push({"mempool-blocks": BLOCKS[:1]})
        await srv.push({"conversions": {"USD": 65000}})  # not mempool statistics: ignored
        await srv.push('{"mempoolInfo": ')  # malformed
        await srv.push({"mempoolInfo": {"size": -5, "bytes": 1}})  # negative count
        await srv.push({"fees": {"fastestFee": "fast"}})  # wrong type
        await until(lambda: len(sink.dead) >= 3)
        stop.set()
        await task
        await srv.stop()
        return srv, feed

    srv, feed = asyncio.run(main())
    assert srv.wants[0] == ["stats", "mempool-blocks"]
    assert "/api/mempool" in srv.rest_hits
    recs = [r for n, r in sink.records if n == "MempoolStats"]
    first = next(r for r in recs if r["tx_count"] == 41234)  # the answer to "want"
    assert (first["symbol"], first["chain"], first["venue"]) == ("BTCUSDT", "BTC", "mempool.space")
    assert (first["tx_count"], first["vsize"], first["total_fee"]) == (41234, 17_654_321, 0.41234567)
    assert (first["fee_fastest"], first["fee_half_hour"], first["fee_hour"], first["fee_economy"],
            first["fee_minimum"]) == (21, 15, 12, 6, 3)
    assert (first["projected_blocks"], first["next_block_median_fee"]) == (2, 18.4)
    last = recs[-1]
    assert last["fee_histogram"] == [{"fee_rate": 53.2, "vsize": 50_000}, {"fee_rate": 20.1, "vsize": 120_000},
                                     {"fee_rate": 10.0, "vsize": 3_000_000}, {"fee_rate": 3.0, "vsize": 9_000_000}]
    assert last["tx_count"] == 50_000 and last["fee_fastest"] == 30 and last["projected_blocks"] == 1
    assert all(r["exchange_ts"] * 1000 <= r["recv_ts"] < (r["exchange_ts"] + 1) * 1000 for r in recs)
    kinds = sorted(k for _, k, _, _, _ in sink.dead)
    assert kinds == ["malformed_json", "negative_value", "wrong_type"]
    assert all(isinstance(p, (str, bytes)) and p for _, _, _, p, _ in sink.dead)
    # one per push with statistics: the answer to "want" and the two updates (plus one from REST when
    # its first poll ran before the socket was up)
    assert len(recs) in (3, 4)


def test_rest_keeps_stats_flowing_while_the_socket_is_down():
    sink = Sink()

    async def main():
        import httpx

        srv = await MempoolSpaceLike().start()
        feed = MempoolSpaceFeed(srv.url, "LTC", ["LTCUSDT"], "litecoinspace", sink.publish, sink.dead_letter)
        async with httpx.AsyncClient() as http:
            await feed.poll_rest(http)  # ws_up is False: REST emits a record on its own
        await srv.stop()

    asyncio.run(main())
    [(name, rec)] = sink.records
    assert rec["tx_count"] == 41240 and rec["total_fee"] == pytest.approx(0.4124) and rec["fee_fastest"] == 21
    assert rec["symbol"] == "LTCUSDT" and rec["venue"] == "litecoinspace"


# --- Alchemy ---------------------------------------------------------------------------------------


def tx(value_eth: float, gwei: float, n: int) -> dict:
    return {"hash": f"0x{n:064x}", "from": "0x" + "11" * 20, "to": "0x" + "22" * 20,
            "value": hex(int(value_eth * 10 ** 18)), "gasPrice": hex(int(gwei * 10 ** 9)), "gas": "0x5208",
            "nonce": hex(n), "input": "0x"}


def test_pending_transactions_are_aggregated_per_second_and_never_kept():
    sink = Sink()
    feed = AlchemyPendingFeed("wss://eth-mainnet.g.alchemy.com/v2/SECRETKEY", "ETH", ["ETHUSDT"], sink.publish,
                              sink.dead_letter, large_transfer=100.0)
    def note(t, n):
        return json.dumps({"jsonrpc": "2.0", "method": "eth_subscription", "params": {"subscription": "0xabc", "result": t}})
    feed.roll(now=1000.2)  # the first second starts
    feed.handle(note(tx(1.5, 20, 1), 1), now=1000.3)
    feed.handle(note(tx(250, 40, 2), 2), now=1000.5)
    feed.handle(note(tx(0.25, 10, 3), 3), now=1000.9)
    feed.handle(note({"hash": "0x1", "value": "0xzz"}, 4), now=1000.95)  # bad hex: dead letter
    feed.handle(note(tx(3, 30, 5), 5), now=1001.1)  # next second
    feed.roll(now=1003.0)  # 1001 closes, and the quiet 1002 is published as zero
    recs = [r for _, r in sink.records]
    assert [r["exchange_ts"] for r in recs] == [1_001_000, 1_002_000, 1_003_000]
    s0, s1, s2 = recs
    assert (s0["tx_count"], s0["large_transfers"]) == (3, 1)
    assert s0["pending_value"] == pytest.approx(251.75)
    assert (s0["fee_minimum"], s0["fee_economy"], s0["fee_half_hour"], s0["fee_fastest"]) == (10, 10, 20, 40)
    assert (s1["tx_count"], s1["pending_value"], s1["large_transfers"]) == (1, pytest.approx(3.0), 0)
    assert (s2["tx_count"], s2["pending_value"], s2["fee_fastest"]) == (0, None, None)
    assert all(r["symbol"] == "ETHUSDT" and r["chain"] == "ETH" and r["venue"] == "alchemy" for r in recs)
    [(source, kind, reason, payload, topic)] = sink.dead
    assert kind == "invalid_number" and "SECRETKEY" not in topic and topic.endswith("/***")
    # nothing of a transaction survives the second it was counted in
    assert set(PendingAggregate.__slots__) == {"count", "gas_gwei", "large", "value_wei", "values_known"}


def test_hash_only_subscription_counts_without_values():
    agg = PendingAggregate()
    agg.add("0x" + "ab" * 32, 10 ** 20)
    rec = aggregate_record(agg, 5, "POLUSDT", "POL", "alchemy", 6_000_000)
    assert rec["tx_count"] == 1 and rec["pending_value"] is None and rec["large_transfers"] is None


class JsonRpcNode:
    """An Ethereum node's WebSocket JSON-RPC: eth_subscribe / eth_subscription notifications.
    ``alchemy``: whether it knows Alchemy's alchemy_pendingTransactions (a plain node does not)."""

    def __init__(self, alchemy: bool):
        self.alchemy = alchemy
        self.requests = []
        self.subs = []

    async def start(self):
        from websockets.asyncio.server import serve

        self.server = await serve(self._ws, "127.0.0.1", 0, compression=None)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _ws(self, ws):
        async for raw in ws:
            req = json.loads(raw)
            self.requests.append(req)
            if req.get("method") != "eth_subscribe":
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": req.get("id"),
                                          "error": {"code": -32601, "message": "the method does not exist"}}))
                continue
            kind = req["params"][0]
            if kind == "alchemy_pendingTransactions" and not self.alchemy:
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": req["id"],
                                          "error": {"code": -32602, "message": "invalid subscription type"}}))
                continue
            sub = f"0x{len(self.subs) + 1:032x}"
            self.subs.append((ws, sub, kind))
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": req["id"], "result": sub}))

    async def notify(self, n: int):
        for ws, sub, kind in self.subs:
            for i in range(n):
                result = tx(0.5 + i, 10 + i, i) if kind == "alchemy_pendingTransactions" else f"0x{i:064x}"
                await ws.send(json.dumps({"jsonrpc": "2.0", "method": "eth_subscription",
                                          "params": {"subscription": sub, "result": result}}))

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("alchemy", [True, False])
def test_alchemy_feed_over_websocket(alchemy):
    sink = Sink()

    async def main():
        node = await JsonRpcNode(alchemy).start()
        feed = AlchemyPendingFeed(f"ws://127.0.0.1:{node.port}/v2/KEY123", "POL", ["POLUSDT"], sink.publish,
                                  sink.dead_letter, large_transfer=2.0)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        await until(lambda: node.subs)
        await asyncio.sleep(1.05 - time.time() % 1.0)  # start of a fresh second
        await node.notify(4)
        await until(lambda: any(r["tx_count"] for _, r in sink.records), timeout=5)
        stop.set()
        await task
        await node.stop()
        return node, feed

    node, feed = asyncio.run(main())
    methods = [r["params"][0] for r in node.requests]
    assert methods == (["alchemy_pendingTransactions"] if alchemy else
                       ["alchemy_pendingTransactions", "newPendingTransactions"])
    busy = [r for _, r in sink.records if r["tx_count"]]
    assert sum(r["tx_count"] for _, r in sink.records) == 4
    if alchemy:
        assert sum(r["pending_value"] for r in busy) == pytest.approx(0.5 + 1.5 + 2.5 + 3.5)
        assert sum(r["large_transfers"] for r in busy) == 2  # 2.5 and 3.5 POL are >= 2.0
    else:
        assert all(r["pending_value"] is None for r in busy)
    assert not sink.dead


def test_mempool_stats_take_the_market_symbols_gw_seq(bootstrap):
    """Inside the gateway, mempool records are numbered in the BTCUSDT sequence with its market data."""
    from connectors.gateway import Gateway
    from tests.test_gateway import by_symbol, check_dense, config, run_with, settle, symbols
    from tests.test_gateway_support import FakeBybitServer, SyntheticMarket, read_back

    sym = symbols("BTC")[0]
    m = SyntheticMarket(sym, seed=70)

    async def main():
        server = await FakeBybitServer({sym: m}).start()
        srv = await MempoolSpaceLike().start()

        def mempool(pub, stop):
            return MempoolSpaceFeed(srv.url, "BTC", [sym], "sim.mempool", pub.publish, pub.dead_letter,
                                    rest_interval_s=30).run(stop)

        gw = Gateway(config(server, [sym]), bootstrap, extra_inputs=[mempool])

        async def scenario():
            await server.wait_subscribed(4)
            for i in range(20):
                await server.push(m.book_delta())
                if i % 5 == 0:
                    await srv.push({"mempoolInfo": {**INFO, "size": 40_000 + i}})
            await until(lambda: gw.publisher.accepted["market.mempool"] >= 5)
            await settle(gw)

        await run_with(gw, scenario)
        await server.stop()
        await srv.stop()

    asyncio.run(main())
    got = by_symbol(read_back(bootstrap, {sym}, idle_s=1.0))
    check_dense(got)
    mem = [r for t, n, r in got[sym] if n == "MempoolStats"]
    assert len(mem) >= 5 and {r["venue"] for r in mem} == {"sim.mempool"}
    assert [r["tx_count"] for r in mem][-4:] == [40_000, 40_005, 40_010, 40_015]
