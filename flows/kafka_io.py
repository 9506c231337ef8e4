"""Kafka source and sink of the feature dataflow.

``RawKafkaSource`` has one Bytewax partition per partition *index* of the raw topics: partition i
reads partition i of every raw topic with one consumer, so all channels of a symbol (same key, same
partition index everywhere) reach one source partition. It decodes the Avro payloads and yields
``(symbol, [(schema, record), ...])`` batches; undecodable bytes become dead letters. Its resume
state is the next offset per topic, so with Bytewax recovery a restart continues where the last
snapshot left off (the engine state is snapshotted at the same epoch).

Event-time merge: Kafka orders each topic, not the topics relative to each other, and one fetch can
bring minutes of one topic's backlog before a message of another. The engine releases a symbol's
events in gw_seq order and waits only a bounded event time for a missing one, so the source queues
what it reads per topic and hands over only messages up to the *frontier* + ``align_slack_ms``: the
frontier is the earliest exchange time that some topic may still deliver (its queue head, or the last
time read from a topic that has more to read). Live, every topic is caught up and messages pass
straight through; in a backlog, topics advance together. A topic whose queue is full is paused.
The cached high watermarks behind "more to read" can lag after a reconnect (a broker partition heals,
one topic's backlog is fetched before the others'), so while the source hands over a backlog
(messages the gateway received more than a second ago), each further ``confirm_jump_ms`` (10 s) of
exchange time is handed over only after the topics with nothing queued are confirmed with a broker
round trip (~6.5 ms per topic on tansu: rare enough not to slow a catch-up). Shorter skews, and a
producer whose retries land one topic seconds after another, are the engine's gw_seq hold's
(20 s of event time, the registry's ``engine:`` block). At the live pace there is no round trip.
The resume state counts only messages handed over, so queued ones are read again after a restart.

``KafkaRecordSink`` encodes records with the serde and produces them keyed by symbol.
"""
from __future__ import annotations

import time
from collections import deque

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from flows.dataflow import DEAD_LETTER_KEY
from flows.metrics import LATENCY, SOURCE_DELAY
from tickcast.kafka import AdaptiveConsumer, consumer_config, producer_config
from tickcast.logs import get_logger
from tickcast.serde import Serde, SerdeError, default_serde
from tickcast.topics import FEATURE_INPUT_TOPICS, RAW_TOPIC_OF

_RAW_FIELDS = ("symbol", "exchange_ts", "gw_seq")


class NotARawEvent(SerdeError):
    """A valid record of another contract (a forecast, a control command...) on a raw topic."""

    kind = "schema_mismatch"

log = get_logger("features.kafka")


def dead_letter(source: str, topic: str | None, kind: str, reason: str, payload: bytes,
                symbol: str | None = None) -> dict:
    return {"source": source, "topic": topic, "symbol": symbol, "error_kind": kind, "reason": reason,
            "payload": bytes(payload or b""), "ts": time.time_ns() // 1000}


class _RawPartition(StatefulSourcePartition):
    """Partition index i of every raw topic: decode, merge the topics by exchange time, yield."""

    def __init__(self, bootstrap: str, topics: tuple[str, ...], index: int, resume: dict | None,
                 batch_size: int, serde: Serde, from_end: bool, align_slack_ms: int, max_queue: int,
                 confirm_jump_ms: int):
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        self.serde = serde
        self.batch_size = batch_size
        self.from_end = from_end
        # resume state: per topic, the offset of the first message not yet handed to the dataflow
        self.offsets: dict[str, int] = dict(resume or {})
        start = OFFSET_END if from_end else OFFSET_BEGINNING
        self.consumer = AdaptiveConsumer(consumer_config(bootstrap, f"tickcast-features-p{index}"))
        self.tps = {t: TopicPartition(t, index) for t in topics}
        # a topic without a resume offset starts at a concrete offset, taken now and kept in the
        # state: a logical "end" would be the end at each restart, skipping what arrived meanwhile
        for t in topics:
            if t not in self.offsets:
                try:
                    low, high = self.consumer.get_watermark_offsets(self.tps[t], timeout=1, cached=False)
                    self.offsets[t] = high if from_end else low
                except Exception as exc:  # noqa: BLE001 - broker not answering yet: the logical start
                    log.warning("start offsets unknown: starting at the logical position", extra={
                        "topic": t, "partition": index, "error": str(exc)})
                    break  # one round trip failed: do not wait for the others too
        self.consumer.assign([TopicPartition(t, index, self.offsets.get(t, start)) for t in topics])
        self.slack = align_slack_ms
        self.max_queue = max_queue
        self.queues: dict[str, deque] = {t: deque() for t in topics}  # (ts, offset, name, record)
        self.last_ts: dict[str, int] = {}  # largest ts read per topic
        self.read_to: dict[str, int] = {}  # next offset to read per topic
        self.paused: set[str] = set()
        self.confirm_jump_ms = confirm_jump_ms
        self.now_us = lambda: time.time_ns() // 1000  # wall clock, as the gateway's recv_ts
        self.confirmed_to: float = float("-inf")  # the hand-over limit at the last confirmation
        self.confirmed: dict[str, int] = {}  # topic -> high watermark from the last round trip
        self.index = index
        self._stalled_since: float | None = None
        self._stall_logged = 0.0

    def _behind(self, topic: str) -> bool:
        """Messages remain below the high watermark (cached, or confirmed by a recent round trip)
        that we have not read yet."""
        low, high = self.consumer.get_watermark_offsets(self.tps[topic], cached=True)
        high = max(high, self.confirmed.get(topic, -1))
        if high < 0:
            return True  # no fetch response yet: unknown, assume behind
        pos = self.read_to.get(topic, self.offsets.get(topic, high if self.from_end else low))
        return pos < high

    def _confirm_idle_topics(self) -> set[str]:
        """Ask the broker for the high watermark of every topic with nothing queued; returns the
        topics whose round trip failed (the caller treats those as having more to read)."""
        failed = set()
        for topic, q in self.queues.items():
            if q:
                continue
            try:
                self.confirmed[topic] = self.consumer.get_watermark_offsets(self.tps[topic], timeout=2,
                                                                            cached=False)[1]
            except Exception as exc:  # broker unreachable
                log.warning("watermark query failed", extra={"topic": topic, "error": str(exc)})
                failed.add(topic)
        return failed

    def _backlog(self) -> bool:
        """Some queued message was received by the gateway more than a second ago."""
        old = self.now_us() - 1_000_000
        for q in self.queues.values():
            if q:
                recv = q[0][3].get("recv_ts")
                if recv is None or recv < old:
                    return True
        return False

    def _read(self) -> None:
        msgs = self.consumer.consume(self.batch_size, 0)
        decode = self.serde.decode_any
        oldest_recv = None
        for m in msgs:
            if m.error() is not None:
                log.warning("kafka error", extra={"error": str(m.error())})
                continue
            topic = m.topic()
            self.read_to[topic] = m.offset() + 1
            try:
                name, rec = decode(m.value())
                if name not in RAW_TOPIC_OF or any(rec.get(f) is None for f in _RAW_FIELDS):
                    # a valid record of another contract (a forecast, a control command...): no event
                    raise NotARawEvent(f"a {name} record is not a raw market event")
            except SerdeError as exc:
                # queued in offset order with the topic's last time: handed over (and so counted in
                # the resume offsets) exactly when the messages around it are, never twice
                self.queues[topic].append((self.last_ts.get(topic, float("-inf")), m.offset(), None, dead_letter(
                    "features.decode", topic, exc.kind, str(exc), m.value(),
                    (m.key() or b"").decode("utf-8", "replace") or None)))
                continue
            ts = rec["exchange_ts"]
            recv = rec.get("recv_ts")
            if recv is not None and (oldest_recv is None or recv < oldest_recv):
                oldest_recv = recv
            if ts > self.last_ts.get(topic, -1):
                self.last_ts[topic] = ts
            self.queues[topic].append((ts, m.offset(), name, rec))
        if oldest_recv is not None:
            SOURCE_DELAY.observe(max(0, self.now_us() - oldest_recv) / 1e6)

    def _frontier(self, unknown: set[str] = frozenset()) -> float:
        """Exchange time up to which every topic is known: the earliest queued message of any topic,
        or, for a topic with nothing queued but more to read (or ``unknown``), the last time read."""
        frontier = float("inf")
        for topic, q in self.queues.items():
            if q:
                frontier = min(frontier, q[0][0])
            elif topic in unknown or self._behind(topic):
                frontier = min(frontier, self.last_ts.get(topic, float("-inf")))
        return frontier

    def _flow_control(self) -> None:
        pause = {t for t, q in self.queues.items() if len(q) >= self.max_queue}
        if pause != self.paused:
            if self.paused - pause:
                self.consumer.resume([self.tps[t] for t in self.paused - pause])
            if pause - self.paused:
                self.consumer.pause([self.tps[t] for t in pause - self.paused])
            self.paused = pause

    def next_batch(self):
        self._read()
        limit = self._frontier() + self.slack
        if limit != float("inf") and limit > self.confirmed_to + self.confirm_jump_ms and self._backlog():
            failed = self._confirm_idle_topics()
            limit = self._frontier(failed) + self.slack
            if not failed:  # else the next batch asks again
                self.confirmed_to = limit
        by_symbol: dict[str, list] = {}
        dead = []
        for topic, q in self.queues.items():
            last_offset = None
            while q and q[0][0] <= limit:
                _, offset, name, rec = q.popleft()
                last_offset = offset
                if name is None:
                    dead.append(("DeadLetter", rec))
                    continue
                batch = by_symbol.get(rec["symbol"])
                if batch is None:
                    by_symbol[rec["symbol"]] = [(name, rec)]
                else:
                    batch.append((name, rec))
            if last_offset is not None:
                self.offsets[topic] = last_offset + 1
        out = list(by_symbol.items())
        if dead:
            out.append((DEAD_LETTER_KEY, dead))
        self._flow_control()
        self._watch_stall(bool(out), limit)
        return out

    def _watch_stall(self, handed_over: bool, limit: float) -> None:
        """Log (at most every 10 s) why messages wait: queued for more than 5 s of wall time with
        nothing handed over means the frontier is held by some topic."""
        now = time.monotonic()
        if handed_over or not any(self.queues.values()):
            self._stalled_since = None
            return
        if self._stalled_since is None:
            self._stalled_since = now
            return
        if now - self._stalled_since < 5.0 or now < self._stall_logged + 10.0:
            return
        self._stall_logged = now
        topics = {}
        for t, q in self.queues.items():
            low, high = self.consumer.get_watermark_offsets(self.tps[t], cached=True)
            topics[t] = {"queued": len(q), "head_ts": q[0][0] if q else None, "last_ts": self.last_ts.get(t),
                         "read_to": self.read_to.get(t), "high": high, "confirmed": self.confirmed.get(t),
                         "paused": t in self.paused}
            if q or self._behind(t):
                topics[t]["client"] = self.consumer.partition_stats(t, self.index)
        log.warning("source stalled: messages wait for the frontier", extra={
            "partition": self.index, "stalled_s": round(now - self._stalled_since, 1),
            "limit": None if limit in (float("inf"), float("-inf")) else limit, "topics": topics})

    def snapshot(self):
        return dict(self.offsets)

    def close(self):
        self.consumer.close()


class RawKafkaSource(FixedPartitionedSource):
    def __init__(self, bootstrap: str, topics: tuple[str, ...] = FEATURE_INPUT_TOPICS, *,
                 batch_size: int = 2_000, from_end: bool = False, serde: Serde | None = None,
                 align_slack_ms: int = 1_000, max_queue: int = 50_000, confirm_jump_ms: int = 10_000):
        self.bootstrap = bootstrap
        self.confirm_jump_ms = confirm_jump_ms
        self.align_slack_ms = align_slack_ms
        self.max_queue = max_queue
        self.topics = tuple(topics)
        self.batch_size = batch_size
        self.from_end = from_end
        self._serde = serde

    def list_parts(self):
        from confluent_kafka.admin import AdminClient

        md = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=30)
        counts = set()
        for t in self.topics:
            if t not in md.topics:
                raise RuntimeError(f"topic {t} does not exist (run `tickcast topics`)")
            counts.add(len(md.topics[t].partitions))
        if len(counts) != 1:
            raise RuntimeError(f"raw topics must share one partition count, got {sorted(counts)}")
        return [f"p{i}" for i in range(counts.pop())]

    def build_part(self, step_id, for_part, resume_state):
        return _RawPartition(self.bootstrap, self.topics, int(for_part[1:]), resume_state, self.batch_size,
                             self._serde or default_serde(), self.from_end, self.align_slack_ms,
                             self.max_queue, self.confirm_jump_ms)


class _ProducerPartition(StatelessSinkPartition):
    def __init__(self, bootstrap: str, topic: str, schema: str, serde: Serde, stamp_emit: bool):
        from confluent_kafka import Producer

        self.producer = Producer(producer_config(bootstrap, **{"linger.ms": 0, "on_delivery": self._delivered}))
        self.failed: list[str] = []
        self.topic = topic
        self.schema = schema
        self.serde = serde
        self.stamp_emit = stamp_emit

    def write_batch(self, items):
        produce = self.producer.produce
        encode = self.serde.encode
        now = time.time_ns() // 1000
        for key, rec in items:
            if self.stamp_emit:
                rec["emit_ts"] = now
                if not rec.get("history"):
                    LATENCY.labels(rec["cadence"]).observe(max(0, now - rec["close_recv_ts"]) / 1e6)
            while True:
                try:
                    produce(self.topic, key=key.encode(), value=encode(self.schema, rec))
                    break
                except BufferError:  # local queue full: let it drain, never drop
                    self.producer.poll(0.05)
        # Bytewax commits the epoch's snapshot once this returns: every record must be on the broker
        # by then, or a crash right after would lose it for good (the resume starts past it)
        self.producer.flush()
        if self.failed:
            errors, self.failed = self.failed, []
            raise RuntimeError(f"{len(errors)} records not delivered to {self.topic}: {errors[:3]}")

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failed.append(str(err))

    def close(self):
        self.producer.flush(30)


class KafkaRecordSink(DynamicSink):
    """Produces (key, record) items as Avro records of ``schema`` on ``topic``."""

    def __init__(self, bootstrap: str, topic: str, schema: str, *, serde: Serde | None = None,
                 stamp_emit: bool = False):
        self.bootstrap, self.topic, self.schema = bootstrap, topic, schema
        self._serde = serde
        self.stamp_emit = stamp_emit

    def build(self, step_id, worker_index, worker_count):
        return _ProducerPartition(self.bootstrap, self.topic, self.schema, self._serde or default_serde(),
                                  self.stamp_emit)
