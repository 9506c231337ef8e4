"""Prometheus metrics of the prediction service (one registry per app instance)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.inference_seconds = Histogram(
            "tickcast_api_inference_seconds", "Champion inference for one minute batch (all ready symbols)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.minute_seconds = Histogram(
            "tickcast_api_minute_publish_seconds",
            "Inference plus building, publishing (Kafka produce, SSE) and queueing the store write of one batch",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0), registry=r)
        self.batch_size = Histogram("tickcast_api_inference_batch_size", "Symbols per inference batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.minutes_served = Counter("tickcast_api_minutes_served_total",
                                      "Minutes with a forecast, by symbol and quality (full/degraded)",
                                      ["symbol", "quality"], registry=r)
        self.minutes_skipped = Counter("tickcast_api_minutes_skipped_total",
                                       "Minutes without a forecast, by symbol and reason kind",
                                       ["symbol", "reason"], registry=r)
        self.data_gaps = Counter("tickcast_api_data_gaps_total",
                                 "Minutes with no m1 feature vector on features.live", ["symbol"], registry=r)
        self.feature_age = Gauge("tickcast_api_feature_age_seconds",
                                 "Wall-clock age of the last m1 feature vector received", ["symbol"], registry=r)
        self.feature_psi = Gauge("tickcast_api_feature_psi",
                                 "Population stability index of a live variate against the training distribution",
                                 ["symbol", "variate"], registry=r)
        self.feature_psi_max = Gauge("tickcast_api_feature_psi_max", "Largest PSI over the variates",
                                     ["symbol"], registry=r)
        self.coverage = Gauge("tickcast_api_interval_coverage",
                              "Share of recent outcomes inside the forecast's [q_low, q_high] interval",
                              ["symbol", "target"], registry=r)
        self.outcomes = Counter("tickcast_api_outcomes_total", "Outcomes joined",
                                ["symbol", "target", "inside"], registry=r)
        self.alerts = Counter("tickcast_api_alerts_total", "Actual outside the forecast interval",
                              ["symbol", "target", "direction"], registry=r)
        self.records_in = Counter("tickcast_api_feature_records_total", "Records read from features.live",
                                  ["result"], registry=r)
        self.dead_letters = Counter("tickcast_api_dead_letters_total", "Records sent to the dead-letter topic",
                                    ["kind"], registry=r)
        self.publish_errors = Counter("tickcast_api_publish_errors_total", "Kafka delivery failures", registry=r)
        self.model_info = Gauge("tickcast_api_model_info", "The champion being served (value 1)",
                                ["version"], registry=r)
        self.model_swaps = Counter("tickcast_api_model_swaps_total", "Champion hot swaps", registry=r)
        self.sse_clients = Gauge("tickcast_api_sse_clients", "Connected SSE clients", registry=r)
        self.sse_dropped = Counter("tickcast_api_sse_dropped_total", "SSE clients dropped for not reading",
                                   registry=r)
        self.sse_fanout = Histogram(
            "tickcast_api_sse_fanout_seconds",
            "From publishing a batch on the SSE hub to writing it to one client's socket (per client and batch)",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.sse_events = Counter("tickcast_api_sse_events_total", "Events published on the SSE stream",
                                  ["event"], registry=r)
