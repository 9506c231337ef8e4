"""Running an exported model with onnxruntime (no torch): sessions, metadata, batched prediction.

The API can use ``open_session`` / ``read_metadata`` / ``run_onnx``; training uses ``forecast_windows``
to re-score the current champion on a challenger's validation origins.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUTPUTS = ("close_logret_q", "rv_q", "range_rel_q", "direction_p")


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are present, CPU otherwise (CPU always as fallback)."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    out = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in avail else []
    return out + ["CPUExecutionProvider"]


def open_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=providers())


def read_metadata(path_or_session) -> dict:
    """The ``tickcast.*`` metadata of a model file (JSON values decoded)."""
    if isinstance(path_or_session, (str, Path)):
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path_or_session), load_external_data=False).metadata_props}
    else:
        props = dict(path_or_session.get_modelmeta().custom_metadata_map)
    out = {}
    for k, v in props.items():
        if not k.startswith("tickcast."):
            continue
        key = k.removeprefix("tickcast.")
        try:
            out[key] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[key] = v
    return out


def run_onnx(session, x: np.ndarray) -> dict[str, np.ndarray]:
    res = session.run(list(OUTPUTS), {"x": np.ascontiguousarray(x, dtype=np.float32)})
    return dict(zip(OUTPUTS, res))


def forecast_windows(session, w, origins: np.ndarray, batch_size: int = 2048) -> dict:
    """Forecast dict (close_q, rv_q, range_q, dir_p) for origins of ``model.data.Windows`` whose
    variates and lookback match the session's metadata."""
    meta = read_metadata(session)
    lookback = int(meta.get("lookback", -1))
    if list(meta.get("variates", [])) != list(w.variates) or not 0 < lookback <= w.lookback:
        raise ValueError(f"windows (variates {len(w.variates)}, lookback {w.lookback}) do not fit the model's "
                         f"variates/lookback ({len(meta.get('variates', []))}, {lookback})")
    parts = {k: [] for k in OUTPUTS}
    for i in range(0, len(origins), batch_size):
        out = run_onnx(session, w.gather(origins[i:i + batch_size])[:, w.lookback - lookback:])
        for k in OUTPUTS:
            parts[k].append(out[k])
    cat = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in parts.items()}
    return {"close_q": cat["close_logret_q"], "rv_q": cat["rv_q"], "range_q": cat["range_rel_q"],
            "dir_p": cat["direction_p"]}
