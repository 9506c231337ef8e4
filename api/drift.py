"""Feature drift: the population stability index (PSI) of live variates against the training data.

The training distribution summary travels with the model, either as the ONNX metadata key
``tickcast.feature_summary`` or as the artifact ``feature_summary.json`` next to the model in its
MLflow run. Its format (``summarise`` builds it from training rows)::

    {"kind": "quantile_bins", "bins": 10,
     "variates": {"<name>": {"cuts": [c1, ..., c9], "fractions": [f1, ..., f10], "n": 123456}},
     "per_symbol": {"BTCUSDT": {"<name>": {...same...}}}}        # optional, preferred when present

``cuts`` are the inner bin edges (training deciles), ``fractions`` the training share of each bin.
PSI = sum((a - e) * ln(a / e)) over bins, with both shares floored at 1e-4. Rule of thumb: < 0.1
stable, 0.1-0.25 moderate shift, > 0.25 large shift.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-4


def summarise(columns: Mapping[str, Sequence[float]], bins: int = 10,
              per_symbol: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> dict:
    """A training distribution summary (the format above) from training values per variate."""
    def one(values) -> dict | None:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size < bins * 5:
            return None
        cuts = np.unique(np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1]))
        idx = np.searchsorted(cuts, v, side="right")
        frac = np.bincount(idx, minlength=len(cuts) + 1) / v.size
        return {"cuts": cuts.tolist(), "fractions": frac.tolist(), "n": int(v.size)}

    out = {"kind": "quantile_bins", "bins": bins,
           "variates": {k: s for k, vals in columns.items() if (s := one(vals)) is not None}}
    if per_symbol:
        out["per_symbol"] = {sym: {k: s for k, vals in cols.items() if (s := one(vals)) is not None}
                             for sym, cols in per_symbol.items()}
    return out


def psi(values: Sequence[float], cuts: Sequence[float], fractions: Sequence[float]) -> float | None:
    """PSI of ``values`` against a training bin summary; None with fewer than 30 finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 30 or len(fractions) != len(cuts) + 1:
        return None
    idx = np.searchsorted(np.asarray(cuts, dtype=float), v, side="right")
    actual = np.maximum(np.bincount(idx, minlength=len(fractions)) / v.size, EPS)
    expected = np.maximum(np.asarray(fractions, dtype=float), EPS)
    val = float(np.sum((actual - expected) * np.log(actual / expected)))
    return val if math.isfinite(val) else None


def summary_for(summary: dict | None, symbol: str) -> dict[str, dict]:
    """The per-variate bins to compare ``symbol`` against (its own when the summary has them)."""
    if not summary:
        return {}
    per = (summary.get("per_symbol") or {}).get(symbol)
    if isinstance(per, dict) and per:
        return per
    base = summary.get("variates")
    return base if isinstance(base, dict) else {}
