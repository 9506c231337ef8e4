"""The real-data evaluation, run ONCE at the end: the iTransformer against every baseline on the
held-out, later part of the shared real klines (model/realdata.py: test = Bybit from 2025-06-19),
with the configuration chosen on validation only (model/configs/real_final.yaml).

    python -m model.real_eval [--config real_final.yaml] [--folds 1] [--out data/reports/real_eval]

Walk-forward: the test period is cut into ``--folds`` consecutive blocks; for each block every model
is (re)fitted on all data before it (purged: 30 min), with the 7 days before the block as
validation (early stopping, EWMA half-life, LightGBM early stopping, signal thresholds). The
metrics pool every block's test origins; the backtests run each block with its own thresholds.

Prints the comparison table (per target: pinball, coverage of [q0.1, q0.9], MAE, directional
accuracy, ...; the strategy backtest's P&L after fees) and the quality-bar verdict; writes
``report.md``, ``results.json`` and PNG plots. The "main with mempool" comparison needs a dataset
with mempool features; the shared real data has none, so it is reported as not run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from model.backtest import BacktestConfig
from model.data import make_windows
from model.evaluate import backtest_forecast, comparison_table, evaluate_forecasters, run_baselines
from model.realdata import TEST_START, build_real_dataset
from model.splits import assert_no_leakage, walk_forward
from model.train import TrainConfig, fit_model, predict, tune_signal

SIZINGS = ("fixed", "vol_target")


def _concat(fcs: list[dict]) -> dict:
    return {k: np.concatenate([f[k] for f in fcs]) for k in fcs[0] if fcs[0].get(k) is not None}


def _merge_backtests(parts: list[dict]) -> dict:
    """Per-block backtests -> one summary: P&L summed, minute returns concatenated for the ratios."""
    from model.backtest import backtest_stats

    nets, ts, trades, pos = [], [], [], []
    fees = funding_paid = 0.0
    for p in parts:
        df = pd.concat([pd.Series(r.net, index=r.ts) for r in p["results"].values()], axis=1).fillna(0.0).sort_index()
        nets.append(df.mean(axis=1).to_numpy())
        ts.append(df.index.to_numpy(np.int64))
        pos.append(np.sign(np.abs(pd.concat([pd.Series(r.position, index=r.ts) for r in p["results"].values()],
                                            axis=1).fillna(0.0).sort_index()).sum(axis=1).to_numpy()))
        trades.append(np.concatenate([r.trades for r in p["results"].values()]) / len(p["results"]))
        fees += p["total"]["fees_paid"]
        funding_paid += p["total"]["funding_paid"]
    net, t = np.concatenate(nets), np.concatenate(ts)
    equity = 10_000.0 * np.cumprod(1 + net)
    total = backtest_stats(t, net, equity, np.concatenate(pos), np.zeros(len(net)), np.zeros(len(net)), 10_000.0,
                           np.concatenate(trades))
    total["fees_paid"] = fees
    total["funding_paid"] = funding_paid
    results = {}
    for p in parts:
        for sym, r in p["results"].items():
            results.setdefault(sym, []).append(r)
    from model.backtest import BacktestResult

    merged = {sym: BacktestResult(np.concatenate([r.ts for r in rs]), np.concatenate([r.position for r in rs]),
                                  np.concatenate([r.gross for r in rs]), np.concatenate([r.cost for r in rs]),
                                  np.concatenate([r.funding for r in rs]), np.concatenate([r.net for r in rs]),
                                  np.concatenate([r.equity for r in rs]), {}, np.concatenate([r.trades for r in rs]))
              for sym, rs in results.items()}
    return {"total": total, "results": merged}


def run_eval(ds, cfg: TrainConfig, test_start: int, folds: int = 1, val_days: float = 7.0,
             lgbm_threads: int = 1, progress: bool = True) -> dict:
    """Walk-forward evaluation of the iTransformer and every baseline over [test_start, end]."""
    w = make_windows(ds, cfg.variates, cfg.window_lookback, cfg.horizon, cfg.flat_threshold)
    test_end = int(w.ts[w.origins].max())
    splits = walk_forward(w.origins, w.ts, test_start, test_end, folds, cfg.horizon, cfg.embargo,
                          val_minutes=int(val_days * 1440))
    taus = cfg.quantiles
    names = ["itransformer", "random_walk", "ewma", "garch", "lgbm_raw", "lgbm_std"]
    fc_test = {n: [] for n in names}
    bts = {n: {s: [] for s in SIZINGS} for n in names}
    signals = {n: [] for n in names}
    fold_info, test_all = [], []
    for k, sp in enumerate(splits):
        assert_no_leakage(sp, w.ts, cfg.horizon)
        print(f"fold {k + 1}/{len(splits)}: train {len(sp.train)}, val {len(sp.val)}, test {len(sp.test)} origins",
              file=sys.stderr)
        t0 = time.perf_counter()
        model, info = fit_model(w, sp.train, sp.val, cfg, progress=progress)
        fcs = {"itransformer": (predict(model, w, sp.val), predict(model, w, sp.test))}
        t_it = time.perf_counter() - t0
        bl = run_baselines(w, sp.train, sp.val, [sp.val, sp.test], taus, progress=progress,
                           lgbm_threads=lgbm_threads)
        for n in names[1:]:
            fcs[n] = tuple(bl[n])
        for n, (fv, ft) in fcs.items():
            fc_test[n].append(ft)
            sig = tune_signal(fv, w, sp.val)
            signals[n].append(sig)
            for s in SIZINGS:
                bts[n][s].append(backtest_forecast(w, sp.test, ft, sig["threshold"], sig["hold"],
                                                   BacktestConfig(sizing=s)))
        test_all.append(sp.test)
        fold_info.append({"split": sp.describe(w.ts), "itransformer_seconds": t_it,
                          "epochs": [len(m["history"]) for m in info["members"]],
                          "seconds_per_epoch": info["seconds_per_epoch"],
                          "baseline_params": {n: getattr(b, "params", {}) for n, b in bl["_fitted"].items()
                                              if n in ("ewma", "garch")}})
    test = np.concatenate(test_all)
    forecasts = {n: _concat(v) for n, v in fc_test.items()}
    metrics = evaluate_forecasters(w, forecasts, test, taus)
    backtests = {n: {s: _merge_backtests(v) for s, v in d.items()} for n, d in bts.items()}
    return {"windows": w, "test": test, "forecasts": forecasts, "metrics": metrics, "backtests": backtests,
            "signals": signals, "folds": fold_info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.real_eval", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="real_final.yaml")
    ap.add_argument("--folds", type=int, default=1)
    ap.add_argument("--val-days", type=float, default=7.0)
    ap.add_argument("--out", default="data/reports/real_eval")
    ap.add_argument("--lgbm-threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch

    t_start = time.perf_counter()
    cfg = TrainConfig.load(a.config)
    torch.set_num_threads(max(1, cfg.threads))
    ds = build_real_dataset(progress=True)
    test_start = int(pd.Timestamp(TEST_START).value // 10**6)
    r = run_eval(ds, cfg, test_start, a.folds, a.val_days, a.lgbm_threads)
    metrics, backtests = r["metrics"], r["backtests"]
    table = comparison_table(metrics, backtests)
    verdict = quality_bar(metrics, gain_intervals(r["windows"], r["forecasts"], r["test"], cfg.quantiles, metrics))
    out = Path(a.out)
    from model.report import write_eval_report

    split_desc = {"folds": [f["split"] for f in r["folds"]], "test_start": TEST_START}
    write_eval_report(out, r["windows"], r["test"], r["forecasts"], metrics, backtests,
                      table + "\n\n" + verdict["text"], f"real data, config {a.config}", split_desc)
    mempool = [c for c in ds.frame.columns if "mempool" in c.lower()]
    note = ("main-with-mempool comparison: not run, the shared real data has no mempool features "
            "(model.evaluate.compare_variate_configs runs it on any dataset that has them)") if not mempool else ""
    res = {"config": cfg.to_dict(), "folds": r["folds"], "metrics": metrics, "verdict": verdict,
           "signals": r["signals"], "mempool": note, "seconds": time.perf_counter() - t_start,
           "backtests": {n: {s: b["total"] for s, b in d.items()} for n, d in backtests.items()}}
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    # every model's test forecasts with their origins: any later analysis needs no re-run
    np.savez_compressed(out / "test_forecasts.npz", origins=r["test"], minute_ts=r["windows"].ts[r["test"]],
                        symbol=r["windows"].symbol[r["test"]].astype(str),
                        **{f"{n}__{k}": v for n, fc in r["forecasts"].items() for k, v in fc.items()})
    print(table)
    print()
    print(verdict["text"])
    if note:
        print(note)
    print(f"\nreport: {out / 'report.md'} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return 0


TARGETS = {"close": ("close_q", "path"), "rv": ("rv_q", "rv"), "range": ("range_q", "range_rel")}


def _best_baseline(metrics: dict, tgt: str, model: str) -> str:
    return min((n for n in metrics if n != model), key=lambda n: metrics[n][tgt]["pinball"])


def gain_intervals(w, forecasts: dict, test: np.ndarray, taus, metrics: dict, model: str = "itransformer",
                   n_boot: int = 2000) -> dict:
    """Per target: the model's pinball gain over the best baseline with a 90% bootstrap interval over
    UTC days (``model.metrics.bootstrap_gain``): how sure the test part lets one be of the gain."""
    from model.metrics import bootstrap_gain, pinball_per_origin

    y = w.targets(test)
    days = w.ts[test] // 86_400_000
    out = {}
    for tgt, (fk, yk) in TARGETS.items():
        best = _best_baseline(metrics, tgt, model)
        yt = y[yk][:, -1] if yk == "path" else y[yk]  # close: Close(t+H), as in forecast_metrics
        loss = {}
        for name in (model, best):
            q = forecasts[name][fk]
            loss[name] = pinball_per_origin(yt, q[:, -1, :] if q.ndim == 3 else q, taus).mean(axis=1)
        out[tgt] = {"baseline": best, **bootstrap_gain(loss[model], loss[best], days, n_boot=n_boot)}
    return out


def quality_bar(metrics: dict, intervals: dict | None = None, model: str = "itransformer") -> dict:
    """The issue's bar: pinball >= 2% below the best baseline for every target, coverage 77-83%,
    median MAE no worse than the random walk. With ``intervals`` (``gain_intervals``) each gain also
    gets its bootstrap interval."""
    rows, ok_all = [], True
    for tgt in ("close", "rv", "range"):
        best = _best_baseline(metrics, tgt, model)
        gain = 1 - metrics[model][tgt]["pinball"] / metrics[best][tgt]["pinball"]
        cov = metrics[model][tgt]["coverage"]
        mae_ok = metrics[model][tgt]["mae"] <= metrics["random_walk"][tgt]["mae"]
        ok = gain >= 0.02 and 0.77 <= cov <= 0.83 and mae_ok
        ok_all &= ok
        ci = ""
        if intervals and tgt in intervals:
            iv = intervals[tgt]
            ci = (f" [{100 * iv['level']:.0f}% interval over {iv['blocks']} days: {100 * iv['lo']:+.2f}% .. "
                  f"{100 * iv['hi']:+.2f}%; P(gain >= 2%) = {iv['p_gain_ge_2pct']:.2f}]")
        rows.append(f"- {tgt}: pinball gain vs best baseline ({best}) {100 * gain:+.2f}%{ci} (bar +2%), coverage "
                    f"{100 * cov:.1f}% (bar 77-83%), MAE {metrics[model][tgt]['mae']:.6g} vs random walk "
                    f"{metrics['random_walk'][tgt]['mae']:.6g} -> {'PASS' if ok else 'FAIL'}")
    return {"pass": bool(ok_all), "text": "quality bar:\n" + "\n".join(rows), "intervals": intervals or {}}


if __name__ == "__main__":
    raise SystemExit(main())
