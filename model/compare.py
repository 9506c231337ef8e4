"""Baseline (without mempool features) vs main (with them), on identical origins and splits.

    python -m model.compare --dataset <id or path> [--config model/configs/kline.yaml]
                            [--extra mempool_tx_count,...] [--log champion|<version>|none]

The seed asks for two models compared on the same splits: the baseline's variates come from the
config, the main model adds the mempool features of the registry (``kind: mempool_*``) that the
dataset carries (or ``--extra``). Both are trained and scored with
``model.evaluate.compare_variate_configs``; the metrics are printed and logged on the MLflow run
of the champion (or of a given version) as ``cmp_baseline_<target>_<metric>`` and
``cmp_main_<target>_<metric>``, which is where ``GET /model`` and the dashboard's Model tab read
them. A dataset without mempool history (every mempool column null) is refused with that reason:
a "main" model trained on nothing but nulls would compare nothing.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

PREFIXES = {"baseline": "cmp_baseline", "main": "cmp_main"}


def registry_mempool_features(registry=None) -> list[str]:
    """The registry's 1-minute mempool features, in registry order."""
    from flows.registry import load_registry

    reg = registry or load_registry()
    return [f.name for f in reg.features if f.kind.startswith("mempool") and "m1" in f.cadences]


def present_columns(frame, names: list[str]) -> list[str]:
    """``names`` that the dataset has with at least one finite value."""
    out = []
    for n in names:
        if n in frame.columns and np.isfinite(frame[n].to_numpy(dtype=float, na_value=np.nan)).any():
            out.append(n)
    return out


def comparison_metrics(result: dict) -> dict[str, float]:
    """The flat metric names the run gets (and the dashboard reads)."""
    from model.train import flatten_metrics

    out: dict[str, float] = {}
    for name, prefix in PREFIXES.items():
        out.update(flatten_metrics(prefix, result["metrics"][name]))
    out["cmp_common_origins"] = float(result["n_common_origins"])
    return out


def log_comparison(settings, run_id: str, result: dict) -> dict[str, float]:
    """Log the comparison on ``run_id``: its metrics, and tags with both variate lists."""
    from model.registry import client

    c = client(settings)
    metrics = comparison_metrics(result)
    for k, v in metrics.items():
        c.log_metric(run_id, k, v)
    extra = [v for v in result["main_variates"] if v not in result["baseline_variates"]]
    c.set_tag(run_id, "cmp_main_extra_variates", ",".join(extra))
    c.set_tag(run_id, "cmp_split", str(result["split"])[:5000])
    return metrics


def _target_run(settings, which: str) -> tuple[str, str]:
    from model.registry import CHAMPION, alias_version, client

    version = alias_version(settings, CHAMPION) if which == "champion" else which
    if version is None:
        raise SystemExit("no champion to log the comparison on (train one, or pass --log none)")
    run_id = client(settings).get_model_version(settings.model_name, version).run_id
    if not run_id:
        raise SystemExit(f"version {version} has no MLflow run to log on")
    return version, run_id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.compare", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, help="dataset id (flows.datasets) or path")
    ap.add_argument("--config", default=None, help="the baseline's training config (default: TrainConfig())")
    ap.add_argument("--extra", default=None, help="comma-separated variates the main model adds "
                                                  "(default: the registry's mempool features the dataset has)")
    ap.add_argument("--log", default="champion", help="champion, a model version, or none")
    args = ap.parse_args(argv)
    from dataclasses import replace

    from model.data import load_dataset
    from model.evaluate import compare_variate_configs
    from model.train import TrainConfig
    from tickcast.config import get_settings

    settings = get_settings()
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    ds = load_dataset(args.dataset, data_dir=settings.data_dir, horizon=base.horizon,
                      flat_threshold=base.flat_threshold)
    wanted = [v.strip() for v in args.extra.split(",") if v.strip()] if args.extra else registry_mempool_features()
    extra = [v for v in present_columns(ds.frame, wanted) if v not in base.variates]
    if not extra:
        print(f"the dataset has no values for any of {wanted}: no mempool history to compare with", file=sys.stderr)
        return 2
    main_cfg = replace(base, variates=list(base.variates) + extra)
    result = compare_variate_configs(ds, base, main_cfg)
    metrics = comparison_metrics(result)
    print(f"{'metric':32s} {'baseline':>12s} {'main':>12s}")
    for k in sorted(m for m in metrics if m.startswith("cmp_baseline_")):
        suffix = k.removeprefix("cmp_baseline_")
        print(f"{suffix:32s} {metrics[k]:12.6g} {metrics.get('cmp_main_' + suffix, float('nan')):12.6g}")
    if args.log != "none":
        version, run_id = _target_run(settings, args.log)
        log_comparison(settings, run_id, result)
        print(f"logged on the run of v{version} ({run_id})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
