"""The bronze archive: a Bytewax dataflow from every raw Kafka topic into the Delta bronze tables.

    kafka (assign, resume offsets from the tables) -> decode -> micro-batch -> Delta append

Rows keep what the online flow saw: the decoded record's exact fields, plus the Kafka
topic/partition/offset (see ``flows.lake``). Undecodable messages (bad framing, unknown schema,
corrupt body, a record of the wrong type for its topic, an empty payload) become rows of
``raw_dead_letters`` with the reason and the raw bytes; they never stop the flow.

**Exactly once across restarts, without Bytewax recovery.** Each Delta commit carries, as Delta
application transactions, the highest offset of every topic-partition whose rows it holds, in the
same atomic commit as the rows. On start, each topic-partition is read from the offset after the one
its own table has committed (the start of the topic when it has none). The sink also drops any row
whose offset its table has already committed, and writes a micro-batch's dead letters *before* the
rows of the data tables: so a crash between the two commits of one micro-batch re-reads that
micro-batch, the dead letters already archived are skipped and the data rows are written once. The
lake is the single source of truth: no recovery database to lose or to keep in step with the
tables, and retention (which deletes rows, never the transactions) cannot make the archive
re-ingest what it expired. Bytewax recovery would snapshot source offsets separately from the
Delta commits and still re-send the last epoch, needing the same dedupe anyway.

Consumers ``assign()`` partitions (no group join); partitions are grouped by index (a symbol lands
on the same index in every raw topic), one consumer per index, so several workers split the load.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.lake import (
    ARCHIVED_TOPICS,
    BRONZE,
    DEAD_LETTER_TABLE,
    TABLE_OF_TOPIC,
    Lake,
    date_of_ms,
    rows_to_arrow,
    with_meta,
)
from tickcast.logs import get_logger

log = get_logger("archive")
ARCHIVE_SOURCE = "archive.decode"


class RawMessage(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None


@dataclass
class ArchiveConfig:
    bootstrap: str
    lake: Lake
    # Kafka topic -> bronze table; default: every raw topic and the dead-letter topic
    topics: dict[str, str] = field(default_factory=lambda: {t: TABLE_OF_TOPIC[t] for t in ARCHIVED_TOPICS})
    batch_seconds: float = 2.0  # micro-batch: at most this long ...
    batch_max_rows: int = 50_000  # ... or this many rows
    poll_max: int = 5_000  # messages per consumer poll
    idle_sleep_s: float = 0.05  # back-off of an idle consumer (no busy loop on a shared machine)
    stop_at_end: bool = False  # archive up to the current end of every partition, then exit
    serde: Any = None  # tickcast.serde.Serde; default: default_serde()
    retention_days: int | None = None  # run the lake's retention once per UTC day (None: never)
    compact_every_s: float | None = 900.0  # rewrite the recent small files sorted (None: never)
    data_dir: str | None = None  # where the datasets (versions to keep) and the last retention date live

    def __post_init__(self):
        for topic, table in self.topics.items():
            if table not in BRONZE:
                raise ValueError(f"topic {topic}: unknown bronze table {table!r}")


# ---------------------------------------------------------------------------------------------
# decode: one Kafka message -> (table, bronze row)


def dead_letter_row(msg: RawMessage, kind: str, reason: str) -> tuple[str, dict]:
    key = None
    if msg.key:
        try:
            k = msg.key.decode("utf-8")
            key = k if k.isalnum() and len(k) <= 40 else None
        except UnicodeDecodeError:
            key = None
    ts_us = (msg.timestamp_ms if msg.timestamp_ms and msg.timestamp_ms > 0 else int(time.time() * 1000)) * 1000
    record = {"source": ARCHIVE_SOURCE, "topic": msg.topic, "symbol": key, "error_kind": kind,
              "reason": reason, "payload": bytes(msg.value or b""), "ts": ts_us}
    t = BRONZE[DEAD_LETTER_TABLE]
    return DEAD_LETTER_TABLE, with_meta(t, record, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                        kafka_ts=msg.timestamp_ms, ingest="kafka")


def decode_message(serde, topic_tables: dict[str, str], msg: RawMessage) -> tuple[str, dict]:
    """(table, row) of a message; anything undecodable becomes a dead-letter row (never raises for
    bad data; a serde outage such as an unreachable registry does raise, so the flow restarts
    rather than dead-lettering good data)."""
    from tickcast.serde import SerdeError

    table_name = topic_tables[msg.topic]
    table = BRONZE[table_name]
    if msg.value is None:
        return dead_letter_row(msg, "empty_payload", "message has no value (tombstone)")
    try:
        name, record = serde.decode_any(msg.value)
    except SerdeError as exc:
        return dead_letter_row(msg, exc.kind, str(exc))
    if name != table.schema_name:
        return dead_letter_row(msg, "schema_mismatch",
                               f"{msg.topic} carries {table.schema_name} records, got a {name}")
    return table_name, with_meta(table, record, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                 kafka_ts=msg.timestamp_ms, ingest="kafka")


# ---------------------------------------------------------------------------------------------
# source: one consumer per partition index, assigned at the offsets the tables committed


def start_offsets(lake: Lake, topic_tables: dict[str, str], tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Next offset to read per topic-partition: one after what its own table committed, or
    OFFSET_BEGINNING when it never committed any."""
    from confluent_kafka import OFFSET_BEGINNING

    cache: dict[str, Any] = {}
    out = {}
    for topic, part in tps:
        name = topic_tables[topic]
        if name not in cache:
            cache[name] = lake.table(name)
        committed = lake.committed_offset(name, topic, part, dt=cache[name]) if cache[name] is not None else None
        out[(topic, part)] = OFFSET_BEGINNING if committed is None else committed + 1
    return out


class _KafkaIndexPartition(StatefulSourcePartition[RawMessage, None]):
    def __init__(self, cfg: ArchiveConfig, tps: list[tuple[str, int]]):
        from confluent_kafka import TopicPartition

        from tickcast.kafka import AdaptiveConsumer, consumer_config

        self._cfg = cfg
        self._consumer = AdaptiveConsumer(consumer_config(cfg.bootstrap, "tickcast-archive", low_latency=False,
                                                  **{"fetch.wait.max.ms": 250}))
        starts = start_offsets(cfg.lake, cfg.topics, tps)
        self._awake: datetime | None = None
        self._pos: dict[tuple[str, int], int] = {}
        self._high: dict[tuple[str, int], int] = {}
        # watermarks before assign: once fetching, each query waits behind a long-poll fetch on the
        # same connection (fetch.wait.max.ms), which made start-up take 2.5 s per partition index
        for (t, p), o in starts.items():
            low, high = self._consumer.get_watermark_offsets(TopicPartition(t, p), timeout=10)
            if o >= 0 and o < low:  # Kafka's retention deleted messages the archive never saw
                log.error("messages expired in Kafka before they were archived", extra={
                    "topic": t, "partition": p, "counts": {"lost": low - o}, "resume_offset": o, "low": low})
            if cfg.stop_at_end:
                self._high[(t, p)] = high
                self._pos[(t, p)] = max(o, low)
        self._consumer.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        log.info("archive partition assigned", extra={"counts": {"topic_partitions": len(tps)},
                                                      "starts": {f"{t}:{p}": o for (t, p), o in starts.items()}})

    def _at_end(self) -> bool:
        return all(self._pos[tp] >= h for tp, h in self._high.items())

    def next_batch(self) -> list[RawMessage]:
        if self._cfg.stop_at_end and self._at_end():
            raise StopIteration()
        msgs = self._consumer.consume(self._cfg.poll_max, 0)
        out = []
        for m in msgs:
            err = m.error()
            if err is not None:
                log.warning("kafka error", extra={"error": str(err), "topic": m.topic()})
                continue
            ts_type, ts = m.timestamp()
            out.append(RawMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                  ts if ts_type != 0 else None))
            if self._cfg.stop_at_end:
                self._pos[(m.topic(), m.partition())] = m.offset() + 1
        if not out:
            if self._cfg.stop_at_end:  # skipped control records: trust the fetch position
                from confluent_kafka import TopicPartition

                for tp in self._consumer.position([TopicPartition(t, p) for t, p in self._high]):
                    if tp.offset >= 0:
                        self._pos[(tp.topic, tp.partition)] = max(self._pos[(tp.topic, tp.partition)], tp.offset)
            self._awake = datetime.now(UTC) + timedelta(seconds=self._cfg.idle_sleep_s)
        else:
            self._awake = None
        return out

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> None:
        return None  # offsets live in the Delta tables (see the module docstring)

    def close(self) -> None:
        self._consumer.close()


class KafkaIndexSource(FixedPartitionedSource[RawMessage, None]):
    """Bytewax source: partition ``p<i>`` = partition i of every configured topic."""

    def __init__(self, cfg: ArchiveConfig):
        self._cfg = cfg

    def _layout(self) -> dict[str, list[tuple[str, int]]]:
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": self._cfg.bootstrap}).list_topics(timeout=15)
        parts: dict[str, list[tuple[str, int]]] = {}
        for topic in self._cfg.topics:
            tmd = md.topics.get(topic)
            if tmd is None or tmd.error is not None:
                raise RuntimeError(f"topic {topic} does not exist on {self._cfg.bootstrap} (run `tickcast topics`)")
            for p in sorted(tmd.partitions):
                parts.setdefault(f"p{p}", []).append((topic, p))
        return parts

    def list_parts(self) -> list[str]:
        return sorted(self._layout(), key=lambda s: int(s[1:]))

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _KafkaIndexPartition:
        return _KafkaIndexPartition(self._cfg, self._layout()[for_part])


# ---------------------------------------------------------------------------------------------
# sink: one Delta commit per table per micro-batch, dead letters first, offsets deduped


class BronzeWriter:
    """Writes micro-batches of (table, row) to the lake exactly once (see the module docstring)."""

    def __init__(self, lake: Lake):
        self.lake = lake
        self._committed: dict[tuple[str, str, int], int | None] = {}
        self._tables: dict[str, Any] = {}
        self.counts = {"rows": 0, "skipped_duplicates": 0, "commits": 0, "dead_letters": 0}

    def _committed_offset(self, table: str, topic: str, part: int) -> int | None:
        key = (table, topic, part)
        if key not in self._committed:
            if table not in self._tables:  # load each table once; afterwards our own commits update the cache
                self._tables[table] = self.lake.table(table)
            dt = self._tables[table]
            self._committed[key] = None if dt is None else self.lake.committed_offset(table, topic, part, dt=dt)
        return self._committed[key]

    def write(self, items: list[tuple[str, dict]]) -> dict[str, int]:
        by_table: dict[str, list[dict]] = {}
        for table, row in items:
            off = row["kafka_offset"]
            done = self._committed_offset(table, row["kafka_topic"], row["kafka_partition"])
            if done is not None and off <= done:
                self.counts["skipped_duplicates"] += 1
                continue
            by_table.setdefault(table, []).append(row)
        written = {}
        order = sorted(by_table, key=lambda t: (t != DEAD_LETTER_TABLE, t))  # dead letters first
        for table in order:
            rows = by_table[table]
            offsets: dict[tuple[str, int], int] = {}
            for r in rows:
                tp = (r["kafka_topic"], r["kafka_partition"])
                offsets[tp] = max(offsets.get(tp, -1), r["kafka_offset"])
            self.lake.append(table, rows_to_arrow(BRONZE[table], rows), offsets=offsets)
            for (t, p), o in offsets.items():
                self._committed[(table, t, p)] = o
            written[table] = len(rows)
            self.counts["rows"] += len(rows)
            self.counts["commits"] += 1
            if table == DEAD_LETTER_TABLE:
                self.counts["dead_letters"] += len(rows)
        if written:
            log.info("archived micro-batch", extra={"counts": {**written, **self.counts}})
        return written


class RetentionSchedule:
    """The lake's upkeep, run by the archive between two micro-batches so that it never races the
    archive's own commits: every ``compact_every_s`` the recent small files are rewritten sorted
    (``Lake.compact_recent``: a replay of the current day pays per file), and once per UTC day the
    retention (``Lake.retention``: expire, compact closed days, vacuum; ``days=None``: never). The
    date of the last retention is kept in ``state_path``: an archive restarted the same day does not
    run it again. A failed run is logged and tried again an hour later (compaction: at its next turn)."""

    RETRY_S = 3_600.0

    def __init__(self, lake: Lake, days: int | None, state_path: str | Path, keep_versions=lambda: {},
                 clock=time.time, compact_every_s: float | None = 900.0, compact_first_s: float = 60.0):
        if days is not None and days < 1:
            raise ValueError("retention needs at least 1 day")
        self.lake, self.days, self.state_path = lake, days, Path(state_path)
        self.keep_versions, self.clock = keep_versions, clock
        self.next_try = 0.0
        self.compact_every_s = compact_every_s
        # a minute after start-up (not at once: a restarted archive first catches up), then every interval
        self.next_compact = clock() + min(compact_first_s, compact_every_s or 0)
        try:
            self.last_date = json.loads(self.state_path.read_text()).get("date")
        except (OSError, ValueError, AttributeError):
            self.last_date = None

    def maybe_run(self) -> dict | None:
        now = self.clock()
        if self.compact_every_s and now >= self.next_compact:
            self.next_compact = now + self.compact_every_s
            t0 = time.monotonic()
            try:
                done = self.lake.compact_recent(now_ms=int(now * 1000))
                log.info("recent files compacted", extra={"stage": "compaction", "counts": {
                    "seconds": round(time.monotonic() - t0, 2), "partitions": sum(map(len, done.values()))}})
            except Exception as exc:  # a lake problem must not stop the archiving
                log.error("compaction of recent files failed", extra={"error": repr(exc)})
        today = date_of_ms(int(now * 1000))
        if self.days is None or self.last_date == today or now < self.next_try:
            return None
        t0 = time.monotonic()
        try:
            report = self.lake.retention(self.days, now_ms=int(now * 1000), keep_versions=self.keep_versions())
        except Exception as exc:  # a lake problem must not stop the archiving
            self.next_try = now + self.RETRY_S
            log.error("scheduled retention failed: trying again in an hour", extra={"error": repr(exc)})
            return None
        self.last_date = today
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps({"date": today, "days": self.days}) + "\n")
        log.info("scheduled retention done", extra={"stage": "retention", "counts": {
            "seconds": round(time.monotonic() - t0, 2),
            "expired_rows": sum(r["expired_rows"] for r in report.values()),
            "compacted": sum(len(r["compacted"]) for r in report.values()),
            "vacuumed": sum(r["vacuumed_files"] for r in report.values())}})
        return report


class _BronzeSinkPartition(StatelessSinkPartition[tuple[str, list[tuple[str, dict]]]]):
    def __init__(self, lake: Lake, retention: RetentionSchedule | None = None):
        self._writer = BronzeWriter(lake)
        self._retention = retention

    def write_batch(self, items: list[tuple[str, list[tuple[str, dict]]]]) -> None:
        flat = [x for _key, batch in items for x in batch]
        if flat:
            self._writer.write(flat)
        if self._retention is not None:
            self._retention.maybe_run()


class BronzeSink(DynamicSink[tuple[str, list[tuple[str, dict]]]]):
    def __init__(self, lake: Lake, retention: RetentionSchedule | None = None):
        self._lake = lake
        self._retention = retention

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _BronzeSinkPartition:
        # one worker runs the retention: the others' appends to the same tables are blind appends
        return _BronzeSinkPartition(self._lake, self._retention if worker_index == 0 else None)


# ---------------------------------------------------------------------------------------------


class _MicroBatch(op.StatefulLogic):
    """One key's items until ``timeout`` after the *first* of them, or ``max_size`` items.

    Not ``op.collect``: Bytewax's (0.21) restarts its timeout on every item, so on a steady stream
    (no quiet gap as long as the timeout, i.e. always, live) a batch would only be written once
    ``max_size`` rows (50,000) had piled up."""

    def __init__(self, timeout: timedelta, max_size: int):
        self.timeout, self.max_size = timeout, max_size
        self.acc: list = []
        self.due: datetime | None = None

    def on_item(self, value):
        if not self.acc:
            self.due = datetime.now(UTC) + self.timeout
        self.acc.append(value)
        if len(self.acc) >= self.max_size:
            return (self.acc,), op.StatefulLogic.DISCARD
        return (), op.StatefulLogic.RETAIN

    def on_notify(self):
        return (self.acc,), op.StatefulLogic.DISCARD

    def on_eof(self):
        return (self.acc,), op.StatefulLogic.DISCARD

    def notify_at(self) -> datetime | None:
        return self.due

    def snapshot(self) -> None:
        return None  # no Bytewax recovery here: the offsets live in the Delta tables


def micro_batch(step_id: str, up, timeout: timedelta, max_size: int):
    """Keyed items -> lists, each closed ``timeout`` after its first item or at ``max_size``."""
    return op.stateful(step_id, up, lambda _resume: _MicroBatch(timeout, max_size))


def build_flow(cfg: ArchiveConfig) -> Dataflow:
    """kafka -> decode -> micro-batch per partition index -> Delta."""
    from tickcast.serde import default_serde

    serde = cfg.serde or default_serde()
    cfg.lake.ensure_tables(sorted(set(cfg.topics.values()) | {DEAD_LETTER_TABLE}))
    topics = dict(cfg.topics)

    flow = Dataflow("bronze_archive")
    msgs = op.input("kafka_raw", flow, KafkaIndexSource(cfg))
    rows = op.map("decode", msgs, lambda m: decode_message(serde, topics, m))
    keyed = op.key_on("by_partition_index", rows, lambda tr: f"p{tr[1]['kafka_partition']}")
    batches = micro_batch("micro_batch", keyed, timedelta(seconds=cfg.batch_seconds), cfg.batch_max_rows)
    retention = None
    if not cfg.stop_at_end:  # a long-running archive keeps the lake in shape; a one-shot catch-up does not
        from flows.datasets import referenced_versions

        data_dir = Path(cfg.data_dir or "data")
        retention = RetentionSchedule(cfg.lake, cfg.retention_days or None, data_dir / "archive" / "retention.json",
                                      keep_versions=lambda: referenced_versions(data_dir),
                                      compact_every_s=cfg.compact_every_s)
    op.output("delta_bronze", batches, BronzeSink(cfg.lake, retention))
    return flow


def run_archive(cfg: ArchiveConfig, *, workers: int = 1) -> None:
    """Run the archive in this process (blocks; with ``stop_at_end`` it returns when caught up)."""
    flow = build_flow(cfg)
    if workers <= 1:
        from bytewax.testing import run_main

        run_main(flow)
    else:
        from bytewax.run import cli_main

        cli_main(flow, workers_per_process=workers)
