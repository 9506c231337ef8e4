"""Every Kafka topic tickcast uses, declared once, and an idempotent way to create them.

Keyed topics share one partition count so that a symbol lands on the same partition index in
every raw topic (same key, same murmur2 partitioner, same count): one consumer of partition p of
each raw topic sees all channels of its symbols. The processing order per symbol across topics is
fixed by the gateway's ``gw_seq`` (see ``schemas/avro``), not by how topics interleave.
"""
from __future__ import annotations

from dataclasses import dataclass

KEYED_PARTITIONS = 6


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schemas: tuple[str, ...]  # Avro record names that may appear on the topic
    partitions: int = KEYED_PARTITIONS
    raw: bool = False  # a raw market-data topic: archived to bronze and replayed offline
    archive_table: str | None = None  # bronze Delta table name
    retention_ms: int | None = None
    doc: str = ""


ORDERBOOK_SNAPSHOT = "market.orderbook.snapshot"
ORDERBOOK_DELTA = "market.orderbook.delta"
TRADES = "market.trades"
KLINE_1M = "market.kline.1m"
TICKER = "market.ticker"
FUNDING = "market.funding"
MEMPOOL = "market.mempool"
NEWS = "market.news"
HEARTBEAT = "market.heartbeat"
EXECUTIONS = "trading.executions"
FEATURES_LIVE = "features.live"
DATASET_READY = "features.dataset.ready"
SIGNALS_LIVE = "signals.live"
DEAD_LETTER = "tickcast.deadletter"
CONTROL = "tickcast.control"

_DAY_MS = 24 * 3600 * 1000

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(ORDERBOOK_SNAPSHOT, ("OrderBookSnapshot",), raw=True, archive_table="raw_orderbook_snapshots"),
    TopicSpec(ORDERBOOK_DELTA, ("OrderBookDelta",), raw=True, archive_table="raw_orderbook_deltas"),
    TopicSpec(TRADES, ("Trade",), raw=True, archive_table="raw_trades"),
    TopicSpec(KLINE_1M, ("Kline",), raw=True, archive_table="raw_kline"),
    TopicSpec(TICKER, ("Ticker",), raw=True, archive_table="raw_ticker"),
    TopicSpec(FUNDING, ("Funding",), raw=True, archive_table="raw_funding"),
    TopicSpec(MEMPOOL, ("MempoolStats",), raw=True, archive_table="raw_mempool"),
    TopicSpec(NEWS, ("NewsItem",), raw=True, archive_table="raw_news"),
    TopicSpec(HEARTBEAT, ("Heartbeat",), raw=True, archive_table="raw_heartbeats",
              doc="event-time progress of quiet symbols"),
    TopicSpec(EXECUTIONS, ("Execution",), raw=True, archive_table="raw_executions", doc="optional input"),
    TopicSpec(FEATURES_LIVE, ("FeatureVector",), retention_ms=7 * _DAY_MS),
    TopicSpec(DATASET_READY, ("DatasetReady",), partitions=1),
    TopicSpec(SIGNALS_LIVE, ("Forecast", "Signal", "Alert"), retention_ms=7 * _DAY_MS),
    TopicSpec(DEAD_LETTER, ("DeadLetter",), partitions=1, archive_table="raw_dead_letters"),
    TopicSpec(CONTROL, ("ControlCommand",), partitions=1, retention_ms=_DAY_MS,
              doc="resync requests from the feature flow to the gateway"),
)

BY_NAME: dict[str, TopicSpec] = {t.name: t for t in TOPICS}
RAW_TOPICS: tuple[TopicSpec, ...] = tuple(t for t in TOPICS if t.raw)
# The raw topics the feature flow consumes (executions are archived only).
FEATURE_INPUT_TOPICS: tuple[str, ...] = tuple(t.name for t in RAW_TOPICS if t.name != EXECUTIONS)
# Record name -> the raw topic it is published on (a raw record type lives on exactly one topic).
RAW_TOPIC_OF: dict[str, str] = {t.schemas[0]: t.name for t in RAW_TOPICS}


def ensure_topics(bootstrap: str, specs: tuple[TopicSpec, ...] = TOPICS, *, replication: int = 1,
                  timeout: float = 30.0) -> list[str]:
    """Create the missing topics; existing ones are left alone. Returns the names created."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    todo = [s for s in specs if s.name not in existing]
    if not todo:
        return []
    new = []
    for s in todo:
        config = {"retention.ms": str(s.retention_ms)} if s.retention_ms else {}
        new.append(NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication, config=config))
    created = []
    for name, fut in admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            # another process created it between our listing and our request: that is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc).lower():
                raise
    return created
