"""The market model itself (no server): grids, spreads, depth, volatility clustering, history, and
the server streaming exactly what the model produces headless."""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics

from connectors.exchange import LocalExchange, ModelDriver
from connectors.exchange.instruments import InstrumentBook
from connectors.exchange.model import MINUTE, MarketModel
from connectors.exchange.recording import read_jsonl
from tests.conftest import FIXTURES
from tests.test_exchange_support import START, connect, drain, subscribe

GEN = InstrumentBook.generated()
MVP = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]


def acf(x: list[float], k: int) -> float:
    mu = statistics.fmean(x)
    v = math.fsum((a - mu) ** 2 for a in x)
    return math.fsum((x[i] - mu) * (x[i + k] - mu) for i in range(len(x) - k)) / v


def test_books_stay_realistic_and_every_number_is_on_its_grid():
    m = MarketModel({s: GEN.require(s) for s in MVP}, seed=21, start_ms=START, history_days=1, depths=(1, 50))
    spreads = {s: [] for s in MVP}
    for k in range(20):
        outs = m.advance(START + (k + 1) * 1000)
        for s, sim in m.sims.items():
            bb, ba = sim.best_bid(), sim.best_ask()
            assert bb < ba and len(sim.bk) >= 1000 and len(sim.ak) >= 1000
            spreads[s].append(ba - bb)
        for o in outs:
            d = json.loads(o.text)
            inst = GEN.require(o.symbol)
            if o.topic.startswith("publicTrade"):
                for t in d["data"]:
                    inst.to_ticks(t["p"]), inst.to_lots(t["v"])
                    assert int(t["v"].replace(".", "")) > 0
            elif o.topic.startswith("orderbook"):
                for p, q in d["data"]["b"] + d["data"]["a"]:
                    inst.to_ticks(p), inst.to_lots(q)
                    for text, dec in ((p, inst.price_dec), (q, inst.qty_dec)):  # the grid's exact decimals
                        assert (len(text.split(".")[1]) if "." in text else 0) == dec
            elif o.topic.startswith("tickers"):
                for k2 in ("bid1Price", "ask1Price", "lastPrice"):
                    if k2 in d["data"]:
                        inst.to_ticks(d["data"][k2])
    for s in MVP:
        assert statistics.median(spreads[s]) <= 2, (s, spreads[s])  # liquid perps: one or two ticks


def test_volatility_clusters_in_history_and_live():
    m = MarketModel({"BTCUSDT": GEN.require("BTCUSDT")}, seed=4, start_ms=START, history_days=10, depths=(1,))
    h = m.sims["BTCUSDT"].history
    r = [math.log(b / a) for a, b in zip(h.c, h.c[1:], strict=False)]
    sq = [x * x for x in r]
    assert acf(sq, 1) > 0.05 and acf(sq, 5) > 0.03  # squared returns stay correlated: clusters
    assert abs(acf(r, 1)) < 0.05                      # returns themselves are not predictable
    assert 0.5 < statistics.pstdev(r) / 0.0003 < 2.0
    for i in range(1, h.n):
        assert h.o[i] == h.c[i - 1] and h.l[i] <= min(h.o[i], h.c[i]) and h.h[i] >= max(h.o[i], h.c[i])
    sim = m.sims["BTCUSDT"]
    mids = []
    for k in range(300):
        m.advance(START + (k + 1) * 1000)
        mids.append((sim.best_bid() + sim.best_ask()) / 2)
    a = [abs(math.log(y / x)) for x, y in itertools.pairwise(mids)]
    assert statistics.fmean(acf(a, k) for k in range(1, 11)) > 0.05  # 1 s volatility clusters too


def test_history_ends_at_the_live_start_and_funding_settles_on_the_grid():
    m = MarketModel({s: GEN.require(s) for s in ("BTCUSDT", "POLUSDT")}, seed=9, start_ms=START + 30_000,
                    history_days=2, depths=(1,))
    for s, sim in m.sims.items():
        h = sim.history
        assert h.start_ms + h.n * MINUTE == START  # history ends at the live minute
        assert h.c[-1] == sim.candle(START).o == GEN.require(s).to_ticks(sim.p.price)
        step = GEN.require(s).funding_interval_min * MINUTE
        assert all(t % step == 0 for t, _ in sim.funding_log)
        assert sim.next_funding % step == 0 and sim.next_funding > START
    assert m.sims["POLUSDT"].fund_step == 4 * 3600_000  # POLUSDT funds every 4 h, as listed


def test_the_server_streams_exactly_what_the_model_makes_headless():
    lines = read_jsonl(FIXTURES / "exchange" / "model_seed7_btc_eth_3s.jsonl")
    topics = []
    for x in lines:
        t = json.loads(x)["topic"]
        if t not in topics:
            topics.append(t)

    async def body():
        drv = ModelDriver(["BTCUSDT", "ETHUSDT"], seed=7, speed=0, start_ms=START, history_days=1, duration_s=3.0,
                          autostart=False)
        async with LocalExchange(drv, instruments=GEN, mempool=False) as ex:
            ws = await connect(ex.ws_url)
            cid = (await subscribe(ws, topics))["conn_id"]
            ex.driver.start()
            return await drain(ws, ex, cid)

    got = asyncio.run(asyncio.wait_for(body(), 120))
    assert got == lines
