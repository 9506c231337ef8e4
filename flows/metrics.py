"""Prometheus metrics of the feature flow, served by Bytewax's dataflow API webserver
(``BYTEWAX_DATAFLOW_API_ENABLED``; ``/metrics`` there includes this process's prometheus_client
registry next to Bytewax's own step metrics).

The engine stays pure: it only counts into ``SymbolEngine.counters``; ``export`` turns the growth of
those counters into Prometheus increments after each batch.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("tickcast_features_events_total", "raw events processed", ["symbol"])
VECTORS = Counter("tickcast_features_vectors_total", "feature vectors emitted", ["symbol", "cadence"])
ENGINE = Counter("tickcast_features_engine_total",
                 "engine counters: book statuses (gap, duplicate, out_of_order, crossed, reset, ...), "
                 "resync requests, late events, bad input", ["symbol", "counter"])
SEQ_HOLES = Counter("tickcast_features_seq_holes_total", "gw_seq holes skipped (events lost upstream)", ["symbol"])
PENDING = Gauge("tickcast_features_seq_pending", "events waiting for a missing gw_seq", ["symbol"])
BOOK_VALID = Gauge("tickcast_features_book_valid", "1 when the symbol's order book is valid", ["symbol"])
LATENCY = Histogram("tickcast_features_latency_seconds",
                    "receive time of the event that closed a window -> the vector handed to Kafka",
                    ["cadence"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
SOURCE_DELAY = Histogram("tickcast_features_source_delay_seconds",
                         "gateway receive -> read by the flow's source: the raw topics' broker hop (the oldest "
                         "message of each read, so one observation per fetch, not per event)",
                         buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))

_exported: dict[tuple[str, str], int] = {}
_holes: dict[str, int] = {}


def export(engine, outputs, events: int) -> None:
    sym = engine.symbol
    EVENTS.labels(sym).inc(events)
    for kind, rec in outputs:
        if kind == "features":
            VECTORS.labels(sym, rec["cadence"]).inc()
    for key, value in engine.counters.items():
        last = _exported.get((sym, key), 0)
        if value > last:
            ENGINE.labels(sym, key).inc(value - last)
            _exported[(sym, key)] = value
    if engine.seq.holes > _holes.get(sym, 0):
        SEQ_HOLES.labels(sym).inc(engine.seq.holes - _holes.get(sym, 0))
        _holes[sym] = engine.seq.holes
    PENDING.labels(sym).set(len(engine.seq.pending))
    BOOK_VALID.labels(sym).set(1 if engine.book.valid else 0)
