"""The local exchange against real websockets/httpx clients on 127.0.0.1: protocol conformance,
book streams, ticker/book and kline/trade consistency, REST, rate limits, idle cuts, determinism."""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from decimal import Decimal

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from connectors.exchange import LocalExchange, ModelDriver, RateLimit
from connectors.exchange.instruments import InstrumentBook
from tests.test_exchange_support import START, Book, connect, drain, subscribe

GEN = InstrumentBook.generated()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def model(duration_s=None, symbols=("BTCUSDT", "ETHUSDT"), seed=3, start_ms=START, autostart=False, speed=0.0,
          depths=(1, 50, 200, 1000)):
    return ModelDriver(list(symbols), seed=seed, speed=speed, start_ms=start_ms, history_days=1,
                       duration_s=duration_s, autostart=autostart, depths=depths)


# ---------------------------------------------------------------------------------------- protocol

def test_acks_pong_and_errors_are_bybits_exact_frames():
    async def body():
        async with LocalExchange(model(), instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            await ws.send('{"op":"subscribe","args":["tickers.BTCUSDT"],"req_id":"r1"}')
            ack = await ws.recv()
            cid = json.loads(ack)["conn_id"]
            assert ack == f'{{"success":true,"ret_msg":"","conn_id":"{cid}","req_id":"r1","op":"subscribe"}}'
            snap = json.loads(await ws.recv())
            assert snap["topic"] == "tickers.BTCUSDT" and snap["type"] == "snapshot"
            assert list(snap) == ["topic", "type", "data", "cs", "ts"]

            async def answer(text):
                await ws.send(text)
                while True:
                    m = await ws.recv()
                    if '"op"' in m:
                        return m
            assert await answer('{"op":"ping","req_id":"p1"}') == \
                f'{{"success":true,"ret_msg":"pong","conn_id":"{cid}","req_id":"p1","op":"ping"}}'
            assert await answer('{"op":"ping"}') == \
                f'{{"success":true,"ret_msg":"pong","conn_id":"{cid}","req_id":"","op":"ping"}}'
            assert await answer('{"op":"subscribe","args":["orderbook.500.BTCUSDT"]}') == \
                (f'{{"success":false,"ret_msg":"error:handler not found,topic:orderbook.500.BTCUSDT",'
                 f'"conn_id":"{cid}","req_id":"","op":"subscribe"}}')
            assert "handler not found,topic:tickers.NOPEUSDT" in await answer(
                '{"op":"subscribe","args":["tickers.NOPEUSDT"]}')
            assert "handler not found,topic:tickers.MATICUSDT" in await answer(
                '{"op":"subscribe","args":["tickers.MATICUSDT"]}')
            assert "handler not found,topic:orderbook.50.btcusdt" in await answer(
                '{"op":"subscribe","args":["orderbook.50.btcusdt"]}')
            assert await answer('{"op":"subscribe","args":["tickers.BTCUSDT"],"req_id":"r2"}') == \
                (f'{{"success":false,"ret_msg":"error:already subscribed,topic:tickers.BTCUSDT",'
                 f'"conn_id":"{cid}","req_id":"r2","op":"subscribe"}}')
            # a request with one bad topic subscribes none of its topics
            m = json.loads(await answer('{"op":"subscribe","args":["kline.1.ETHUSDT","kline.1.NOPE"]}'))
            assert m["success"] is False and "kline.1.NOPE" in m["ret_msg"]
            assert "kline.1.ETHUSDT" not in ex.conns[cid].topics
            assert json.loads(await answer('{"op":"auth","args":["k"]}'))["ret_msg"] == "error:invalid op"
            assert json.loads(await answer('{"op":"subscribe","args":"tickers.ETHUSDT"}'))["success"] is False
            bad = json.loads(await answer("hello"))
            assert bad["success"] is False and bad["ret_msg"].startswith("Failed to decode incoming data")
            assert await answer('{"op":"unsubscribe","args":["tickers.BTCUSDT"],"req_id":"u1"}') == \
                f'{{"success":true,"ret_msg":"","conn_id":"{cid}","req_id":"u1","op":"unsubscribe"}}'
            assert "tickers.BTCUSDT" not in ex.conns[cid].topics
            # the args of one connection total at most 21,000 characters
            ok = [f"kline.{iv}.{s}" for s in ("BTCUSDT", "ETHUSDT") for iv in ("1", "3", "5", "15", "30", "60")]
            assert json.loads(await answer(json.dumps({"op": "subscribe", "args": ok})))["success"] is True
            ex.conns[cid].args_chars = 20_995
            m = json.loads(await answer('{"op":"subscribe","args":["tickers.ETHUSDT"]}'))
            assert m["success"] is False and m["ret_msg"] == "args length >21000"
            await ws.close()
            # the sent log holds every frame of the connection, as sent
            sent = ex.sent_log[cid]
            assert sent[0].text == ack and sent[0].kind == "ack" and sent[1].kind == "data"
            assert [r.n for r in sent] == list(range(len(sent)))
    run(body())


def test_spot_protocol_differs_as_bybits_does(tmp_path):
    from connectors.exchange import ReplayDriver
    from tests.conftest import FIXTURES

    fixture = FIXTURES / "exchange" / "model_seed7_btc_eth_3s.jsonl"

    async def body():
        drv = ReplayDriver({"linear": fixture, "spot": fixture}, speed=0, start="manual")
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.spot_ws_url)
            await ws.send('{"op":"subscribe","args":["tickers.BTCUSDT"]}')
            ack = await ws.recv()
            cid = json.loads(ack)["conn_id"]
            assert ack == f'{{"success":true,"ret_msg":"subscribe","conn_id":"{cid}","op":"subscribe"}}'
            args = [f"kline.1.X{i}USDT" for i in range(11)]
            await ws.send(json.dumps({"op": "subscribe", "args": args, "req_id": "s2"}))
            # over 10 args per request: refused whole, Go-escaped as Bybit sends it
            assert await ws.recv() == (f'{{"success":false,"ret_msg":"args size \\u003e10","conn_id":"{cid}",'
                                       f'"req_id":"s2","op":"subscribe"}}')
            await ws.close()
    run(body())


def test_idle_connections_are_cut_and_pinging_ones_stay():
    async def body():
        async with LocalExchange(model(), instruments=GEN, mempool=False, idle_timeout=2.0) as ex:
            quiet = await connect(ex.ws_url)
            busy = await connect(ex.ws_url)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.5:
                await busy.send('{"op":"ping"}')
                assert "pong" in await asyncio.wait_for(busy.recv(), 5)
                await asyncio.sleep(0.25)
            with pytest.raises(ConnectionClosed) as e:
                await asyncio.wait_for(quiet.recv(), 5)
            assert e.value.rcvd is None  # cut without a close frame (1006), as Bybit's cuts look
            assert ex.counts["idle_cuts"] == 1
            await busy.close()
    run(body())


# ---------------------------------------------------------------------------------------- model streams

def test_books_snapshot_then_deltas_u_plus_one_and_depth_1_resends():
    depths = (1, 50, 200, 1000)
    topics = [f"orderbook.{d}.{s}" for d in depths for s in ("BTCUSDT", "ETHUSDT")]

    async def body():
        async with LocalExchange(model(duration_s=4.0), instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, topics))["conn_id"]
            ex.driver.start()
            return [json.loads(m) for m in await drain(ws, ex, cid)], ex

    msgs, ex = run(body())
    by_topic: dict[str, list[dict]] = {}
    for m in msgs:
        if "topic" in m:
            by_topic.setdefault(m["topic"], []).append(m)
    assert set(by_topic) == set(topics)
    for topic, ms in by_topic.items():
        depth = int(topic.split(".")[1])
        assert ms[0]["type"] == "snapshot", topic
        if depth == 1:
            assert all(m["type"] == "snapshot" and list(m) == ["topic", "ts", "type", "data", "cts"] for m in ms)
            for a, b in itertools.pairwise(ms):
                if b["data"]["u"] == a["data"]["u"]:  # a resend: same book, after 3 s without change
                    assert b["data"] == a["data"] and b["ts"] - a["ts"] >= 3000
                else:
                    assert b["data"]["u"] == a["data"]["u"] + 1
            continue
        book = Book()
        book.apply(ms[0])
        assert len(ms) > 10, topic
        for a, b in itertools.pairwise(ms):
            assert list(b) == ["topic", "type", "ts", "data", "cts"]
            assert b["type"] == "delta" and b["data"]["u"] == a["data"]["u"] + 1, topic
            assert b["data"]["seq"] > a["data"]["seq"] and b["ts"] >= a["ts"] and b["cts"] <= b["ts"]
            bids = [Decimal(p) for p, _ in b["data"]["b"]]
            asks = [Decimal(p) for p, _ in b["data"]["a"]]
            assert bids == sorted(bids, reverse=True) and asks == sorted(asks)
            book.apply(b)
            assert len(book.b) == depth and len(book.a) == depth  # the window stays full, like Bybit's
        inst = GEN.require(topic.rsplit(".", 1)[1])
        for p, q in list(book.b.items()) + list(book.a.items()):
            inst.to_ticks(p), inst.to_lots(q)  # on the grids (raises otherwise)
            assert Decimal(q) > 0
    # the REST book is the deepest stream's state, with its u
    assert ex is not None


def test_ticker_deltas_merge_to_the_book_top_and_carry_only_changes():
    syms = ("BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT")

    async def body():
        async with LocalExchange(model(duration_s=6.0, symbols=syms), instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, [f"{c}.{s}" for s in syms for c in ("orderbook.50", "tickers")]))["conn_id"]
            ex.driver.start()
            return [json.loads(m) for m in await drain(ws, ex, cid)]

    msgs = run(body())
    books = {s: Book() for s in syms}
    state: dict[str, dict] = {}
    checked = 0
    for m in msgs:
        topic = m.get("topic", "")
        sym = topic.rsplit(".", 1)[-1]
        if topic.startswith("orderbook."):
            books[sym].apply(m)
        elif topic.startswith("tickers."):
            if m["type"] == "snapshot":
                state[sym] = dict(m["data"])
            else:
                old = state[sym]
                for k, v in m["data"].items():
                    if k not in ("symbol", "bid1Price", "bid1Size", "ask1Price", "ask1Size"):
                        assert old.get(k) != v, f"{k} sent unchanged"
                # bid1Price/bid1Size (and ask) travel as pairs
                assert ("bid1Price" in m["data"]) == ("bid1Size" in m["data"])
                assert ("ask1Price" in m["data"]) == ("ask1Size" in m["data"])
                old.update(m["data"])
            st = state[sym]
            assert (st["bid1Price"], st["bid1Size"], st["ask1Price"], st["ask1Size"]) == books[sym].top(), m
            checked += 1
            assert int(st["nextFundingTime"]) > m["ts"] and Decimal(st["markPrice"]) > 0
    assert checked > 4 * 40


def test_klines_equal_the_aggregation_of_the_trades():
    # start 50 s into a minute: candles close after 10 s and 70 s of exchange time
    start = START + 50_000

    async def body():
        async with LocalExchange(model(duration_s=72.0, start_ms=start, depths=(1,)), instruments=GEN,
                                 mempool=False) as ex:
            async with httpx.AsyncClient(base_url=ex.base_url) as http:
                r = await http.get("/v5/market/kline", params={"category": "linear", "symbol": "BTCUSDT",
                                                               "interval": "1", "limit": 2})
                hist_close = r.json()["result"]["list"][1][4]
            ws = await connect(ex.ws_url)
            args = [f"{c}.{s}" for s in ("BTCUSDT", "ETHUSDT") for c in ("publicTrade", "kline.1")]
            cid = (await subscribe(ws, args))["conn_id"]
            ex.driver.start()
            msgs = [json.loads(m) for m in await drain(ws, ex, cid)]
            async with httpx.AsyncClient(base_url=ex.base_url) as http:
                rest = {s: (await http.get("/v5/market/kline", params={"symbol": s, "interval": "1", "limit": 5}))
                        .json()["result"]["list"] for s in ("BTCUSDT", "ETHUSDT")}
            return msgs, hist_close, rest

    msgs, hist_close, rest = run(body())
    trades: dict[str, list[dict]] = {"BTCUSDT": [], "ETHUSDT": []}
    confirmed: dict[str, list[dict]] = {"BTCUSDT": [], "ETHUSDT": []}
    ids = set()
    for m in msgs:
        topic = m.get("topic", "")
        sym = topic.rsplit(".", 1)[-1]
        if topic.startswith("publicTrade."):
            assert 1 <= len(m["data"]) <= 1024
            for t in m["data"]:
                assert list(t) == ["T", "s", "S", "v", "p", "L", "i", "BT", "RPI", "seq"] and t["i"] not in ids
                ids.add(t["i"])
                trades[sym].append(t)
        elif topic.startswith("kline."):
            closed = [c for c in m["data"] if c["confirm"]]
            if closed:
                assert len(m["data"]) == 2 and not m["data"][1]["confirm"]  # the closing message carries 2
                assert m["data"][1]["start"] == closed[0]["end"] + 1
            confirmed[sym] += closed
    for sym, sym_trades in trades.items():
        assert len(confirmed[sym]) == 2 and sym_trades, sym
        prev_close = hist_close if sym == "BTCUSDT" else None
        for c in confirmed[sym]:
            ts = [t for t in sym_trades if c["start"] <= t["T"] <= c["end"]]
            opn = Decimal(c["open"])
            if prev_close is not None:
                assert opn == Decimal(prev_close)  # opens at the previous close (history, then live)
            prices = [Decimal(t["p"]) for t in ts]
            assert Decimal(c["high"]) == max([opn, *prices]) and Decimal(c["low"]) == min([opn, *prices])
            assert Decimal(c["close"]) == (prices[-1] if prices else opn)
            assert Decimal(c["volume"]) == sum((Decimal(t["v"]) for t in ts), Decimal(0))
            assert Decimal(c["turnover"]) == sum((Decimal(t["p"]) * Decimal(t["v"]) for t in ts), Decimal(0))
            prev_close = c["close"]
        # REST serves the same candles, newest first, the open one included
        rows = {int(r[0]): r for r in rest[sym]}
        for c in confirmed[sym]:
            assert rows[c["start"]][1:] == [c["open"], c["high"], c["low"], c["close"], c["volume"], c["turnover"]]
        assert int(rest[sym][0][0]) > confirmed[sym][-1]["start"]


# ---------------------------------------------------------------------------------------- REST

def test_rest_klines_newest_first_paging_limits_and_errors():
    async def body():
        async with LocalExchange(model(autostart=True, speed=1.0), instruments=GEN, mempool=False) as ex, \
                httpx.AsyncClient(base_url=ex.base_url) as http:
            async def get(**params):
                r = await http.get("/v5/market/kline", params=params)
                assert r.status_code == 200
                return r.json()
            d = await get(category="linear", symbol="BTCUSDT", interval="1")
            assert list(d) == ["retCode", "retMsg", "result", "retExtInfo", "time"] and d["retCode"] == 0
            rows = d["result"]["list"]
            assert len(rows) == 200  # default limit
            starts = [int(r[0]) for r in rows]
            assert starts == sorted(starts, reverse=True) and all(a - b == 60_000 for a, b in itertools.pairwise(starts))
            assert starts[0] == ex.driver.now_ms() // 60_000 * 60_000  # the still-open candle comes first
            for r in rows:
                o, h, lo, c = map(Decimal, r[1:5])
                assert lo <= min(o, c) and h >= max(o, c) and Decimal(r[5]) >= 0
            assert all(Decimal(r[5]) > 0 for r in rows[1:])  # history: every closed minute traded
            assert all(rows[i][1] == rows[i + 1][4] for i in range(len(rows) - 1))  # open = previous close
            # page backwards with end = oldest start - 1: contiguous, no duplicates, up to the history start
            seen, end = [], None
            while True:
                params = {"category": "linear", "symbol": "BTCUSDT", "interval": "1", "limit": 1000}
                if end is not None:
                    params["end"] = end
                page = (await get(**params))["result"]["list"]
                if not page:
                    break
                seen += [int(r[0]) for r in page]
                end = int(page[-1][0]) - 1
            assert len(seen) == len(set(seen)) and len(seen) >= 1440 + 1
            assert all(a - b == 60_000 for a, b in itertools.pairwise(seen))
            sub = (await get(symbol="BTCUSDT", interval="1", start=seen[10], end=seen[5]))["result"]["list"]
            assert [int(r[0]) for r in sub] == seen[5:11]
            five = (await get(symbol="ETHUSDT", interval="5", limit=3))["result"]["list"]
            assert all(int(r[0]) % 300_000 == 0 for r in five)
            for params, msg in [({"interval": "1"}, "symbol is required"),
                                ({"symbol": "MATICUSDT", "interval": "1"}, "Not supported symbols"),
                                ({"symbol": "BTCUSDT"}, "interval is required"),
                                ({"symbol": "BTCUSDT", "interval": "2"}, "invalid interval"),
                                ({"symbol": "BTCUSDT", "interval": "1", "limit": 1001}, "between 1 and 1000"),
                                ({"symbol": "BTCUSDT", "interval": "1", "limit": 0}, "between 1 and 1000"),
                                ({"symbol": "BTCUSDT", "interval": "1", "limit": "x"}, "must be an integer"),
                                ({"symbol": "BTCUSDT", "interval": "1", "start": 5, "end": 4}, "start"),
                                ({"category": "fx", "symbol": "BTCUSDT", "interval": "1"}, "illegal category")]:
                e = await get(**params)
                assert e["retCode"] == 10001 and msg in e["retMsg"] and e["result"] == {}, (params, e)
            assert len((await get(symbol="BTCUSDT", interval="1", limit=1000))["result"]["list"]) == 1000
            r = await http.get("/v5/market/nope")
            assert r.status_code == 404
    run(body())


@pytest.mark.parametrize("source", ["generated", "real"])
def test_instruments_info_pagination(source, request):
    if source == "real":
        ib = InstrumentBook.load(request.getfixturevalue("shared_real"))
        assert ib.source.startswith("real")
    else:
        ib = GEN

    async def body():
        async with LocalExchange(model(), instruments=ib, mempool=False) as ex, \
                httpx.AsyncClient(base_url=ex.base_url) as http:
            limit = 3 if source == "generated" else 333
            got, cursor, pages = [], None, 0
            while True:
                params = {"category": "linear", "limit": limit}
                if cursor:
                    params["cursor"] = cursor
                res = (await http.get("/v5/market/instruments-info", params=params)).json()["result"]
                got += res["list"]
                pages += 1
                cursor = res["nextPageCursor"]
                if not cursor:
                    break
            full = ib.lists["linear"]
            assert [i["symbol"] for i in got] == [i["symbol"] for i in full] and pages == -(-len(full) // limit)
            syms = {i["symbol"] for i in got}
            assert "POLUSDT" in syms and "MATICUSDT" not in syms
            pol = (await http.get("/v5/market/instruments-info", params={"category": "linear", "symbol": "POLUSDT"}))
            entry = pol.json()["result"]["list"][0]
            assert entry["priceFilter"]["tickSize"] == "0.00001" and entry["lotSizeFilter"]["qtyStep"] == "1"
            bad = (await http.get("/v5/market/instruments-info", params={"category": "linear", "cursor": "zz"})).json()
            assert bad["retCode"] == 10001 and "cursor" in bad["retMsg"]
            assert (await http.get("/v5/market/instruments-info")).json()["retCode"] == 10001  # category required
    run(body())


def test_rest_orderbook_tickers_funding_match_the_streams():
    async def body():
        async with LocalExchange(model(duration_s=1.0), instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, ["orderbook.1000.ETHUSDT", "tickers.ETHUSDT"]))["conn_id"]
            ex.driver.start()
            msgs = [json.loads(m) for m in await drain(ws, ex, cid)]
            book = Book()
            ticker = {}
            for m in msgs:
                if m.get("topic", "").startswith("orderbook"):
                    book.apply(m)
                elif m.get("topic", "").startswith("tickers"):
                    ticker.update(m["data"])
            async with httpx.AsyncClient(base_url=ex.control_url) as http:  # the keep-alive port serves it too
                ob = (await http.get("/v5/market/orderbook", params={"category": "linear", "symbol": "ETHUSDT"})).json()
                res = ob["result"]
                assert list(res) == ["s", "a", "b", "ts", "u", "seq", "cts"] and len(res["b"]) == 25
                assert res["u"] == book.u  # REST u is the 1000-level stream's u
                assert [[str(p), q] for p, q in sorted(book.b.items(), reverse=True)[:25]] == res["b"]
                big = (await http.get("/v5/market/orderbook", params={"category": "linear", "symbol": "ETHUSDT",
                                                                       "limit": 500})).json()["result"]
                assert len(big["a"]) == 500
                e = (await http.get("/v5/market/orderbook", params={"category": "linear", "symbol": "ETHUSDT",
                                                                     "limit": 501})).json()
                assert e["retCode"] == 10001
                tk = (await http.get("/v5/market/tickers", params={"category": "linear", "symbol": "ETHUSDT"})).json()
                t = tk["result"]["list"][0]
                for k in ("bid1Price", "ask1Price", "lastPrice", "markPrice", "fundingRate", "nextFundingTime"):
                    assert t[k] == ticker[k]
                all_t = (await http.get("/v5/market/tickers", params={"category": "linear"})).json()["result"]["list"]
                assert {x["symbol"] for x in all_t} == {"BTCUSDT", "ETHUSDT"}
                fh = (await http.get("/v5/market/funding/history",
                                     params={"category": "linear", "symbol": "ETHUSDT", "limit": 5})).json()
                rows = fh["result"]["list"]
                assert len(rows) == 3 and [int(r["fundingRateTimestamp"]) for r in rows] == \
                    sorted((int(r["fundingRateTimestamp"]) for r in rows), reverse=True)
                assert all(int(r["fundingRateTimestamp"]) % (8 * 3600_000) == 0 for r in rows)
                e = (await http.get("/v5/market/funding/history",
                                    params={"category": "linear", "symbol": "ETHUSDT", "startTime": 1})).json()
                assert e["retCode"] == 10001 and "endTime" in e["retMsg"]
    run(body())


def test_rate_limits_answer_like_bybit():
    async def body():
        rl = RateLimit(ip_requests=5, ip_window_s=10.0, ban_s=0.6)
        async with LocalExchange(model(), instruments=GEN, mempool=False, rate_limit=rl) as ex:
            async with httpx.AsyncClient(base_url=ex.base_url) as http:
                params = {"category": "linear", "symbol": "BTCUSDT"}
                codes = [(await http.get("/v5/market/tickers", params=params)).status_code for _ in range(7)]
                assert codes == [200] * 5 + [403, 403]
                r = await http.get("/v5/market/tickers", params=params)
                assert r.status_code == 403 and "access too frequent" in r.text
                await asyncio.sleep(0.7)  # the ban is over: the window still holds the earlier hits
            async with httpx.AsyncClient(base_url=ex.control_url) as ctl:
                r = await ctl.post("/control/ratelimit", json={"reset": True, "ip_requests": 1000, "api_per_s": 2})
                assert r.status_code == 200 and r.json()["rate_limit"]["api_per_s"] == 2
                out = [await ctl.get("/v5/market/orderbook", params={"category": "linear", "symbol": "BTCUSDT"})
                       for _ in range(3)]
                assert [o.json()["retCode"] for o in out[:2]] == [0, 0]
                assert out[2].status_code == 200 and out[2].json()["retCode"] == 10006
                assert out[2].json()["retMsg"] == "Too many visits!"
                assert out[0].headers["X-Bapi-Limit"] == "2" and out[0].headers["X-Bapi-Limit-Status"] == "1"
                bad = await ctl.post("/control/ratelimit", json={"bogus": 1})
                assert bad.status_code == 400
    run(body())


# ---------------------------------------------------------------------------------------- determinism

def test_same_seed_same_messages_different_seed_different():
    topics = ["orderbook.50.BTCUSDT", "publicTrade.BTCUSDT", "tickers.ETHUSDT", "kline.1.ETHUSDT"]

    async def one(seed):
        async with LocalExchange(model(duration_s=3.0, seed=seed), instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, topics))["conn_id"]
            ex.driver.start()
            return [m for m in await drain(ws, ex, cid) if '"topic"' in m]

    a, b, c = run(one(11)), run(one(11)), run(one(12))
    assert len(a) > 100 and a == b and a != c


# ---------------------------------------------------------------------------------------- mempool

def test_mempool_feed_ws_and_rest():
    async def body():
        async with LocalExchange(model(), instruments=GEN, mempool_speed=20.0) as ex:
            ws = await connect(ex.mempool_ws_url("BTC"))
            await ws.send(json.dumps({"action": "want", "data": ["stats", "mempool-blocks"]}))
            first = await asyncio.wait_for(ws.recv(), 10)
            assert first.startswith('{"mempool-blocks": [') and ', "mempoolInfo": {' in first
            d = json.loads(first)
            assert set(d) == {"mempool-blocks", "mempoolInfo", "vBytesPerSecond", "fees"}
            info = d["mempoolInfo"]
            assert info["size"] > 0 and info["bytes"] > 0 and 0 < info["total_fee"] < 100
            blocks = d["mempool-blocks"]
            assert 1 <= len(blocks) <= 8 and all(
                list(b) == ["blockSize", "blockVSize", "nTx", "totalFees", "medianFee", "feeRange"] for b in blocks)
            assert [b["medianFee"] for b in blocks] == sorted((b["medianFee"] for b in blocks), reverse=True)
            f = d["fees"]
            assert f["fastestFee"] >= f["halfHourFee"] >= f["hourFee"] >= f["economyFee"] >= f["minimumFee"] >= 1
            upd = json.loads(await asyncio.wait_for(ws.recv(), 10))  # a mempool change (2 s of model time)
            assert {"mempoolInfo", "vBytesPerSecond", "transactions", "fees", "mempool-blocks"} <= set(upd)
            await ws.send('{"action":"ping"}')
            while True:
                m = await asyncio.wait_for(ws.recv(), 10)
                if m == '{"pong": true}':
                    break
            await ws.send("not json")
            with pytest.raises(ConnectionClosed):
                for _ in range(100):
                    await asyncio.wait_for(ws.recv(), 10)
            async with httpx.AsyncClient(base_url=ex.base_url) as http:
                mp = (await http.get("/api/mempool")).json()
                assert list(mp) == ["count", "vsize", "total_fee", "fee_histogram"]
                hist = mp["fee_histogram"]
                assert sum(v for _, v in hist) == mp["vsize"]
                assert [r for r, _ in hist] == sorted((r for r, _ in hist), reverse=True)
                rec = (await http.get("/api/v1/fees/recommended")).json()
                assert set(rec) == {"fastestFee", "halfHourFee", "hourFee", "economyFee", "minimumFee"}
                ltc = (await http.get("/ltc/api/mempool")).json()
                assert ltc["count"] < mp["count"]
                assert (await http.get("/api/nope")).status_code == 404
            ltc_ws = await connect(ex.mempool_ws_url("LTC"))
            await ltc_ws.send(json.dumps({"action": "want", "data": ["stats"]}))
            assert "mempoolInfo" in json.loads(await asyncio.wait_for(ltc_ws.recv(), 10))
            await ltc_ws.close()
    run(body())


def test_cli_serves_and_prints_its_urls(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    proc = subprocess.Popen([sys.executable, "-m", "tickcast.cli", "exchange", "--port", "0", "--history-days", "1",
                             "--symbols", "BTCUSDT"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        urls = None
        for line in proc.stdout:
            if line.startswith('{"urls"'):
                urls = json.loads(line)["urls"]
                break
        assert urls is not None

        async def body():
            ws = await connect(urls["ws_linear"])
            ack = await subscribe(ws, ["orderbook.50.BTCUSDT"])
            snap = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.close()
            async with httpx.AsyncClient() as http:
                st = (await http.get(urls["control"] + "/control/state")).json()
            return ack, snap, st
        ack, snap, st = run(body())
        assert ack["success"] and snap["type"] == "snapshot" and st["driver"]["driver"] == "model"
    finally:
        proc.terminate()
        proc.wait(10)


def test_threaded_exchange_for_synchronous_callers():
    from websockets.sync.client import connect as sync_connect

    from connectors.exchange import ThreadedExchange

    with ThreadedExchange(model(duration_s=1.0), instruments=GEN, mempool=False) as ex:
        with sync_connect(ex.ws_url) as ws:
            ws.send('{"op":"subscribe","args":["orderbook.50.ETHUSDT"],"req_id":"t"}')
            cid = json.loads(ws.recv())["conn_id"]
            ex.wait_subscribed(["orderbook.50.ETHUSDT"])
            ex.start_driver()
            ex.wait_done()
            got = []
            while len(got) + 1 < len(ex.sent_log[cid]):
                got.append(ws.recv(timeout=5))
            rec = ex.inject("drop", conn_id=cid)
            assert rec["conn_ids"] == [cid]
        assert got == [r.text for r in ex.sent_data(cid)] and len(got) > 20
        assert httpx.get(ex.base_url + "/v5/market/tickers", params={"category": "linear"}).json()["retCode"] == 0
