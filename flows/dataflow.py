"""The feature dataflow: one function, used unchanged online and offline.

    raw (symbol, [(schema, record), ...])  --split-->  dead letters  -> sinks.dead_letters
                                            \\-> engine (per symbol, stateful) -> features -> sinks.features
                                                                              \\-> control  -> sinks.control

Online (``flows/online_features.py``) the source reads the raw Kafka topics and the sinks write to
``features.live``, ``tickcast.control`` and ``tickcast.deadletter``. Offline
(``flows/offline_replay.py``) the source reads the Delta Lake archive in gw_seq order and the sink
writes a dataset. The engine (``flows.engine.SymbolEngine``) holds all the logic; Bytewax only routes
each symbol's events to its engine and keeps that state recoverable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.outputs import Sink

DEAD_LETTER_KEY = "__deadletter__"


@dataclass(frozen=True)
class FlowConfig:
    flow_id: str = "tickcast-features"
    registry_path: str | None = None  # default flows/features.yaml
    requester: str = "features"  # who asks the gateway for resyncs


@dataclass
class FlowSinks:
    features: Sink  # receives (symbol, FeatureVector record)
    control: Sink | None = None  # (symbol, ControlCommand record); offline: nobody to ask
    dead_letters: Sink | None = None  # (key, DeadLetter record)
    extra: dict[str, Any] = field(default_factory=dict)


class RegistryWatcher:
    """Re-reads the registry file when it changes (checked at most every ``every_s`` seconds of wall
    time) so ``POST /feature-registry/reload`` or an edit takes effect without a restart; each symbol's
    engine switches at its next batch. A registry that fails to load is logged and ignored: the
    running one stays. Values never depend on when the switch happened within a registry: every
    output record carries the hash of the registry that computed it."""

    def __init__(self, path: str, every_s: float = 2.0):
        from flows.registry import load_registry

        self.path = path
        self.every_s = every_s
        self.current = load_registry(path)
        self._mtime = self._stat()
        self._next_check = 0.0

    def _stat(self) -> float:
        import os

        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return -1.0

    def poll(self):
        import time

        now = time.monotonic()
        if now < self._next_check:
            return self.current
        self._next_check = now + self.every_s
        mtime = self._stat()
        if mtime != self._mtime:
            self._mtime = mtime
            from flows.registry import RegistryError, load_registry
            from tickcast.logs import get_logger

            try:
                new = load_registry(self.path)
                from flows.engine import check_engine_config

                check_engine_config(new)  # the engine: block too, or every symbol's step would raise
            except (RegistryError, ValueError) as exc:
                get_logger("features.registry").error("registry change rejected: keeping the running one",
                                                      extra={"error": str(exc), "hash": self.current.hash})
            else:
                if new.hash != self.current.hash:
                    get_logger("features.registry").info("registry reloaded", extra={
                        "old": self.current.hash, "new": new.hash, "counts": {"features": len(new.features)}})
                self.current = new
        return self.current


def _engine_step(registry_path: str | None, requester: str):
    from flows.engine import SymbolEngine
    from flows.registry import DEFAULT_PATH

    watcher = RegistryWatcher(str(registry_path or DEFAULT_PATH))

    from flows import metrics

    def step(engine, batch):
        registry = watcher.poll()
        if engine is None:
            engine = SymbolEngine(batch[0][1]["symbol"], registry, requester)
        elif engine.registry_hash != registry.hash:
            engine.reload(registry)
        out = engine.process(batch)
        metrics.export(engine, out, len(batch))
        return engine, out

    return step


def build_flow(source: Source, sinks: FlowSinks, config: FlowConfig = FlowConfig()) -> Dataflow:
    flow = Dataflow(config.flow_id)
    raw = op.input("raw", flow, source)
    split = op.branch("split_dead_letters", raw, lambda kv: kv[0] == DEAD_LETTER_KEY)
    if sinks.dead_letters is not None:
        dead = op.flat_map("dead_letter_records", split.trues, lambda kv: [(kv[0], r) for _, r in kv[1]])
        op.output("dead_letters_out", dead, sinks.dead_letters)
    outputs = op.stateful_flat_map("engine", split.falses, _engine_step(config.registry_path, config.requester))
    routed = op.branch("split_outputs", outputs, lambda kv: kv[1][0] == "features")
    features = op.map("feature_records", routed.trues, lambda kv: (kv[0], kv[1][1]))
    op.output("features_out", features, sinks.features)
    if sinks.control is not None:
        control = op.map("control_records", routed.falses, lambda kv: (kv[0], kv[1][1]))
        op.output("control_out", control, sinks.control)
    return flow
