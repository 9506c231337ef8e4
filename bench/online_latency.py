"""Online feature latency and flow throughput (issue 4).

Latency: the local exchange's market model at 10x Bybit's real cadence for 4 symbols -> the gateway
-> the embedded broker -> the online feature flow (one process) -> a consumer of features.live. For
every feature record: arrival time at the consumer minus ``close_recv_ts``, the gateway's receive
time of the event that closed the window (both wall clock on this machine). Required p99 <= 20 ms.
The flow runs as deployed, with recovery snapshots every 5 s.

Throughput: the same flow, one process, started on a backlog of raw events already in the broker
(4 synthetic symbols); events/s from its first to its last published window.

    python bench/online_latency.py [--seconds 60] [--backlog-s 300]

Last lines: RESULT p50_ms=<x>, RESULT p99_ms=<x>, RESULT events_per_s=<n>.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SYMBOLS = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    from tickcast.broker import _die_with_parent

    return subprocess.Popen(args, env={**os.environ, **env}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(seconds: float, workdir: Path) -> tuple[list[float], dict, dict]:
    """(latencies ms, feature records by cadence, CPU % of a core per process while measuring)."""
    from confluent_kafka import Consumer

    from tickcast.broker import EmbeddedBroker, free_port
    from tickcast.kafka import assign_all, consume_ready, consumer_config
    from tickcast.serde import Serde
    from tickcast.topics import FEATURES_LIVE

    serde = Serde()
    port, metrics_port = free_port(), free_port()
    with EmbeddedBroker() as broker:
        env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "TICKCAST_SOURCE": "local",
               "TICKCAST_GATEWAY_LOCAL_URL": f"http://127.0.0.1:{port}", "TICKCAST_SYMBOLS": ",".join(SYMBOLS),
               "TICKCAST_GATEWAY_NEWS": "false", "TICKCAST_DATA_DIR": str(workdir)}
        procs = [
            _spawn([sys.executable, "-m", "tickcast.cli", "exchange", "--speed", "10", "--seed", "7",
                    "--port", str(port), "--http-port", str(free_port()), "--history-days", "0.1"],
                   env, workdir / "exchange.log"),
            # as deployed: recovery on, a snapshot of every symbol's engine every 5 s
            _spawn([sys.executable, "-m", "flows.online_features", "--bootstrap", broker.bootstrap,
                    "--recovery-dir", str(workdir / "recovery"), "--metrics-port", str(metrics_port)],
                   env, workdir / "flow.log"),
        ]
        time.sleep(2.0)
        procs.append(_spawn([sys.executable, "-m", "tickcast.cli", "gateway", "--metrics-port", "0"], env,
                            workdir / "gateway.log"))
        consumer = Consumer(consumer_config(broker.bootstrap, "bench-latency"))
        assign_all(consumer, [FEATURES_LIVE], from_beginning=False)
        lat: list[float] = []
        hop0 = hop = None
        to_emit: list[float] = []  # gateway receive -> the flow's sink (gateway, broker, source, engine)
        from_emit: list[float] = []  # the flow's sink -> this consumer (the output hop)
        per_cadence: dict[str, int] = {}
        cpu: dict[str, int] = {}
        warm_until = time.monotonic() + 15.0  # connections, snapshots, first windows
        end = warm_until + seconds
        cpu0 = None  # CPU seconds per process at the end of the warm-up: who uses the cores
        try:
            while time.monotonic() < end:
                if cpu0 is None and time.monotonic() >= warm_until:
                    cpu0 = {n: _cpu_s(pid) for n, pid in _pids(broker, procs).items()}, time.monotonic()
                    hop0 = _histogram(metrics_port, "tickcast_features_source_delay_seconds")
                for m in consume_ready(consumer, 500, 0.1):
                    if m.error():
                        continue
                    arrived = time.time_ns() // 1000
                    if time.monotonic() < warm_until:
                        continue
                    rec = serde.decode(m.value(), expect="FeatureVector")
                    lat.append((arrived - rec["close_recv_ts"]) / 1000.0)
                    to_emit.append((rec["emit_ts"] - rec["close_recv_ts"]) / 1000.0)
                    from_emit.append((arrived - rec["emit_ts"]) / 1000.0)
                    per_cadence[rec["cadence"]] = per_cadence.get(rec["cadence"], 0) + 1
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"{p.args[:4]} exited with {p.returncode}; see {workdir}")
            if cpu0 is not None:
                hop = _histogram(metrics_port, "tickcast_features_source_delay_seconds", hop0)
                wall = time.monotonic() - cpu0[1]
                cpu = {n: round(100 * (_cpu_s(pid) - cpu0[0][n]) / wall) for n, pid in _pids(broker, procs).items()}
        finally:
            consumer.close()
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    print(f"  receive -> flow sink ms: p50={_percentile(to_emit, .5):.2f} p99={_percentile(to_emit, .99):.2f}; "
          f"flow sink -> consumer ms: p50={_percentile(from_emit, .5):.2f} p99={_percentile(from_emit, .99):.2f}"
          if lat else "")
    if hop:  # how much of receive -> sink is the broker hop of the raw events (the rest: merge, engine)
        print(f"  receive -> read by the flow's source ms (per fetch, from the flow's histogram): "
              f"p50~{_bucket_quantile(hop, .5):.1f} p99~{_bucket_quantile(hop, .99):.1f}")
    return lat, per_cadence, cpu


def _histogram(port: int, name: str, minus: dict | None = None) -> dict | None:
    """Cumulative bucket counts {upper bound s: count} of a Prometheus histogram scraped from the
    flow's /metrics, less ``minus`` (an earlier scrape); None when it cannot be read."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                out[le] = out.get(le, 0) + s.value - ((minus or {}).get(le, 0))
    return out or None


def _bucket_quantile(buckets: dict, q: float) -> float:
    """Prometheus' histogram_quantile: linear within the bucket holding the q-th observation (ms)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank, lo, below = q * total, 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            if b == float("inf"):
                return lo * 1000
            return (lo + (b - lo) * (rank - below) / max(buckets[b] - below, 1e-9)) * 1000
        lo, below = b, buckets[b]
    return lo * 1000


def _pids(broker, procs) -> dict[str, int]:
    names = ["exchange", "flow", "gateway"]
    return {"broker": broker.proc.pid, **{names[i]: p.pid for i, p in enumerate(procs)}}


def throughput(backlog_s: float, workdir: Path) -> tuple[float, int]:
    from confluent_kafka import Consumer, Producer

    from tests.synth import SynthStream
    from tickcast.broker import EmbeddedBroker
    from tickcast.kafka import assign_all, consumer_config, producer_config
    from tickcast.serde import Serde
    from tickcast.topics import FEATURES_LIVE, RAW_TOPIC_OF

    serde = Serde()
    streams = {s: SynthStream(s, seed=i + 1).run(backlog_s) for i, s in enumerate(SYMBOLS)}
    n_events = sum(len(v) for v in streams.values())
    with EmbeddedBroker() as broker:
        producer = Producer(producer_config(broker.bootstrap, low_latency=False))
        for sym, evs in streams.items():
            for name, rec in evs:
                while True:
                    try:
                        producer.produce(RAW_TOPIC_OF[name], key=sym.encode(), value=serde.encode(name, rec))
                        break
                    except BufferError:
                        producer.poll(0.1)
        producer.flush(120)
        expected_last = max(r["exchange_ts"] for evs in streams.values() for _, r in evs)
        flow = _spawn([sys.executable, "-m", "flows.online_features", "--bootstrap", broker.bootstrap,
                       "--recovery-dir", ""], {}, workdir / "flow-throughput.log")
        consumer = Consumer(consumer_config(broker.bootstrap, "bench-throughput", low_latency=False))
        assign_all(consumer, [FEATURES_LIVE])
        first = last = None
        done: set[str] = set()
        deadline = time.monotonic() + 600
        try:
            while len(done) < len(SYMBOLS) and time.monotonic() < deadline:
                for m in consumer.consume(1000, 0.2):
                    if m.error():
                        continue
                    now = time.monotonic()
                    first = first or now
                    last = now
                    rec = serde.decode(m.value(), expect="FeatureVector")
                    if rec["cadence"] == "s1" and rec["window_end"] > expected_last - 2_000:
                        done.add(rec["symbol"])
        finally:
            consumer.close()
            flow.terminate()
            flow.wait(10)
    if len(done) < len(SYMBOLS):
        raise RuntimeError("the flow did not finish the backlog in time")
    return n_events / (last - first), n_events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="latency measurement time (wall)")
    p.add_argument("--backlog-s", type=float, default=300.0, help="exchange seconds of backlog per symbol")
    a = p.parse_args()
    from flows.engine import EngineConfig
    from flows.registry import load_registry

    hold_s = EngineConfig.from_registry(load_registry()).seq_hold_ms / 1000
    if a.backlog_s < 2 * hold_s:  # the first release waits for the gw_seq hold, which a backlog must outlast
        p.error(f"--backlog-s must be at least {2 * hold_s:.0f} (twice the registry's gw_seq hold of {hold_s:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="tickcast-bench-") as tmp:
        work = Path(tmp)
        lat, per_cadence, cpu = latency(a.seconds, work)
        if not lat:
            print((work / "gateway.log").read_text()[-2000:], (work / "flow.log").read_text()[-2000:])
            raise SystemExit("no feature records arrived")
        eps, n = throughput(a.backlog_s, work)
    print(f"latency: {len(lat)} feature records over {a.seconds:.0f} s, by cadence {per_cadence}")
    print(f"CPU % of one core while measuring: {cpu} (the embedded broker's fetch lists every stored batch of "
          "a partition, so its cost grows with the partition)")
    print(f"latency ms: p50={_percentile(lat, .5):.2f} p90={_percentile(lat, .9):.2f} "
          f"p99={_percentile(lat, .99):.2f} max={max(lat):.2f} (required p99 <= 20)")
    print(f"throughput: {n} raw events through one flow process")
    print(f"RESULT p50_ms={_percentile(lat, .5):.2f}")
    print(f"RESULT p99_ms={_percentile(lat, .99):.2f}")
    print(f"RESULT events_per_s={eps:.0f}")
    if "broker" in cpu:
        print(f"RESULT broker_cpu_pct={cpu['broker']}")


if __name__ == "__main__":
    main()
