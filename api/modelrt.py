"""The champion ONNX model as the API runs it (model/CONTRACT.md), through onnxruntime only.

``OnnxModel(path, version)`` reads the contract's metadata, checks the graph's inputs and outputs,
makes a dry run on a synthetic window and exposes ``predict(x)`` for a batch ``[B, lookback, n]``.
Any departure from the contract raises ``ModelContractError`` with the reason, so a bad model is
refused at load and the current champion keeps serving.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OUTPUTS = ("close_logret_q", "rv_q", "range_rel_q", "direction_p")


class ModelContractError(ValueError):
    """The ONNX file does not follow model/CONTRACT.md."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    variates: tuple[str, ...]
    lookback: int
    horizon: int
    quantiles: tuple[float, ...]
    flat_threshold: float
    registry_hash: str
    cadence: str
    normalisation: Any = None
    target_scaling: Any = None
    feature_summary: dict | None = None  # training distribution (see api/drift.py), when shipped
    signal: dict | None = None  # tickcast.signal: {"threshold", "hold"} tuned on validation by model/train.py
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def q_low_index(self) -> int:
        return _closest(self.quantiles, 0.1)

    @property
    def q_high_index(self) -> int:
        return _closest(self.quantiles, 0.9)

    @property
    def median_index(self) -> int:
        return _closest(self.quantiles, 0.5)


def _closest(levels: tuple[float, ...], target: float) -> int:
    return min(range(len(levels)), key=lambda i: abs(levels[i] - target))


def _json(meta: dict[str, str], key: str, default=None, required: bool = True):
    if key not in meta:
        if required:
            raise ModelContractError(f"metadata {key} is missing")
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ModelContractError(f"metadata {key} is not JSON: {exc}") from None


def parse_metadata(meta: dict[str, str], version: str | None = None) -> ModelSpec:
    variates = _json(meta, "tickcast.variates")
    if not isinstance(variates, list) or not variates or not all(isinstance(v, str) and v for v in variates):
        raise ModelContractError("tickcast.variates must be a non-empty JSON list of feature names")
    if len(set(variates)) != len(variates):
        raise ModelContractError("tickcast.variates lists a name twice")
    try:
        lookback = int(meta["tickcast.lookback"])
        horizon = int(meta["tickcast.horizon"])
        flat = float(meta.get("tickcast.flat_threshold", "0.001"))
    except KeyError as exc:
        raise ModelContractError(f"metadata {exc.args[0]} is missing") from None
    except ValueError as exc:
        raise ModelContractError(f"bad lookback/horizon/flat_threshold: {exc}") from None
    if not (1 <= lookback <= 100_000) or not (1 <= horizon <= 10_000):
        raise ModelContractError(f"lookback {lookback} / horizon {horizon} out of range")
    if not (math.isfinite(flat) and flat >= 0):
        raise ModelContractError(f"flat_threshold {flat} must be a finite number >= 0")
    quantiles = _json(meta, "tickcast.quantiles")
    if (not isinstance(quantiles, list) or not quantiles
            or not all(isinstance(q, (int, float)) and 0 < q < 1 for q in quantiles)
            or any(b <= a for a, b in zip(quantiles, quantiles[1:]))):
        raise ModelContractError(f"tickcast.quantiles must be ascending levels in (0, 1), got {quantiles!r}")
    cadence = meta.get("tickcast.cadence", "m1")
    if cadence != "m1":
        raise ModelContractError(f"the API serves m1 models; tickcast.cadence is {cadence!r}")
    summary = _json(meta, "tickcast.feature_summary", None, required=False)
    signal = _json(meta, "tickcast.signal", None, required=False)
    if signal is not None:
        try:
            thr = float(signal["threshold"])
            hold = int(signal.get("hold", 1))
        except (TypeError, KeyError, ValueError):
            raise ModelContractError(f"tickcast.signal must be {{threshold, hold}}, got {signal!r}") from None
        if math.isnan(thr) or thr < 0 or hold < 1:
            raise ModelContractError(f"tickcast.signal threshold must be >= 0 and hold >= 1, got {signal!r}")
        signal = {**signal, "threshold": thr, "hold": hold}
    return ModelSpec(
        name=meta.get("tickcast.model_name", ""),
        version=str(version if version is not None else meta.get("tickcast.model_version", "")),
        variates=tuple(variates), lookback=lookback, horizon=horizon,
        quantiles=tuple(float(q) for q in quantiles), flat_threshold=flat,
        registry_hash=meta.get("tickcast.registry_hash", ""), cadence=cadence,
        normalisation=_json(meta, "tickcast.normalisation", None, required=False),
        target_scaling=_json(meta, "tickcast.target_scaling", None, required=False),
        feature_summary=summary if isinstance(summary, dict) else None,
        signal=signal, metadata=dict(meta))


class OnnxModel:
    """A loaded, checked champion. ``predict`` is safe to call from one thread at a time per model
    (the inference loop); onnxruntime sessions are themselves thread-safe for ``run``."""

    def __init__(self, path: str | Path, version: str | None = None, *, threads: int = 1,
                 feature_summary: dict | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelContractError(f"onnxruntime cannot load {self.path.name}: {exc}") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        spec = parse_metadata(meta, version)
        if feature_summary is not None and spec.feature_summary is None:
            spec = ModelSpec(**{**spec.__dict__, "feature_summary": feature_summary})
        self.spec = spec
        self.providers = self.session.get_providers()
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "x" or len(inputs[0].shape) != 3:
            raise ModelContractError(f"expected one input x [batch, lookback, n_variates], got "
                                     f"{[(i.name, i.shape) for i in inputs]}")
        shape = inputs[0].shape
        for dim, want, what in ((shape[1], spec.lookback, "lookback"), (shape[2], len(spec.variates), "n_variates")):
            if isinstance(dim, int) and dim != want:
                raise ModelContractError(f"input x has {what} {dim} but the metadata says {want}")
        names = {o.name for o in self.session.get_outputs()}
        missing = [o for o in OUTPUTS if o not in names]
        if missing:
            raise ModelContractError(f"outputs missing: {missing} (has {sorted(names)})")
        self.batch_fixed = shape[0] if isinstance(shape[0], int) else None
        self._dry_run()
        self.loaded_at = time.time()

    def _dry_run(self) -> None:
        """Run a synthetic window (a gentle random walk per variate) and check every output."""
        rng = np.random.default_rng(0)
        L, n = self.spec.lookback, len(self.spec.variates)
        b = self.batch_fixed or 2
        x = (1.0 + 0.01 * rng.standard_normal((b, L, n)).cumsum(axis=1)).astype(np.float32)
        try:
            out = self.predict(x)
        except ModelContractError:
            raise
        except Exception as exc:
            raise ModelContractError(f"dry run failed: {type(exc).__name__}: {exc}") from None
        H, Q = self.spec.horizon, len(self.spec.quantiles)
        want = {"close_logret_q": (b, H, Q), "rv_q": (b, Q), "range_rel_q": (b, Q), "direction_p": (b, 3)}
        for k, shp in want.items():
            if out[k].shape != shp:
                raise ModelContractError(f"output {k} has shape {out[k].shape}, expected {shp}")
            if not np.all(np.isfinite(out[k])):
                raise ModelContractError(f"output {k} is not finite on a plain random-walk window")

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.spec.lookback, len(self.spec.variates)):
            raise ModelContractError(f"input shape {x.shape} does not match "
                                     f"[B, {self.spec.lookback}, {len(self.spec.variates)}]")
        if self.batch_fixed and x.shape[0] != self.batch_fixed:
            parts = [self._run(x[i:i + 1]) for i in range(x.shape[0])] if self.batch_fixed == 1 else None
            if parts is None:
                raise ModelContractError(f"the graph has a fixed batch of {self.batch_fixed}")
            return {k: np.concatenate([p[k] for p in parts]) for k in OUTPUTS}
        return self._run(x)

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self.session.run(list(OUTPUTS), {"x": x})
        return {k: np.asarray(v, dtype=np.float64) for k, v in zip(OUTPUTS, res)}

    def info(self) -> dict:
        s = self.spec
        return {"name": s.name, "version": s.version, "variates": list(s.variates), "lookback": s.lookback,
                "horizon": s.horizon, "quantiles": list(s.quantiles), "flat_threshold": s.flat_threshold,
                "registry_hash": s.registry_hash, "cadence": s.cadence, "normalisation": s.normalisation,
                "signal": _finite_json(s.signal),
                "providers": list(self.providers), "has_feature_summary": s.feature_summary is not None,
                "path": self.path.name, "loaded_at": self.loaded_at}


def _finite_json(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
