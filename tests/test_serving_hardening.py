"""The served artifact and the registry, each test a bug found in a review: NaN pinball in the
promotion rule, rollback after a re-promotion, a model cache reused across a registry reset, an
exported graph whose length differs from its metadata, a champion re-scored with other quantile
levels, a champion with variates the live flow does not produce, the watcher's version when the
alias moves during a load."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
mlflow = pytest.importorskip("mlflow")

from api import contract_model  # noqa: E402
from model import registry  # noqa: E402


@pytest.fixture()
def settings(tmp_path):
    from tickcast.config import load_settings

    return load_settings(data_dir=tmp_path / "data", mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                         model_name="audit-itransformer")


def _m(close, rv, rng, cov=0.8):
    return {"close": {"pinball": close, "coverage": cov}, "rv": {"pinball": rv, "coverage": cov},
            "range": {"pinball": rng, "coverage": cov}}


# ------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("challenger, champion", [
    (_m(math.nan, math.nan, math.nan), _m(1.0, 1.0, 1.0)),   # challenger metrics NaN
    (_m(0.5, 0.5, 0.5), _m(math.nan, math.nan, math.nan)),   # champion reference NaN
    (_m(0.5, math.nan, 0.5), _m(1.0, 1.0, 1.0)),             # one target NaN
])
def test_promotion_decision_never_promotes_on_nan_pinball(challenger, champion):
    # model/registry.py promotion_decision: every comparison with a NaN ratio is False, so neither
    # "worst target > 1.02" nor "mean ratio > 0.99" rejects, and the challenger is promoted
    d = registry.promotion_decision(challenger, champion)
    assert not d.promote, d.reason


def test_rollback_after_a_re_promotion_returns_to_the_champion_just_before(settings):
    c = registry.client(settings)
    c.create_registered_model(settings.model_name)
    for _ in range(3):
        c.create_model_version(settings.model_name, source=str(settings.data_dir), run_id=None)

    def promote(v):
        registry.set_alias(settings, registry.CHAMPION, v, "test", action="promote")

    promote("1")
    promote("2")
    assert registry.rollback(settings)["to"] == "1"  # v2 misbehaved: back to v1
    promote("2")  # v2 fixed upstream / re-validated: champion again
    promote("3")
    # the champion before v3 was v2; rollback skips v2 forever because it was once "rolled back from"
    assert registry.rollback(settings)["to"] == "2"


def test_model_cache_is_not_served_for_another_model_under_the_same_version_number(settings, tmp_path):
    from model.serving import read_metadata

    uri = settings.mlflow_tracking_uri
    art = tmp_path / "artifacts"
    a = contract_model.build(tmp_path / "a" / "model.onnx", ["close"], lookback=4, horizon=3)
    b = contract_model.build(tmp_path / "b" / "model.onnx", ["close"], lookback=6, horizon=3)
    v = contract_model.register(uri, settings.model_name, a, artifact_root=art)
    _, path = registry.champion_onnx_path(settings)
    assert read_metadata(path)["lookback"] == 4
    # the registered model is deleted and trained again (or the MLflow DB reset with data/ kept):
    # version numbers restart at 1
    registry.client(settings).delete_registered_model(settings.model_name)
    v2 = contract_model.register(uri, settings.model_name, b, artifact_root=art)
    assert v2 == v
    _, path = registry.champion_onnx_path(settings)
    assert read_metadata(path)["lookback"] == 6, "stale <data_dir>/model_cache/<name>/<version> file served"


# ------------------------------------------------------------------------------------ training -> artifact
def test_exported_graph_lookback_matches_the_metadata_when_members_override_lookback(settings, tmp_path):
    """TrainConfig.window_lookback (the windows) can exceed the exported model's cfg.lookback (the
    metadata): the top-level lookback when every member overrides a shorter one, or the longest
    member when a time budget stops the ensemble before it. The graph is traced on window_lookback
    rows (static axis), the metadata says cfg.lookback: the API refuses the promoted champion."""
    from api.modelrt import OnnxModel
    from model.data import load_dataset
    from model.serving import read_metadata
    from model.synthetic import synthetic_klines
    from model.train import TrainConfig, train

    ds = load_dataset(synthetic_klines(900, seed=2), horizon=5)
    cfg = TrainConfig(lookback=48, horizon=5, d_model=8, n_heads=2, e_layers=1, d_ff=16, epochs=1, batch_size=64,
                      origins_per_epoch=128, val_origins_max=64, threads=1,
                      members=[{"lookback": 32}, {"lookback": 32, "d_model": 16}])
    s = train(ds, cfg, settings, out_dir=tmp_path / "out", register=False, progress=False, evaluate_test=False,
              quick=True)
    meta = read_metadata(s["onnx"])
    model = OnnxModel(s["onnx"], "1")  # raises ModelContractError: input x has lookback 48, metadata 32
    assert model.spec.lookback == meta["lookback"]


def test_champion_reference_refuses_a_champion_with_other_quantile_levels(settings, tmp_path, monkeypatch):
    """The champion is re-scored on the challenger's windows with the challenger's quantile levels:
    a champion forecasting [0.05, 0.5, 0.95] gets its pinball computed as if they were [0.1, 0.5, 0.9]
    (and its coverage as if it were the 80% interval) and the promotion compares unlike numbers."""
    from model.data import kline_variate_names, load_dataset, make_windows
    from model.synthetic import synthetic_klines
    from model.train import _champion_reference

    V = kline_variate_names()
    w = make_windows(load_dataset(synthetic_klines(300, seed=4), horizon=5), V, 16, 5)
    champ = contract_model.build(tmp_path / "c" / "model.onnx", V, lookback=16, horizon=5,
                                 quantiles=(0.05, 0.5, 0.95))
    monkeypatch.setattr(registry, "champion_onnx_path", lambda _s: ("1", champ))
    version, metrics, note = _champion_reference(settings, w, w.origins[:50], [0.1, 0.5, 0.9])
    assert metrics is None, f"champion with quantiles 0.05/0.5/0.95 scored with taus 0.1/0.5/0.9 ({note})"


# ------------------------------------------------------------------------------------ API
def test_api_refuses_a_champion_whose_variates_the_feature_flow_does_not_produce(settings, tmp_path, monkeypatch):
    """A model whose variates are not m1 features of the registry the live flow runs is loaded and
    served every minute with that variate fed as 0 (degraded); it should be refused at load with the
    reason, so the previous champion keeps serving."""
    from api.champion import ChampionWatcher
    from api.modelrt import ModelContractError

    p = contract_model.build(tmp_path / "m" / "model.onnx", ["close", "log_return_1m", "not_a_live_feature"],
                             lookback=4, horizon=3)
    monkeypatch.setattr(registry, "champion_onnx_path", lambda _s: ("1", p))
    watcher = ChampionWatcher(settings)
    with pytest.raises(ModelContractError, match="not_a_live_feature"):
        watcher._load("1", SimpleNamespace(run_id=None))


def test_watcher_version_meta_matches_the_model_it_swapped_in(settings, tmp_path, monkeypatch):
    """The alias moves between the watcher's alias lookup (v1) and champion_onnx_path (v2): _load
    serves v2, but check() records v1 as the version (version_meta, swaps, run metrics); the next poll
    sees v2 == current and never corrects it."""
    from api.champion import ChampionWatcher

    p2 = contract_model.build(tmp_path / "v2" / "model.onnx", ["close"], lookback=4, horizon=3)
    monkeypatch.setattr(registry, "champion_onnx_path", lambda _s: ("2", p2))
    monkeypatch.setattr(registry, "promotion_log", lambda _s: [])

    class FakeClient:
        def get_model_version_by_alias(self, name, alias):
            return SimpleNamespace(version="1", run_id="run-of-v1", tags={}, aliases=["champion"],
                                   creation_timestamp=0, last_updated_timestamp=0)

        def get_run(self, run_id):
            raise RuntimeError("no run")

        def list_artifacts(self, run_id):
            return []

    watcher = ChampionWatcher(settings)
    watcher._client = FakeClient()
    assert watcher.check()
    assert watcher.current.spec.version == "2"
    assert watcher.version_meta["version"] == watcher.current.spec.version
    assert watcher.swaps[-1]["to"] == watcher.current.spec.version
