"""Bybit v5 REST client against a real HTTP server on 127.0.0.1 that follows Bybit's semantics:
kline pages newest first (with the still-open candle), cursor-paginated instruments-info, order-book
snapshots, funding history, Bybit's own rate limit (HTTP 403 / retCode 10006) and injected faults."""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from connectors.rest import BybitRest, RateLimiter, RestError, kline_record, orderbook_record, resolve_symbols

DOCS = Path(__file__).parent / "fixtures" / "bybit_docs"
MINUTE = 60_000
NOW = 1_786_310_845_123  # mid-minute: the candle of this minute is still open


def candle(symbol: str, start: int) -> list[str]:
    h = int(hashlib.sha256(f"{symbol}{start}".encode()).hexdigest()[:8], 16)
    o = 60000 + h % 1000
    c = o + (h >> 10) % 50 - 25
    return [str(start), f"{o}.5", f"{max(o, c) + 3}.0", f"{min(o, c) - 2}.5", f"{c}.0", f"{(h % 997) / 100:.3f}",
            f"{(h % 99991) / 10:.4f}"]


def instruments() -> list[dict]:
    base = json.loads(json.dumps([x for x in json.loads((DOCS / "market_instrument.examples.json").read_text())
                                  if "result" in x and x["result"]["category"] == "spot"][0]["result"]["list"][0]))
    out = []
    for sym, tick, step in [("BTCUSDT", "0.10", "0.001"), ("ETHUSDT", "0.01", "0.01"), ("LTCUSDT", "0.01", "0.1"),
                            ("POLUSDT", "0.00001", "1"), ("SOLUSDT", "0.010", "0.1")]:
        item = {**base, "symbol": sym, "status": "Trading", "baseCoin": sym[:-4], "quoteCoin": "USDT",
                "priceFilter": {"minPrice": tick, "maxPrice": "1999999", "tickSize": tick},
                "lotSizeFilter": {"maxOrderQty": "1000", "minOrderQty": step, "qtyStep": step}}
        out.append(item)
    out.append({**out[0], "symbol": "OLDUSDT", "status": "Closed"})
    return out


class BybitLike:
    """State of the fake REST server (what tests configure and inspect)."""

    def __init__(self):
        self.requests: list[tuple[float, str, dict]] = []
        self.faults: list = []  # consumed one per request: 429, 403, 500, "timeout", 10006, 10001
        self.limit_per_s = 1000  # Bybit-like IP limit: beyond it, 403 "access too frequent"
        self.overlap = False  # kline pages repeat the previous page's oldest candle
        self.page = 2  # instruments per page
        self.lock = threading.Lock()

    def respond(self, path: str, q: dict) -> tuple[int, dict | str]:
        now = time.monotonic()
        with self.lock:
            self.requests.append((now, path, q))
            recent = sum(1 for t, _, _ in self.requests if now - t < 1.0)
            fault = self.faults.pop(0) if self.faults else None
        if recent > self.limit_per_s:
            return 403, "403 Forbidden: access too frequent"
        if fault == "timeout":
            time.sleep(1.5)
        elif isinstance(fault, int) and fault >= 10000:
            return 200, {"retCode": fault, "retMsg": "Too many visits!" if fault == 10006 else "params error",
                         "result": {}, "retExtInfo": {}, "time": NOW}
        elif isinstance(fault, int):
            return fault, {"retCode": 10000, "retMsg": "error"}
        if path == "/v5/market/kline":
            return 200, self.kline(q)
        if path == "/v5/market/instruments-info":
            items = instruments()
            start = int(q.get("cursor", "0") or 0)
            nxt = start + self.page
            return 200, self.env({"category": "linear", "list": items[start:nxt],
                                  "nextPageCursor": str(nxt) if nxt < len(items) else ""})
        if path == "/v5/market/orderbook":
            ex = json.loads((DOCS / "market_orderbook.examples.json").read_text())[0]
            ex["result"]["s"] = q["symbol"]
            return 200, ex
        if path == "/v5/market/funding/history":
            end, start, limit = int(q["endTime"]), int(q["startTime"]), int(q.get("limit", 200))
            times = [t for t in range(start - start % 28_800_000, end + 1, 28_800_000) if start <= t <= end]
            rows = [{"symbol": q["symbol"], "fundingRate": f"0.000{t % 7}", "fundingRateTimestamp": str(t)}
                    for t in sorted(times, reverse=True)[:limit]]
            return 200, self.env({"category": "linear", "list": rows})
        return 404, "not found"

    @staticmethod
    def env(result: dict) -> dict:
        return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": NOW}

    def kline(self, q: dict) -> dict:
        limit = min(int(q.get("limit", 200)), 1000)
        start, end = int(q["start"]), int(q.get("end", NOW))
        end = min(end, NOW)
        last = end - end % MINUTE  # newest candle start <= end (includes the open one)
        if self.overlap:
            last = min(last + MINUTE, NOW - NOW % MINUTE)
        rows = []
        t = last
        while t >= start and len(rows) < limit:
            rows.append(candle(q["symbol"], t))
            t -= MINUTE
        return self.env({"symbol": q["symbol"], "category": "linear", "list": rows})


@pytest.fixture()
def bybit():
    state = BybitLike()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Bybit's CDN

        def do_GET(self):
            parts = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            status, body = state.respond(parts.path, q)
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *a):
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128

    srv = Server(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield state
    srv.shutdown()
    srv.server_close()


def rest(state, **kw) -> BybitRest:
    kw = {"rate_per_s": 50, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "backoff_403_s": 0.05,
          "timeout_s": 1.0, **kw}
    return BybitRest(state.url, **kw)


def run(coro):
    return asyncio.run(coro)


def test_kline_backfill_pages_newest_first_drops_the_open_candle(bybit):
    start = NOW - NOW % MINUTE - 2500 * MINUTE

    async def go():
        async with rest(bybit) as r:
            return await r.klines("BTCUSDT", start, NOW)

    rows = run(go())
    starts = [int(x[0]) for x in rows]
    assert starts == list(range(start, NOW - NOW % MINUTE, MINUTE))  # ascending, complete, no open candle
    assert len(starts) == 2500
    assert rows[10] == candle("BTCUSDT", starts[10])  # the exchange's strings untouched
    pages = [q for _, p, q in bybit.requests if p == "/v5/market/kline"]
    assert len(pages) == 3 and all(q["limit"] == "1000" for q in pages)
    ends = [int(q["end"]) for q in pages]
    assert ends[0] == NOW and ends == sorted(ends, reverse=True)


def test_kline_pages_that_overlap_are_deduplicated(bybit):
    bybit.overlap = True
    start = NOW - NOW % MINUTE - 1500 * MINUTE

    async def go():
        async with rest(bybit) as r:
            return await r.klines("ETHUSDT", start, NOW - 400 * MINUTE, limit=200)

    rows = run(go())
    starts = [int(x[0]) for x in rows]
    end = NOW - 400 * MINUTE
    assert starts == list(range(start, end - end % MINUTE + 1, MINUTE))  # each once, none past the end
    assert len(starts) == 1101
    assert len([1 for _, p, _ in bybit.requests if p == "/v5/market/kline"]) == 6  # 200 a page, 1 repeated


def test_kline_records_match_the_historical_contract(bybit):
    row = candle("BTCUSDT", NOW - NOW % MINUTE - MINUTE)
    rec = kline_record("BTCUSDT", "bybit.linear.rest", row, "1")
    from flows.kline_history import make_kline

    assert rec == make_kline("BTCUSDT", "1", int(row[0]), *row[1:6], row[6], "bybit.linear.rest")


def test_rate_limiter_keeps_under_the_configured_rate(bybit):
    # a token bucket of 20/s with a burst of 20 sends at most ~40 in any second (plus network jitter):
    # a server that refuses the 45th request within a second (all 45 at once without the limiter) never
    # refuses one (Bybit allows 600 per 5 s; the default here is 10/s)
    bybit.limit_per_s = 44

    async def go():
        async with rest(bybit, rate_per_s=20) as r:
            t0 = time.monotonic()
            await asyncio.gather(*(r.orderbook("BTCUSDT", 50) for _ in range(45)))
            return time.monotonic() - t0, r.retries

    elapsed, retries = run(go())
    assert retries == 0  # never hit the server's limit
    assert elapsed >= (45 - 20) / 20 * 0.95  # burst of 20, then 20 per second
    assert len(bybit.requests) == 45


def test_rate_limiter_unit():
    clock = [0.0]
    lim = RateLimiter(10, burst=2, clock=lambda: clock[0])

    async def go():
        await lim.acquire()
        await lim.acquire()
        assert lim.tokens < 1
        clock[0] += 0.1
        await lim.acquire()

    run(go())
    assert lim.waited_s == 0


def test_retries_on_429_5xx_timeouts_and_bybit_busy_codes(bybit):
    bybit.faults = [429, 500, 503, "timeout", 10006]

    async def go():
        async with rest(bybit) as r:
            res = await r.orderbook("BTCUSDT", 50)
            return res, r.retries, r.requests

    res, retries, requests = run(go())
    assert res["s"] == "BTCUSDT" and retries == 5 and requests == 6


def test_403_backs_off_longer_and_gives_up_with_a_clear_error(bybit):
    bybit.faults = [403] * 10

    async def go():
        async with rest(bybit, max_retries=2, backoff_403_s=0.2) as r:
            t0 = time.monotonic()
            with pytest.raises(RestError) as err:
                await r.orderbook("BTCUSDT", 50)
            return err.value, time.monotonic() - t0

    err, elapsed = run(go())
    assert err.status == 403 and "region" in str(err) and "3 attempts" in str(err)
    assert elapsed >= 0.2  # two waits of at least backoff_403_s / 2 each


def test_bad_parameters_are_not_retried(bybit):
    bybit.faults = [10001]

    async def go():
        async with rest(bybit) as r:
            with pytest.raises(RestError) as err:
                await r.orderbook("BTCUSDT", 50)
            return err.value, r.requests

    err, requests = run(go())
    assert err.ret_code == 10001 and requests == 1


def test_instruments_are_paged_by_cursor_and_symbols_resolved(bybit, caplog):
    async def go():
        async with rest(bybit) as r:
            inst = await r.instruments()
            pages = len(bybit.requests)
            return inst, pages, await r.resolve_symbols(["BTCUSDT", "MATICUSDT", "LTCUSDT"])

    inst, pages, (resolved, info) = run(go())
    assert len(inst) == 6 and pages == 3
    assert [q.get("cursor") for _, _, q in bybit.requests[:3]] == [None, "2", "4"]
    assert resolved == ["BTCUSDT", "POLUSDT", "LTCUSDT"]
    assert (info["POLUSDT"].tick_size, info["POLUSDT"].qty_step) == ("0.00001", "1")
    assert "MATICUSDT no longer trades on Bybit: it was replaced by POLUSDT" in caplog.text
    with pytest.raises(ValueError, match="NOPEUSDT"):
        resolve_symbols(["BTCUSDT", "NOPEUSDT"], inst)
    with pytest.raises(ValueError, match="OLDUSDT"):
        resolve_symbols(["OLDUSDT"], inst)
    assert resolve_symbols(["MATICUSDT", "XUSDT"], None)[0] == ["POLUSDT", "XUSDT"]  # REST down: renames only


@pytest.mark.shared_data
def test_the_real_instrument_list_resolves_the_mvp_symbols(shared_real):
    from connectors.rest import Instrument

    body = json.loads((shared_real / "cryptofeed_bybit_v5_20260809" / "rest_instruments_info_linear.json").read_text())
    inst = {i["symbol"]: Instrument(i["symbol"], i["status"], i["priceFilter"]["tickSize"],
                                    i["lotSizeFilter"]["qtyStep"], i["baseCoin"], i["quoteCoin"],
                                    i.get("fundingInterval")) for i in body["result"]["list"]}
    resolved, info = resolve_symbols(["BTCUSDT", "ETHUSDT", "LTCUSDT", "MATICUSDT"], inst)
    assert resolved == ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]
    assert info["BTCUSDT"].tick_size == "0.10" and info["POLUSDT"].tick_size == "0.00001"


def test_orderbook_snapshot_record_from_the_docs_example(bybit):
    async def go():
        async with rest(bybit) as r:
            return await r.orderbook("BTCUSDT", 50)

    rec = orderbook_record("BTCUSDT", "bybit.linear", run(go()), 50, 7)
    assert (rec["bid_px"], rec["bid_sz"], rec["ask_px"], rec["ask_sz"]) == (["65485.47"], ["47.081829"], ["65557.7"],
                                                                            ["16.606555"])
    assert (rec["update_id"], rec["cross_seq"], rec["exchange_ts"], rec["match_ts"]) == \
        (230704, 1432604333, 1716863719031, 1716863718905)


def test_funding_history_pages(bybit):
    start, end = NOW - 40 * 28_800_000, NOW

    async def go():
        async with rest(bybit) as r:
            return await r.funding_history("BTCUSDT", start, end, limit=15)

    rows = run(go())
    ts = [int(r["fundingRateTimestamp"]) for r in rows]
    assert ts == sorted(set(ts)) and len(ts) == 40
    assert len([1 for _, p, _ in bybit.requests if p.endswith("funding/history")]) == 3


def test_gateway_resync_by_rest_publishes_the_snapshot(bybit, bootstrap):
    from connectors.gateway import Gateway, GatewayConfig
    from tests.test_gateway import by_symbol, symbols
    from tests.test_gateway_support import read_back

    sym = symbols("BTC")[0]

    async def go():
        r = rest(bybit)
        gw = Gateway(GatewayConfig(symbols=[sym], ws_url="ws://127.0.0.1:9/none", resync="rest", control=False),
                     bootstrap, rest=r)
        outcome = await gw.resync(sym, "test")
        again = await gw.resync(sym, "test")  # within the minimum interval: coalesced
        await asyncio.to_thread(gw.publisher.flush, 10)
        await r.aclose()
        return outcome, again

    assert run(go()) == ("rest", "coalesced")
    [(topic, name, rec)] = by_symbol(read_back(bootstrap, {sym}, idle_s=1.0))[sym]
    assert name == "OrderBookSnapshot" and rec["gw_seq"] == 0 and rec["update_id"] == 230704


def test_backfill_cli_writes_csv_and_imports_into_the_lake(bybit, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tickcast.cli import app
    from tickcast.config import get_settings

    monkeypatch.setenv("TICKCAST_GATEWAY_LOCAL_URL", bybit.url)
    monkeypatch.setenv("TICKCAST_SOURCE", "local")
    monkeypatch.setenv("TICKCAST_LAKE_ROOT", str(tmp_path / "lake"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        start = time.strftime("%Y-%m-%dT%H:%M", time.gmtime((NOW - 300 * MINUTE) / 1000))
        end = time.strftime("%Y-%m-%dT%H:%M", time.gmtime((NOW - 60 * MINUTE) / 1000))
        res = CliRunner().invoke(app, ["backfill", "--symbols", "BTCUSDT,MATICUSDT", "--start", start, "--end", end,
                                       "--out", str(tmp_path / "csv")])
        assert res.exit_code == 0, res.output
        files = sorted((tmp_path / "csv").glob("*.csv"))
        assert [f.name.split("_")[0] for f in files] == ["BTCUSDT", "POLUSDT"]
        lines = files[0].read_text().splitlines()
        assert lines[0] == "startTime,open,high,low,close,volume,turnover" and len(lines) == 242
        res = CliRunner().invoke(app, ["backfill", "--symbols", "BTCUSDT", "--start", start, "--end", end])
        assert res.exit_code == 0, res.output
        again = CliRunner().invoke(app, ["backfill", "--symbols", "BTCUSDT", "--start", start, "--end", end])
        assert again.exit_code == 0, again.output
    finally:
        get_settings.cache_clear()
    from deltalake import DeltaTable

    table = DeltaTable(str(tmp_path / "lake" / "raw_kline")).to_pyarrow_table().to_pylist()
    assert len(table) == 241  # idempotent: the second import added nothing
    assert {r["venue"] for r in table} == {"sim.linear.rest"} and {r["gw_seq"] for r in table} == {-1}
