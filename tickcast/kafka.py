"""Kafka client settings used by every component, so partitioning and latency are set in one place."""
from __future__ import annotations

import json
import time


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
        # lower than 5 ms: the embedded tansu broker (memory storage) answers every fetch only after
        # its max wait, and a fetch that finds data lists the partition's stored batches (measured
        # ~0.9 µs per batch: ~90 ms at 100k batches) and answers *empty* when that outlasts the
        # wait. So its cost grows with the partition: consumers off the latency path use longer
        # waits, and AdaptiveConsumer widens a starved one. Kafka and Redpanda have neither limit.
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


def consume_ready(consumer, num_messages: int, timeout: float) -> list:
    """Up to ``num_messages`` messages, returning as soon as any is there (waiting at most ``timeout``
    for the first). ``Consumer.consume(n, timeout)`` waits for n messages *or* the timeout, so at a
    feature's trickle every call sat out the whole timeout: measured, ``consume(100, 0.05)`` put a
    uniform 0-50 ms on a 3 ms broker hop."""
    msgs = consumer.consume(num_messages, 0)
    if msgs or timeout <= 0:
        return msgs
    first = consumer.poll(timeout)
    if first is None:
        return []
    rest = consumer.consume(num_messages - 1, 0) if num_messages > 1 else []
    return [first, *rest]


class AdaptiveConsumer:
    """A confluent-kafka ``Consumer`` (assign mode) that widens its fetch wait when the broker is slow
    to answer or starves it, and narrows it back once caught up.

    Why: tansu, the embedded broker (memory storage), lists the stored batches of a partition on each
    fetch that finds data (~0.9 µs per batch, measured) and answers *empty* when that outlasts the
    fetch's max wait. The listing grows with the partition, so at a fixed short wait a long-running
    stack spends ever more broker CPU per fetch until consumers starve (a flow restarted after a
    kill -9 never caught up). Two signals widen the wait, rebuilding the consumer at its next
    position: near the tail, the broker's average round trip (librdkafka statistics, every second)
    above twice the wait sets the wait to ``rtt_factor`` x the round trip, so listings take a bounded
    share of the broker; and a partition with messages below its high watermark and none handed out for
    ``starve_s`` (``starve_behind_s`` when the consumer is far behind and other partitions flow), or
    far behind handing out only a trickle while the application keeps up (``trickling``),
    multiplies it by 4. Both stop at ``max_wait_ms``. After ``relax_s`` caught up (less than ``caught_up_lag``
    behind) it returns to the configured wait; widening again soon after doubles ``relax_s`` (the
    partition has outgrown the short wait: stop flapping). On Kafka or Redpanda neither signal fires
    and it stays a plain consumer. Only ``assign`` is supported (no group subscription)."""

    def __init__(self, conf: dict, *, max_wait_ms: int = 1_000, starve_s: float = 0.5, relax_s: float = 5.0,
                 caught_up_lag: int = 500, rtt_factor: float = 8.0, starve_behind_s: float = 3.0):
        from confluent_kafka import Consumer

        self._make = Consumer
        self.conf = dict(conf)
        user_stats = self.conf.get("stats_cb")
        self.conf["stats_cb"] = lambda raw: self._on_stats(raw, user_stats)
        self.conf.setdefault("statistics.interval.ms", 1_000)
        self.base_wait = self.wait_ms = int(self.conf.get("fetch.wait.max.ms", 500))
        self.max_wait_ms = max(max_wait_ms, self.base_wait)
        self.starve_s, self.relax_s, self.caught_up_lag = starve_s, relax_s, caught_up_lag
        self.starve_behind_s = starve_behind_s  # one partition starving while far behind
        self.rtt_factor = rtt_factor
        self.rtt_ms: float | None = None  # the broker's average round trip over the last statistics
        self._rtt_new = False  # a sample not yet acted on (the check costs a watermark lookup per partition)
        self._relaxed_at = float("-inf")
        self._c = Consumer(self.conf)
        self._start: dict[tuple[str, int], int] = {}  # assigned offset (may be logical) per partition
        self._next: dict[tuple[str, int], int] = {}  # offset after the last message handed out
        self._paused: set[tuple[str, int]] = set()
        self._last_data = time.monotonic()
        self._data_at: dict[tuple[str, int], float] = {}  # when each partition last handed out a message
        # per partition over the current far-behind window: [start, messages handed out]; and per
        # consumer: [calls, calls that drained librdkafka's queue (fewer messages than asked for)]
        self._progress: dict[tuple[str, int], list] = {}
        self._calls = [0, 0]
        self._assigned_at = time.monotonic()
        self._starve_check_at = 0.0
        self._caught_up_since: float | None = None
        self.rebuilds = 0
        self.last_stats: dict = {}  # librdkafka's latest statistics (for diagnostics)

    def _on_stats(self, raw: str, user_cb) -> None:
        try:
            stats = json.loads(raw)
            self.last_stats = stats
            brokers = stats.get("brokers", {}).values()
            rtts = [b["rtt"]["avg"] for b in brokers if b.get("nodeid", -1) >= 0 and b.get("rtt", {}).get("cnt")]
            self.rtt_ms = max(rtts) / 1000.0 if rtts else None
        except (ValueError, KeyError, TypeError, AttributeError):
            self.rtt_ms = None
        self._rtt_new = self.rtt_ms is not None
        if user_cb is not None:
            user_cb(raw)

    def partition_stats(self, topic: str, partition: int) -> dict:
        """librdkafka's view of one partition (fetch state, queued messages, offsets) from the
        latest statistics: what a stalled partition needs explained."""
        tp = self.last_stats.get("topics", {}).get(topic, {}).get("partitions", {}).get(str(partition), {})
        keys = ("fetch_state", "fetchq_cnt", "fetchq_size", "next_offset", "app_offset", "hi_offset", "ls_offset",
                "consumer_lag", "rxmsgs", "rx_ver_drops", "msgs_inflight")
        return {k: tp[k] for k in keys if k in tp}

    def __getattr__(self, name):  # list_topics, offsets_for_times, committed, ...
        return getattr(self._c, name)

    def assign(self, partitions) -> None:
        self._start = {(tp.topic, tp.partition): tp.offset for tp in partitions}
        self._next = {}
        self._paused = set()
        self._c.assign(partitions)
        self._last_data = self._assigned_at = now = time.monotonic()
        self._data_at = {}
        self._progress = {k: [now, 0] for k in self._start}
        self._calls = [0, 0]

    def pause(self, partitions) -> None:
        self._paused |= {(tp.topic, tp.partition) for tp in partitions}
        self._c.pause(partitions)

    def resume(self, partitions) -> None:
        self._paused -= {(tp.topic, tp.partition) for tp in partitions}
        self._c.resume(partitions)
        now = time.monotonic()
        for tp in partitions:  # a paused partition did not starve
            self._data_at[(tp.topic, tp.partition)] = now
            self._progress[(tp.topic, tp.partition)] = [now, 0]

    def consume(self, num_messages: int = 1, timeout: float = -1):
        msgs = self._c.consume(num_messages, timeout)
        now = time.monotonic()
        got = False
        self._calls[0] += 1
        self._calls[1] += len(msgs) < num_messages
        for m in msgs:
            if m.error() is None:
                key = (m.topic(), m.partition())
                self._next[key] = m.offset() + 1
                self._data_at[key] = now
                if key in self._progress:
                    self._progress[key][1] += 1
                got = True
        if got:
            self._last_data = now
        self._adapt(now, got)
        return msgs

    def starved(self, now: float | None = None, for_s: float | None = None) -> list[tuple[str, int]]:
        """Unpaused partitions with messages below their cached high watermark and none handed out
        for ``starve_s``: tansu answers the partitions whose listing outlasts the wait empty, so the
        longest partition of a fetch can starve while the others keep flowing."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        now = time.monotonic() if now is None else now
        for_s = self.starve_s if for_s is None else for_s
        out = []
        for key, start in self._start.items():
            if key in self._paused or now - self._data_at.get(key, self._assigned_at) < for_s:
                continue
            low, high = self._c.get_watermark_offsets(TopicPartition(*key), cached=True)
            pos = self._next.get(key, start)
            if pos == OFFSET_BEGINNING:
                pos = low  # assigned at the beginning and nothing handed out yet
            if high >= 0 and pos >= 0 and high > pos:
                out.append(key)
        return out

    def trickling(self, now: float) -> list[tuple[str, int]]:
        """Unpaused partitions at least ``caught_up_lag`` behind that handed out fewer than
        ``caught_up_lag`` messages over the last ``starve_behind_s`` while the application drained
        what librdkafka had (most consume() calls got fewer messages than asked for): the broker, not
        the application, is the limit. tansu in a half-starved state answers such a partition with a
        record or two per fetch (measured: 1 per fetch at a 64 ms wait on a partition of 30k
        batches), so it never goes silent for ``starve_behind_s`` and would never catch up."""
        from confluent_kafka import TopicPartition

        calls, drained = self._calls
        if now - min((p[0] for p in self._progress.values()), default=now) < self.starve_behind_s:
            return []
        out = []
        for key, start in self._start.items():
            since, count = self._progress.setdefault(key, [now, 0])
            if key in self._paused or now - since < self.starve_behind_s:
                continue
            self._progress[key] = [now, 0]
            high = self._c.get_watermark_offsets(TopicPartition(*key), cached=True)[1]
            pos = self._next.get(key, start)
            if pos >= 0 and high - pos >= self.caught_up_lag > count and 2 * drained >= calls > 0:
                out.append(key)
        self._calls = [0, 0]
        return out

    def poll(self, timeout: float = -1):
        msgs = self.consume(1, timeout)
        return msgs[0] if msgs else None

    def close(self) -> None:
        self._c.close()

    def lag(self) -> int | None:
        """Messages below the cached high watermarks not yet handed out (unpaused partitions);
        None while a partition's position or watermark is unknown."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

        total = 0
        for (topic, part), start in self._start.items():
            if (topic, part) in self._paused:
                continue
            low, high = self._c.get_watermark_offsets(TopicPartition(topic, part), cached=True)
            pos = self._next.get((topic, part), start)
            if pos == OFFSET_BEGINNING:
                pos = low  # assigned at the beginning, nothing handed out yet (as in starved())
            elif pos == OFFSET_END:
                continue  # assigned at the end, nothing handed out yet: no lag of its own
            if high < 0 or pos < 0:
                return None
            total += max(0, high - pos)
        return total

    def _adapt(self, now: float, got: bool) -> None:
        rtt, fresh = self.rtt_ms, self._rtt_new
        self._rtt_new = False  # once per statistics sample: consume() runs in tight loops
        if fresh and rtt > 2 * self.wait_ms and self.wait_ms < self.max_wait_ms and self._near_tail():
            # at the tail, the broker's work per fetch outgrew the wait: fetch less often (behind,
            # a long round trip is a big answer, and the consumer should fetch as fast as it can)
            self._widen(now, int(min(self.max_wait_ms, max(self.wait_ms * 2, rtt * self.rtt_factor))),
                        f"the broker's round trip ({rtt:.0f} ms) outgrew the wait")
        elif self.wait_ms < self.max_wait_ms and now >= self._starve_check_at:
            self._starve_check_at = now + self.starve_s / 4  # a watermark lookup per partition: not every call
            starved, behind = self.starved(now), not self._near_tail()
            # nothing at all for starve_s, or one partition left out near the tail while the others
            # flow: widen. Far behind, a partition left out of a few responses is normal (byte
            # limits, an application busy with its last batch) and widening at once only slows the
            # catch-up (measured: 571 instead of ~30k events/s), so there it must starve longer, or
            # trickle while the application keeps up.
            if starved and behind and now - self._last_data < self.starve_s:
                starved = self.starved(now, self.starve_behind_s)
            how = "answered empty for"
            if not starved and behind:
                starved, how = self.trickling(now), "trickled"
            if starved:
                self._widen(now, min(self.max_wait_ms, self.wait_ms * 4),
                            f"the broker {how} {starved[0][0]}[{starved[0][1]}] while messages were waiting")
                return
        if got and self.wait_ms != self.base_wait:
            if self._near_tail():
                self._caught_up_since = self._caught_up_since or now
                if now - self._caught_up_since >= self.relax_s:
                    self._relaxed_at = now
                    self._rebuild(self.base_wait, "caught up")
            else:
                self._caught_up_since = None

    def _near_tail(self) -> bool:
        lag = self.lag()
        return lag is not None and lag < self.caught_up_lag

    def _widen(self, now: float, wait_ms: int, why: str) -> None:
        if now - self._relaxed_at < 60.0:
            self.relax_s = min(600.0, self.relax_s * 2)
        self._rebuild(wait_ms, why)

    def _rebuild(self, wait_ms: int, why: str) -> None:
        from confluent_kafka import TopicPartition

        from tickcast.logs import get_logger

        get_logger("kafka").warning(f"fetch wait changed: {why}", extra={
            "group": self.conf.get("group.id"), "fetch_wait_ms": wait_ms, "was_ms": self.wait_ms,
            "relax_s": self.relax_s})
        self._c.close()
        self.rtt_ms, self._rtt_new = None, False  # measured at the old wait
        self.wait_ms = wait_ms
        self._c = self._make({**self.conf, "fetch.wait.max.ms": wait_ms})
        positions = [TopicPartition(t, p, self._next.get((t, p), o)) for (t, p), o in self._start.items()]
        self._c.assign(positions)
        paused = [TopicPartition(t, p) for t, p in self._paused]
        if paused:
            self._c.pause(paused)
        self._last_data = now = time.monotonic()
        self._data_at = {k: now for k in self._start}  # a fresh consumer: give every partition starve_s
        self._progress = {k: [now, 0] for k in self._start}
        self._calls = [0, 0]
        self._caught_up_since = None
        self.rebuilds += 1
