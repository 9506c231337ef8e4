"""Model-selection experiments on the real data's VALIDATION part only (never the test part).

    python -m model.experiments baselines            # every baseline on validation
    python -m model.experiments itransformer --set lookback=480 --set ensemble=1 ...
    python -m model.experiments itransformer --since 2025-05-30 --cross-asset log_return_1m,rv_15m

``--since`` keeps only rows from that day on (the shared Bybit days are the only period where BTC and
ETH share minutes); ``--cross-asset`` adds the other symbol's variates at the same minute as extra
variates ``xa_<name>`` (the iTransformer attends across variate tokens: a cross-asset token is what
its design is for). Compare such a run with a ``--since`` run without it: same origins otherwise.

Each run appends a JSON line to ``data/experiments/val_results.jsonl`` (the record of what was
tried). Training uses the real split's train part with early stopping on a slice of validation;
scores are on the whole validation part.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from model.data import make_windows
from model.evaluate import evaluate_forecasters, run_baselines
from model.realdata import REAL_SPLIT, build_real_dataset
from model.train import TrainConfig, fit_model, make_split, predict

OUT = Path("data/experiments/val_results.jsonl")


def with_cross_asset(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Add ``xa_<name>``: the other symbol's value of each variate at the same minute (two symbols;
    NaN where the other has no row, so such minutes are no valid window)."""
    syms = sorted(df["symbol"].unique())
    if len(syms) != 2:
        raise ValueError(f"cross-asset variates need exactly two symbols, got {syms}")
    other = df[["symbol", "minute_ts", *names]].copy()
    other["symbol"] = other["symbol"].map({syms[0]: syms[1], syms[1]: syms[0]})
    other = other.rename(columns={n: f"xa_{n}" for n in names})
    return df.merge(other, on=["symbol", "minute_ts"], how="left")


def _summ(m: dict) -> dict:
    return {t: {k: round(m[t][k], 7) for k in ("pinball", "coverage", "mae", "dir_acc")} for t in ("close", "rv", "range")}


def _record(entry: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def _parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets:
        k, v = s.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["baselines", "itransformer"])
    ap.add_argument("--config", default="kline.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--tag", default="")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--since", default=None, help="drop rows before this UTC date/time")
    ap.add_argument("--cross-asset", default="", help="comma-separated variates of the other symbol to add")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cfg = TrainConfig.load(args.config, **_parse_sets(args.set))
    cfg.split = REAL_SPLIT
    ds = build_real_dataset(progress=False)
    if args.since:
        ds.frame = ds.frame[ds.frame["minute_ts"] >= int(pd.Timestamp(args.since, tz="UTC").value // 1_000_000)]
    if args.cross_asset:
        names = args.cross_asset.split(",")
        ds.frame = with_cross_asset(ds.frame, names)
        cfg.variates = list(cfg.variates) + [f"xa_{n}" for n in names]
    w = make_windows(ds, cfg.variates, cfg.window_lookback, cfg.horizon, cfg.flat_threshold)
    sp = make_split(w, cfg.split, cfg.embargo)
    t0 = time.perf_counter()
    if args.what == "baselines":
        bl = run_baselines(w, sp.train, sp.val, [sp.val], cfg.quantiles, progress=True)
        fcs = {k: v[0] for k, v in bl.items() if not k.startswith("_")}
        res = evaluate_forecasters(w, fcs, sp.val, cfg.quantiles)
        for name, m in res.items():
            print(name, json.dumps(_summ(m)))
            _record({"what": name, "tag": args.tag, "lookback": cfg.lookback, "val": _summ(m),
                     "params": getattr(bl["_fitted"][name], "params", {}) if name in bl["_fitted"] else {}})
    else:
        model, info = fit_model(w, sp.train, sp.val, cfg, progress=args.progress)
        fc = predict(model, w, sp.val)
        if args.tag:
            np.savez_compressed(OUT.parent / f"val_fc_{args.tag}.npz", origins=sp.val, **fc)
        m = evaluate_forecasters(w, {"it": fc}, sp.val, cfg.quantiles)["it"]
        print(json.dumps(_summ(m)), f"dir3={m['direction']['acc3']:.4f}")
        _record({"what": "itransformer", "tag": args.tag, "since": args.since,
                 "config": {k: v for k, v in cfg.to_dict().items() if k != "variates"},
                 "variates": cfg.variates, "val": _summ(m), "dir3": m["direction"]["acc3"],
                 "seconds": time.perf_counter() - t0, "epochs": [len(i["history"]) for i in info["members"]],
                 "history": [i["history"] for i in info["members"]]})
    print(f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
