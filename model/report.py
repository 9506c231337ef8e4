"""Run reports: markdown plus PNG plots (forecast fan vs actual, calibration, equity curve)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fan(path: Path, w, origins: np.ndarray, fc: dict, n: int = 720, title: str = "") -> Path:
    """Close(t+H) forecast fan (q10-q90 band and median, in price) against the actual close, for
    the last ``n`` origins of the first symbol; plotted at the target time t+H."""
    plt = _plt()
    sym = w.symbol[origins[0]]
    sel = np.flatnonzero(w.symbol[origins] == sym)[-n:]
    o = origins[sel]
    H = w.horizon
    t_target = (w.ts[o] + H * 60_000).astype("datetime64[ms]")
    c0 = w.close[o]
    q = fc["close_q"][sel, -1, :]
    actual = c0 * np.exp(w.path[o, -1])
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.fill_between(t_target, c0 * np.exp(q[:, 0]), c0 * np.exp(q[:, -1]), alpha=0.3, label="q10-q90")
    ax.plot(t_target, c0 * np.exp(q[:, q.shape[1] // 2]), lw=0.8, label="median")
    ax.plot(t_target, actual, lw=0.8, color="k", label="actual Close(t+H)")
    ax.set_title(title or f"{sym}: 30-minute forecast fan vs actual")
    ax.legend(loc="upper left")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(path: Path, metrics: dict, title: str = "calibration") -> Path:
    """Observed frequency of y <= q_tau against tau, per target (the diagonal is perfect)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    for name, m in metrics.items():
        for tgt in ("close", "rv", "range"):
            cal = m[tgt]["calibration"]
            ax.plot([c[0] for c in cal], [c[1] for c in cal], marker="o", label=f"{name} {tgt}")
    ax.set_xlabel("nominal quantile")
    ax.set_ylabel("observed P(y <= q)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_equity(path: Path, backtests: dict, title: str = "strategy equity (after fees)") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4))
    for name, bt in backtests.items():
        for sizing, res in bt.items():
            r = res.get("results") or {}
            if not r:
                continue
            import pandas as pd

            nets = pd.concat([pd.Series(x.net, index=x.ts) for x in r.values()], axis=1).fillna(0).sort_index()
            eq = 10_000 * np.cumprod(1 + nets.mean(axis=1).to_numpy())
            ax.plot(nets.index.to_numpy().astype("datetime64[ms]"), eq, lw=0.8, label=f"{name} ({sizing})")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metrics_md(m: dict) -> str:
    rows = ["| target | pinball | coverage | width | CRPS | MAE | RMSE | dir. acc. |", "|---|---|---|---|---|---|---|---|"]
    for tgt in ("close", "rv", "range"):
        x = m[tgt]
        rows.append(f"| {tgt} | {x['pinball']:.6g} | {x['coverage']:.3f} | {x['width']:.5g} | {x['crps']:.5g} | "
                    f"{x['mae']:.5g} | {x['rmse']:.5g} | {x['dir_acc']:.3f} |")
    if "direction" in m:
        rows.append(f"\ndirection head: 3-class accuracy {m['direction']['acc3']:.3f}, "
                    f"log loss {m['direction']['logloss']:.4f}")
    return "\n".join(rows)


def write_report(out_dir: Path, w, split, cfg, val_m, test_m, fc_val, fc_test, info, parity, signal) -> Path:
    """The training run's report: config, split, learning curve, metrics, ONNX parity, plots."""
    from model.backtest import BacktestConfig
    from model.evaluate import backtest_forecast

    rep = Path(out_dir) / "report"
    rep.mkdir(parents=True, exist_ok=True)
    lines = ["# tickcast iTransformer training report", "",
             f"variates ({len(cfg.variates)}): {', '.join(cfg.variates)}",
             f"lookback {cfg.lookback} min, horizon {cfg.horizon} min, quantiles {cfg.quantiles}",
             f"d_model {cfg.d_model}, heads {cfg.n_heads}, layers {cfg.e_layers}, d_ff {cfg.d_ff}, "
             f"ensemble {cfg.ensemble}", "",
             "## split (origin ts ms: first, last, count)", "", "```", json.dumps(split.describe(w.ts), indent=1), "```",
             "", "## learning curve", "", "| member | epoch | train loss | val score | s |", "|---|---|---|---|---|"]
    for k, mi in enumerate(info["members"]):
        for h in mi["history"]:
            lines.append(f"| {k + 1} | {h['epoch']} | {h['train_loss']:.4f} | {h['val_score']:.4f} | {h['seconds']:.1f} |")
    lines += ["", "## validation", "", _metrics_md(val_m)]
    plots = {"calibration_val.png": plot_calibration(rep / "calibration_val.png", {"val": val_m})}
    plot_fan(rep / "fan_val.png", w, split.val, fc_val, title="validation: forecast fan vs actual")
    plots["fan_val.png"] = rep / "fan_val.png"
    if test_m is not None:
        lines += ["", "## test (held out; not used for any choice)", "", _metrics_md(test_m)]
        plot_fan(rep / "fan_test.png", w, split.test, fc_test, title="test: forecast fan vs actual")
        plot_calibration(rep / "calibration_test.png", {"test": test_m})
        # run even when validation found no profitable threshold: then it stays flat, reported as such
        bts = {"itransformer": {s: backtest_forecast(w, split.test, fc_test, signal["threshold"], signal["hold"],
                                                     BacktestConfig(sizing=s)) for s in ("fixed", "vol_target")}}
        plot_equity(rep / "equity_test.png", bts)
        for s, r in bts["itransformer"].items():
            t = r["total"]
            lines.append(f"\nbacktest ({s}): P&L {t['pnl']:+.1f} USDT, per 30 d {t['pnl_per_30d']:+.1f}, "
                         f"Sharpe {t['sharpe']:.2f}, max DD {100 * t['max_drawdown']:.2f}%, trades {t['n_trades']}")
    else:  # no test part: the equity curve of the validation period (where the signal was tuned)
        bts = {"itransformer (validation)": {"fixed": backtest_forecast(w, split.val, fc_val, signal["threshold"],
                                                                         signal["hold"], BacktestConfig())}}
        plot_equity(rep / "equity_val.png", bts, title="validation equity (signal tuned here: optimistic)")
    lines += ["", f"signal (tuned on validation): {json.dumps(signal)}",
              "", f"ONNX parity (max abs diff ORT vs torch): batch 1 {parity[1]:.2e}, batch 8 {parity[8]:.2e}",
              "", "plots: " + ", ".join(sorted(p.name for p in rep.glob('*.png')))]
    (rep / "report.md").write_text("\n".join(lines) + "\n")
    return rep / "report.md"


def write_eval_report(out: Path, w, origins, forecasts: dict, metrics: dict, backtests: dict, table: str,
                      label: str, split: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_calibration(out / "calibration.png", metrics)
    plot_equity(out / "equity.png", backtests)
    for name, fc in forecasts.items():
        if name.startswith("itransformer"):
            plot_fan(out / f"fan_{name}.png", w, origins, fc)
    text = [f"# tickcast evaluation: {label}", "", "split:", "```", json.dumps(split, indent=1), "```", "", table]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return out / "report.md"
