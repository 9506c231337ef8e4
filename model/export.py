"""ONNX export (torch 2.13 dynamo exporter) with a dynamic batch axis, the metadata of
model/CONTRACT.md inside the file, and the onnxruntime-vs-torch parity check."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from model.itransformer import normalisation_doc, target_scaling_doc
from model.serving import OUTPUTS, open_session, run_onnx

# the exporter warns once per torchvision op it cannot register ("torchvision is not installed"):
# tickcast's model uses none of them
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

PARITY_TOL = 1e-4


class _Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def contract_metadata(cfg, registry_hash: str = "", model_name: str = "", model_version: str = "",
                      extra: dict | None = None) -> dict[str, str]:
    meta = {
        "tickcast.variates": json.dumps(list(cfg.variates)),
        "tickcast.lookback": str(int(cfg.lookback)),
        "tickcast.horizon": str(int(cfg.horizon)),
        "tickcast.quantiles": json.dumps([float(q) for q in cfg.quantiles]),
        "tickcast.flat_threshold": repr(float(cfg.flat_threshold)),
        "tickcast.registry_hash": registry_hash or "",
        "tickcast.cadence": "m1",
        "tickcast.normalisation": json.dumps(normalisation_doc(cfg)),
        "tickcast.model_name": model_name,
        "tickcast.model_version": str(model_version),
        "tickcast.target_scaling": json.dumps(target_scaling_doc(cfg)),
    }
    for k, v in (extra or {}).items():
        meta[f"tickcast.{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta


def export_onnx(model, path: str | Path, metadata: dict[str, str], example: np.ndarray | None = None) -> Path:
    """Export with input ``x`` [batch, lookback, n_variates] (batch dynamic; traced with batch 4) and
    the four named outputs; write the metadata into ``metadata_props``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model = model.eval()
    if example is None:
        example = _example_input(cfg, 4)
    x = torch.as_tensor(np.asarray(example, np.float32))
    if x.shape[0] < 2:
        raise ValueError("trace with a batch of 2 or more (a batch of 1 can get fixed into the graph)")
    if "tickcast.lookback" in metadata and x.shape[1] != int(metadata["tickcast.lookback"]):
        # only the batch axis is dynamic: the traced length is the served length
        raise ValueError(f"example windows of {x.shape[1]} minutes, but the metadata says lookback "
                         f"{metadata['tickcast.lookback']}")
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_Wrapper(model), (x,), dynamo=True, external_data=False,
                                 input_names=["x"], output_names=list(OUTPUTS),
                                 dynamic_shapes={"x": {0: batch}}, verbose=False)
    proto = prog.model_proto
    del proto.metadata_props[:]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    onnx.checker.check_model(proto)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save_model(proto, str(tmp))
    tmp.replace(path)
    return path


def _example_input(cfg, batch: int, seed: int = 0) -> np.ndarray:
    """Plausible raw windows (random walk prices, small returns, time features) for tracing/parity."""
    rng = np.random.default_rng(seed)
    L, V = cfg.lookback, len(cfg.variates)
    x = rng.normal(0, 1, (batch, L, V)).astype(np.float32)
    for j, name in enumerate(cfg.variates):
        if name == "close":
            x[:, :, j] = 30000 * np.exp(np.cumsum(rng.normal(0, 5e-4, (batch, L)), axis=1))
        elif name.startswith(("log_return", "return_", "body_rel")):
            x[:, :, j] *= 1e-3
        elif name.startswith(("range_rel", "rv_", "parkinson")):
            x[:, :, j] = np.abs(x[:, :, j]) * 1e-3 + 1e-4
        elif name in ("tod_sin", "tod_cos", "dow_sin", "dow_cos"):
            x[:, :, j] = np.sin(np.linspace(0, 1, L))[None, :]
    return x


def parity_check(model, path: str | Path, windows: np.ndarray | None = None, batches=(1, 8)) -> dict:
    """Max abs difference of every output between onnxruntime and torch eager at each batch size."""
    sess = open_session(path)
    model = model.eval()
    out = {}
    for b in batches:
        x = windows[:b] if windows is not None and len(windows) >= b else _example_input(model.cfg, b, seed=b)
        x = np.asarray(x, np.float32)
        with torch.no_grad():
            ref = [t.numpy() for t in model(torch.from_numpy(x))]
        got = run_onnx(sess, x)
        out[b] = max(float(np.max(np.abs(got[k] - r))) for k, r in zip(OUTPUTS, ref))
    out["ok"] = all(v <= PARITY_TOL for k, v in out.items() if k != "ok")
    return out
