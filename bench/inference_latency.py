"""Inference latency of the exported iTransformer and its training time per epoch.

Model: the repo's kline configuration (model/configs/kline.yaml: 15 variates, lookback 240,
d_model 64, 2 layers; ``--config`` for another), exported to ONNX by model/export.py (random
weights: the same graph and cost as a trained model). Inputs: windows of 4 symbols built by
flows/candles.py from synthetic random-walk candles (model/synthetic.py).

- ONNX: p50/p99 of one onnxruntime ``session.run`` on a batch of 4 (``--calls`` timed calls after
  warm-up, 1 intra-op thread: the machine is shared).
- Reference: torch eager on the same inputs (``torch.no_grad``, 1 thread); ratio = ONNX p50 / torch p50.
- Training: one epoch of ``origins_per_epoch`` windows (batch 256, AdamW, the real loss) on the
  synthetic windows, seconds per epoch.

Last lines: ``RESULT p50_ms=``, ``RESULT p99_ms=``, ``RESULT ratio_to_torch=``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="kline.yaml")
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--epoch-origins", type=int, default=None, help="default: the config's origins_per_epoch")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    from model.data import load_dataset, make_windows
    from model.export import contract_metadata, export_onnx, parity_check
    from model.itransformer import ITransformer
    from model.serving import open_session
    from model.synthetic import synthetic_klines
    from model.train import TrainConfig, fit_member

    torch.set_num_threads(a.threads)
    cfg = TrainConfig.load(a.config)
    n_rows = max(20_000, cfg.lookback + 2_000)
    import pandas as pd

    kl = pd.concat([synthetic_klines(n_rows, seed=i, symbol=s) for i, s in
                    enumerate(["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"])], ignore_index=True)
    ds = load_dataset(kl, horizon=cfg.horizon)
    w = make_windows(ds, cfg.variates, cfg.window_lookback, cfg.horizon)
    last = [w.origins[w.symbol[w.origins] == s].max() for s in ("BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT")]
    x = w.gather(np.array(last))  # [4, L, V]: the newest window of each symbol
    torch.manual_seed(0)
    if cfg.members:  # a heterogeneous ensemble config: the whole ensemble is what gets served
        from model.itransformer import Ensemble

        model = Ensemble([ITransformer(cfg.member(k).model_config()) for k in range(len(cfg.members))]).eval()
    else:
        model = ITransformer(cfg.model_config()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", contract_metadata(model.cfg), example=x)
        par = parity_check(model, path, w.gather(w.origins[-8:]))
        sess = open_session(path, threads=a.threads)
        feed = {"x": np.ascontiguousarray(x, np.float32)}
        for _ in range(50):
            sess.run(None, feed)
        t_onnx = []
        for _ in range(a.calls):
            t0 = time.perf_counter()
            sess.run(None, feed)
            t_onnx.append(time.perf_counter() - t0)
    xt = torch.from_numpy(x)
    t_torch = []
    with torch.no_grad():
        for _ in range(50):
            model(xt)
        for _ in range(a.calls):
            t0 = time.perf_counter()
            model(xt)
            t_torch.append(time.perf_counter() - t0)
    # training time per epoch (the real training step on synthetic windows)
    cfg.epochs, cfg.patience = 1, 1
    if a.epoch_origins:
        cfg.origins_per_epoch = a.epoch_origins
    cfg.threads = a.threads
    n = len(w.origins)
    tr, va = w.origins[: int(n * 0.9)], w.origins[int(n * 0.9):][:2000]
    _, info = fit_member(w, tr, va, cfg.member(0), seed=0, progress=True, desc="bench")
    epoch_s = info["history"][0]["seconds"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {a.config} lookback {cfg.window_lookback}, {len(cfg.variates)} variates, d_model {cfg.d_model}, "
          f"{cfg.e_layers} layers, {max(1, len(cfg.members))} member(s), {n_params} parameters; batch of 4 symbols; "
          f"{a.threads} thread(s)")
    print(f"parity ORT vs torch: max abs diff batch 1 {par[1]:.2e}, batch 8 {par[8]:.2e}")
    print(f"torch eager: p50 {_pct(t_torch, 50):.3f} ms, p99 {_pct(t_torch, 99):.3f} ms")
    print(f"training: {epoch_s:.1f} s per epoch of {min(len(tr), cfg.origins_per_epoch)} windows "
          f"(batch {cfg.batch_size}, one member)")
    print(f"RESULT train_epoch_s={epoch_s:.2f}")
    print(f"RESULT torch_p50_ms={_pct(t_torch, 50):.4f}")
    print(f"RESULT p50_ms={_pct(t_onnx, 50):.4f}")
    print(f"RESULT p99_ms={_pct(t_onnx, 99):.4f}")
    print(f"RESULT ratio_to_torch={_pct(t_onnx, 50) / _pct(t_torch, 50):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
