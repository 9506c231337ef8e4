"""Train and evaluate the paper's iTransformer on any multivariate CSV under the paper's protocol,
to compare with Liu et al. (ICLR 2024), Table 1 / Appendix (e.g. ETTh1 average over horizons
96..720: MSE 0.454, MAE 0.447; ETTm1: 0.407 / 0.410; Weather: 0.258 / 0.278; ECL: 0.178 / 0.270).

    python -m model.paper_check ETTh1.csv [--horizons 96,192,336,720] [--epochs 10]

Protocol (as in the paper's released setup): the first column is the date, every other numeric
column is a variate; chronological split 12/4/4 months for ETTh*/ETTm* files (by name) and
70%/10%/20% otherwise, validation and test windows starting where the previous part ends (their
lookback reaches back into the previous part); a StandardScaler fitted on the train part only;
lookback 96; MSE loss, Adam, early stopping on validation MSE (patience 3), learning-rate halving
each epoch; time features (hour of day, day of week, day of month, day of year scaled to
[-0.5, 0.5]) as extra tokens; MSE/MAE on the normalised test values over all windows (stride 1).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def time_features(dates: pd.Series) -> np.ndarray:
    d = pd.to_datetime(dates)
    # the paper's four (its code's default freq='h', used by every released script): hour of day,
    # day of week, day of month, day of year
    return np.stack([d.dt.hour / 23.0 - 0.5, d.dt.day_of_week / 6.0 - 0.5, (d.dt.day - 1) / 30.0 - 0.5,
                     (d.dt.day_of_year - 1) / 365.0 - 0.5], axis=1).astype(np.float32)


def borders(name: str, n: int, lookback: int) -> tuple[list[int], list[int]]:
    """Start/end row of train, val, test (the paper's data loaders)."""
    up = name.upper()
    if up.startswith("ETTH"):
        m = 30 * 24
        b1 = [0, 12 * m - lookback, 12 * m + 4 * m - lookback]
        b2 = [12 * m, 12 * m + 4 * m, 12 * m + 8 * m]
    elif up.startswith("ETTM"):
        m = 30 * 24 * 4
        b1 = [0, 12 * m - lookback, 12 * m + 4 * m - lookback]
        b2 = [12 * m, 12 * m + 4 * m, 12 * m + 8 * m]
    else:
        n_train, n_test = int(n * 0.7), int(n * 0.2)
        n_val = n - n_train - n_test
        b1 = [0, n_train - lookback, n - n_test - lookback]
        b2 = [n_train, n_train + n_val, n]
    return b1, [min(b, n) for b in b2]


def run(csv: str | Path, horizons=(96, 192, 336, 720), lookback: int = 96, epochs: int = 10, batch_size: int = 32,
        lr: float = 1e-4, d_model: int = 128, n_heads: int = 8, e_layers: int = 2, d_ff: int = 128,
        dropout: float = 0.1, patience: int = 3, max_train_windows: int | None = None, threads: int = 1,
        seed: int = 2021, progress: bool = True) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from model.itransformer import PaperITransformer

    torch.set_num_threads(threads)
    df = pd.read_csv(csv)
    date_col = df.columns[0]
    values = df.drop(columns=[date_col]).select_dtypes("number").to_numpy(np.float32)
    marks = time_features(df[date_col])
    b1, b2 = borders(Path(csv).name, len(df), lookback)
    train = values[b1[0]:b2[0]]
    mean, std = train.mean(0), train.std(0)
    std[std == 0] = 1.0
    data = (values - mean) / std
    results = []
    for H in horizons:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)

        def windows(part, H=H):
            lo, hi = b1[part], b2[part]
            starts = np.arange(lo, hi - lookback - H + 1)
            return starts

        tr, va, te = windows(0), windows(1), windows(2)
        if len(te) == 0 or len(tr) == 0:
            raise ValueError(f"horizon {H}: not enough rows ({len(df)}) for lookback {lookback}")
        model = PaperITransformer(values.shape[1], lookback, H, d_model, n_heads, e_layers, d_ff, dropout)
        opt = torch.optim.Adam(model.parameters(), lr=lr)

        def batch(starts, H=H):
            idx = starts[:, None] + np.arange(lookback)[None, :]
            fut = starts[:, None] + lookback + np.arange(H)[None, :]
            return (torch.from_numpy(data[idx]), torch.from_numpy(marks[idx]), torch.from_numpy(data[fut]))

        def evaluate(starts, model=model):
            model.eval()
            se = ae = n = 0.0
            with torch.no_grad():
                for i in range(0, len(starts), 256):
                    x, xm, y = batch(starts[i:i + 256])
                    p = model(x, xm)
                    se += float(((p - y) ** 2).sum())
                    ae += float((p - y).abs().sum())
                    n += y.numel()
            return se / n, ae / n

        best, best_state, bad = math.inf, None, 0
        t0 = time.perf_counter()
        for ep in range(epochs):
            model.train()
            order = rng.permutation(tr)
            if max_train_windows:
                order = order[:max_train_windows]
            for i in tqdm(range(0, len(order), batch_size), desc=f"H={H} epoch {ep + 1}", disable=not progress,
                          leave=False):
                x, xm, y = batch(order[i:i + batch_size])
                loss = torch.mean((model(x, xm) - y) ** 2)
                opt.zero_grad()
                loss.backward()
                opt.step()
            vmse, _ = evaluate(va)
            if vmse < best:
                best, best_state, bad = vmse, {k: v.clone() for k, v in model.state_dict().items()}, 0
            else:
                bad += 1
                if bad >= patience:
                    break
            for g in opt.param_groups:  # the paper's "type1": lr * 0.5^(epoch - 1) for epochs 1, 2, ...
                g["lr"] = lr * 0.5 ** ep  # next epoch is ep + 2 (1-based): the first two run at lr
        model.load_state_dict(best_state)
        mse, mae = evaluate(te)
        results.append({"horizon": H, "mse": mse, "mae": mae, "val_mse": best, "epochs": ep + 1,
                        "seconds": time.perf_counter() - t0, "test_windows": int(len(te))})
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.paper_check", description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--horizons", default="96,192,336,720")
    ap.add_argument("--lookback", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=8)
    ap.add_argument("--e-layers", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=128)
    ap.add_argument("--max-train-windows", type=int, default=None, help="subsample training windows per epoch")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if not Path(a.csv).is_file():
        print(f"no such file: {a.csv}", file=sys.stderr)
        return 2
    res = run(a.csv, [int(h) for h in a.horizons.split(",")], a.lookback, a.epochs, a.batch_size, a.lr, a.d_model,
              a.n_heads, a.e_layers, a.d_ff, max_train_windows=a.max_train_windows, threads=a.threads)
    print("| horizon | MSE | MAE | epochs | s |\n|---|---|---|---|---|")
    for r in res:
        print(f"| {r['horizon']} | {r['mse']:.3f} | {r['mae']:.3f} | {r['epochs']} | {r['seconds']:.0f} |")
    print(f"| avg | {np.mean([r['mse'] for r in res]):.3f} | {np.mean([r['mae'] for r in res]):.3f} | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
