"""Raw events -> Kafka: per-symbol ``gw_seq``, Avro, keyed by symbol, a bounded buffer, counters.

``gw_seq`` is the processing order of a symbol across every raw topic. The publisher assigns it
when it accepts an event, in arrival order, so it is dense: an event refused at the buffer bound
never takes a number, and neither does one that cannot be encoded (it becomes a dead letter). At
start, :func:`restore_next_seq` reads the tail of every raw topic back from Kafka and continues
each symbol from its maximum + 1, so the sequence carries on across gateway restarts.

The producer is ``tickcast.kafka.producer_config`` (idempotent, acks=all, murmur2): every raw
topic has the same partition count, so a symbol lands on the same partition index everywhere.
While the broker is unreachable librdkafka keeps the records queued and retries them in order
(``message.timeout.ms=0``: no local expiry); the queue is the gateway's bounded buffer, and only
when it holds ``buffer_max`` records are new events refused, logged and counted as dropped.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from confluent_kafka import KafkaException

from tickcast.logs import get_logger
from tickcast.serde import EncodeError, Serde, SerdeError
from tickcast.topics import DEAD_LETTER, RAW_TOPIC_OF, RAW_TOPICS

log = get_logger("gateway.publisher")

# a dead letter's raw payload is cut here: librdkafka's and Kafka's default message limit is 1 MB
DEAD_LETTER_PAYLOAD_MAX = 512 * 1024

# --- Kafka's murmur2 partitioner (Java client and librdkafka's murmur2_random agree) ------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of a key (unsigned 32 bit)."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length & ~3
    extra = length % 4
    if extra == 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_of(key: str | bytes, partitions: int) -> int:
    """The partition Kafka's murmur2 partitioner gives ``key``."""
    data = key.encode() if isinstance(key, str) else key
    return (murmur2(data) & 0x7FFFFFFF) % partitions


def now_us() -> int:
    return time.time_ns() // 1000


# --- gw_seq across restarts --------------------------------------------------------------------


def restore_next_seq(bootstrap: str, symbols: Iterable[str], serde: Serde, *,
                     topics: Iterable[str] | None = None, max_scan: int = 20_000, chunk: int = 2_000,
                     timeout: float = 10.0) -> dict[str, int]:
    """Next ``gw_seq`` of each symbol: 1 + the largest one published on any raw topic.

    Reads each raw topic partition backwards in chunks from its end until every symbol that maps
    to it has been seen, the partition's start is reached or ``max_scan`` records were read
    (heartbeats make every symbol's last records recent, so the scan is short); a symbol found in
    no partition's tail is then looked for in its partitions' whole history. Raises when the broker
    cannot be read: the gateway must not guess a sequence.
    """
    from tickcast.kafka import AdaptiveConsumer, consumer_config

    symbols = list(symbols)
    topics = list(topics) if topics is not None else [t.name for t in RAW_TOPICS]
    best: dict[str, int] = {}
    undecodable = [0]
    consumer = AdaptiveConsumer(consumer_config(bootstrap, "tickcast-gateway-restore",
                                                **{"enable.partition.eof": True}))

    def scan(wanted_symbols: list[str], limit: int | None) -> None:
        md = consumer.list_topics(timeout=timeout)
        for topic in topics:
            tmd = md.topics.get(topic)
            if tmd is None or tmd.error is not None:
                raise KafkaException(f"raw topic {topic} is missing on {bootstrap} (run `tickcast topics`)")
            nparts = len(tmd.partitions)
            wanted: dict[int, set[bytes]] = {}
            for s in wanted_symbols:
                wanted.setdefault(partition_of(s, nparts), set()).add(s.encode())
            for part, keys in wanted.items():
                found = _scan_partition(consumer, serde, topic, part, keys, limit, chunk, timeout, undecodable)
                for key, seq in found.items():
                    sym = key.decode()
                    best[sym] = max(best.get(sym, -1), seq)

    try:
        scan(symbols, max_scan)
        # A symbol in no partition's tail was either never published or not for a long while (dropped
        # from the config, then added again): only its whole history can tell, and restarting it at 0
        # would publish its gw_seq values a second time.
        unseen = [s for s in symbols if s not in best]
        if unseen:
            log.info("gw_seq restore: symbols not in the recent records, reading their partitions whole",
                     extra={"symbols": unseen})
            scan(unseen, None)
    finally:
        consumer.close()
    if undecodable[0]:
        log.warning("gw_seq restore skipped records that are not tickcast raw events",
                    extra={"counts": {"undecodable": undecodable[0]}})
    return {s: best.get(s, -1) + 1 for s in symbols}


def _scan_partition(consumer, serde: Serde, topic: str, part: int, keys: set[bytes], limit: int | None,
                    chunk: int, timeout: float, undecodable: list[int]) -> dict[bytes, int]:
    """The largest gw_seq of each key in one partition, reading backwards from its end until every
    key was seen, the start is reached or ``limit`` records were read (None: no limit)."""
    from confluent_kafka import TopicPartition

    low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=timeout)
    found: dict[bytes, int] = {}
    if high <= low:
        return found
    end, scanned = _true_end(consumer, topic, part, max(low, high - 1), timeout), 0
    while end > low and (limit is None or scanned < limit) and len(found) < len(keys):
        start = max(low, end - chunk) if limit is None else max(low, end - chunk, end - (limit - scanned))
        for msg in _read_range(consumer, topic, part, start, end, timeout):
            key = msg.key()
            if key in keys:
                try:
                    seq = serde.decode(msg.value())["gw_seq"]
                except (SerdeError, KeyError):
                    undecodable[0] += 1  # not one of ours: it carries no gw_seq
                    continue
                if seq > found.get(key, -1):
                    found[key] = seq
        scanned += end - start
        end = start
    return found


def _true_end(consumer, topic: str, part: int, start: int, timeout: float) -> int:
    """The offset after a partition's last record, read from ``start`` up to the end.

    The reported high watermark is not enough: tansu (the embedded broker) answers with the base
    offset of the last record batch + 1, so the records of that last batch lie beyond it.
    """
    from confluent_kafka import KafkaError, TopicPartition

    consumer.assign([TopicPartition(topic, part, start)])
    deadline = time.monotonic() + timeout
    end = start
    while time.monotonic() < deadline:
        # consume() waits for num_messages or the timeout: keep the timeout short, EOF ends the loop
        for msg in consumer.consume(num_messages=1000, timeout=0.02):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return end
                raise KafkaException(err)
            end = msg.offset() + 1
    raise KafkaException(f"timed out looking for the end of {topic}[{part}]")


def _read_range(consumer, topic: str, part: int, start: int, end: int, timeout: float) -> list:
    """Every record of offsets [start, end) of one partition."""
    from confluent_kafka import KafkaError, TopicPartition

    consumer.assign([TopicPartition(topic, part, start)])
    deadline = time.monotonic() + timeout
    out: list = []
    nxt = start
    while nxt < end:
        if time.monotonic() > deadline:
            raise KafkaException(f"timed out reading {topic}[{part}] offsets {start}..{end}")
        for msg in consumer.consume(num_messages=min(1000, end - nxt), timeout=0.5):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    return out  # records below the end were deleted: nothing more to read
                raise KafkaException(err)
            if msg.offset() >= end:
                return out
            nxt = msg.offset() + 1
            out.append(msg)
    return out


# --- the publisher ----------------------------------------------------------------------------


class Publisher:
    """Assigns ``gw_seq``, encodes and produces raw events; dead letters; counters.

    Not thread-safe by design: the gateway calls it from its one event-loop thread, which is what
    makes ``gw_seq`` the arrival order. ``poll()`` must be called regularly (delivery reports).
    """

    def __init__(self, bootstrap: str, *, serde: Serde | None = None, next_seq: dict[str, int] | None = None,
                 buffer_max: int = 200_000, encoder=None, producer_overrides: dict | None = None,
                 latency_every: int = 64):
        from confluent_kafka import Producer

        from tickcast.kafka import producer_config

        self.serde = serde or Serde()
        if encoder is None:
            from connectors.avro_fast import FastEncoder

            encoder = FastEncoder(self.serde)
        self._encode = encoder.encode
        self.next_seq: dict[str, int] = dict(next_seq or {})
        self.buffer_max = buffer_max
        conf = producer_config(bootstrap, **{
            "message.timeout.ms": 0,  # never expire a queued record locally: retry until the broker is back
            "reconnect.backoff.max.ms": 1000,  # back within a second of the broker's return
            "queue.buffering.max.messages": max(buffer_max * 2, 100_000),
            "on_delivery": self._on_delivery,
            **(producer_overrides or {}),
        })
        self.producer = Producer(conf)
        self.accepted: dict[str, int] = {t.name: 0 for t in RAW_TOPICS}  # per raw topic
        self.delivered = 0
        self.failed = 0
        self.retried = 0
        self.dropped = 0
        self.dead_letters: dict[str, int] = {}
        self.latency_samples: list[float] = []  # seconds, drained by the metrics
        self._latency_every = latency_every
        self._last_drop_log = 0.0
        self._left_at_close = 0
        self._lock = threading.Lock()  # only guards latency_samples against the metrics thread

    # -- events ---------------------------------------------------------------------------------
    @property
    def buffered(self) -> int:
        """Records handed to the producer and not yet acknowledged by the broker."""
        return len(self.producer) if self.producer is not None else self._left_at_close

    def publish(self, name: str, rec: dict) -> bool:
        """Assign the next gw_seq of the record's symbol and produce it; False when dropped."""
        topic = RAW_TOPIC_OF[name]
        if len(self.producer) >= self.buffer_max:
            self._drop(name, rec)
            return False
        symbol = rec["symbol"]
        seq = self.next_seq.get(symbol, 0)
        rec["gw_seq"] = seq
        try:
            value = self._encode(name, rec)
        except EncodeError as exc:
            self.dead_letter("gateway.publish", "schema_violation", str(exc), repr(rec).encode(),
                             topic=topic, symbol=symbol)
            return False
        try:
            self.producer.produce(topic, value, symbol)
        except BufferError:
            self._drop(name, rec)
            return False
        except KafkaException as exc:  # refused locally (e.g. over message.max.bytes): no gw_seq taken
            self.dead_letter("gateway.publish", "produce_refused", str(exc), value, topic=topic, symbol=symbol)
            return False
        self.next_seq[symbol] = seq + 1
        self.accepted[topic] += 1
        return True

    def _drop(self, name: str, rec: dict) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log > 5.0 or self.dropped == 1:
            self._last_drop_log = now
            log.warning("buffer full: event dropped (broker unreachable or too slow)", extra={
                "symbol": rec.get("symbol"), "record": name,
                "counts": {"dropped": self.dropped, "buffered": len(self.producer), "bound": self.buffer_max}})

    def dead_letter(self, source: str, kind: str, reason: str, payload: bytes | str, *,
                    topic: str | None = None, symbol: str | None = None) -> None:
        """Bad input with its raw bytes and the reason, on ``tickcast.deadletter``."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogateescape")
        self.dead_letters[kind] = self.dead_letters.get(kind, 0) + 1
        reason = reason[:2000]
        if len(payload) > DEAD_LETTER_PAYLOAD_MAX:  # keep the record under the broker's message size
            reason += f" [payload truncated from {len(payload)} to {DEAD_LETTER_PAYLOAD_MAX} bytes]"
            payload = payload[:DEAD_LETTER_PAYLOAD_MAX]
        rec = {"source": source, "topic": topic, "symbol": symbol, "error_kind": kind, "reason": reason,
               "payload": bytes(payload), "ts": now_us()}
        if len(self.producer) >= self.buffer_max:
            self.dropped += 1
            log.error("buffer full: dead letter dropped", extra={"symbol": symbol, "error_kind": kind})
            return
        try:
            self.producer.produce(DEAD_LETTER, self.serde.encode("DeadLetter", rec), symbol)
        except BufferError:
            self.dropped += 1
            log.error("producer queue full: dead letter dropped", extra={"symbol": symbol, "error_kind": kind})
        except KafkaException as exc:  # never raise out of the error path: count and log it
            self.dropped += 1
            log.error("dead letter refused by the producer", extra={
                "symbol": symbol, "error_kind": kind, "reason": str(exc)})

    # -- delivery -------------------------------------------------------------------------------
    def _on_delivery(self, err, msg) -> None:
        if err is None:
            self.delivered += 1
            if self.delivered % self._latency_every == 0:
                lat = msg.latency()
                if lat is not None:
                    with self._lock:
                        if len(self.latency_samples) < 10_000:
                            self.latency_samples.append(lat)
            return
        if err.retriable() and not err.fatal():
            # cannot happen with message.timeout.ms=0 short of a broker-side refusal: try again, in order
            # with what follows (gw_seq lets consumers restore the order across topics anyway)
            self.retried += 1
            try:
                self.producer.produce(msg.topic(), msg.value(), msg.key())
                return
            except BufferError:
                pass
        self.failed += 1
        log.error("record could not be delivered: gw_seq gap", extra={
            "topic": msg.topic(), "symbol": (msg.key() or b"").decode(errors="replace"), "error": str(err),
            "counts": {"failed": self.failed}})
        if msg.topic() != DEAD_LETTER:
            self.dead_letter("gateway.deliver", "delivery_failed", str(err), msg.value() or b"",
                             topic=msg.topic(), symbol=(msg.key() or b"").decode(errors="replace") or None)

    def poll(self, timeout: float = 0.0) -> int:
        return self.producer.poll(timeout) if self.producer is not None else 0

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for the queue to drain; returns the number of records still undelivered."""
        return self.producer.flush(timeout) if self.producer is not None else self._left_at_close

    def close(self, timeout: float = 10.0) -> int:
        """Flush and release the producer (its threads and connections); the counters stay readable.
        Returns the number of records that could not be delivered (lost: logged by the caller)."""
        if self.producer is not None:
            self._left_at_close = self.producer.flush(timeout)
            self.producer = None
        return self._left_at_close

    def drain_latency(self) -> list[float]:
        with self._lock:
            out, self.latency_samples = self.latency_samples, []
        return out

    def counts(self) -> dict:
        return {"accepted": sum(self.accepted.values()), "delivered": self.delivered, "buffered": self.buffered,
                "dropped": self.dropped, "failed": self.failed, "dead_letters": sum(self.dead_letters.values())}


def check_topic_partitions(bootstrap: str, timeout: float = 10.0) -> None:
    """Every raw topic must have the same partition count (a symbol's partition index everywhere)."""
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=timeout)
    counts = {t.name: len(md.topics[t.name].partitions) for t in RAW_TOPICS if t.name in md.topics}
    missing = [t.name for t in RAW_TOPICS if t.name not in md.topics] + \
        ([DEAD_LETTER] if DEAD_LETTER not in md.topics else [])
    if missing:
        raise RuntimeError(f"topics missing on {bootstrap}: {missing} (run `tickcast topics`)")
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"raw topics must share one partition count, got {counts}")
