"""The online flow as users run it: raw topics on a real broker -> `python -m flows.online_features`
(subprocess) -> features.live. Its records equal the engine's, bit for bit; undecodable bytes become
dead letters; a flow killed with SIGKILL mid-stream and restarted with recovery produces no gap and
no differing window (re-emitted windows carry identical values)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, Producer

from flows.engine import new_engine
from tests.synth import SynthStream
from tickcast.broker import EmbeddedBroker
from tickcast.kafka import assign_all, consumer_config, producer_config
from tickcast.serde import Serde
from tickcast.topics import CONTROL, DEAD_LETTER, FEATURES_LIVE, RAW_TOPIC_OF

pytestmark = pytest.mark.slow
SERDE = Serde()
SYMBOLS = {"BTCUSDT": 21, "ETHUSDT": 22, "SOLUSDT": 23}


def merged_events(seconds: float):
    per = {sym: SynthStream(sym, seed=seed).run(seconds) for sym, seed in SYMBOLS.items()}
    allev = [(rec["exchange_ts"], sym, i, name, rec) for sym, evs in per.items() for i, (name, rec) in enumerate(evs)]
    allev.sort(key=lambda x: (x[0], x[1], x[2]))  # arrival order at the gateway
    return per, [(sym, name, rec) for _, sym, _, name, rec in allev]


def reference(per):
    ref = {}
    for sym, evs in per.items():
        for kind, rec in new_engine(sym).process(evs):
            if kind == "features":
                ref[(rec["symbol"], rec["cadence"], rec["window_end"])] = (rec["values"], rec["nulls"])
    return ref


def produce(producer, events):
    for sym, name, rec in events:
        producer.produce(RAW_TOPIC_OF[name], key=sym.encode(), value=SERDE.encode(name, rec))
    producer.flush(30)


def start_flow(bootstrap, recovery_dir, log):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flows.online_features", "--bootstrap", bootstrap,
                             "--recovery-dir", str(recovery_dir), "--snapshot-s", "0.2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


class Collector:
    def __init__(self, bootstrap):
        self.c = Consumer(consumer_config(bootstrap, "test-collector"))
        assign_all(self.c, [FEATURES_LIVE, DEAD_LETTER, CONTROL])
        self.features: dict = {}
        self.copies = 0
        self.differing: list = []
        self.dead: list = []
        self.control: list = []

    def poll(self, seconds: float, until=lambda: False):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not until():
            for m in self.c.consume(500, 0.2):
                if m.error():
                    continue
                name, rec = SERDE.decode_any(m.value())
                if name == "DeadLetter":
                    self.dead.append(rec)
                elif name == "ControlCommand":
                    self.control.append(rec)
                else:
                    key = (rec["symbol"], rec["cadence"], rec["window_end"])
                    val = (rec["values"], rec["nulls"])
                    if key in self.features:
                        self.copies += 1
                        if self.features[key] != val:
                            self.differing.append(key)
                    self.features[key] = val


def test_online_flow_equals_engine_and_survives_kill_and_restart(tmp_path):
    per, events = merged_events(75)
    ref = reference(per)
    n = len(events)
    with EmbeddedBroker() as broker, open(tmp_path / "flow.log", "ab") as log:
        producer = Producer(producer_config(broker.bootstrap))
        collector = Collector(broker.bootstrap)
        produce(producer, events[: n // 3])
        producer.produce("market.trades", key=b"BTCUSDT", value=b"\x00garbage")  # undecodable
        producer.flush(10)
        flow = start_flow(broker.bootstrap, tmp_path / "recovery", log)
        try:
            collector.poll(60, until=lambda: len(collector.features) > len(ref) // 5)
            assert len(collector.features) > len(ref) // 5, (tmp_path / "flow.log").read_text()[-3000:]
            produce(producer, events[n // 3: 2 * n // 3])
            time.sleep(0.5)
            flow.send_signal(signal.SIGKILL)
            flow.wait(10)
            produce(producer, events[2 * n // 3:])
            flow = start_flow(broker.bootstrap, tmp_path / "recovery", log)
            collector.poll(90, until=lambda: set(ref) <= set(collector.features))
        finally:
            flow.kill()
            flow.wait(10)
            collector.c.close()
    missing = set(ref) - set(collector.features)
    assert not missing, f"{len(missing)} windows never published, e.g. {sorted(missing)[:3]}"
    assert not collector.differing, f"re-emitted windows differ: {collector.differing[:3]}"
    mismatched = [k for k in ref if collector.features[k] != ref[k]]
    print(f"windows compared: {len(ref)}, re-emitted after restart: {collector.copies}, mismatches: {len(mismatched)}")
    assert not mismatched
    assert len(collector.dead) == 1 and collector.dead[0]["error_kind"] == "unknown_schema"
    assert collector.dead[0]["topic"] == "market.trades"


def _two_free_ports() -> int:
    """A port p with p + 1 also free (process i serves its metrics on p + i)."""
    import socket

    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
            return p
    raise RuntimeError("no two consecutive free ports")


def test_two_process_cluster_partitions_by_symbol_and_equals_the_engine(tmp_path):
    from tickcast.broker import free_port

    per, events = merged_events(20)
    ref = reference(per)
    import urllib.request

    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    metrics_port = _two_free_ports()
    with EmbeddedBroker() as broker, open(tmp_path / "flow.log", "ab") as log:
        producer = Producer(producer_config(broker.bootstrap))
        produce(producer, events)
        procs = [subprocess.Popen([sys.executable, "-m", "flows.online_features", "--bootstrap", broker.bootstrap,
                                   "--recovery-dir", "", "-i", str(i), "-a", addresses,
                                   "--metrics-port", str(metrics_port)],
                                  stdout=log, stderr=subprocess.STDOUT) for i in range(2)]
        collector = Collector(broker.bootstrap)
        try:
            collector.poll(60, until=lambda: set(ref) <= set(collector.features))
            # each process serves Prometheus metrics on metrics_port + its index; together they
            # counted every vector (the engines are spread over the processes by symbol)
            vectors = 0.0
            for i in range(2):
                text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + i}/metrics", timeout=5).read().decode()
                vectors += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                               if line.startswith("tickcast_features_vectors_total{"))
                assert "tickcast_features_latency_seconds_bucket" in text and "bytewax_" in text
            assert vectors >= len(ref)
        finally:
            for p in procs:
                p.kill()
                p.wait(10)
            collector.c.close()
    assert set(ref) <= set(collector.features), (tmp_path / "flow.log").read_text()[-3000:]
    assert all(collector.features[k] == ref[k] for k in ref) and not collector.differing
