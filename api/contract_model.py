"""A small reference model that follows model/CONTRACT.md, built with ``onnx.helper`` (no torch).

It is a real, if simple, forecaster: a random walk whose volatility is the realised volatility of the
window's 1-minute log closes, with an optional drift and fixed direction probabilities::

    sigma          = sqrt(mean(r_i^2)), r_i = log(C_i / C_{i-1}) over the lookback window
    close_logret_q = drift * h + z_q * sigma * sqrt(h)                 h = 1..H
    rv_q           = sigma * sqrt(H) * (1 + 0.3 z_q)
    range_rel_q    = 2 * sigma * sqrt(H) * (1 + 0.3 z_q)
    direction_p    = the given (down, flat, up) probabilities

The API's tests and ``bench/api_load.py`` (when the registry has no champion) serve it; the
dashboard's tests can too. ``register`` logs it to an MLflow registry (the run holds
``onnx/model.onnx``, as the contract says) and can point an alias at it. Needs the ``onnx`` package
(the ``train`` extra); the API itself never imports this module.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np


def build(path: str | Path, variates: Sequence[str], *, lookback: int, horizon: int = 30,
          quantiles: Sequence[float] = (0.1, 0.5, 0.9), drift: float = 0.0,
          direction_p: Sequence[float] = (0.3, 0.4, 0.3), flat_threshold: float = 0.001, close: str = "close",
          model_name: str = "contract-random-walk", model_version: str = "", registry_hash: str = "",
          extra_metadata: dict | None = None) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    variates = list(variates)
    if close not in variates:
        raise ValueError(f"the variates must include {close!r}")
    z = np.array([NormalDist().inv_cdf(q) for q in quantiles], dtype=np.float32)
    h = np.arange(1, horizon + 1, dtype=np.float32)
    k = (np.sqrt(h)[:, None] * z[None, :]).astype(np.float32)  # [H, Q]
    d = np.repeat((drift * h)[:, None], len(quantiles), axis=1).astype(np.float32)
    spread = (1.0 + 0.3 * z).astype(np.float32)
    if np.any(spread <= 0):
        raise ValueError("quantiles too extreme for the rv/range spread")
    consts = {
        "idx": np.array(variates.index(close), dtype=np.int64),
        "s1": np.array([1], dtype=np.int64), "e1": np.array([lookback], dtype=np.int64),
        "s0": np.array([0], dtype=np.int64), "e0": np.array([lookback - 1], dtype=np.int64),
        "ax1": np.array([1], dtype=np.int64), "ax2": np.array([2], dtype=np.int64),
        "K": k, "D": d,
        "RV": (math.sqrt(horizon) * spread)[None, :].astype(np.float32),
        "RG": (2.0 * math.sqrt(horizon) * spread)[None, :].astype(np.float32),
        "P": np.array(direction_p, dtype=np.float32)[None, :],
        "zero": np.array(0.0, dtype=np.float32),
    }
    init = [numpy_helper.from_array(v, name=n) for n, v in consts.items()]
    nodes = [
        helper.make_node("Gather", ["x", "idx"], ["c"], axis=2),
        helper.make_node("Log", ["c"], ["lc"]),
        helper.make_node("Slice", ["lc", "s1", "e1", "ax1"], ["a"]),
        helper.make_node("Slice", ["lc", "s0", "e0", "ax1"], ["b"]),
        helper.make_node("Sub", ["a", "b"], ["r"]),
        helper.make_node("Mul", ["r", "r"], ["r2"]),
        helper.make_node("ReduceMean", ["r2"], ["v"], axes=[1], keepdims=1),
        helper.make_node("Sqrt", ["v"], ["sig"]),  # [B, 1]
        helper.make_node("Unsqueeze", ["sig", "ax2"], ["sig3"]),  # [B, 1, 1]
        helper.make_node("Mul", ["sig3", "K"], ["pk"]),
        helper.make_node("Add", ["pk", "D"], ["close_logret_q"]),
        helper.make_node("Mul", ["sig", "RV"], ["rv_q"]),
        helper.make_node("Mul", ["sig", "RG"], ["range_rel_q"]),
        helper.make_node("Mul", ["sig", "zero"], ["sz"]),
        helper.make_node("Add", ["sz", "P"], ["direction_p"]),
    ]
    Q = len(quantiles)
    graph = helper.make_graph(
        nodes, "contract_random_walk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", lookback, len(variates)])],
        [helper.make_tensor_value_info("close_logret_q", TensorProto.FLOAT, ["batch", horizon, Q]),
         helper.make_tensor_value_info("rv_q", TensorProto.FLOAT, ["batch", Q]),
         helper.make_tensor_value_info("range_rel_q", TensorProto.FLOAT, ["batch", Q]),
         helper.make_tensor_value_info("direction_p", TensorProto.FLOAT, ["batch", 3])],
        init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tickcast.api")
    model.ir_version = 8
    meta = {
        "tickcast.variates": json.dumps(variates),
        "tickcast.lookback": str(lookback),
        "tickcast.horizon": str(horizon),
        "tickcast.quantiles": json.dumps([float(q) for q in quantiles]),
        "tickcast.flat_threshold": repr(float(flat_threshold)),
        "tickcast.registry_hash": registry_hash,
        "tickcast.cadence": "m1",
        "tickcast.normalisation": json.dumps({"kind": "none", "note": "uses log closes only"}),
        "tickcast.model_name": model_name,
        "tickcast.model_version": str(model_version),
        "tickcast.target_scaling": json.dumps({"kind": "none"}),
    }
    for key, val in (extra_metadata or {}).items():
        meta[f"tickcast.{key}"] = val if isinstance(val, str) else json.dumps(val)
    for key, val in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, val
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def register(tracking_uri: str, model_name: str, onnx_path: str | Path, *, artifact_root: str | Path,
             alias: str | None = "champion", experiment: str = "tickcast-api-reference",
             tags: dict[str, str] | None = None, metrics: dict[str, float] | None = None) -> str:
    """Log ``onnx_path`` as ``onnx/model.onnx`` of a new run, register it, optionally set ``alias``.
    Returns the new version."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=Path(artifact_root).resolve().as_uri())
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name)
    run = client.create_run(exp_id, run_name="contract-random-walk")
    onnx_path = Path(onnx_path)
    if onnx_path.name != "model.onnx":
        raise ValueError("the contract names the artifact onnx/model.onnx: pass a file called model.onnx")
    client.log_artifact(run.info.run_id, str(onnx_path), "onnx")
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, float(value))
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(model_name, f"{run.info.artifact_uri}/onnx", run_id=run.info.run_id,
                                     tags=tags or {})
    if alias:
        client.set_registered_model_alias(model_name, alias, mv.version)
    del mlflow
    return str(mv.version)
