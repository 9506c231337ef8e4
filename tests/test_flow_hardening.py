"""The online flow's Kafka source and sink, each test a bug found in a review: a valid record of
another contract on a raw topic, records still queued when an epoch commits, a widened fetch wait
that never narrows while a partition sits at a logical offset, a --from-end restart skipping a quiet
topic, a registry whose engine: block would crash every step."""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition

from flows.kafka_io import KafkaRecordSink, _RawPartition, dead_letter
from tickcast.broker import EmbeddedBroker
from tickcast.kafka import AdaptiveConsumer, consumer_config, producer_config
from tickcast.serde import Serde
from tickcast.topics import DEAD_LETTER, TopicSpec

NOW_US = 1_800_000_000_000_000


class _JsonSerde:
    def decode_any(self, raw: bytes):
        rec = json.loads(raw)
        return rec.pop("_name"), rec


def _rec(name: str, ts: int, seq: int) -> dict:
    return {"_name": name, "symbol": "BTCUSDT", "exchange_ts": ts, "gw_seq": seq,
            "recv_ts": time.time_ns() // 1000}


class _Msg:
    def __init__(self, topic, offset, value, key=b"BTCUSDT"):
        self._t, self._o, self._v, self._k = topic, offset, value, key

    def topic(self):
        return self._t

    def partition(self):
        return 0

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return self._k

    def error(self):
        return None


class _FakeConsumer:
    def __init__(self, script):
        self.script = list(script)

    def consume(self, n, timeout):
        return self.script.pop(0) if self.script else []

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return 0, 1

    def pause(self, tps):
        pass

    def resume(self, tps):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def small_broker():
    """Two one-partition topics on a private broker (these tests need a known, empty start)."""
    with EmbeddedBroker(topics=(TopicSpec("audit.a", (), 1), TopicSpec("audit.b", (), 1),
                                TopicSpec("audit.c", (), 1), TopicSpec("audit.d", (), 1))) as b:
        yield b


# --- 1. a well-formed record of a non-raw schema on a raw topic crashes the source ------------------
def test_a_wellformed_non_raw_record_on_a_raw_topic_is_a_dead_letter_not_a_crash():
    serde = Serde()
    topic = "market.trades"
    bad = serde.encode("ControlCommand", {"command": "resync", "symbol": "BTCUSDT", "reason": "x",
                                          "requester": "someone", "requested_ts": 1})
    part = _RawPartition("127.0.0.1:1", (topic,), 0, None, 100, serde, False, 1_000, 50_000, 1_000)
    part.consumer.close()
    part.consumer = _FakeConsumer([[_Msg(topic, 0, bad)]])
    out = part.next_batch()  # KeyError: 'exchange_ts' on the code as audited
    assert [k for k, _ in out] == ["__deadletter__"]
    assert part.snapshot() == {topic: 1}


# --- 2. the sink returns from write_batch (so Bytewax may commit the epoch) before delivery -------
def test_the_feature_sink_has_delivered_an_epochs_records_when_write_batch_returns(bootstrap):
    part = KafkaRecordSink(bootstrap, DEAD_LETTER, "DeadLetter").build("out", 0, 1)
    try:
        part.write_batch([("__deadletter__", dead_letter("audit", "t", "k", "r", b"x"))])
        # Bytewax snapshots the epoch once write_batch returned: anything still queued in librdkafka
        # is lost by a kill -9 after that snapshot and never re-emitted after the resume
        assert len(part.producer) == 0, f"{len(part.producer)} record(s) still queued/in flight"
    finally:
        part.close()


# --- 3. AdaptiveConsumer.lag() is None while a partition sits at a logical start offset ------------
def test_a_widened_consumer_narrows_back_when_another_assigned_partition_is_empty(small_broker):
    p = Producer(producer_config(small_broker.bootstrap))
    for i in range(5):
        p.produce("audit.a", str(i).encode())
    p.flush(10)
    ac = AdaptiveConsumer(consumer_config(small_broker.bootstrap, "audit-lag"), relax_s=0.3)
    try:
        ac.assign([TopicPartition("audit.a", 0, OFFSET_BEGINNING), TopicPartition("audit.b", 0, OFFSET_BEGINNING)])
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(got) < 5:
            got += [m for m in ac.consume(100, 0.1) if m.error() is None]
        assert len(got) == 5
        ac._rebuild(64, "audit: as after a transient starvation")
        deadline = time.monotonic() + 8
        i = 5
        while time.monotonic() < deadline and ac.wait_ms != ac.base_wait:
            p.produce("audit.a", str(i).encode())
            p.flush(10)
            i += 1
            for _ in range(5):
                ac.consume(100, 0.05)
        # every partition is read to its high watermark ("audit.b" is empty), yet lag() is None
        assert ac.wait_ms == ac.base_wait, f"never narrowed back: wait {ac.wait_ms} ms, lag() = {ac.lag()}"
    finally:
        ac.close()


# --- 4. from_end: a topic with nothing handed over is not in the resume state -----------------------
def test_from_end_restart_with_recovery_state_does_not_skip_messages_of_a_quiet_topic(small_broker):
    bs = small_broker.bootstrap
    topics = ("audit.c", "audit.d")
    p = Producer(producer_config(bs))

    def drain(part, seconds, until):
        got = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(got) < until:
            got += [rec["gw_seq"] for _, items in part.next_batch() for _, rec in items]
            time.sleep(0.02)
        return got

    part = _RawPartition(bs, topics, 0, None, 100, _JsonSerde(), True, 1_000, 50_000, 10_000)
    drain(part, 2.0, 1)  # assigned at the end of both topics (nothing there yet)
    p.produce("audit.c", json.dumps(_rec("Trade", 1_000, 1)).encode(), key=b"BTCUSDT")
    p.flush(10)
    assert drain(part, 8.0, 1) == [1]
    snap = part.snapshot()  # the epoch's snapshot: "audit.d" had nothing handed over
    part.close()  # crash
    # while the flow is down, the quiet topic gets a message
    p.produce("audit.d", json.dumps(_rec("Funding", 1_500, 2)).encode(), key=b"BTCUSDT")
    p.flush(10)
    part = _RawPartition(bs, topics, 0, snap, 100, _JsonSerde(), True, 1_000, 50_000, 10_000)
    try:
        got = drain(part, 6.0, 1)
    finally:
        part.close()
    assert got == [2], f"resume state {snap}: the message produced during the downtime was skipped"


# --- 5. a registry reload with a bad engine block crashes the flow --------------------------------
def test_a_registry_with_a_bad_engine_setting_is_rejected_not_a_crash(tmp_path):
    from flows.dataflow import _engine_step
    from flows.registry import DEFAULT_PATH
    from tests.synth import SynthStream

    reg = tmp_path / "features.yaml"
    shutil.copy(DEFAULT_PATH, reg)
    step = _engine_step(str(reg), "audit")
    events = SynthStream("BTCUSDT", seed=3).run(4)
    engine, _ = step(None, events[: len(events) // 2])
    text = reg.read_text().replace("seq_hold_ms:", "seq_hold_mss:", 1)  # a typo in the engine block
    assert text != reg.read_text()
    reg.write_text(text)
    os.utime(reg, (time.time() + 5, time.time() + 5))
    time.sleep(2.2)  # the watcher re-reads at most every 2 s
    # "a registry that fails to load is logged and ignored: the running one stays"
    engine, _ = step(engine, events[len(events) // 2:])  # ValueError: unknown engine settings
    assert engine.cfg.seq_hold_ms == 20_000
