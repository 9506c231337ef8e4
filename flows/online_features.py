"""The online feature flow: raw Kafka topics -> ``build_flow`` -> ``features.live``.

    python -m flows.online_features                       # one process, recovery under data/recovery
    python -m flows.online_features -i 0 -a h1:2101,h2:2101 # process 0 of a 2-process cluster
    python -m bytewax.run "flows.online_features:get_flow()"

Scale-out: the engine state is keyed by symbol, so any number of Bytewax processes (``-a`` lists
them, ``-i`` is this one's index) share the symbols; source partitions (one per raw partition index)
are spread over the processes. With recovery (on by default) a crash and restart resumes from the
last snapshot: offsets and engine state of the same epoch, so no window is lost; windows emitted
again after a resume carry the same (symbol, cadence, window_end) key and identical values, so
consumers treat them idempotently.
"""
from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow

from flows.dataflow import FlowConfig, FlowSinks, build_flow
from flows.kafka_io import KafkaRecordSink, RawKafkaSource
from tickcast.topics import CONTROL, DEAD_LETTER, FEATURES_LIVE


def get_flow(bootstrap: str | None = None, registry_path: str | None = None, from_end: bool = False) -> Dataflow:
    from tickcast.config import get_settings

    bootstrap = bootstrap or get_settings().kafka_bootstrap
    if not bootstrap:
        raise SystemExit("no Kafka bootstrap: set KAFKA_BOOTSTRAP (or run `tickcast up`)")
    sinks = FlowSinks(
        features=KafkaRecordSink(bootstrap, FEATURES_LIVE, "FeatureVector", stamp_emit=True),
        control=KafkaRecordSink(bootstrap, CONTROL, "ControlCommand"),
        dead_letters=KafkaRecordSink(bootstrap, DEAD_LETTER, "DeadLetter"),
    )
    return build_flow(RawKafkaSource(bootstrap, from_end=from_end), sinks, FlowConfig(registry_path=registry_path))


def run(bootstrap: str | None = None, *, registry_path: str | None = None, recovery_dir: str | None = None,
        snapshot_s: float = 5.0, process_id: int | None = None, addresses: list[str] | None = None,
        workers: int = 1, from_end: bool = False, metrics_port: int | None = None) -> None:
    import os

    from bytewax._bytewax import cli_main
    from bytewax.recovery import RecoveryConfig, init_db_dir

    from tickcast.gc_tuning import use_throughput_gc
    from tickcast.logs import get_logger

    use_throughput_gc()
    if metrics_port:  # Bytewax's dataflow API: /metrics (its step metrics + ours), /dataflow
        import tempfile

        os.environ["BYTEWAX_DATAFLOW_API_ENABLED"] = "true"
        os.environ["BYTEWAX_DATAFLOW_API_PORT"] = str(metrics_port + (process_id or 0))
        # it writes the rendered dataflow into this directory (default: the working directory)
        cache = os.path.join(tempfile.gettempdir(), f"tickcast-bytewax-{os.getpid()}")
        os.makedirs(cache, exist_ok=True)
        os.environ.setdefault("BYTEWAX_DATAFLOW_API_CACHE_PATH", cache)

    flow = get_flow(bootstrap, registry_path, from_end)
    recovery = None
    if recovery_dir:
        db = Path(recovery_dir)
        if not any(db.glob("part-*.sqlite3")):
            db.mkdir(parents=True, exist_ok=True)
            init_db_dir(db, 1)
        recovery = RecoveryConfig(db)
    get_logger("features").info("online feature flow starting", extra={
        "recovery": str(recovery_dir), "process_id": process_id, "addresses": addresses,
        "metrics": f"http://127.0.0.1:{metrics_port + (process_id or 0)}/metrics" if metrics_port else None})
    cli_main(flow, workers_per_process=workers, process_id=process_id, addresses=addresses,
             epoch_interval=timedelta(seconds=snapshot_s), recovery_config=recovery)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flows.online_features", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", help="Kafka bootstrap (default: KAFKA_BOOTSTRAP)")
    p.add_argument("--registry", help="feature registry YAML (default flows/features.yaml)")
    p.add_argument("--recovery-dir", default="data/recovery/features", help="'' disables recovery")
    p.add_argument("--snapshot-s", type=float, default=5.0, help="epoch/snapshot interval in seconds")
    p.add_argument("-i", "--process-id", type=int)
    p.add_argument("-a", "--addresses", help="comma-separated host:port of every process")
    p.add_argument("-w", "--workers", type=int, default=1)
    p.add_argument("--from-end", action="store_true", help="without recovery state, start at the topics' end")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus /metrics on this port (+ process id); 0: off")
    a = p.parse_args(argv)
    run(a.bootstrap, registry_path=a.registry, recovery_dir=a.recovery_dir or None, snapshot_s=a.snapshot_s,
        process_id=a.process_id, addresses=a.addresses.split(",") if a.addresses else None, workers=a.workers,
        from_end=a.from_end, metrics_port=a.metrics_port or None)


if __name__ == "__main__":
    main()
