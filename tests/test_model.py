"""model/: data loading and windows, the iTransformer (shapes, normalisation, non-crossing
quantiles, overfitting a tiny set), leakage, metrics, baselines, the backtest arithmetic, ONNX parity."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flows.candles import KLINE_VARIATES, MINUTE_MS
from flows.targets import forward_targets
from model.data import (
    DatasetError,
    funding_asof,
    kline_variate_names,
    load_dataset,
    load_funding_csv,
    load_klines_csv,
    make_windows,
)
from model.synthetic import synthetic_klines
from tests.conftest import FIXTURES, REPO

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

KLINES = FIXTURES / "klines"
VARS = kline_variate_names()


def _tiny_cfg(**kw):
    from model.itransformer import ModelConfig

    base = dict(variates=VARS, lookback=32, horizon=5, d_model=16, n_heads=2, e_layers=1, d_ff=32, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def synth_ds():
    return load_dataset(synthetic_klines(3000, seed=1), horizon=5)


# ------------------------------------------------------------------------------------------- data
def test_real_kline_excerpt_loads_into_a_dataset_with_shared_variates_and_targets():
    path = KLINES / "BTCUSDT_1m_bybit_linear_20250530.csv"
    kl = load_klines_csv(path)
    assert len(kl) == 300 and kl["minute_ts"].iloc[0] == 1748623140000  # 2025-05-30 16:39 UTC
    assert (np.diff(kl["minute_ts"]) == MINUTE_MS).all()
    ds = load_dataset(path)
    f = ds.frame
    assert set(KLINE_VARIATES) <= set(f.columns) and f["symbol"].unique().tolist() == ["BTCUSDT"]
    tg = forward_targets(kl["close"], kl["high"], kl["low"])
    np.testing.assert_array_equal(f["rv_h"].to_numpy(), tg["rv_h"])
    assert f["funding_rate"].isna().all()  # no funding given
    w = make_windows(ds, VARS, lookback=60, horizon=30)
    # the first complete row is 60 (rv_60m / volume_z_60m), a window spans 60 rows, and the last
    # 30 rows have no complete future
    assert w.origins.min() == 60 + 60 - 1 and w.origins.max() == 300 - 31
    assert w.gather(w.origins[:3]).shape == (3, 60, len(VARS))


def test_binance_naive_timestamps_are_utc_and_bad_files_are_rejected(tmp_path):
    kl = load_klines_csv(KLINES / "BTCUSDT_1m_binance_spot_20210326.csv")
    assert kl["minute_ts"].iloc[0] == 1616727600000  # 2021-03-26 03:00 UTC
    bad = tmp_path / "BTCUSDT_bad.csv"
    bad.write_text("time,price\n1,2\n")
    with pytest.raises(DatasetError, match="expected columns"):
        load_klines_csv(bad)
    off = tmp_path / "BTCUSDT_off.csv"
    off.write_text("timestamp,open,high,low,close,volume\n2025-01-01 00:00:30,1,1,1,1,1\n")
    with pytest.raises(DatasetError, match="minute boundary"):
        load_klines_csv(off)
    with pytest.raises(DatasetError, match="neither an existing path nor a valid dataset id"):
        load_dataset("../../etc/passwd", data_dir=tmp_path, allow_paths=False)  # a request value
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("ds-0000000000000000", data_dir=tmp_path, allow_paths=False)
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(bad.with_suffix(".parquet") if bad.with_suffix(".parquet").write_text("x") else None)


def test_funding_is_forward_filled_by_time_from_unsorted_history():
    f = load_funding_csv(KLINES / "funding_bybit_BTCUSDT.csv")
    assert f["ts"].is_monotonic_increasing
    t0 = int(f["ts"].iloc[0])
    minutes = np.array([t0 - 2 * MINUTE_MS, t0 - MINUTE_MS, t0, t0 + 7 * 3600_000])
    got = funding_asof(minutes, f)
    assert np.isnan(got[0])
    assert got[1] == f["rate"].iloc[0]  # the minute ending at the settlement knows it
    assert got[3] == f["rate"].iloc[0]
    # a history that ended more than three settlements (24 h) earlier is not "known" any more
    assert np.isnan(funding_asof(np.array([t0 + 25 * 3600_000]), f.iloc[:1])).all()
    assert funding_asof(np.array([t0 + 23 * 3600_000]), f.iloc[:1]).item() == f["rate"].iloc[0]


def test_missing_minutes_mask_windows_and_targets():
    kl = synthetic_klines(400, seed=2)
    kl = kl.drop(index=[200])  # one missing minute
    ds = load_dataset(kl, horizon=5)
    w = make_windows(ds, VARS, lookback=32, horizon=5)
    gap = int(np.flatnonzero(w.ts == kl["minute_ts"].iloc[0] + 200 * MINUTE_MS)[0])
    assert np.isnan(w.close[gap])
    o = set(w.origins.tolist())
    # no window contains the NaN row and no target reaches into it
    assert not any(t in o for t in range(gap - 5, gap + 32 + 60))
    for t in w.origins:
        assert np.isfinite(w.gather(np.array([t]))).all()


def test_builder_layout_ts_and_y_columns_is_accepted(synth_ds):
    f = synth_ds.frame
    tg = forward_targets(f["close"], f["high"], f["low"], 5)
    b = pd.DataFrame({"symbol": f["symbol"], "ts": f["minute_ts"], "available_ts": f["minute_ts"] + MINUTE_MS,
                      "venue": "bybit", **{v: f[v] for v in VARS}})
    for k in ("ret_h", "close_h", "rv_h", "range_rel_h", "direction"):
        b[f"y_{k}"] = tg[k]
    b["y_close_path"] = [None if not np.isfinite(p).all() else p.tolist() for p in tg["close_path"]]
    b = b.drop(columns=["close"])
    from model.data import Dataset, _check_frame

    wb = make_windows(Dataset(_check_frame(b, 5, 0.001), {"label_config": {"flat_threshold": 0.001, "horizon": 5}}),
                      [v for v in VARS if v != "close"], 32, 5)
    wa = make_windows(synth_ds, [v for v in VARS if v != "close"], 32, 5)
    np.testing.assert_array_equal(wa.origins, wb.origins)
    np.testing.assert_allclose(wa.path[wa.origins], wb.path[wb.origins])
    np.testing.assert_allclose(wa.close[wa.origins], wb.close[wb.origins], rtol=1e-12)


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("extra", [{}, {"stat_token": True, "learned_scale": True, "time_harmonics": 4}])
def test_shapes_and_quantiles_never_cross(extra):
    from model.itransformer import ITransformer

    torch.manual_seed(0)
    m = ITransformer(_tiny_cfg(**extra)).eval()
    with torch.no_grad():
        for p in m.parameters():  # large random weights: crossing would show up here
            p.add_(torch.randn_like(p) * 3)
    x = torch.randn(7, 32, len(VARS)) * 5
    close_q, rv_q, rng_q, dir_p = m(x)
    assert close_q.shape == (7, 5, 3) and rv_q.shape == (7, 3) and rng_q.shape == (7, 3) and dir_p.shape == (7, 3)
    assert (close_q.diff(dim=-1) >= 0).all() and (rv_q.diff(dim=-1) >= 0).all() and (rng_q.diff(dim=-1) >= 0).all()
    assert (rv_q > 0).all() and (rng_q > 0).all()
    torch.testing.assert_close(dir_p.sum(-1), torch.ones(7))


def test_per_window_normalisation_and_denormalisation():
    from model.itransformer import ITransformer, per_window_norm

    x = torch.randn(4, 32, 3) * 7 + 100
    xn, mean, std = per_window_norm(x)
    torch.testing.assert_close(xn.mean(1), torch.zeros(4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close((xn * std + mean), x)
    torch.manual_seed(0)
    m = ITransformer(_tiny_cfg(feed_scale_to_heads=False)).eval()
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(0, 1, (3, 32, len(VARS))), dtype=torch.float32)
    ir, ic = VARS.index("log_return_1m"), VARS.index("close")
    x[:, :, ir] *= 1e-3
    base = m(x)
    # shifting a variate's level changes nothing (normalised away) ...
    x2 = x.clone()
    x2[:, :, ic] += 5000.0
    torch.testing.assert_close(m(x2)[0], base[0], atol=1e-6, rtol=1e-4)
    # ... and scaling the return variate scales the return and vol quantiles (de-normalisation)
    x3 = x.clone()
    x3[:, :, ir] *= 2.0
    out3 = m(x3)
    torch.testing.assert_close(out3[0], 2 * base[0], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(out3[1], 2 * base[1], rtol=1e-3, atol=1e-7)
    # time tokens are not normalised: a constant shift of tod_sin changes the forecast
    x4 = x.clone()
    x4[:, :, VARS.index("tod_sin")] += 0.5
    assert not torch.allclose(m(x4)[0], base[0])


def test_paper_itransformer_shapes():
    from model.itransformer import PaperITransformer

    m = PaperITransformer(n_variates=5, lookback=96, pred_len=24, d_model=32, n_heads=4, d_ff=32).eval()
    y = m(torch.randn(2, 96, 5), torch.randn(2, 96, 4))
    assert y.shape == (2, 24, 5)


def test_tiny_model_overfits_a_tiny_set(synth_ds):
    from model.itransformer import ITransformer
    from model.losses import forecast_loss

    w = make_windows(synth_ds, VARS, 32, 5)
    o = w.origins[:64]
    torch.manual_seed(0)
    m = ITransformer(_tiny_cfg(d_model=32, d_ff=64))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    taus = torch.tensor([0.1, 0.5, 0.9])
    x = torch.from_numpy(w.gather(o))
    y = {"path": torch.from_numpy(w.path[o]).float(), "rv": torch.from_numpy(w.rv[o]).float(),
         "range_rel": torch.from_numpy(w.range_rel[o]).float(),
         "direction": torch.from_numpy(w.direction[o]).float()}
    losses = []
    for _ in range(300):
        loss = forecast_loss(m.forward_scaled(x), y, taus, {"direction": 0.0})["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])


# ---------------------------------------------------------------------------------------- leakage
def test_shuffled_future_changes_no_input_and_no_forecast():
    from model.itransformer import ITransformer

    kl = synthetic_klines(600, seed=3)
    cut = 400
    shuffled = kl.copy()
    perm = np.random.default_rng(0).permutation(np.arange(cut + 1, len(kl)))
    for c in ("open", "high", "low", "close", "volume"):
        shuffled.loc[cut + 1:, c] = kl[c].to_numpy()[perm]
    wa = make_windows(load_dataset(kl, horizon=5), VARS, 32, 5)
    wb = make_windows(load_dataset(shuffled, horizon=5), VARS, 32, 5)
    past = np.arange(32 + 60, cut + 1)
    np.testing.assert_array_equal(wa.gather(past), wb.gather(past))  # bit-identical inputs up to the cut
    torch.manual_seed(0)
    m = ITransformer(_tiny_cfg()).eval()
    with torch.no_grad():
        torch.testing.assert_close(m(torch.from_numpy(wa.gather(past)))[0], m(torch.from_numpy(wb.gather(past)))[0],
                                   rtol=0, atol=0)
    # targets of origins whose horizon ends before the cut are unchanged, later ones do change
    ok = past[past + 5 <= cut]
    np.testing.assert_array_equal(wa.path[ok], wb.path[ok])
    assert not np.allclose(wa.path[cut - 2], wb.path[cut - 2])


def test_honest_targets_give_no_skill_and_shifted_targets_are_caught():
    """On a random walk the pipeline must not predict direction (no look-ahead anywhere); the same
    model with the target shifted into its inputs (a deliberate leak) must, proving the test's power."""
    from model.train import TrainConfig, fit_model, predict

    ds = load_dataset(synthetic_klines(6000, seed=4), horizon=5)
    f = ds.frame
    f["leak"] = f["ret_h"].fillna(0.0)  # the future return, aligned at t: a leak
    variates_honest = ["log_return_1m", "range_rel_1m", "rv_15m", "tod_sin"]
    cfg = TrainConfig(variates=variates_honest, lookback=32, horizon=5, d_model=16, n_heads=2, e_layers=1,
                      d_ff=32, dropout=0.0, epochs=10, patience=10, origins_per_epoch=4000, batch_size=128,
                      val_origins_max=1000, loss_weights={"direction": 1.0}, lr=5e-3)
    res = {}
    for name, variates in (("honest", variates_honest), ("leak", variates_honest + ["leak"])):
        cfg.variates = variates
        w = make_windows(ds, variates, 32, 5)
        tr, te = w.origins[w.origins < 4500], w.origins[w.origins >= 4600]
        model, _ = fit_model(w, tr, te[:300], cfg, progress=False)
        fc = predict(model, w, te)
        res[name] = float(np.mean(np.sign(fc["close_q"][:, -1, 1]) == np.sign(w.path[te, -1])))
    assert 0.42 < res["honest"] < 0.58, res
    assert res["leak"] > 0.7, res


def test_purge_and_embargo():
    from model.splits import assert_no_leakage, chronological_split, purge_embargo_mask, walk_forward

    ts = np.arange(2000, dtype=np.int64) * MINUTE_MS
    origins = np.arange(2000)
    sp = chronological_split(origins, ts, val_start=1000 * MINUTE_MS, test_start=1500 * MINUTE_MS, horizon=30)
    assert sp.train.max() < 1000 - 30 and sp.val.min() == 1000 and sp.val.max() < 1500 - 30
    assert sp.test.min() == 1500
    assert_no_leakage(sp, ts, 30)
    with pytest.raises(ValueError, match="embargo"):
        purge_embargo_mask(ts, 0, 10, horizon=30, embargo=10)
    keep = purge_embargo_mask(ts, 1000 * MINUTE_MS, 1100 * MINUTE_MS, horizon=30, embargo=60)
    assert not keep[970:1191].any() and keep[969] and keep[1191]
    folds = walk_forward(origins, ts, 1200 * MINUTE_MS, 1999 * MINUTE_MS, 2, horizon=30, val_minutes=200)
    for f in folds:
        assert_no_leakage(f, ts, 30)
    assert folds[1].train.max() > folds[0].test.min()  # anchored: later folds train on earlier tests
    bad = type(sp)(np.arange(1480, 1490), np.array([], int), np.arange(1500, 1600), {})
    with pytest.raises(AssertionError):
        assert_no_leakage(bad, ts, 30)


# ---------------------------------------------------------------------------------------- metrics
def test_metrics_against_hand_computed_values():
    from model.metrics import crps_from_quantiles, directional_accuracy, pinball, quantile_metrics

    y = np.array([1.0, 2.0, 3.0])
    q = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    pb = pinball(y, q, [0.1, 0.5, 0.9])
    # tau 0.1: d = 1,2,3 -> 0.1*d mean = 0.2; tau 0.5: d = 0,1,2 -> 0.5; tau 0.9: d = -1,0,1 -> (0.1+0+0.9)/3
    np.testing.assert_allclose(pb, [0.2, 0.5, 1.0 / 3])
    assert crps_from_quantiles(y, q, [0.1, 0.5, 0.9]) == pytest.approx(2 * np.mean(pb))
    m = quantile_metrics(y, q, [0.1, 0.5, 0.9])
    assert m["coverage"] == pytest.approx(2 / 3) and m["width"] == 2.0
    assert m["mae"] == pytest.approx(1.0) and m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert directional_accuracy(np.array([1, -1, 1, 0]), np.array([2, 1, 3, 1])) == pytest.approx(2 / 3)
    assert m["calibration"] == [(0.1, 0.0), (0.5, 1 / 3), (0.9, 2 / 3)]


# -------------------------------------------------------------------------------------- baselines
def test_baselines_use_only_the_past(synth_ds):
    from model.baselines import LightGBMQuantile, RandomWalkQuantiles, VolScaled

    w = make_windows(synth_ds, VARS, 32, 5)
    tr, va, te = w.origins[w.origins < 1800], w.origins[(w.origins > 1810) & (w.origins < 2300)], \
        w.origins[w.origins >= 2400]
    f2 = synth_ds.frame.copy()
    later = f2.index >= 2700
    for c in ("open", "high", "low", "close"):
        f2.loc[later, c] *= 1.5
    f2 = load_dataset(f2[["symbol", "minute_ts", "open", "high", "low", "close", "volume"]], horizon=5)
    w2 = make_windows(f2, VARS, 32, 5)
    probe = te[(te < 2690)]
    for b in (RandomWalkQuantiles([0.1, 0.5, 0.9], window=600, min_periods=100),
              VolScaled([0.1, 0.5, 0.9], "ewma"), VolScaled([0.1, 0.5, 0.9], "garch"),
              LightGBMQuantile([0.1, 0.5, 0.9], VARS, standardise=True, n_estimators=30, max_train=2000)):
        a = b.fit(w, tr, va).predict(w, probe)
        if isinstance(b, RandomWalkQuantiles):
            b.fit(w2)
        elif isinstance(b, VolScaled):
            b._sig = b._sigma_h(w2, b.halflife) if b.kind == "ewma" else b._sigma_h(w2)
        else:
            from model.baselines import ewma_variance, log_returns

            b._sig1 = np.sqrt(np.maximum(ewma_variance(log_returns(w2), w2.seg_start, b.halflife), 1e-16))
        c = b.predict(w2, probe)
        for k in ("close_q", "rv_q", "range_q"):
            np.testing.assert_allclose(a[k], c[k], err_msg=f"{type(b).__name__} {k}")
            assert (np.diff(a[k], axis=-1) >= 0).all()


# --------------------------------------------------------------------------------------- backtest
def test_backtest_arithmetic_by_hand():
    from model.backtest import BacktestConfig, run_backtest

    ts = np.arange(6) * MINUTE_MS
    o = np.array([100, 100, 101, 102, 101, 100.0])
    c = np.array([100, 101, 102, 101, 100, 100.0])
    p = np.array([1, 1, 0, -1, 0, 0.0])  # decided at each close, filled at the NEXT open
    r = run_backtest(ts, o, c, p, BacktestConfig(fee_bps=7, slippage_bps=3, funding=False))
    # bar 1: long from the open 100 to the close 101 (+1%), entry cost 10 bps
    # bar 2: held: gap 101->101, 101->102; bar 3: flat after exit at the open (cost 10 bps)
    # bar 4: short from the open 101 to the close 100; bar 5: exit at the open (cost)
    np.testing.assert_allclose(r.gross, [0, 0.01, 102 / 101 - 1, 0, -(100 / 101 - 1), 0])
    np.testing.assert_allclose(r.cost, [0, 1e-3, 0, 1e-3, 1e-3, 1e-3])
    np.testing.assert_allclose(r.equity[-1], 10_000 * np.prod(1 + r.net))
    np.testing.assert_allclose(r.trades, [0.01 + (102 / 101 - 1) - 2e-3, (1 - 100 / 101) - 2e-3])
    assert r.stats["n_trades"] == 2 and r.stats["win_rate"] == 1.0
    # a signal on the last bar is never filled; T+0 would have earned bar 0's move: it does not
    assert r.gross[0] == 0.0


def test_backtest_funding_sizing_and_stats():
    from model.backtest import (
        BacktestConfig,
        funding_per_bar,
        positions_from_scores,
        run_backtest,
        size_positions,
    )

    t0 = 8 * 3600_000 * 1000  # a settlement boundary
    ts = t0 - 3 * MINUTE_MS + np.arange(6) * MINUTE_MS  # the bar starting at t0 - 1 min ends on it
    rate = funding_per_bar(ts, pd.DataFrame({"ts": [t0], "rate": [1e-4]}), None)
    np.testing.assert_array_equal(rate, [0, 0, 1e-4, 0, 0, 0])
    o = c = np.full(6, 100.0)
    r = run_backtest(ts, o, c, np.array([-1, -1, -1, 0, 0, 0.0]), BacktestConfig(fee_bps=0, slippage_bps=0),
                     pd.DataFrame({"ts": [t0], "rate": [1e-4]}))
    assert r.net[2] == pytest.approx(1e-4)  # a short receives a positive rate
    s = positions_from_scores(np.array([0.5, -0.5, 0.0, 0.9, -0.9, 0.1]), 0.2, hold=3)
    np.testing.assert_array_equal(s, [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(positions_from_scores(np.array([0.5, -0.5, np.nan]), 0.2), [1, -1, 0])
    lev = size_positions(np.array([1.0, -1.0]), BacktestConfig(sizing="vol_target", target_vol_annual=0.5,
                                                               max_leverage=2.0), np.array([1e-4, 1e-2]))
    target = 0.5 / math.sqrt(525_600)
    np.testing.assert_allclose(lev, [min(2.0, target / 1e-4), -target / 1e-2])
    rng = np.random.default_rng(0)
    px = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, 3000)))
    ts2 = 1_700_000_000_000 - 1_700_000_000_000 % MINUTE_MS + np.arange(3000) * MINUTE_MS
    r2 = run_backtest(ts2, np.concatenate([[100], px[:-1]]), px, np.sign(rng.normal(size=3000)))
    st = r2.stats
    assert st["max_drawdown"] > 0 and st["n_trades"] > 100 and 0 <= st["win_rate"] <= 1
    assert sum(st["monthly_pnl"].values()) == pytest.approx(st["pnl"])
    assert st["fees_paid"] > 0 and st["sharpe"] < 0  # random signals lose their fees


def test_last_n_candles():
    from model.backtest import last_n_candles

    kl = synthetic_klines(300, seed=5)
    sig = pd.DataFrame({"minute_ts": kl["minute_ts"], "signal": np.sign(np.sin(np.arange(300) / 7))})
    out = last_n_candles(kl, sig, n=100)
    assert out["n_candles"] == 101 and len(out["equity"]) == 101
    json.dumps(out)  # JSON-ready
    assert out["equity"][-1]["minute_ts"] == int(kl["minute_ts"].iloc[-1])
    with pytest.raises(ValueError):
        last_n_candles(kl, pd.DataFrame({"minute_ts": [1]}), n=100)


# ------------------------------------------------------------------------------------------- ONNX
def test_onnx_export_parity_metadata_and_dynamic_batch(tmp_path):
    from model.export import PARITY_TOL, contract_metadata, export_onnx, parity_check
    from model.itransformer import Ensemble, ITransformer
    from model.serving import open_session, read_metadata, run_onnx

    torch.manual_seed(0)
    cfg = _tiny_cfg(stat_token=True, learned_scale=True, time_harmonics=3, ewma_halflives=[5.0, 20.0])
    # a heterogeneous ensemble: the second member is smaller and reads only the newest 16 rows
    members = [ITransformer(cfg), ITransformer(_tiny_cfg(stat_token=True, learned_scale=True, lookback=16,
                                                         d_model=8))]
    with torch.no_grad():  # non-trivial learned scales (they start at zero)
        for m in members:
            m.scale_rv.weight.normal_(0, 0.1)
            m.scale_path.weight.normal_(0, 0.1)
    model = Ensemble(members).eval()
    w = make_windows(load_dataset(synthetic_klines(400, seed=6), horizon=5), VARS, 32, 5)
    meta = contract_metadata(cfg, "", "tickcast-itransformer", "3")
    path = export_onnx(model, tmp_path / "m.onnx", meta, example=w.gather(w.origins[:4]))
    par = parity_check(model, path, w.gather(w.origins[:8]))
    assert par["ok"] and par[1] <= PARITY_TOL and par[8] <= PARITY_TOL, par
    md = read_metadata(path)
    for key in ("variates", "lookback", "horizon", "quantiles", "flat_threshold", "registry_hash", "cadence",
                "normalisation", "model_name", "model_version", "target_scaling"):
        assert key in md, key
    assert md["variates"] == VARS and md["lookback"] == 32 and md["horizon"] == 5 and md["cadence"] == "m1"
    assert model.cfg.lookback == 32
    out = run_onnx(open_session(path), w.gather(w.origins[:3]))
    assert out["close_logret_q"].shape == (3, 5, 3) and out["direction_p"].shape == (3, 3)


def test_serving_and_registry_do_not_import_torch():
    code = ("import sys; import model.registry, model.serving, model.backtest, model.metrics, model.data; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_paper_check_runs_the_paper_protocol_on_a_csv(tmp_path):
    from model.paper_check import borders, run

    n = 700
    t = np.arange(n)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"date": pd.date_range("2020-01-01", periods=n, freq="h"),
                       "a": np.sin(2 * np.pi * t / 24) + 0.05 * rng.normal(size=n),
                       "b": np.cos(2 * np.pi * t / 24) + 0.05 * rng.normal(size=n),
                       "OT": np.sin(2 * np.pi * t / 12) + 0.05 * rng.normal(size=n)})
    path = tmp_path / "toy.csv"
    df.to_csv(path, index=False)
    b1, b2 = borders("toy.csv", n, 48)
    # 70/10/20 with the paper's int() rounding; val/test windows' lookback reaches into the previous part
    assert b2 == [int(n * 0.7), n - int(n * 0.2), n] and b1 == [0, int(n * 0.7) - 48, n - int(n * 0.2) - 48]
    assert borders("ETTh1.csv", 17420, 96)[1] == [8640, 11520, 14400]
    res = run(path, horizons=(12,), lookback=48, epochs=3, batch_size=16, lr=1e-3, d_model=32, n_heads=4, d_ff=32,
              progress=False)
    assert res[0]["horizon"] == 12 and res[0]["test_windows"] == int(n * 0.2) - 12 + 1
    assert res[0]["mse"] < 0.2  # periodic data: far below the 1.0 of predicting the mean


def test_loads_a_dataset_built_by_the_dataset_builder(tmp_path):
    """flows/datasets.py output (ts, y_* targets, list-valued y_close_path, manifest) by dataset id."""
    datasets = pytest.importorskip("flows.datasets")
    from flows.kline_history import import_kline_file
    from flows.lake import Lake

    lake = Lake(str(tmp_path / "lake"))
    import_kline_file(lake, KLINES / "BTCUSDT_1m_bybit_linear_20250530.csv", symbol="BTCUSDT")
    kl = load_klines_csv(KLINES / "BTCUSDT_1m_bybit_linear_20250530.csv")
    t0 = int(kl["minute_ts"].iloc[0])
    spec = datasets.DatasetSpec.from_dict({"symbols": ["BTCUSDT"], "from": t0 + 61 * MINUTE_MS,
                                           "to": t0 + 300 * MINUTE_MS})
    m = datasets.build_dataset(spec, lake=lake, data_dir=tmp_path, publish=False)
    ds = load_dataset(m["dataset_id"], data_dir=tmp_path, allow_paths=False)
    assert ds.manifest["dataset_id"] == m["dataset_id"]
    w = make_windows(ds, VARS, lookback=30, horizon=30)
    assert len(w.origins) > 100
    # the same minutes built here from the CSV give the same inputs and targets
    mine = make_windows(load_dataset(KLINES / "BTCUSDT_1m_bybit_linear_20250530.csv"), VARS, 30, 30)
    common = np.intersect1d(w.ts[w.origins], mine.ts[mine.origins])
    assert len(common) > 100
    a = w.origins[np.isin(w.ts[w.origins], common)]
    b = mine.origins[np.isin(mine.ts[mine.origins], common)]
    np.testing.assert_allclose(w.gather(a), mine.gather(b), rtol=1e-6)
    np.testing.assert_allclose(w.path[a], mine.path[b], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(w.rv[a], mine.rv[b], rtol=1e-12)
    np.testing.assert_allclose(w.range_rel[a], mine.range_rel[b], rtol=1e-12)


def test_walk_forward_evaluation_against_every_baseline_on_synthetic_data():
    """The held-out evaluation's code path (model.real_eval.run_eval) end to end on small data."""
    from model.evaluate import comparison_table
    from model.real_eval import quality_bar, run_eval
    from model.train import TrainConfig

    kl = pd.concat([synthetic_klines(3600, seed=21, symbol="BTCUSDT"),
                    synthetic_klines(3600, seed=22, symbol="ETHUSDT", price=3000.0)], ignore_index=True)
    ds = load_dataset(kl, horizon=5)
    cfg = TrainConfig(lookback=32, horizon=5, d_model=16, n_heads=2, e_layers=1, d_ff=32, epochs=1,
                      origins_per_epoch=1500, val_origins_max=500, members=[{}, {"lookback": 16}],
                      stat_token=True, learned_scale=True, time_harmonics=2)
    test_start = int(kl["minute_ts"].iloc[3000])
    r = run_eval(ds, cfg, test_start, folds=2, val_days=0.3, progress=False)
    w, test = r["windows"], r["test"]
    assert len(r["folds"]) == 2 and w.ts[test].min() >= test_start
    assert set(r["metrics"]) == {"itransformer", "random_walk", "ewma", "garch", "lgbm_raw", "lgbm_std"}
    for name, m in r["metrics"].items():
        assert m["close"]["n"] == len(test), name  # every forecaster scored on the same origins
        assert 0.0 < m["rv"]["coverage"] <= 1.0
    for bt in r["backtests"].values():
        assert set(bt) == {"fixed", "vol_target"} and "pnl_per_30d" in bt["fixed"]["total"]
    table = comparison_table(r["metrics"], r["backtests"])
    assert "lgbm_std" in table and "P&L per 30 d" in table
    assert "quality bar" in quality_bar(r["metrics"])["text"]
    # the gain intervals: the point gain is the table's, inside its interval
    from model.real_eval import gain_intervals

    iv = gain_intervals(w, r["forecasts"], test, cfg.quantiles, r["metrics"], n_boot=200)
    for tgt, g in iv.items():
        m = r["metrics"]
        assert g["gain"] == pytest.approx(1 - m["itransformer"][tgt]["pinball"] / m[g["baseline"]][tgt]["pinball"],
                                          rel=1e-9, abs=1e-12), tgt
        assert g["lo"] <= g["gain"] <= g["hi"] and g["blocks"] >= 1
    assert "interval over" in quality_bar(r["metrics"], iv)["text"]


def test_bootstrap_gain_over_blocks():
    from model.metrics import bootstrap_gain

    ref = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    days = np.array([0, 0, 1, 1, 2, 2])
    g = bootstrap_gain(0.9 * ref, ref, days, n_boot=500)
    assert g["gain"] == pytest.approx(0.1) and g["lo"] == pytest.approx(0.1) and g["hi"] == pytest.approx(0.1)
    assert g["blocks"] == 3 and g["p_gain_ge_2pct"] == 1.0 and g["p_gain_le_0"] == 0.0
    # better on one day, worse on another: the interval spans both, and a NaN origin is left out
    loss = np.array([0.5, 1.0, 3.0, 4.0, 6.0, np.nan])
    g = bootstrap_gain(loss, ref, days, n_boot=2000, seed=1)
    assert g["gain"] == pytest.approx(1 - 14.5 / 15.0)
    assert g["lo"] < 0 < g["hi"] and 0 < g["p_gain_le_0"] < 1
    assert bootstrap_gain(loss, ref, days, n_boot=2000, seed=1) == g  # fixed seed: same interval


def test_two_variate_configs_are_compared_on_identical_origins():
    """The seed's "baseline without mempool" vs "main with mempool": generic over any two variate
    sets; here the second adds a synthetic extra variate (no real mempool history exists)."""
    from model.evaluate import compare_variate_configs
    from model.train import TrainConfig

    ds = load_dataset(synthetic_klines(2500, seed=31), horizon=5)
    rng = np.random.default_rng(0)
    ds.frame["mempool_tx_count"] = rng.normal(size=len(ds.frame))
    ds.frame.loc[100:180, "mempool_tx_count"] = np.nan  # a feed outage: fewer valid origins there
    base = dict(lookback=32, horizon=5, d_model=16, n_heads=2, e_layers=1, d_ff=32, epochs=1,
                origins_per_epoch=800, val_origins_max=300)
    a = TrainConfig(variates=VARS, **base)
    b = TrainConfig(variates=VARS + ["mempool_tx_count"], **base)
    r = compare_variate_configs(ds, a, b, progress=False)
    assert set(r["metrics"]) == {"baseline", "main"}
    assert r["metrics"]["baseline"]["close"]["n"] == r["metrics"]["main"]["close"]["n"] > 0
    assert r["main_variates"][-1] == "mempool_tx_count"


def test_cross_asset_variates_are_the_other_symbols_values_at_the_same_minute():
    import pandas as pd

    from model.experiments import with_cross_asset

    df = pd.DataFrame({"symbol": ["A", "A", "B", "B", "B"], "minute_ts": [0, 60_000, 0, 60_000, 120_000],
                       "r": [1.0, 2.0, 10.0, 20.0, 30.0]})
    out = with_cross_asset(df, ["r"]).set_index(["symbol", "minute_ts"])["xa_r"]
    assert out[("A", 0)] == 10.0 and out[("A", 60_000)] == 20.0
    assert out[("B", 0)] == 1.0 and out[("B", 60_000)] == 2.0
    assert pd.isna(out[("B", 120_000)])  # A has no such minute: no valid window there
    with pytest.raises(ValueError, match="exactly two symbols"):
        with_cross_asset(pd.concat([df, df.assign(symbol="C")]), ["r"])
