"""Every contract through the real embedded broker on every topic; idempotent topic creation."""
from __future__ import annotations

import subprocess
import sys
import time

from confluent_kafka import Consumer, Producer

from tests.avro_samples import sample
from tickcast.broker import EmbeddedBroker, free_port
from tickcast.kafka import assign_all, consumer_config, producer_config
from tickcast.serde import Serde
from tickcast.topics import BY_NAME, KEYED_PARTITIONS, RAW_TOPIC_OF, RAW_TOPICS, TOPICS, ensure_topics

SERDE = Serde()


def test_topics_exist_with_declared_partitions(bootstrap):
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    for spec in TOPICS:
        assert spec.name in md.topics, spec.name
        assert len(md.topics[spec.name].partitions) == spec.partitions


def test_topic_creation_is_idempotent(bootstrap):
    assert ensure_topics(bootstrap) == []
    assert ensure_topics(bootstrap) == []


def test_raw_topics_share_the_partition_count():
    assert {t.partitions for t in RAW_TOPICS} == {KEYED_PARTITIONS}
    assert set(RAW_TOPIC_OF) == {t.schemas[0] for t in RAW_TOPICS}
    assert all(t.archive_table and t.archive_table.startswith("raw_") for t in RAW_TOPICS)


def test_every_schema_through_the_broker_on_every_topic(bootstrap):
    import uuid

    key = f"SCHEMATEST{uuid.uuid4().hex[:8]}".encode()  # other tests share this broker's topics
    producer = Producer(producer_config(bootstrap))
    sent = {}
    for spec in TOPICS:
        for i, name in enumerate(spec.schemas):
            rec = sample(SERDE.schema(name).raw, i + 1)
            producer.produce(spec.name, key=key, value=SERDE.encode(name, rec))
            sent[(spec.name, name)] = rec
    assert producer.flush(10) == 0
    consumer = Consumer(consumer_config(bootstrap, "test-every-schema"))
    assign_all(consumer, [t.name for t in TOPICS])
    got = {}
    deadline = time.monotonic() + 20
    while len(got) < len(sent) and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is None or msg.error() or msg.key() != key:
            continue
        name, rec = SERDE.decode_any(msg.value())
        assert name in BY_NAME[msg.topic()].schemas
        got[(msg.topic(), name)] = rec
    consumer.close()
    assert got == sent


def test_one_symbol_lands_on_the_same_partition_of_every_raw_topic(bootstrap):
    producer = Producer(producer_config(bootstrap))
    parts = {}

    def on_delivery(err, msg):
        assert err is None
        parts[msg.topic()] = msg.partition()

    for spec in RAW_TOPICS:
        producer.produce(spec.name, key=b"ETHUSDT", value=b"x", on_delivery=on_delivery)
    producer.flush(10)
    assert len(parts) == len(RAW_TOPICS) and len(set(parts.values())) == 1


def test_broker_stops_cleanly_and_leaves_no_process():
    b = EmbeddedBroker(topics=None).start()
    pid = b.proc.pid
    b.stop()
    assert b.proc.poll() is not None
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_broker_dies_with_a_killed_parent():
    code = ("import time; from tickcast.broker import EmbeddedBroker; "
            "b = EmbeddedBroker(topics=None).start(); print(b.proc.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if subprocess.run(["kill", "-0", str(child_pid)], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the broker outlived its parent")


def test_port_in_use_is_a_clear_error():
    port = free_port()
    with EmbeddedBroker(port, topics=None):
        second = EmbeddedBroker(port, topics=None)
        try:
            second.start(timeout=5)
        except Exception as exc:
            assert "tansu" in str(exc)
        else:
            second.stop()
            raise AssertionError("a second broker on a busy port must fail")


def test_a_partition_with_thousands_of_batches_stays_readable():
    """tansu lists every stored batch of a partition on each fetch and answers empty when that
    outlasts the fetch's max wait: our consumer settings must keep long partitions readable."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from tickcast.topics import TopicSpec

    with EmbeddedBroker(topics=(TopicSpec("long", ("x",), partitions=1),)) as b:
        producer = Producer(producer_config(b.bootstrap, **{"linger.ms": 0}))
        for i in range(6000):  # one batch each
            producer.produce("long", value=b"%d" % i, partition=0)
            producer.flush(10)
        consumer = Consumer(consumer_config(b.bootstrap, "long-reader"))
        for start in (OFFSET_BEGINNING, 5990):
            consumer.assign([TopicPartition("long", 0, start)])
            got = None
            deadline = time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                for m in consumer.consume(10, 0.1):
                    if not m.error():
                        got = m.offset()
                        break
            assert got == (0 if start == OFFSET_BEGINNING else 5990)
        consumer.close()
