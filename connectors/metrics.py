"""Prometheus metrics of the gateway, read from its plain counters at scrape time.

The hot path only increments Python ints; this collector turns them into metric families when
Prometheus scrapes (in the HTTP server's thread), so metrics cost nothing per message:

- ``tickcast_gateway_ws_frames_total{conn}``: every frame received (data, replies, bad input)
- ``tickcast_gateway_ws_messages_total{channel}``: valid data messages received per exchange channel
- ``tickcast_gateway_events_total{topic}`` and ``tickcast_gateway_events_per_second{topic}``
  (raw events accepted for publishing per Kafka topic; the rate over the last ~5 s)
- ``tickcast_gateway_delivered_total``, ``..._dropped_total``, ``..._delivery_failed_total``
- ``tickcast_gateway_buffer_depth``: records queued, not yet acknowledged by the broker
- ``tickcast_gateway_dead_letters_total{kind}``
- ``tickcast_gateway_reconnects_total{conn}``, ``tickcast_gateway_connected{conn}``
- ``tickcast_gateway_publish_latency_seconds``: produce -> broker acknowledgement (sampled)
- ``tickcast_gateway_heartbeats_total``, ``..._resyncs_total``, ``..._duplicate_trades_total``,
  ``..._book_gaps_total``
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayCollector:
    def __init__(self, gateway):
        self.gw = gateway

    def describe(self):  # lets the registry accept the collector without calling collect() early
        return []

    def collect(self):
        gw = self.gw
        pub = gw.publisher
        by_channel: dict[str, int] = {}
        for topic, n in list(gw.received.items()):
            ch = topic.split(".", 1)[0]
            by_channel[ch] = by_channel.get(ch, 0) + n
        m = CounterMetricFamily("tickcast_gateway_ws_messages", "Data messages received per exchange channel",
                                labels=["channel"])
        for ch, n in sorted(by_channel.items()):
            m.add_metric([ch], n)
        yield m
        m = CounterMetricFamily("tickcast_gateway_events", "Raw events accepted for publishing per topic",
                                labels=["topic"])
        for t, n in sorted(pub.accepted.items()):
            m.add_metric([t], n)
        yield m
        m = GaugeMetricFamily("tickcast_gateway_events_per_second", "Raw events per second per topic (last ~5 s)",
                              labels=["topic"])
        for t, r in sorted(dict(gw.rates).items()):
            m.add_metric([t], r)
        yield m
        yield CounterMetricFamily("tickcast_gateway_delivered", "Records acknowledged by the broker",
                                  value=pub.delivered)
        yield CounterMetricFamily("tickcast_gateway_dropped", "Events refused at the buffer bound",
                                  value=pub.dropped)
        yield CounterMetricFamily("tickcast_gateway_delivery_failed", "Records the broker refused for good",
                                  value=pub.failed)
        yield GaugeMetricFamily("tickcast_gateway_buffer_depth", "Records queued, not yet acknowledged",
                                value=pub.buffered)
        m = CounterMetricFamily("tickcast_gateway_dead_letters", "Dead letters per error kind", labels=["kind"])
        for k, n in sorted(dict(pub.dead_letters).items()):
            m.add_metric([k], n)
        yield m
        m = CounterMetricFamily("tickcast_gateway_ws_frames", "WebSocket frames received (data, replies, bad input)",
                                labels=["conn"])
        for c in gw.connections:
            m.add_metric([c.name], c.received)
        yield m
        m = CounterMetricFamily("tickcast_gateway_reconnects", "WebSocket reconnects", labels=["conn"])
        g = GaugeMetricFamily("tickcast_gateway_connected", "1 while the WebSocket is subscribed", labels=["conn"])
        for c in gw.connections:
            m.add_metric([c.name], c.reconnects)
            g.add_metric([c.name], 1 if c.connected.is_set() else 0)
        yield m
        yield g
        yield CounterMetricFamily("tickcast_gateway_heartbeats", "Heartbeats published", value=gw.heartbeats)
        yield CounterMetricFamily("tickcast_gateway_resyncs", "Order-book resyncs done", value=gw.resyncs)
        yield CounterMetricFamily("tickcast_gateway_book_gaps", "Order-book deltas whose u does not follow",
                                  value=gw.parser.book_gaps)
        yield CounterMetricFamily("tickcast_gateway_book_repeats", "Order-book deltas whose u is not above the last",
                                  value=gw.parser.book_repeats)
        yield CounterMetricFamily("tickcast_gateway_duplicate_trades", "Trades dropped as duplicates (same id)",
                                  value=gw.parser.duplicate_trades)


class GatewayMetrics:
    """The gateway's registry; ``update()`` (from the event loop) moves latency samples in."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.registry = CollectorRegistry()
        self.registry.register(GatewayCollector(gateway))
        self.latency = Histogram("tickcast_gateway_publish_latency_seconds",
                                 "Produce -> broker acknowledgement, sampled", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.server = None

    def update(self) -> None:
        for s in self.gateway.publisher.drain_latency():
            self.latency.observe(s)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (``/metrics``) in a daemon thread; returns the bound port."""
        from prometheus_client import start_http_server

        self.server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self.server.server_address[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
