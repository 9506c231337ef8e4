"""``tickcast gateway`` as a process, configured only through the environment, against the local
exchange (TICKCAST_SOURCE=local) and a broker of its own: symbols resolved through instruments-info
(MATICUSDT -> POLUSDT), gw_seq restored, market data and the local mempool feed published under
the simulated venues, Prometheus metrics served, a clean stop on SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from connectors.exchange import ModelDriver, ThreadedExchange
from connectors.exchange.instruments import InstrumentBook
from tests.test_gateway import by_symbol, check_dense
from tests.test_gateway_support import read_back
from tickcast.broker import EmbeddedBroker, free_port


def _metrics(port: int) -> dict[str, float]:
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in body.splitlines() if ln and not ln.startswith("#")}


@pytest.mark.slow
def test_tickcast_gateway_process_against_the_local_exchange(tmp_path):
    drv = ModelDriver(["BTCUSDT", "POLUSDT"], seed=21, speed=1.0, start_ms=1_786_310_760_000, history_days=0.01)
    with EmbeddedBroker() as broker, ThreadedExchange(drv, instruments=InstrumentBook.generated(),
                                                      mempool_speed=20.0) as ex:
        port = free_port()
        env = {**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap, "TICKCAST_SOURCE": "local",
               "TICKCAST_GATEWAY_LOCAL_URL": ex.base_url, "TICKCAST_SYMBOLS": "BTCUSDT,MATICUSDT",
               "TICKCAST_DATA_DIR": str(tmp_path), "TICKCAST_GATEWAY_HEARTBEAT_MS": "100"}
        log = tmp_path / "gateway.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "tickcast.cli", "gateway", "--metrics-port", str(port),
                                     "--no-news"], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while True:
                m = _metrics(port)
                if m.get('tickcast_gateway_events_total{topic="market.mempool"}', 0) >= 2 and \
                        m.get("tickcast_gateway_delivered_total", 0) >= 200:
                    break
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            assert m['tickcast_gateway_connected{conn="ws0"}'] == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "MATICUSDT no longer trades on Bybit: it was replaced by POLUSDT" in text
        assert '"msg":"gateway stopped"' in text and '"undelivered":0' in text
        records = read_back(broker.bootstrap, {"BTCUSDT", "POLUSDT"}, idle_s=1.0)
    got = by_symbol(records)
    check_dense(got)
    assert {r["venue"] for _, n, r in got["POLUSDT"]} == {"sim.linear"}
    btc = {n: r for _, n, r in got["BTCUSDT"]}
    assert {"OrderBookSnapshot", "OrderBookDelta", "Ticker", "Heartbeat", "MempoolStats"} <= set(btc)
    assert btc["MempoolStats"]["venue"] == "sim.mempool" and btc["MempoolStats"]["chain"] == "BTC"


def test_auto_source_falls_back_to_the_local_exchange_when_bybit_is_unreachable():
    from connectors.gateway import choose_source
    from tickcast.config import load_settings

    dead = free_port()
    s = load_settings(source="auto", bybit_ws_url=f"ws://127.0.0.1:{dead}/v5/public",
                      gateway_local_url="http://127.0.0.1:8765")
    src = asyncio.run(choose_source(s, probe_timeout=1.0))
    assert (src.kind, src.venue, src.mempool_venue) == ("local", "sim.linear", "sim.mempool")
    assert src.ws_url == "ws://127.0.0.1:8765/v5/public/linear"
    assert src.mempool_urls == {"BTC": "http://127.0.0.1:8765", "LTC": "http://127.0.0.1:8765/ltc"}
    s = load_settings(source="bybit")
    src = asyncio.run(choose_source(s))
    assert (src.kind, src.venue, src.ws_url) == ("bybit", "bybit.linear", "wss://stream.bybit.com/v5/public/linear")
    assert src.mempool_urls == {"BTC": "https://mempool.space", "LTC": "https://litecoinspace.org"}


def test_cli_module_imports_only_typer_and_the_standard_library():
    code = ("import sys; import connectors.cli; "
            "heavy = [m for m in ('confluent_kafka', 'websockets', 'httpx', 'fastavro', 'orjson', 'prometheus_client') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
