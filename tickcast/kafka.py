"""Kafka client settings used by every component, so partitioning and latency are set in one place."""
from __future__ import annotations


def producer_config(bootstrap: str, *, low_latency: bool = True, **overrides) -> dict:
    """Idempotent, acks=all producer; murmur2 so a key maps to the same partition as Java clients."""
    conf = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "linger.ms": 1 if low_latency else 20,
        "compression.type": "none" if low_latency else "lz4",
        "message.timeout.ms": 300_000,
        "queue.buffering.max.messages": 1_000_000,
    }
    conf.update(overrides)
    return conf


def consumer_config(bootstrap: str, group: str, *, low_latency: bool = True, **overrides) -> dict:
    """Consumers of our own topics ``assign()`` partitions (a group join on tansu takes ~20 s)."""
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # librdkafka waits up to 500 ms for data by default: far too long on a latency path. Not
        # lower than 5 ms: the embedded tansu broker lists every stored batch of a partition on each
        # fetch and answers *empty* when that takes longer than the fetch's max wait, so with 1 ms a
        # partition stops being readable after a few thousand batches (measured: 5 ms keeps 100k+
        # batches readable at ~3 ms p50 / ~8 ms p99 per hop)
        "fetch.wait.max.ms": 5 if low_latency else 100,
        "fetch.min.bytes": 1,
        "enable.partition.eof": False,
    }
    conf.update(overrides)
    return conf


def assign_all(consumer, topics: list[str], *, from_beginning: bool = True, timeout: float = 10.0) -> None:
    """Assign every partition of ``topics`` to ``consumer`` (no group coordination)."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

    md = consumer.list_topics(timeout=timeout)
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    parts = []
    for t in topics:
        if t not in md.topics or md.topics[t].error is not None:
            raise RuntimeError(f"topic {t} does not exist on the broker (run `tickcast topics`)")
        parts += [TopicPartition(t, p, start) for p in md.topics[t].partitions]
    consumer.assign(parts)
