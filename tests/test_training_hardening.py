"""The training side (model/), each test a bug found in a review: rv/range targets of another
horizon than the one trained, recent-data oversampling without effect, the paper check's learning
rate schedule, time features and normalisation floor. Tiny models and synthetic data only."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flows.targets import forward_targets
from model.data import Dataset, load_dataset, make_windows
from model.synthetic import synthetic_klines

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

DAY_MS = 86_400_000


# ------------------------------------------------------------------------- recent-data oversampling
def _draw_rates(n_minutes: int, origins_per_epoch: int, recent_weight: float = 5.0):
    """Train fit_member with recent_days=1, record which training origins the batches read, and
    return (draws per recent origin) / (draws per older origin)."""
    from model.train import TrainConfig, fit_member

    ds = load_dataset(synthetic_klines(n_minutes, seed=2), horizon=5)
    variates = ["log_return_1m", "range_rel_1m", "rv_15m"]
    w = make_windows(ds, variates, 16, 5)
    tr, va = w.origins[:-300], w.origins[-200:]
    cfg = TrainConfig(variates=variates, lookback=16, horizon=5, d_model=8, n_heads=2, e_layers=1, d_ff=16,
                      dropout=0.0, epochs=3, patience=5, batch_size=256, origins_per_epoch=origins_per_epoch,
                      val_origins_max=50, recent_days=1.0, recent_weight=recent_weight)
    train_set = set(tr.tolist())
    seen: list[int] = []
    gather = w.gather

    def recording_gather(origins):
        origins = np.asarray(origins)
        seen.extend(o for o in origins.tolist() if o in train_set)
        return gather(origins)

    w.gather = recording_gather  # instance attribute: the training loop's batches go through it
    fit_member(w, tr, va, cfg, 0, progress=False)
    recent = w.ts[tr] > w.ts[tr].max() - DAY_MS
    recent_set = set(tr[recent].tolist())
    is_recent = np.array([o in recent_set for o in seen])
    return (is_recent.sum() / recent.sum()) / ((~is_recent).sum() / (~recent).sum())


def test_recent_weight_oversamples_recent_origins_when_the_train_part_is_small():
    """TrainConfig documents recent origins as "drawn recent_weight times as often". fit_member draws
    ``rng.choice(train, n_per_epoch, replace=False, p=p_draw)`` with n_per_epoch = min(len(train),
    origins_per_epoch): when the train part fits in one epoch every origin is drawn exactly once and
    the weights have no effect at all (measured ratio 1.03 instead of 5)."""
    ratio = _draw_rates(3 * 1440 + 200, origins_per_epoch=10**6, recent_weight=5.0)
    assert ratio > 3.0, f"recent origins drawn only {ratio:.2f}x as often (recent_weight=5)"


def test_recent_weight_is_not_saturated_by_sampling_without_replacement():
    """Half the train part per epoch: without replacement a recent origin can be drawn at most once,
    so the realised ratio is ~2.7 instead of 5 (on the real config, ~4.3 instead of 5)."""
    ratio = _draw_rates(3 * 1440 + 200, origins_per_epoch=2092, recent_weight=5.0)
    assert ratio > 4.0, f"recent origins drawn only {ratio:.2f}x as often (recent_weight=5)"


# ------------------------------------------------------------------- targets at the wrong horizon
def test_windows_targets_follow_the_requested_horizon_not_the_datasets_columns():
    """A kline dataset built (and e.g. cached as Parquet, like model/realdata.py's real_klines.parquet)
    with H=30 carries rv_h / range_rel_h over 30 minutes. make_windows(horizon=10) recomputes the close
    path over 10 minutes but then OVERRIDES rv and range with the dataset's 30-minute columns
    (data.py:408-411; _check_frame ignores its horizon argument): the model is trained on a 10-minute
    path and a 30-minute rv/range, silently. (Near the end of each segment, where the 30-min columns
    are NaN, the 10-min values are used instead: a mix of both.)"""
    kl = synthetic_klines(400, seed=1)
    ds = load_dataset(kl, horizon=30)
    w = make_windows(Dataset(ds.frame), ["log_return_1m"], 8, horizon=10)
    ref = forward_targets(kl.close.to_numpy(), kl.high.to_numpy(), kl.low.to_numpy(), horizon=10)
    o = w.origins
    np.testing.assert_allclose(w.path[o], ref["close_path"][o])  # the path is right
    np.testing.assert_allclose(w.rv[o], ref["rv_h"][o], rtol=1e-9)
    np.testing.assert_allclose(w.range_rel[o], ref["range_rel_h"][o], rtol=1e-9)


# ------------------------------------------------------------------------------ paper_check protocol
def _toy_csv(tmp_path, n=300):
    t = np.arange(n)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq="h"),
                       "a": np.sin(2 * np.pi * t / 24) + 0.05 * rng.normal(size=n),
                       "OT": np.cos(2 * np.pi * t / 12) + 0.05 * rng.normal(size=n)})
    path = tmp_path / "toy.csv"
    df.to_csv(path, index=False)
    return path


def test_paper_check_learning_rate_schedule_matches_the_reference_code(tmp_path, monkeypatch):
    """The paper's code (thuml/iTransformer, experiments/exp_long_term_forecasting.py) calls
    ``adjust_learning_rate(opt, epoch + 1, args)`` after each epoch with type1
    ``lr * 0.5 ** ((epoch - 1) // 1)``: epochs 1 AND 2 run at lr, epoch 3 at lr/2, epoch k at
    lr / 2**(k-2). paper_check sets ``lr * 0.5 ** (ep + 1)`` after epoch ep (0-based): epoch 2 already
    runs at lr/2, every epoch after the first at half the reference learning rate."""
    from model import paper_check

    lrs: list[float] = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    path = _toy_csv(tmp_path)
    lookback, H, bs = 24, 12, 64
    paper_check.run(path, horizons=(H,), lookback=lookback, epochs=3, batch_size=bs, lr=1e-3, d_model=16,
                    n_heads=2, d_ff=16, patience=10, progress=False)
    n_train = int(300 * 0.7) - lookback - H + 1
    steps = -(-n_train // bs)
    per_epoch = [lrs[k * steps] for k in range(3)]
    assert per_epoch == pytest.approx([1e-3, 1e-3, 5e-4]), per_epoch


def test_paper_check_time_features_are_the_papers_four():
    """paper_check's docstring (and the paper's code with its default freq='h', used by every
    released script) has four time features: hour of day, day of week, day of month, day of year.
    time_features adds a fifth, minute of hour: a constant (-0.5) token for hourly data, and extra
    information the paper's model did not get on ETTm*/Weather."""
    from model.paper_check import time_features

    marks = time_features(pd.Series(pd.date_range("2020-01-01", periods=48, freq="h")))
    assert marks.shape[1] == 4


def test_paper_model_normalisation_floor_is_the_papers():
    """PaperITransformer (the paper's model, run on StandardScaler output) adds the paper's 1e-5 to
    the window variance; tickcast's own ITransformer keeps its scale-aware floor for raw variates."""
    from model.itransformer import PAPER_EPS_VAR, per_window_norm

    x = torch.zeros(1, 96, 1)
    x[0, ::2, 0] = 1e-4  # a near-constant window of standardised data
    _, _, std = per_window_norm(x, PAPER_EPS_VAR)
    paper_std = torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(std, paper_std, rtol=1e-6, atol=0)


def test_the_paper_model_normalises_with_the_papers_floor(monkeypatch):
    from model import itransformer as M

    floors = []
    real = M.per_window_norm

    def recording(x, eps_var=None):
        floors.append(eps_var)
        return real(x, eps_var)

    monkeypatch.setattr(M, "per_window_norm", recording)
    m = M.PaperITransformer(n_variates=2, lookback=16, pred_len=4, d_model=8, n_heads=2, d_ff=8).eval()
    with torch.no_grad():
        m(torch.randn(3, 16, 2))
    assert floors == [M.PAPER_EPS_VAR]
