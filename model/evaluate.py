"""Evaluation: a model (torch or ONNX) against the baselines on identical origins, the strategy
backtest of each forecaster's signals, the comparison table, and the generic two-variate-config
comparison (the seed's "baseline without mempool" vs "main with mempool").

    python -m model.evaluate --dataset <id or path> [--onnx FILE | --version N] [--out DIR]

evaluates the champion (or the given ONNX file / version) against every baseline on the test part
of the dataset's default split and writes a report (markdown + PNG plots).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from model.backtest import (
    BacktestConfig,
    held_between_decisions,
    portfolio_backtest,
    positions_from_scores,
    score_from_forecast,
    size_positions,
)
from model.data import Windows
from model.metrics import forecast_metrics


def backtest_forecast(w: Windows, origins: np.ndarray, fc: dict, threshold: float, hold: int,
                      cfg: BacktestConfig | None = None, funding: dict | None = None) -> dict:
    """Backtest the signals of a forecast over the minutes spanned by ``origins`` (per symbol and
    segment; minutes without a forecast are flat)."""
    cfg = cfg or BacktestConfig()
    origins = np.asarray(origins)
    score = np.full(len(w.close), np.nan)
    score[origins] = score_from_forecast(fc)
    vol = np.full(len(w.close), np.nan)
    if cfg.sizing == "vol_target":
        mid = fc["rv_q"].shape[1] // 2
        vol[origins] = fc["rv_q"][:, mid] / np.sqrt(w.horizon)
    frames = {}
    for sym in np.unique(w.symbol[origins]):
        o = origins[w.symbol[origins] == sym]
        parts = []
        for s0 in np.unique(w.seg_start[o]):
            oo = o[w.seg_start[o] == s0]
            rows = np.arange(oo.min(), oo.max() + 1)
            # decisions every `hold` minutes from the span's first minute; a vol-target size is set
            # at the decision too and kept with the sign (no resizing fees inside a holding period)
            sig = positions_from_scores(score[rows], threshold, hold)
            pos = size_positions(sig, cfg, held_between_decisions(vol[rows], hold)
                                 if cfg.sizing == "vol_target" else None)
            parts.append(pd.DataFrame({"minute_ts": w.ts[rows], "open": w.open[rows], "close": w.close[rows],
                                       "position": pos}))
        # segments of one symbol are run back to back (a flat bar at each junction)
        f = pd.concat(parts, ignore_index=True)
        if len(parts) > 1:
            f = _flat_junctions(parts)
        frames[str(sym)] = f
    return portfolio_backtest(frames, cfg, funding)


def _flat_junctions(parts: list[pd.DataFrame]) -> pd.DataFrame:
    out = []
    for p in parts:
        p = p.copy()
        # flat over the last two bars of a segment: no position is carried across a data gap
        # (a position decided at bar k is held over the gap into bar k+2)
        p.loc[p.index[-2:], "position"] = 0.0
        out.append(p)
    return pd.concat(out, ignore_index=True)


def evaluate_forecasters(w: Windows, forecasts: dict[str, dict], origins: np.ndarray, taus: Sequence[float]) -> dict:
    ref = {"rv_past": w.rv_past[origins], "range_rel_past": w.range_rel_past[origins]}
    return {name: forecast_metrics(fc, w.targets(origins), taus, ref) for name, fc in forecasts.items()}


def comparison_table(metrics: dict, backtests: dict | None = None, model: str = "itransformer") -> str:
    """Markdown table: per target, every forecaster's pinball, coverage, MAE, directional accuracy,
    plus the backtest's P&L per 30 days after fees; and the model's pinball gain vs the best baseline."""
    lines = []
    names = list(metrics)
    for tgt in ("close", "rv", "range"):
        lines.append(f"\n**{tgt}**" + (" (Close(t+H): log return at h = H)" if tgt == "close" else ""))
        lines.append("")
        lines.append("| model | n | pinball | q10 | q50 | q90 | coverage [q10,q90] | width | CRPS | MAE | RMSE | dir. acc. |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n in names:
            m = metrics[n][tgt]
            lines.append(f"| {n} | {m['n']} | {m['pinball']:.6g} | {m['pinball_q10']:.5g} | {m['pinball_q50']:.5g} | "
                         f"{m['pinball_q90']:.5g} | {m['coverage']:.3f} | {m['width']:.5g} | {m['crps']:.5g} | "
                         f"{m['mae']:.5g} | {m['rmse']:.5g} | {m['dir_acc']:.3f} |")
        if model in metrics:
            bases = [n for n in names if n != model and not n.startswith(model)]
            if bases:
                best = min(bases, key=lambda n: metrics[n][tgt]["pinball"])
                gain = 1 - metrics[model][tgt]["pinball"] / metrics[best][tgt]["pinball"]
                lines.append(f"\n{model} pinball vs best baseline ({best}): {100 * gain:+.2f}% "
                             f"({'meets' if gain >= 0.02 else 'misses'} the 2% bar)")
    if backtests:
        lines.append("\n**strategy backtest** (T+1 at the next open, fees + slippage per side, thresholds tuned "
                     "on validation only; 10,000 USDT, equal capital per symbol)\n")
        lines.append("| model | sizing | P&L per 30 d | total P&L | Sharpe | Sortino | max DD | Calmar | trades | "
                     "win rate | profit factor | fees paid | monthly P&L |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n, bt in backtests.items():
            for sizing, res in bt.items():
                t = res["total"]
                if not t:
                    continue
                monthly = ", ".join(f"{k}: {v:+.0f}" for k, v in t["monthly_pnl"].items())
                lines.append(f"| {n} | {sizing} | {t['pnl_per_30d']:+.1f} | {t['pnl']:+.1f} | {t['sharpe']:.2f} | "
                             f"{t['sortino']:.2f} | {100 * t['max_drawdown']:.2f}% | {t['calmar']:.2f} | "
                             f"{t['n_trades']} | {t['win_rate']:.2f} | {_pf(t['profit_factor'])} | "
                             f"{t['fees_paid']:.1f} | {monthly} |")
    return "\n".join(lines)


def _pf(v):
    return "inf" if v == float("inf") else f"{v:.2f}"


def run_baselines(w: Windows, train: np.ndarray, val: np.ndarray, origins_list: Sequence[np.ndarray],
                  taus: Sequence[float], progress: bool = True, lgbm_threads: int = 1,
                  which: Sequence[str] = ("random_walk", "ewma", "garch", "lgbm_raw", "lgbm_std")) -> dict:
    """Fit every baseline on train (tuning on val) and forecast each origins array in origins_list.
    Returns {name: [fc for each origins array]} plus the fitted objects under '_fitted'."""
    from tqdm.auto import tqdm

    from model.baselines import LightGBMQuantile, RandomWalkQuantiles, VolScaled

    out, fitted = {}, {}
    makers = {
        "random_walk": lambda: RandomWalkQuantiles(taus),
        "ewma": lambda: VolScaled(taus, "ewma"),
        "garch": lambda: VolScaled(taus, "garch"),
        "lgbm_raw": lambda: LightGBMQuantile(taus, w.variates, standardise=False, threads=lgbm_threads),
        "lgbm_std": lambda: LightGBMQuantile(taus, w.variates, standardise=True, threads=lgbm_threads),
    }
    for name in tqdm(list(which), desc="baselines", disable=not progress):
        b = makers[name]()
        b.fit(w, train, val)
        fitted[name] = b
        out[name] = [b.predict(w, o) for o in origins_list]
    out["_fitted"] = fitted
    return out


def compare_variate_configs(dataset, cfg_a, cfg_b, settings=None, names=("baseline", "main"),
                            progress: bool = True) -> dict:
    """Train two iTransformer configurations that differ in their variates (e.g. without / with
    mempool features) on identical origins and splits, and evaluate both on the same test origins.
    Origins are those valid for both variate sets; the split is computed once on them."""
    from model.data import load_dataset, make_windows
    from model.train import fit_model, make_split, predict

    ds = dataset if hasattr(dataset, "frame") else load_dataset(dataset)
    wa = make_windows(ds, cfg_a.variates, cfg_a.window_lookback, cfg_a.horizon, cfg_a.flat_threshold)
    wb = make_windows(ds, cfg_b.variates, cfg_b.window_lookback, cfg_b.horizon, cfg_b.flat_threshold)
    if not (np.array_equal(wa.ts, wb.ts) and np.array_equal(wa.symbol, wb.symbol)):
        raise ValueError("the two configurations see different minute grids")
    common = np.intersect1d(wa.origins, wb.origins)
    wa.origins, wb.origins = common, common
    split = make_split(wa, cfg_a.split, cfg_a.embargo)
    result = {"split": split.describe(wa.ts), "n_common_origins": int(len(common)), "metrics": {}}
    for name, cfg, w in ((names[0], cfg_a, wa), (names[1], cfg_b, wb)):
        model, info = fit_model(w, split.train, split.val, cfg, progress)
        fc = predict(model, w, split.test)
        result["metrics"][name] = forecast_metrics(fc, w.targets(split.test), cfg.quantiles,
                                                   {"rv_past": w.rv_past[split.test],
                                                    "range_rel_past": w.range_rel_past[split.test]})
        result[f"{name}_variates"] = list(cfg.variates)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.evaluate", description="evaluate a model vs the baselines")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--onnx", default=None, help="an ONNX file (default: the registry's champion)")
    ap.add_argument("--version", default=None, help="a registered version instead of the champion")
    ap.add_argument("--config", default=None, help="training config whose split to use (default: its own)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--baselines", default="random_walk,ewma,garch,lgbm_raw,lgbm_std")
    args = ap.parse_args(argv)
    from model import registry
    from model.data import load_dataset, make_windows
    from model.report import write_eval_report
    from model.serving import forecast_windows, open_session, read_metadata
    from model.train import TrainConfig, make_split, tune_signal
    from tickcast.config import get_settings

    settings = get_settings()
    if args.onnx:
        path, label = Path(args.onnx), Path(args.onnx).name
    elif args.version:
        path, label = registry.version_onnx_path(settings, args.version), f"v{args.version}"
    else:
        v, path = registry.champion_onnx_path(settings)
        label = f"champion v{v}"
    meta = read_metadata(path)
    cfg = TrainConfig.load(args.config) if args.config else TrainConfig()
    ds = load_dataset(args.dataset, data_dir=settings.data_dir, horizon=int(meta["horizon"]),
                      flat_threshold=float(meta["flat_threshold"]))
    w = make_windows(ds, meta["variates"], int(meta["lookback"]), int(meta["horizon"]), float(meta["flat_threshold"]))
    split = make_split(w, cfg.split, cfg.embargo)
    test = split.test if len(split.test) else split.val
    if not len(split.test):  # say it wherever the numbers go: they are not out-of-sample
        label += " (IN-SAMPLE: the split has no test part, scored on validation where thresholds were tuned)"
        print(f"warning: {label}", file=sys.stderr)
    sess = open_session(path)
    taus = meta["quantiles"]
    fc_val = forecast_windows(sess, w, split.val)
    fc = {"itransformer": forecast_windows(sess, w, test)}
    bl = run_baselines(w, split.train, split.val, [split.val, test], taus,
                       which=[b for b in args.baselines.split(",") if b])
    vals = {"itransformer": fc_val}
    for name, fcs in bl.items():
        if name.startswith("_"):
            continue
        vals[name], fc[name] = fcs
    metrics = evaluate_forecasters(w, fc, test, taus)
    backtests = {}
    for name in fc:
        sig = tune_signal(vals[name], w, split.val)
        backtests[name] = {s: backtest_forecast(w, test, fc[name], sig["threshold"], sig["hold"],
                                                BacktestConfig(sizing=s)) for s in ("fixed", "vol_target")}
    table = comparison_table(metrics, backtests)
    out = Path(args.out or Path(settings.data_dir) / "reports" / "evaluate")
    write_eval_report(out, w, test, fc, metrics, backtests, table, label, split.describe(w.ts))
    print(table)
    print(f"\nreport: {out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
