"""Gateway throughput: messages/s from the local exchange at full speed through the gateway into the
embedded broker, with the gateway on one core, and the ratio to a bare ``json.loads`` of the same
messages on that core (issue 3; required: >= 20,000 messages/s).

Messages: a recording of the local exchange's seeded market model (4 MVP symbols, depth-50 books,
trades, tickers, 1-minute klines, exactly what a subscriber receives; ``--seconds`` of exchange
time), written by ``connectors.exchange.recording``. Pipeline: ``tickcast exchange --replay ... --speed 0``
(the local exchange's replay driver, sending as fast as it can) in its own process -> WebSocket on
127.0.0.1 -> the gateway (this process: parse, validate, gw_seq, Avro, produce, heartbeats;
librdkafka's threads included) -> tansu. The gateway process is pinned to one core; the exchange
and the broker to the others. ``--direct`` feeds the same messages straight into
``Gateway.on_message`` instead (no socket), to see the WebSocket's share.

Two figures, both printed: the wall-clock rate (first message received -> broker acknowledgement
of the last event), and the rate per CPU-second of the pinned gateway process (messages divided
by the CPU time of all its threads over the same interval), which is what one dedicated core
sustains. This machine's two cores are shared with other work, so the wall-clock rate depends on
how much of its core the gateway got; the RESULT lines report the per-CPU-second rate, and the
``json.loads`` reference is measured the same way (CPU time, same core), so the ratio compares like
with like. The load average during the run is printed next to them.

    python bench/gateway_throughput.py [--seconds 180] [--direct]

Last lines: ``RESULT msgs_per_s=<n>`` and ``RESULT ratio_to_json=<r>``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SYMBOLS = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]
TOPICS = ["orderbook.50", "publicTrade", "tickers", "kline.1"]


def cores() -> tuple[set[int], set[int]]:
    """(the gateway's core, the others' cores)."""
    avail = sorted(os.sched_getaffinity(0))
    if len(avail) == 1:
        return set(avail), set(avail)
    return {avail[0]}, set(avail[1:])


def record(path: Path, seconds: float) -> list[str]:
    from connectors.exchange.recording import record_model

    record_model(path, SYMBOLS, seed=7, start_ms=1_786_310_760_000, seconds=seconds, prefixes=TOPICS)
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def json_rate(texts: list[str], rounds: int = 3) -> float:
    """json.loads of every message, per CPU-second (best of ``rounds``)."""
    best = float("inf")
    loads = json.loads
    for _ in range(rounds):
        t0 = time.process_time()
        for t in texts:
            loads(t)
        best = min(best, time.process_time() - t0)
    return len(texts) / best


async def through_exchange(path: Path, n_data: int, bootstrap: str, other: set[int]) -> tuple[float, dict]:
    from connectors.gateway import Gateway, GatewayConfig
    from tickcast.broker import _die_with_parent, free_port

    port = free_port()
    env = {**os.environ, "TICKCAST_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "tickcast.cli", "exchange", "--replay", str(path), "--speed", "0",
                             "--port", str(port), "--http-port", str(free_port()), "--no-mempool",
                             "--sent-log-max", "10", "--idle-timeout", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    try:
        os.sched_setaffinity(proc.pid, other)
        from connectors.bybit.ws import reachable

        url = f"ws://127.0.0.1:{port}/v5/public/linear"
        deadline = time.monotonic() + 60
        while not await reachable(url, 1.0):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the local exchange did not start")
            await asyncio.sleep(0.2)
        gw = Gateway(GatewayConfig(symbols=SYMBOLS, ws_url=url, venue="sim.linear", control=False), bootstrap)
        first: list[float] = []
        inner = gw.on_message

        def on_message(raw, recv_ts, conn=None):
            if not first:
                first.append(time.perf_counter())
                first.append(time.process_time())
            inner(raw, recv_ts, conn)

        for c in gw.connections:
            c.on_message = on_message
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        while sum(gw.received.values()) < n_data:
            await asyncio.sleep(0.01)
            if task.done():
                task.result()
        while gw.publisher.buffered:
            gw.publisher.poll(0.005)
            await asyncio.sleep(0)
        elapsed = time.perf_counter() - first[0]
        cpu = time.process_time() - first[1]
        counts = {**gw.counts(), "cpu_s": round(cpu, 3), "wall_s": round(elapsed, 3)}
        stop.set()
        await task
        return n_data / elapsed, counts
    finally:
        proc.terminate()
        proc.wait(10)


def direct(texts: list[str], bootstrap: str) -> tuple[float, dict]:
    from connectors.gateway import Gateway, GatewayConfig

    gw = Gateway(GatewayConfig(symbols=SYMBOLS, ws_url="ws://127.0.0.1:9/unused", venue="sim.linear",
                               control=False), bootstrap)
    t0, c0 = time.perf_counter(), time.process_time()
    recv_ts = time.time_ns() // 1000
    for i, t in enumerate(texts):
        gw.on_message(t, recv_ts + i)
        if i % 100 == 0:
            gw.publisher.poll(0)
    gw.publisher.flush(60)
    elapsed = time.perf_counter() - t0
    return len(texts) / elapsed, {**gw.counts(), "cpu_s": round(time.process_time() - c0, 3),
                                  "wall_s": round(elapsed, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0, help="exchange time of the model recording")
    ap.add_argument("--direct", action="store_true", help="feed Gateway.on_message directly (no WebSocket)")
    args = ap.parse_args()

    mine, other = cores()
    os.sched_setaffinity(0, mine)  # before any thread exists: librdkafka's threads inherit it
    from tickcast.broker import EmbeddedBroker

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.jsonl"
        t0 = time.perf_counter()
        texts = record(path, args.seconds)
        data = [t for t in texts if '"topic"' in t]
        print(f"recording: {len(data)} data messages, {args.seconds:.0f} s of the model "
              f"({time.perf_counter() - t0:.1f} s to write)", flush=True)
        jr = json_rate(data)
        print(f"json.loads: {jr:,.0f} messages per CPU-second on core {sorted(mine)}", flush=True)
        with EmbeddedBroker() as broker:
            os.sched_setaffinity(broker.proc.pid, other)
            if args.direct:
                rate, counts = direct(data, broker.bootstrap)
                how = "direct feed into Gateway.on_message (no WebSocket)"
            else:
                rate, counts = asyncio.run(through_exchange(path, len(data), broker.bootstrap, other))
                how = "local exchange replay driver at full speed over WebSocket"
    print(f"mode: {how}; gateway on core {sorted(mine)}, exchange and broker on {sorted(other)}")
    print(f"gateway counts: {counts}")
    per_cpu = len(data) / max(counts["cpu_s"], 1e-9)
    print(f"gateway: {len(data)} messages -> {counts['accepted']} events, {counts['dead_letters']} dead letters")
    print(f"wall clock: {rate:,.0f} messages/s ({counts['wall_s']} s); the gateway process used "
          f"{counts['cpu_s']} s of CPU: {per_cpu:,.0f} messages per CPU-second")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(on a shared machine the wall-clock rate is what the gateway's share of its core gave)")
    print(f"RESULT msgs_per_s={per_cpu:.0f}")
    print(f"RESULT ratio_to_json={per_cpu / jr:.4f}")


if __name__ == "__main__":
    main()
