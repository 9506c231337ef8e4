"""Baselines on the same windows and splits as the iTransformer (numpy / pandas / scipy / LightGBM).

Every baseline has ``fit(w, train, val)`` and ``predict(w, origins) -> forecast dict`` with
``close_q [n,H,Q]``, ``rv_q [n,Q]``, ``range_q [n,Q]`` (the same layout as the model's outputs).

- ``RandomWalkQuantiles``: the price is a random walk; quantiles of each target are the rolling
  empirical quantiles of its past values known at t (the h-minute return of origin s is known at
  s+h; rv/range of origin s at s+H) over a trailing window (default 7 days).
- ``VolScaled`` (``kind="ewma"`` or ``"garch"``): a 1-minute variance forecast (EWMA with a
  half-life, or GARCH(1,1) fitted by Gaussian QMLE on the training returns), scaled to the horizon
  (sqrt(h) for EWMA; the GARCH term structure sum for GARCH), times standardised quantiles of each
  target fitted on the training origins (filtered historical simulation). The EWMA half-life is
  picked on validation.
- ``LightGBMQuantile`` (``standardise=False/True``): LightGBM quantile regression, one model per
  target and quantile, on the variates at t plus log EWMA volatility; on raw targets or on targets
  divided by the EWMA volatility scaled to the horizon (then multiplied back). Level variates whose
  scale differs across exchanges and years (``close``, ``log_volume_1m``) are left out of the trees.
  Quantiles are sorted per row (no crossing). The close path uses the h = H model scaled by sqrt(h/H).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from model.data import Windows
from model.metrics import pinball

LEVEL_VARIATES = ("close", "log_volume_1m")


def log_returns(w: Windows) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        lc = np.log(w.close)
    r = np.full(len(lc), np.nan)
    r[1:] = lc[1:] - lc[:-1]
    r[w.seg_start == np.arange(len(lc))] = np.nan
    return r


def _shift_in_segment(values: np.ndarray, seg: np.ndarray, k: int) -> np.ndarray:
    out = np.full(len(values), np.nan)
    if k < len(values):
        out[k:] = values[:-k] if k else values
    idx = np.arange(len(values))
    out[idx - seg < k] = np.nan
    return out


def _rolling_quantiles(values: np.ndarray, seg: np.ndarray, window: int, min_periods: int,
                       taus: Sequence[float]) -> np.ndarray:
    s = pd.Series(values)
    out = np.full((len(values), len(taus)), np.nan)
    for _, idx in pd.Series(np.arange(len(values))).groupby(seg, sort=False):
        sub = s.iloc[idx.to_numpy()]
        roll = sub.rolling(window, min_periods=min_periods)
        for j, t in enumerate(taus):
            out[idx.to_numpy(), j] = roll.quantile(t).to_numpy()
    return out


class RandomWalkQuantiles:
    name = "random_walk"

    def __init__(self, taus: Sequence[float], window: int = 7 * 1440, min_periods: int = 1440,
                 path_horizons: Sequence[int] | None = None):
        self.taus = list(taus)
        self.window = window
        self.min_periods = min_periods
        self.path_horizons = path_horizons
        self._cache: dict | None = None

    def fit(self, w: Windows, train=None, val=None) -> RandomWalkQuantiles:
        H = w.horizon
        seg = w.seg_start
        hs = list(self.path_horizons or range(1, H + 1))
        path_q = np.full((len(w.close), H, len(self.taus)), np.nan)
        for h in hs:
            known = _shift_in_segment(w.path[:, h - 1], seg, h)
            path_q[:, h - 1] = _rolling_quantiles(known, seg, self.window, self.min_periods, self.taus)
        if len(hs) < H:  # fill the rest by sqrt-time interpolation from the computed ones
            ref_h = hs[-1]
            for h in range(1, H + 1):
                if h not in hs:
                    path_q[:, h - 1] = path_q[:, ref_h - 1] * math.sqrt(h / ref_h)
        rv_q = _rolling_quantiles(_shift_in_segment(w.rv, seg, H), seg, self.window, self.min_periods, self.taus)
        rg_q = _rolling_quantiles(_shift_in_segment(w.range_rel, seg, H), seg, self.window, self.min_periods,
                                  self.taus)
        self._cache = {"close_q": path_q, "rv_q": rv_q, "range_q": rg_q}
        return self

    def predict(self, w: Windows, origins: np.ndarray) -> dict:
        if self._cache is None or len(self._cache["rv_q"]) != len(w.close):
            self.fit(w)
        o = np.asarray(origins)
        return {k: np.sort(v[o], axis=-1) for k, v in self._cache.items()}


def ewma_variance(r: np.ndarray, seg: np.ndarray, halflife: float) -> np.ndarray:
    """EWMA of squared 1-min returns per segment (known at t: includes r_t)."""
    s = pd.Series(r * r)
    out = s.groupby(seg, sort=False).transform(
        lambda x: x.ewm(halflife=halflife, adjust=False, ignore_na=True, min_periods=30).mean())
    return out.to_numpy()


def _garch_filter(r2: np.ndarray, omega: float, alpha: float, beta: float, init: float) -> np.ndarray:
    """sigma2_{t+1} = omega + alpha r_t^2 + beta sigma2_t, returned aligned at t (forecast for t+1)."""
    from scipy.signal import lfilter

    x = omega + alpha * np.nan_to_num(r2, nan=init)
    y, _ = lfilter([1.0], [1.0, -beta], x, zi=[beta * init])
    return y


def fit_garch(r: np.ndarray, seg: np.ndarray, max_n: int = 300_000) -> tuple[float, float, float]:
    """Gaussian QMLE of GARCH(1,1) on 1-min returns (variance targeting: omega = var * (1-a-b))."""
    from scipy.optimize import minimize

    r = r[np.isfinite(r)]
    r = r[-max_n:]
    r = r - r.mean()
    var = float(np.mean(r * r))
    r2 = r * r

    def nll(p):
        a, b = 1 / (1 + np.exp(-p[0])) * 0.5, 1 / (1 + np.exp(-p[1]))
        if a + b >= 0.9999:
            return 1e12
        omega = var * (1 - a - b)
        s2 = _garch_filter(r2, omega, a, b, var)
        s2 = np.concatenate([[var], s2[:-1]])
        s2 = np.maximum(s2, 1e-14)
        return float(0.5 * np.mean(np.log(s2) + r2 / s2))

    res = minimize(nll, x0=np.array([-2.0, 2.5]), method="Nelder-Mead", options={"maxiter": 200, "xatol": 1e-3})
    a, b = 1 / (1 + np.exp(-res.x[0])) * 0.5, 1 / (1 + np.exp(-res.x[1]))
    return var * (1 - a - b), a, b


class VolScaled:
    """Horizon-scaled volatility forecast times standardised empirical quantiles per target."""

    def __init__(self, taus: Sequence[float], kind: str = "ewma", halflives: Sequence[float] = (30, 60, 120, 240)):
        self.taus = list(taus)
        self.kind = kind
        self.name = kind
        self.halflives = list(halflives)
        self.halflife: float | None = None
        self.params: dict = {}

    def _sigma_h(self, w: Windows, halflife: float | None = None) -> np.ndarray:
        """[N, H] forecast std of the h-minute log return, h = 1..H, known at t."""
        r = log_returns(w)
        seg = w.seg_start
        H = w.horizon
        hs = np.arange(1, H + 1)
        if self.kind == "ewma":
            v1 = ewma_variance(r, seg, halflife or self.halflife)
            return np.sqrt(np.maximum(v1, 1e-16))[:, None] * np.sqrt(hs)[None, :]
        omega, a, b = self.params["omega"], self.params["alpha"], self.params["beta"]
        var_l = omega / (1 - a - b)
        s2_next = np.full(len(r), np.nan)
        for _, idx in pd.Series(np.arange(len(r))).groupby(seg, sort=False):
            ii = idx.to_numpy()
            s2_next[ii] = _garch_filter(r[ii] ** 2, omega, a, b, var_l)
        # sum_{k=1..h} E[sigma2_{t+k}] = h var_l + (s2_{t+1} - var_l) * (1 - p^h) / (1 - p)
        p = a + b
        geo = (1 - p ** hs) / (1 - p)
        tot = hs[None, :] * var_l + (s2_next - var_l)[:, None] * geo[None, :]
        return np.sqrt(np.maximum(tot, 1e-16))

    def _fit_multipliers(self, w: Windows, sig: np.ndarray, train: np.ndarray) -> dict:
        H = w.horizon
        z_path = w.path[train] / sig[train]
        mult_path = np.nanquantile(z_path, self.taus, axis=0).T  # [H, Q]
        sH = sig[train, -1]
        return {"path": mult_path,
                "rv": np.nanquantile(w.rv[train] / sH, self.taus),
                "range": np.nanquantile(w.range_rel[train] / sH, self.taus), "H": H}

    def _forecast(self, sig: np.ndarray, m: dict, o: np.ndarray) -> dict:
        s = sig[o]
        return {"close_q": s[:, :, None] * m["path"][None, :, :],
                "rv_q": s[:, -1:] * m["rv"][None, :],
                "range_q": s[:, -1:] * m["range"][None, :]}

    def fit(self, w: Windows, train: np.ndarray, val: np.ndarray | None = None) -> VolScaled:
        train = np.asarray(train)
        if self.kind == "garch":
            r = log_returns(w)
            mask = np.zeros(len(r), bool)
            mask[train] = True  # fit on returns at training origins only (all before validation)
            omega, a, b = fit_garch(np.where(mask, r, np.nan), w.seg_start)
            self.params = {"omega": omega, "alpha": a, "beta": b}
            self._sig = self._sigma_h(w)
            self._mult = self._fit_multipliers(w, self._sig, train)
            return self
        best = None
        for hl in self.halflives:
            sig = self._sigma_h(w, hl)
            m = self._fit_multipliers(w, sig, train)
            if val is None or len(val) == 0:
                best = (0.0, hl, sig, m)
                break
            fc = self._forecast(sig, m, np.asarray(val))
            score = (np.mean(pinball(w.path[val, -1], fc["close_q"][:, -1], self.taus)) / np.mean(np.abs(w.path[val, -1]))
                     + np.mean(pinball(w.rv[val], fc["rv_q"], self.taus)) / np.mean(w.rv[val])
                     + np.mean(pinball(w.range_rel[val], fc["range_q"], self.taus)) / np.mean(w.range_rel[val]))
            if best is None or score < best[0]:
                best = (score, hl, sig, m)
        _, self.halflife, self._sig, self._mult = best
        self.params = {"halflife": self.halflife}
        return self

    def predict(self, w: Windows, origins: np.ndarray) -> dict:
        return self._forecast(self._sig, self._mult, np.asarray(origins))


class LightGBMQuantile:
    def __init__(self, taus: Sequence[float], variates: Sequence[str], standardise: bool = False,
                 halflife: float = 60.0, max_train: int = 120_000, n_estimators: int = 400,
                 learning_rate: float = 0.05, num_leaves: int = 31, min_child_samples: int = 200,
                 threads: int = 1, seed: int = 0, progress: bool = False):
        self.taus = list(taus)
        self.standardise = standardise
        self.name = "lgbm_std" if standardise else "lgbm_raw"
        self.features = [v for v in variates if v not in LEVEL_VARIATES]
        self.halflife = halflife
        self.max_train = max_train
        self.params = dict(objective="quantile", n_estimators=n_estimators, learning_rate=learning_rate,
                           num_leaves=num_leaves, min_child_samples=min_child_samples, subsample=0.8,
                           subsample_freq=1, colsample_bytree=0.9, n_jobs=threads, random_state=seed,
                           verbose=-1)
        self.progress = progress
        self.models: dict = {}
        self._variates = list(variates)

    def _design(self, w: Windows, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cols = [w.variates.index(f) for f in self.features]
        X = w.x[o][:, cols].astype(np.float64)
        sH = self._sig1[o] * math.sqrt(w.horizon)
        X = np.column_stack([X, np.log(sH)])
        return X, sH

    def _targets(self, w: Windows, o: np.ndarray) -> dict:
        return {"close": w.path[o, -1], "rv": w.rv[o], "range": w.range_rel[o]}

    def fit(self, w: Windows, train: np.ndarray, val: np.ndarray | None = None) -> LightGBMQuantile:
        import lightgbm as lgb
        from tqdm.auto import tqdm

        self._sig1 = np.sqrt(np.maximum(ewma_variance(log_returns(w), w.seg_start, self.halflife), 1e-16))
        train = np.asarray(train)
        if len(train) > self.max_train:
            train = np.sort(np.random.default_rng(0).choice(train, self.max_train, replace=False))
        Xtr, str_ = self._design(w, train)
        ytr = self._targets(w, train)
        if val is not None and len(val):
            val = np.asarray(val)
            if len(val) > self.max_train // 3:
                val = np.sort(np.random.default_rng(1).choice(val, self.max_train // 3, replace=False))
            Xva, sva = self._design(w, val)
            yva = self._targets(w, val)
        jobs = [(t, j) for t in ("close", "rv", "range") for j in range(len(self.taus))]
        for tgt, j in tqdm(jobs, desc=self.name, disable=not self.progress, leave=False):
            alpha = self.taus[j]
            y = ytr[tgt] / str_ if self.standardise else ytr[tgt]
            m = lgb.LGBMRegressor(alpha=alpha, **self.params)
            kw = {}
            if val is not None and len(val):
                yv = yva[tgt] / sva if self.standardise else yva[tgt]
                kw = dict(eval_X=(Xva,), eval_y=(yv,), eval_metric="quantile",
                          callbacks=[lgb.early_stopping(30, verbose=False)])
            m.fit(Xtr, y, **kw)
            self.models[(tgt, j)] = m
        return self

    def predict(self, w: Windows, origins: np.ndarray) -> dict:
        o = np.asarray(origins)
        X, sH = self._design(w, o)
        out = {}
        for tgt in ("close", "rv", "range"):
            q = np.column_stack([self.models[(tgt, j)].predict(X) for j in range(len(self.taus))])
            if self.standardise:
                q = q * sH[:, None]
            out[tgt] = np.sort(q, axis=1)
        H = w.horizon
        scale = np.sqrt(np.arange(1, H + 1) / H)
        return {"close_q": out["close"][:, None, :] * scale[None, :, None], "rv_q": out["rv"],
                "range_q": out["range"]}
