"""Train the iTransformer on a dataset, evaluate it, export ONNX, log to MLflow, register it as the
challenger and apply the promotion rule.

    python -m model.train --dataset <id or path> [--config model/configs/kline.yaml] [--no-register]
    tickcast train --dataset ...

``quick_champion(dataset_or_klines, settings)`` is the fast path for ``tickcast up`` on a fresh
machine: a small model on kline history within a time budget (default 150 s on 2 cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from model.data import Dataset, Windows, kline_variate_names, load_dataset, make_windows
from model.metrics import forecast_metrics
from model.splits import Split, chronological_split, fraction_split

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
QUICK_RESERVE_S = 70.0


@dataclass
class TrainConfig:
    variates: list[str] = field(default_factory=kline_variate_names)
    lookback: int = 240
    horizon: int = 30
    quantiles: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    flat_threshold: float = 0.001
    d_model: int = 64
    n_heads: int = 4
    e_layers: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    use_time_tokens: bool = True
    feed_scale_to_heads: bool = True
    stat_token: bool = False
    learned_scale: bool = False
    time_harmonics: int = 0
    ewma_halflives: list = field(default_factory=list)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    epochs: int = 12
    patience: int = 3
    origins_per_epoch: int = 60_000
    val_origins_max: int = 20_000
    ensemble: int = 1
    # per-member overrides for a heterogeneous ensemble (e.g. [{}, {"d_model": 128}, {"lookback": 240}]);
    # when given, the ensemble has len(members) members
    members: list = field(default_factory=list)
    seed: int = 0
    threads: int = 1
    raw_weighting: bool = False
    loss_weights: dict = field(default_factory=lambda: {"path": 1.0, "rv": 1.0, "range": 1.0, "direction": 0.2})
    split: dict = field(default_factory=lambda: {"kind": "fraction", "val_frac": 0.15, "test_frac": 0.15})
    embargo: int = 30
    time_budget_s: float | None = None
    # oversample the most recent training origins (closest to the forecast period): origins in the
    # last ``recent_days`` before the end of the training part are drawn ``recent_weight`` times as often
    recent_days: float | None = None
    recent_weight: float = 1.0

    @property
    def window_lookback(self) -> int:
        """The window length the data must provide (the longest member's lookback)."""
        return max([self.lookback] + [int(m.get("lookback", self.lookback)) for m in self.members])

    def member(self, k: int) -> TrainConfig:
        if not self.members:
            return self
        d = self.to_dict()
        d.update(self.members[k])
        d["members"] = []
        return TrainConfig(**d)

    def model_config(self):
        from model.itransformer import ModelConfig

        return ModelConfig(variates=list(self.variates), lookback=self.lookback, horizon=self.horizon,
                           quantiles=list(self.quantiles), d_model=self.d_model, n_heads=self.n_heads,
                           e_layers=self.e_layers, d_ff=self.d_ff, dropout=self.dropout,
                           use_time_tokens=self.use_time_tokens, flat_threshold=self.flat_threshold,
                           feed_scale_to_heads=self.feed_scale_to_heads, stat_token=self.stat_token,
                           learned_scale=self.learned_scale, time_harmonics=self.time_harmonics,
                           ewma_halflives=list(self.ewma_halflives))

    @classmethod
    def load(cls, path: str | Path | None, **overrides) -> TrainConfig:
        data: dict = {}
        if path:
            p = Path(path)
            if not p.is_file() and (CONFIG_DIR / p).is_file():
                p = CONFIG_DIR / p
            text = p.read_text()
            if p.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        data.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)


def set_seed(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _iso_ms(v) -> int:
    if isinstance(v, (int, np.integer)):
        return int(v)
    return int(pd.Timestamp(v, tz="UTC").value // 10**6) if pd.Timestamp(v).tzinfo is None else \
        int(pd.Timestamp(v).tz_convert("UTC").value // 10**6)


def make_split(w: Windows, spec: dict, embargo: int) -> Split:
    kind = spec.get("kind", "fraction")
    if kind == "fraction":
        return fraction_split(w.origins, w.ts, spec.get("val_frac", 0.15), spec.get("test_frac", 0.15),
                              w.horizon, embargo)
    if kind == "chronological":
        test_end = _iso_ms(spec["test_end"]) if spec.get("test_end") else None
        return chronological_split(w.origins, w.ts, _iso_ms(spec["val_start"]), _iso_ms(spec["test_start"]),
                                   test_end, w.horizon, embargo)
    raise ValueError(f"unknown split kind {kind!r}")


# ------------------------------------------------------------------------------------ torch parts
def _batch_targets(w: Windows, o: np.ndarray):
    import torch

    return {"path": torch.from_numpy(w.path[o].astype(np.float32)),
            "rv": torch.from_numpy(w.rv[o].astype(np.float32)),
            "range_rel": torch.from_numpy(w.range_rel[o].astype(np.float32)),
            "direction": torch.from_numpy(w.direction[o].astype(np.float32))}


def predict(model, w: Windows, origins: np.ndarray, batch_size: int = 2048) -> dict:
    """Forecast dict (close_q [n,H,Q], rv_q, range_q, dir_p) from a torch model."""
    import torch

    model.eval()
    parts: list[list[np.ndarray]] = [[], [], [], []]
    with torch.no_grad():
        for i in range(0, len(origins), batch_size):
            x = torch.from_numpy(w.gather(origins[i:i + batch_size]))
            for j, t in enumerate(model(x)):
                parts[j].append(t.numpy())
    H, Q = w.horizon, len(model.cfg.quantiles)
    cat = [np.concatenate(p) if p else np.zeros((0,)) for p in parts]
    if not len(origins):
        cat = [np.zeros((0, H, Q)), np.zeros((0, Q)), np.zeros((0, Q)), np.zeros((0, 3))]
    return {"close_q": cat[0], "rv_q": cat[1], "range_q": cat[2], "dir_p": cat[3]}


def val_score(fc: dict, w: Windows, o: np.ndarray, taus) -> float:
    """Mean over close (h = H), rv and range of pinball / mean |target|: the early-stopping score."""
    from model.metrics import pinball

    s = 0.0
    for y, q in ((w.path[o, -1], fc["close_q"][:, -1]), (w.rv[o], fc["rv_q"]), (w.range_rel[o], fc["range_q"])):
        s += float(np.mean(pinball(y, q, taus)) / np.mean(np.abs(y)))
    return s / 3


def fit_member(w: Windows, train: np.ndarray, val: np.ndarray, cfg: TrainConfig, seed: int,
               progress: bool = True, deadline: float | None = None, desc: str = "train") -> tuple:
    import torch
    from tqdm.auto import tqdm

    from model.itransformer import ITransformer
    from model.losses import forecast_loss

    torch.set_num_threads(max(1, int(cfg.threads)))
    set_seed(seed)
    model = ITransformer(cfg.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    taus = torch.tensor(cfg.quantiles, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    val_sub = val if len(val) <= cfg.val_origins_max else np.sort(
        np.random.default_rng(12345).choice(val, cfg.val_origins_max, replace=False))
    n_per_epoch = min(len(train), cfg.origins_per_epoch)
    p_draw = None
    if cfg.recent_days and cfg.recent_weight != 1.0:
        t_end = w.ts[train].max()
        wts = np.where(w.ts[train] > t_end - cfg.recent_days * 86_400_000, cfg.recent_weight, 1.0)
        p_draw = wts / wts.sum()
    steps_per_epoch = max(1, n_per_epoch // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1)
    best, best_state, bad, history = math.inf, None, 0, []
    t_epoch = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        # weighted draws with replacement: without it, a train part that fits an epoch is drawn
        # exactly once whatever the weights (recent_weight had no effect on small train parts)
        ep = rng.choice(train, n_per_epoch, replace=p_draw is not None, p=p_draw)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                   leave=False, unit="batch")
        stop_time = False
        for s in bar:
            o = ep[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = torch.from_numpy(w.gather(o))
            out = model.forward_scaled(x)
            loss = forecast_loss(out, _batch_targets(w, o), taus, cfg.loss_weights, cfg.raw_weighting)
            opt.zero_grad(set_to_none=True)
            loss["total"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss["total"].detach()))
            if s % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            if deadline is not None and time.perf_counter() > deadline:
                stop_time = True
                break
        t_epoch.append(time.perf_counter() - t0)
        score = val_score(predict(model, w, val_sub), w, val_sub, cfg.quantiles) if len(val_sub) else float(
            np.mean(losses))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_score": score,
                        "seconds": t_epoch[-1], "steps": len(losses)})
        if progress:
            print(f"  {desc} epoch {epoch + 1}: train loss {np.mean(losses):.4f}, val score {score:.4f} "
                  f"({t_epoch[-1]:.1f}s)", file=sys.stderr)
        if score < best - 1e-5:
            best, best_state, bad = score, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
        if bad >= cfg.patience or stop_time:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, {"history": history, "best_val_score": best, "seconds_per_epoch": float(np.mean(t_epoch)),
                   "seconds_per_epoch_per_1k_origins": float(np.mean(t_epoch)) / max(1, n_per_epoch) * 1000}


def fit_model(w: Windows, train: np.ndarray, val: np.ndarray, cfg: TrainConfig, progress: bool = True):
    """Train ``cfg.ensemble`` members (seeds seed, seed+1, ...) and return the model (an Ensemble
    when more than one) with the training history."""
    from model.itransformer import Ensemble

    deadline = time.perf_counter() + cfg.time_budget_s if cfg.time_budget_s else None
    members, infos = [], []
    n = len(cfg.members) or cfg.ensemble
    for k in range(n):
        m, info = fit_member(w, train, val, cfg.member(k), cfg.seed + k, progress, deadline,
                             desc=f"member {k + 1}/{n}")
        members.append(m)
        infos.append(info)
        if deadline is not None and time.perf_counter() > deadline:
            break
    model = members[0] if len(members) == 1 else Ensemble(members).eval()
    return model, {"members": infos, "seconds_per_epoch": float(np.mean([i["seconds_per_epoch"] for i in infos]))}


# ------------------------------------------------------------------------------------- the pipeline
def flatten_metrics(prefix: str, m: dict) -> dict[str, float]:
    out = {}
    for tgt in ("close", "rv", "range"):
        for k in ("pinball", "coverage", "width", "crps", "mae", "rmse", "dir_acc"):
            v = m.get(tgt, {}).get(k)
            if v is not None and np.isfinite(v):
                out[f"{prefix}_{tgt}_{k}"] = float(v)
    if "close_path" in m:
        out[f"{prefix}_close_path_pinball"] = float(m["close_path"]["pinball"])
    if "direction" in m:
        out[f"{prefix}_direction_acc3"] = float(m["direction"]["acc3"])
    return out


def _champion_reference(settings, w: Windows, val: np.ndarray, taus) -> tuple[str | None, dict | None, str]:
    """Re-score the current champion's ONNX on these validation origins (if it can read them)."""
    from model import registry
    from model.serving import forecast_windows, open_session, read_metadata

    try:
        version, path = registry.champion_onnx_path(settings)
    except registry.NoChampionError:
        return None, None, "no champion"
    except Exception as exc:  # registry unreachable: do not promote blindly
        return None, None, f"champion unavailable: {exc}"
    meta = read_metadata(path)
    variates, lookback = list(meta.get("variates", [])), int(meta.get("lookback", 0))
    # the same question asked of both: same horizon, quantile levels and flat band, or no comparison
    same = {"horizon": (int(meta.get("horizon", -1)), int(w.horizon)),
            "quantiles": ([round(float(q), 6) for q in meta.get("quantiles", [])], [round(float(q), 6) for q in taus]),
            "flat_threshold": (round(float(meta.get("flat_threshold", -1)), 9), round(float(w.flat_threshold), 9))}
    differ = [f"{k} {a} vs {b}" for k, (a, b) in same.items() if a != b]
    if differ:
        return version, None, f"champion v{version} forecasts another target ({'; '.join(differ)})"
    try:
        cw = w if (variates == w.variates and 0 < lookback <= w.lookback) else None
        if cw is None:
            return version, None, f"champion v{version} reads other variates/lookback"
        fc = forecast_windows(open_session(path), cw, val)
    except Exception as exc:
        return version, None, f"champion v{version} could not be scored: {exc}"
    return version, forecast_metrics(fc, cw.targets(val), taus), "ok"


def tune_signal(fc_val: dict, w: Windows, val: np.ndarray, bt_cfg=None) -> dict:
    """Pick the signal threshold and holding period on validation only (best net Sharpe; flat if
    nothing beats doing nothing)."""
    from model.backtest import BacktestConfig, score_from_forecast
    from model.evaluate import backtest_forecast

    bt_cfg = bt_cfg or BacktestConfig()
    score = score_from_forecast(fc_val)
    # default: never trade (a finite threshold above every score, JSON-safe)
    never = float(np.ceil(np.nanmax(np.abs(score)) + 1.0)) if len(score) else 1.0
    rule = "p_up - p_down" if fc_val.get("dir_p") is not None else "median / (q_hi - q_lo)"
    best = {"threshold": never, "hold": 30, "sharpe": 0.0, "rule": rule, "fee_bps": bt_cfg.fee_bps,
            "slippage_bps": bt_cfg.slippage_bps}
    for hold in (1, 30):
        for qlev in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98):
            thr = float(np.quantile(np.abs(score), qlev))
            res = backtest_forecast(w, val, fc_val, thr, hold, bt_cfg)
            sh = res["total"].get("sharpe", 0.0)
            if sh > best["sharpe"]:
                best.update({"threshold": thr, "hold": hold, "sharpe": sh})
    return best


def train(dataset, cfg: TrainConfig, settings=None, out_dir: str | Path | None = None, register: bool = True,
          progress: bool = True, evaluate_test: bool = True, run_name: str | None = None,
          quick: bool = False) -> dict:
    """The whole training run; returns a summary dict (paths, metrics, version, decision)."""
    import torch

    from model.export import contract_metadata, export_onnx, parity_check
    from model.report import write_report

    if settings is None:
        from tickcast.config import get_settings

        settings = get_settings()
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg.threads)))
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_dir=settings.data_dir,
                                                                   horizon=cfg.horizon,
                                                                   flat_threshold=cfg.flat_threshold)
    w = make_windows(ds, cfg.variates, cfg.window_lookback, cfg.horizon, cfg.flat_threshold)
    if len(w.origins) < 100:
        raise ValueError(f"only {len(w.origins)} usable forecast origins in the dataset "
                         f"(lookback {cfg.lookback} + warm-up needs more history)")
    split = make_split(w, cfg.split, cfg.embargo)
    if len(split.train) == 0 or len(split.val) == 0:
        raise ValueError(f"split left train={len(split.train)} val={len(split.val)} origins")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="tickcast-train-", dir=_tmp_root(settings)))
    out_dir.mkdir(parents=True, exist_ok=True)
    model, info = fit_model(w, split.train, split.val, cfg, progress)
    train_seconds = time.perf_counter() - t_start
    taus = cfg.quantiles
    fc_val = predict(model, w, split.val)
    val_m = forecast_metrics(fc_val, w.targets(split.val), taus,
                             {"rv_past": w.rv_past[split.val], "range_rel_past": w.range_rel_past[split.val]})
    test_m, fc_test = None, None
    if evaluate_test and len(split.test):
        fc_test = predict(model, w, split.test)
        test_m = forecast_metrics(fc_test, w.targets(split.test), taus,
                                  {"rv_past": w.rv_past[split.test], "range_rel_past": w.range_rel_past[split.test]})
    signal = tune_signal(fc_val, w, split.val) if not quick else {
        "threshold": 1.0, "hold": 30, "sharpe": 0.0, "rule": "p_up - p_down",
        "note": "quick champion: no signal tuning (threshold 1 never trades)"}
    # ONNX export + parity
    next_version = _next_version(settings) if register else ""
    meta = contract_metadata(model.cfg, ds.registry_hash, settings.model_name, next_version,
                             extra={"dataset": ds.fingerprint, "signal": signal})
    # the graph's input is the model's own lookback (what its metadata says and the API builds); the
    # windows may be longer (the config's longest member, which a time budget can leave untrained)
    L = int(model.cfg.lookback)
    onnx_path = export_onnx(model, out_dir / "model.onnx", meta, example=w.gather(split.val[:4])[:, -L:])
    parity = parity_check(model, onnx_path, w.gather(split.val[:8])[:, -L:])
    if not parity["ok"]:
        raise RuntimeError(f"ONNX parity check failed: {parity}")
    report = write_report(out_dir, w, split, cfg, val_m, test_m, fc_val, fc_test, info, parity, signal)
    summary = {"out_dir": str(out_dir), "onnx": str(onnx_path), "val": val_m, "test": test_m, "parity": parity,
               "split": split.describe(w.ts), "signal": signal, "train_seconds": train_seconds,
               "seconds_per_epoch": info["seconds_per_epoch"], "report": str(report), "dataset": ds.fingerprint}
    if register:
        summary.update(_log_and_register(settings, cfg, ds, w, split, model, onnx_path, out_dir, val_m, test_m,
                                         info, parity, signal, run_name))
    return summary


def _tmp_root(settings) -> str:
    p = Path(settings.data_dir) / "tmp"
    p.mkdir(parents=True, exist_ok=True)
    return str(p)


def _next_version(settings) -> str:
    from model import registry

    try:
        versions = registry.list_versions(settings)
    except Exception:
        return "1"
    return str(max((int(v["version"]) for v in versions), default=0) + 1)


def _log_and_register(settings, cfg, ds, w, split, model, onnx_path, out_dir, val_m, test_m, info, parity,
                      signal, run_name) -> dict:
    import mlflow
    import onnx

    from model import registry

    exp_id = registry.ensure_experiment(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    champ_version, champ_m, champ_note = _champion_reference(settings, w, split.val, cfg.quantiles)
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name or "itransformer") as run:
        flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.to_dict().items()}
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        mlflow.log_metrics(flatten_metrics("val", val_m))
        if test_m:
            mlflow.log_metrics(flatten_metrics("test", test_m))
        mlflow.log_metrics({"parity_max_abs_b1": parity[1], "parity_max_abs_b8": parity[8],
                            "seconds_per_epoch": info["seconds_per_epoch"]})
        if champ_m is not None:
            mlflow.log_metrics(flatten_metrics("champion_val", champ_m))
        mlflow.set_tags({"dataset": ds.fingerprint, "dataset_source": ds.source, "registry_hash": ds.registry_hash,
                         "champion_ref_version": champ_version or "", "champion_ref_note": champ_note,
                         "split": json.dumps(split.describe(w.ts))})
        manifest = dict(ds.manifest)
        manifest.setdefault("fingerprint", ds.fingerprint)
        mlflow.log_dict(manifest, "dataset/manifest.json")
        mlflow.log_dict(cfg.to_dict(), "config/train_config.json")
        mlflow.log_artifacts(str(out_dir / "report"), "report")
        mlflow.log_artifact(str(onnx_path), "onnx")  # the run holds onnx/model.onnx (CONTRACT.md)
        proto = onnx.load(str(onnx_path))
        info_m = mlflow.onnx.log_model(proto, name="onnx", onnx_execution_providers=["CPUExecutionProvider"],
                                       registered_model_name=settings.model_name,
                                       pip_requirements=_serving_requirements())  # skips a 15 s inference
        version = str(info_m.registered_model_version)
        run_id = run.info.run_id
    registry.set_alias(settings, registry.CHALLENGER, version, f"trained in run {run_id}")
    decision = registry.promote(settings, version)
    return {"version": version, "run_id": run_id, "promoted": decision.promote, "decision": decision.reason,
            "champion_ref": champ_version, "champion_ref_note": champ_note}


def _serving_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


# ----------------------------------------------------------------------------------- quick champion
def quick_champion(dataset_or_klines, settings=None, time_budget_s: float = 150.0, progress: bool = True,
                   force: bool = False) -> dict:
    """Train a small champion from kline history within ``time_budget_s`` (2 cores) for a fresh
    machine: ``dataset_or_klines`` is a dataset path/id, a kline CSV, a Dataset, or a DataFrame of
    klines (symbol, minute_ts, open, high, low, close, volume). Registers it and makes it champion
    when there is none (or ``force``). Returns the training summary."""
    from model import registry

    t0 = time.perf_counter()
    if settings is None:
        from tickcast.config import get_settings

        settings = get_settings()
    if not force and registry.alias_version(settings, registry.CHAMPION) is not None:
        v, p = registry.champion_onnx_path(settings)
        return {"version": v, "onnx": str(p), "skipped": "a champion exists"}
    cfg = TrainConfig.load(CONFIG_DIR / "quick.yaml")
    cfg.threads = min(2, os.cpu_count() or 1)
    ds = dataset_or_klines
    if isinstance(ds, pd.DataFrame):
        ds = load_dataset(ds, horizon=cfg.horizon, flat_threshold=cfg.flat_threshold)
    elif not isinstance(ds, Dataset):
        ds = load_dataset(ds, data_dir=settings.data_dir, horizon=cfg.horizon, flat_threshold=cfg.flat_threshold)
    # what is left after loading, minus ~70 s for windows, ONNX export, parity, report and registration
    cfg.time_budget_s = max(5.0, time_budget_s - (time.perf_counter() - t0) - QUICK_RESERVE_S)
    summary = train(ds, cfg, settings, register=True, progress=progress, evaluate_test=False,
                    run_name="quick_champion", quick=True)
    if registry.alias_version(settings, registry.CHAMPION) is None:
        registry.set_alias(settings, registry.CHAMPION, summary["version"],
                           f"quick champion for a fresh start (rule: {summary['decision']})", action="promote")
        summary["promoted"] = True
    summary["total_seconds"] = time.perf_counter() - t0
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", required=True, help="dataset id, Parquet/Delta path, or kline CSV")
    ap.add_argument("--config", default=str(CONFIG_DIR / "kline.yaml"))
    ap.add_argument("--out", default=None, help="output folder (default: a new one under <data_dir>/tmp)")
    ap.add_argument("--no-register", action="store_true", help="do not log to MLflow / register")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="quick_champion: small model, time budget")
    args = ap.parse_args(argv)
    from tickcast.config import ConfigError, get_settings

    try:
        settings = get_settings()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.quick:
        s = quick_champion(args.dataset, settings, force=True)
    else:
        cfg = TrainConfig.load(args.config, epochs=args.epochs, threads=args.threads)
        s = train(args.dataset, cfg, settings, args.out, register=not args.no_register)
    printable = {k: v for k, v in s.items() if k in ("out_dir", "onnx", "version", "promoted", "decision",
                                                     "report", "train_seconds", "skipped")}
    for k in ("val", "test"):
        if s.get(k):
            printable[k] = {t: {m: round(s[k][t][m], 6) for m in ("pinball", "coverage", "mae")}
                            for t in ("close", "rv", "range")}
    print(json.dumps(printable, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
