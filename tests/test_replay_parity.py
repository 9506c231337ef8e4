"""End to end: raw events on a real broker -> the online flow (subprocess, as users run it) publishes
features.live, the archive writes the Delta bronze tables; then `tickcast parity` replays the archive
through the same dataflow and every (symbol, cadence, window_end, feature) is bit-identical to what
was published, with a gw_seq gap and a book resync (reconnect) in the stream."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, Producer

from flows.archive import ArchiveConfig, run_archive
from flows.engine import new_engine
from flows.lake import Lake
from flows.parity import parity
from tests.synth import T0, SynthStream
from tickcast.broker import EmbeddedBroker
from tickcast.kafka import assign_all, consumer_config, producer_config
from tickcast.serde import Serde
from tickcast.topics import FEATURES_LIVE, RAW_TOPIC_OF

pytestmark = pytest.mark.slow
SERDE = Serde()


def stream(symbol: str, seed: int) -> list:
    """90 s of events with a reconnect (fresh snapshot) at 40 s and 25 events lost at ~60 s."""
    s = SynthStream(symbol, seed=seed)
    s.run(40)
    s.snapshot()
    events = s.run(50)
    gap_at = next(i for i, (_, r) in enumerate(events) if r["exchange_ts"] >= T0 + 60_000)
    return events[:gap_at] + events[gap_at + 25:]


def test_online_features_equal_the_replay_of_the_archive(tmp_path):
    per = {"BTCUSDT": stream("BTCUSDT", 31), "ETHUSDT": stream("ETHUSDT", 32)}
    arrival = sorted(((r["exchange_ts"], sym, i, n, r) for sym, ev in per.items() for i, (n, r) in enumerate(ev)),
                     key=lambda x: x[:3])
    lo, hi = T0, T0 + 85_000
    expected = set()
    for sym, ev in per.items():
        for kind, rec in new_engine(sym).process(ev):
            if kind == "features" and lo < rec["window_end"] <= hi:
                expected.add((sym, rec["cadence"], rec["window_end"]))
    with EmbeddedBroker() as broker, open(tmp_path / "online.log", "wb") as log:
        bootstrap = broker.bootstrap
        p = Producer(producer_config(bootstrap))
        for _, sym, _, name, rec in arrival:
            p.produce(RAW_TOPIC_OF[name], key=sym.encode(), value=SERDE.encode(name, rec))
        assert p.flush(30) == 0
        online = subprocess.Popen([sys.executable, "-m", "flows.online_features", "--bootstrap", bootstrap,
                                   "--recovery-dir", ""], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            lake = Lake(str(tmp_path / "lake"))
            run_archive(ArchiveConfig(bootstrap=bootstrap, lake=lake, stop_at_end=True, batch_seconds=0.5))
            c = Consumer(consumer_config(bootstrap, "test-parity-wait"))
            assign_all(c, [FEATURES_LIVE])
            seen, deadline = set(), time.monotonic() + 240
            while not expected <= seen and time.monotonic() < deadline and online.poll() is None:
                for m in c.consume(5000, 0.5):
                    if m.error() is None:
                        r = SERDE.decode(m.value(), "FeatureVector")
                        seen.add((r["symbol"], r["cadence"], r["window_end"]))
            c.close()
            assert expected <= seen, (online.poll(), (tmp_path / "online.log").read_text()[-3000:])
        finally:
            online.terminate()
            online.wait(30)
        report = parity(bootstrap, lake, lo, hi, ["BTCUSDT", "ETHUSDT"], work_dir=tmp_path)
        print(report.text())
        assert report.ok, report.text()
        assert report.windows_compared == len(expected) and report.only_online == 0 and report.only_offline == 0
        assert report.values_compared > 5_000 and report.value_mismatches == 0
        assert set(report.by_cadence) == {"s1", "s3", "s15", "m1"}
        # the same through the CLI, as an operator runs it
        env = {**os.environ, "TICKCAST_LAKE_ROOT": str(tmp_path / "lake"), "KAFKA_BOOTSTRAP": bootstrap,
               "TICKCAST_LOG_LEVEL": "WARNING"}
        r = subprocess.run([sys.executable, "-m", "tickcast.cli", "parity", "--from", str(lo), "--to", str(hi),
                            "--symbols", "BTCUSDT,ETHUSDT", "--json", str(tmp_path / "parity.json")],
                           capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "PARITY OK" in r.stdout
        assert json.loads((tmp_path / "parity.json").read_text())["values_compared"] == report.values_compared
