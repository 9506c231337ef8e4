"""The model registry against a real MLflow sqlite store: registration, the promotion rule,
promotion log, rollback, champion_onnx_path; and the whole training pipeline (quick champion)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
mlflow = pytest.importorskip("mlflow")

from model import registry  # noqa: E402
from model.registry import promotion_decision  # noqa: E402


def _m(close, rv, rng, cov=0.8):
    return {"close": {"pinball": close, "coverage": cov}, "rv": {"pinball": rv, "coverage": cov},
            "range": {"pinball": rng, "coverage": cov}}


def test_promotion_rule():
    champ = _m(1.0, 1.0, 1.0)
    assert promotion_decision(_m(0.98, 0.98, 0.98), champ).promote
    d = promotion_decision(_m(0.995, 0.995, 0.995), champ)
    assert not d.promote and "mean pinball ratio" in d.reason
    d = promotion_decision(_m(0.90, 0.90, 1.03), champ)  # better on average, one target 3% worse
    assert not d.promote and "range" in d.reason
    d = promotion_decision(_m(0.5, 0.5, 0.5, cov=0.95), champ)
    assert not d.promote and "coverage" in d.reason
    assert promotion_decision(_m(1, 1, 1), None).promote
    assert not promotion_decision({"close": {"pinball": 1, "coverage": 0.8}}, None).promote


@pytest.fixture()
def settings(tmp_path):
    from tickcast.config import load_settings

    return load_settings(data_dir=tmp_path / "data", mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                         model_name="test-itransformer")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    from model.export import contract_metadata, export_onnx
    from model.itransformer import ITransformer, ModelConfig

    cfg = ModelConfig(variates=["log_return_1m", "range_rel_1m", "rv_15m", "tod_sin"], lookback=16, horizon=5,
                      d_model=8, n_heads=2, e_layers=1, d_ff=16)
    torch.manual_seed(0)
    return export_onnx(ITransformer(cfg), tmp_path_factory.mktemp("onnx") / "model.onnx",
                       contract_metadata(cfg, "", "test-itransformer", ""))


def _register(settings, onnx_path, val: dict, ref_version: str | None = None, ref: dict | None = None) -> str:
    import onnx

    exp = registry.ensure_experiment(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)  # an earlier test (training) may have set another
    with mlflow.start_run(experiment_id=exp):
        for t, m in val.items():
            mlflow.log_metrics({f"val_{t}_pinball": m["pinball"], f"val_{t}_coverage": m["coverage"]})
        if ref:
            for t, m in ref.items():
                mlflow.log_metrics({f"champion_val_{t}_pinball": m["pinball"],
                                    f"champion_val_{t}_coverage": m["coverage"]})
        mlflow.set_tag("champion_ref_version", ref_version or "")
        mlflow.log_artifact(str(onnx_path), "onnx")
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="onnx", pip_requirements=["onnxruntime"],
                                     registered_model_name=settings.model_name)
    return str(info.registered_model_version)


def test_register_promote_rollback_and_champion_path(settings, onnx_file):
    with pytest.raises(registry.NoChampionError):
        registry.champion_onnx_path(settings)
    v1 = _register(settings, onnx_file, _m(1.0, 1.0, 1.0))
    assert registry.promote(settings, v1).promote
    version, path = registry.champion_onnx_path(settings)
    assert version == v1 and path.is_file()
    from model.serving import open_session, read_metadata, run_onnx

    out = run_onnx(open_session(path), np.random.default_rng(0).normal(0, 1e-3, (2, 16, 4)))
    assert out["close_logret_q"].shape == (2, 5, 3)
    assert read_metadata(path)["variates"][0] == "log_return_1m"
    # v2 beats the champion re-scored on the same origins: promoted
    v2 = _register(settings, onnx_file, _m(0.95, 0.97, 0.96), v1, _m(1.0, 1.0, 1.0))
    registry.set_alias(settings, registry.CHALLENGER, v2, "test")
    d = registry.promote(settings, v2)
    assert d.promote, d.reason
    assert registry.alias_version(settings, "champion") == v2
    # v3 compared against v1 (stale: the champion moved since): not promoted automatically
    v3 = _register(settings, onnx_file, _m(0.5, 0.5, 0.5), v1, _m(1.0, 1.0, 1.0))
    d = registry.promote(settings, v3)
    assert not d.promote and "not compared with the current champion" in d.reason
    assert registry.promote(settings, v3, force=True).promote
    assert registry.champion_onnx_path(settings)[0] == v3
    # rollback walks back through the champions
    assert registry.rollback(settings)["to"] == v2
    assert registry.rollback(settings)["to"] == v1
    with pytest.raises(LookupError):
        registry.rollback(settings)
    log = registry.promotion_log(settings)
    actions = [e["action"] for e in log]
    assert actions.count("promote") == 3 and actions.count("rollback") == 2 and "rejected" in actions
    assert all(log[i]["seq"] < log[i + 1]["seq"] for i in range(len(log) - 1))
    assert (settings.data_dir / "mlflow" / "promotions.jsonl").read_text().count("\n") == len(log)
    # the CLI moves the alias too
    env = {**os.environ, "TICKCAST_DATA_DIR": str(settings.data_dir),
           "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "TICKCAST_MODEL_NAME": settings.model_name}
    r = subprocess.run([sys.executable, "-m", "tickcast.cli", "model", "rollback", "--to", v3], env=env,
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert registry.alias_version(settings, "champion") == v3
    r = subprocess.run([sys.executable, "-m", "tickcast.cli", "model", "promote", "x1"], env=env,
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "must be a number" in r.stderr


def test_quick_champion_then_challenger_end_to_end(settings):
    """Klines -> dataset -> train -> ONNX (parity) -> MLflow -> champion; then a challenger that is
    compared with the champion re-scored by onnxruntime on the same validation origins."""
    from model.data import load_dataset
    from model.synthetic import synthetic_klines
    from model.train import CONFIG_DIR, TrainConfig, quick_champion, train

    kl = synthetic_klines(2500, seed=11)
    s = quick_champion(kl, settings, time_budget_s=80, progress=False)
    assert s["promoted"] and s["parity"]["ok"]
    version, path = registry.champion_onnx_path(settings)
    assert version == s["version"] == "1"
    assert (settings.data_dir / "tmp").is_dir() and os.path.isfile(s["report"])
    again = quick_champion(kl, settings, time_budget_s=60, progress=False)
    assert again.get("skipped") == "a champion exists"
    cfg = TrainConfig.load(CONFIG_DIR / "quick.yaml", epochs=1, origins_per_epoch=1000, threads=1)
    s2 = train(load_dataset(kl), cfg, settings, progress=False)
    assert s2["version"] == "2" and s2["champion_ref"] == "1" and s2["champion_ref_note"] == "ok"
    run = registry.client(settings).get_run(s2["run_id"])
    assert "champion_val_close_pinball" in run.data.metrics and "val_rv_coverage" in run.data.metrics
    arts = {a.path for a in registry.client(settings).list_artifacts(s2["run_id"], "onnx")}
    assert "onnx/model.onnx" in arts  # CONTRACT.md: the run holds onnx/model.onnx
    assert isinstance(s2["promoted"], bool) and s2["decision"]
    assert registry.alias_version(settings, "challenger") == "2"
    assert registry.alias_version(settings, "champion") == ("2" if s2["promoted"] else "1")


def test_baseline_vs_main_comparison_is_logged_on_the_champion_run(settings, onnx_file, tmp_path, monkeypatch):
    """model.compare: without mempool history it refuses with the reason; with it, both models are
    trained on identical origins and the metrics land on the champion's run, where GET /model (the
    champion watcher) and the dashboard read them."""
    from model.compare import (
        comparison_metrics,
        log_comparison,
        main,
        present_columns,
        registry_mempool_features,
    )
    from model.data import kline_variate_names, load_dataset
    from model.evaluate import compare_variate_configs
    from model.synthetic import synthetic_klines
    from model.train import TrainConfig

    names = registry_mempool_features()
    assert "mempool_tx_count" in names and all(n.startswith("mempool_") for n in names)
    v1 = _register(settings, onnx_file, _m(1.0, 1.0, 1.0))
    registry.promote(settings, v1)
    # a kline-only dataset: no mempool history, refused with the reason
    csv = tmp_path / "BTCUSDT_1m.csv"
    synthetic_klines(600, seed=5).to_csv(csv, index=False)
    monkeypatch.setenv("TICKCAST_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
    monkeypatch.setenv("TICKCAST_MODEL_NAME", settings.model_name)
    assert main(["--dataset", str(csv), "--log", "none"]) == 2
    # with a mempool column: compared and logged
    ds = load_dataset(synthetic_klines(1500, seed=7), horizon=5)
    rng = np.random.default_rng(1)
    ds.frame["mempool_tx_count"] = rng.normal(size=len(ds.frame))
    assert present_columns(ds.frame, names) == ["mempool_tx_count"]
    base = dict(lookback=16, horizon=5, d_model=8, n_heads=2, e_layers=1, d_ff=16, epochs=1,
                origins_per_epoch=300, val_origins_max=100)
    vars_ = kline_variate_names()
    result = compare_variate_configs(ds, TrainConfig(variates=vars_, **base),
                                     TrainConfig(variates=vars_ + ["mempool_tx_count"], **base), progress=False)
    run_id = registry.client(settings).get_model_version(settings.model_name, v1).run_id
    logged = log_comparison(settings, run_id, result)
    assert logged == comparison_metrics(result)
    run = registry.client(settings).get_run(run_id)
    for t in ("close", "rv", "range"):
        assert run.data.metrics[f"cmp_baseline_{t}_pinball"] == result["metrics"]["baseline"][t]["pinball"]
        assert run.data.metrics[f"cmp_main_{t}_pinball"] == result["metrics"]["main"][t]["pinball"]
    assert run.data.tags["cmp_main_extra_variates"] == "mempool_tx_count"
    assert run.data.metrics["cmp_common_origins"] == result["n_common_origins"] > 0
