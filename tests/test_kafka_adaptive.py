"""AdaptiveConsumer against the real embedded broker: tansu answers a fetch *empty* when listing the
partition's stored batches outlasts the fetch's max wait, so a consumer behind on a long partition
can starve for good. Reproduced here with a short wait on a partition of many one-record batches."""
from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from tickcast.broker import EmbeddedBroker
from tickcast.kafka import AdaptiveConsumer, consumer_config, producer_config
from tickcast.topics import TopicSpec

N = 30_000


def _read(consumer, seconds: float, until: int) -> list[int]:
    got: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(got) < until:
        got += [int(m.value()) for m in consumer.consume(1000, 0.1) if m.error() is None]
    return got


def _long_partition(broker) -> Producer:
    """N records on topic "long", one batch each (the listing tansu does per fetch grows with each);
    returns the producer (one record per batch) for more."""
    p = Producer(producer_config(broker.bootstrap, **{"batch.num.messages": 1, "linger.ms": 0}))
    for i in range(N):
        while True:
            try:
                p.produce("long", str(i).encode())
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    assert p.flush(60) == 0
    return p


@pytest.fixture(scope="module")
def long_broker():
    """One broker for the tests on a long partition (writing its N batches takes seconds): "long"
    (N records, more may follow) and "live"."""
    with EmbeddedBroker(topics=(TopicSpec("long", (), 1), TopicSpec("live", (), 1))) as broker:
        yield broker, _long_partition(broker)


def test_a_starved_consumer_widens_its_fetch_wait_reads_everything_once_and_narrows_back(long_broker):
    broker, p = long_broker
    start = TopicPartition("long", 0, N // 2)
    conf = consumer_config(broker.bootstrap, "starve", **{"fetch.wait.max.ms": 1})

    plain = Consumer(conf)
    plain.assign([start])
    starved = _read(plain, 3.0, N // 2)
    high = plain.get_watermark_offsets(TopicPartition("long", 0), cached=True)[1]
    plain.close()
    assert high == N and len(starved) < N // 2, "the broker no longer starves a 1 ms fetch (test premise)"

    ac = AdaptiveConsumer(conf, relax_s=1.0)
    ac.assign([start])
    got = _read(ac, 60.0, N // 2)
    assert got == list(range(N // 2, N))  # all of it, in order, nothing twice
    widened = ac.rebuilds
    assert widened >= 1 and ac.wait_ms > 1
    for i in range(3):  # caught up: live messages bring it back to the configured wait
        p.produce("long", str(N + i).encode())
        p.flush(10)
        got += _read(ac, 5.0, 1)
        time.sleep(0.4)
    assert got[-3:] == [N, N + 1, N + 2] and ac.lag() == 0
    assert ac.rebuilds > widened  # went back to the configured wait once caught up
    ac.close()


def test_a_slow_broker_round_trip_widens_the_wait_and_the_users_stats_callback_still_runs():
    import json

    seen = []
    ac = AdaptiveConsumer(consumer_config("127.0.0.1:1", "rtt", stats_cb=seen.append), max_wait_ms=1_000)
    ac.assign([TopicPartition("t", 0, 0)])
    ac.lag = lambda: 3  # at the tail (no broker here to ask)
    stats = {"brokers": {"127.0.0.1:1/1": {"nodeid": 1, "rtt": {"avg": 40_000, "cnt": 12}},
                         "GroupCoordinator": {"nodeid": -1, "rtt": {"avg": 900_000, "cnt": 1}}}}
    ac._on_stats(json.dumps(stats), seen.append)
    assert ac.rtt_ms == 40.0 and len(seen) == 1  # the coordinator's entry is not a fetch path
    ac._adapt(time.monotonic(), True)
    assert ac.wait_ms == 320 and ac.rebuilds == 1  # 8 x the 40 ms round trip
    ac._on_stats(json.dumps(stats), None)
    ac._adapt(time.monotonic(), True)
    ac._adapt(time.monotonic(), True)
    assert ac.rebuilds == 1  # 40 ms is within 2 x 320 ms; one look per sample either way
    ac._on_stats(json.dumps({"brokers": {"b": {"nodeid": 1, "rtt": {"avg": 900_000, "cnt": 3}}}}), None)
    ac._adapt(time.monotonic(), True)
    assert ac.wait_ms == 1_000  # capped
    ac._on_stats("not json", None)
    assert ac.rtt_ms is None
    ac2 = AdaptiveConsumer(consumer_config("127.0.0.1:1", "rtt2"))
    ac2.assign([TopicPartition("t", 0, 0)])
    ac2.lag = lambda: 50_000  # far behind: a long round trip is a big answer, keep fetching fast
    ac2._on_stats(json.dumps(stats), None)
    ac2._adapt(time.monotonic(), True)
    assert ac2.wait_ms == ac2.base_wait and ac2.rebuilds == 0
    ac.close()
    ac2.close()


def test_one_starved_partition_widens_the_wait_while_another_keeps_flowing(long_broker):
    """tansu answers empty only the partitions whose listing outlasts the wait: a consumer of a
    long partition (behind) and a short live one gets the live messages and nothing of the long
    partition. The starvation is per partition (seen in a 2-symbol soak: the order-book deltas of
    one symbol stopped while its trades and tickers flowed, and the event-time merge held them)."""
    import threading

    broker, p = long_broker
    stop = threading.Event()

    def trickle():  # a live partition with a message every 20 ms
        i = 0
        while not stop.is_set():
            p.produce("live", str(i).encode())
            p.poll(0)
            i += 1
            time.sleep(0.02)

    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    try:
        conf = consumer_config(broker.bootstrap, "starve-one", **{"fetch.wait.max.ms": 1})
        assignment = [TopicPartition("long", 0, N // 2), TopicPartition("live", 0, 0)]

        def read(consumer, seconds):
            by_topic = {"long": [], "live": []}
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and len(by_topic["long"]) < N // 2:
                for m in consumer.consume(1000, 0.05):
                    if m.error() is None:
                        by_topic[m.topic()].append(int(m.value()))
            return by_topic

        plain = Consumer(conf)
        plain.assign(assignment)
        seen = read(plain, 3.0)
        plain.close()
        assert seen["live"] and len(seen["long"]) < N // 2, "premise: the long partition starves alone"

        ac = AdaptiveConsumer(conf, relax_s=1.0)
        ac.assign(assignment)
        seen = read(ac, 60.0)
        assert seen["long"][:N // 2] == list(range(N // 2, N))  # all of it, in order, nothing twice
        assert ac.rebuilds >= 1 and ac.wait_ms > 1 and seen["live"]
        ac.close()
    finally:
        stop.set()
        th.join(5)


def test_a_trickling_partition_far_behind_widens_only_when_the_application_keeps_up():
    """tansu can answer a long partition with a record per fetch (measured at a 64 ms wait under
    load): never silent for starve_behind_s, never catching up. Far behind, fewer than caught_up_lag
    messages in starve_behind_s is starvation when the application drained what it had; when the
    application is the limit (consume() calls return full batches) it is not."""
    from types import SimpleNamespace

    class Msg:
        def __init__(self, off):
            self.off = off

        def error(self):
            return None

        def topic(self):
            return "long"

        def partition(self):
            return 0

        def offset(self):
            return self.off

    def consumer(full_batches: bool):
        ac = AdaptiveConsumer(consumer_config("127.0.0.1:1", "trickle", **{"fetch.wait.max.ms": 4}),
                              starve_behind_s=1.0)
        ac.assign([TopicPartition("long", 0, 0)])
        real = ac._c
        real.close()
        ac._c = SimpleNamespace(get_watermark_offsets=lambda tp, cached: (0, 100_000), close=lambda: None,
                                consume=None, assign=lambda parts: None)
        ac._make = lambda conf: ac._c
        off = iter(range(10**6))
        # a message per call; the application asks for 1 (full) or 1000 (drained) at a time
        ac._c.consume = lambda n, t: [Msg(next(off))]
        return ac, (1 if full_batches else 1000)

    for full, widens in ((False, True), (True, False)):
        ac, ask = consumer(full)
        t0 = time.monotonic()
        while time.monotonic() - t0 < ac.starve_behind_s + 1.0 and ac.rebuilds == 0:
            ac.consume(ask, 0)
            time.sleep(0.01)
        assert (ac.rebuilds == 1 and ac.wait_ms == 16) == widens, (full, ac.rebuilds, ac.wait_ms)


def test_consume_ready_returns_when_a_message_is_there_not_when_the_batch_is_full():
    """confluent-kafka's consume(n, timeout) waits for n messages or the timeout: a latency path that
    asks for a batch at a trickle sits out the whole timeout. consume_ready hands over what is there."""
    from tickcast.kafka import consume_ready

    with EmbeddedBroker(topics=(TopicSpec("hop", (), 1),)) as broker:
        p = Producer(producer_config(broker.bootstrap))
        c = Consumer(consumer_config(broker.bootstrap, "ready"))
        c.assign([TopicPartition("hop", 0, 0)])
        assert consume_ready(c, 100, 0.2) == []  # nothing there: waits the timeout, returns empty
        def first_message_after(fetch) -> float:
            p.produce("hop", b"x")
            p.flush(5)
            t0 = time.monotonic()
            got = []
            while not got and time.monotonic() - t0 < 5:
                got = [m for m in fetch() if m.error() is None]
            assert len(got) == 1
            return time.monotonic() - t0

        assert first_message_after(lambda: c.consume(100, 0.5)) >= 0.45  # sat out the timeout
        assert first_message_after(lambda: consume_ready(c, 100, 0.5)) < 0.3
        c.close()
