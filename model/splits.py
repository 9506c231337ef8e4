"""Chronological splits with purge and embargo (numpy only).

Splits cut on time, the same cut for every symbol (BTC and ETH move together: a symbol's test
period must not be another symbol's training period). Origin t's label interval is [t, t+H]
(minutes; the targets read minutes t+1..t+H). For a test block of origins [a, b]:

- **purge**: drop every training origin whose label interval overlaps a test label interval,
  i.e. t in [a - H, b + H];
- **embargo**: also drop training origins in (b + H, b + H + embargo] (only matters when training
  data lies after the test block, e.g. purged K-fold); ``embargo`` >= H is enforced.

Train -> validation -> test chains use the same rule between each pair, so validation labels never
reach into the test period either.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flows.candles import MINUTE_MS


@dataclass
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    spec: dict

    def describe(self, ts: np.ndarray) -> dict:
        def span(idx):
            if len(idx) == 0:
                return None
            return [int(ts[idx].min()), int(ts[idx].max()), int(len(idx))]
        return {"train": span(self.train), "val": span(self.val), "test": span(self.test), **self.spec}


def purge_embargo_mask(origin_ts: np.ndarray, block_start: int, block_end: int, horizon: int,
                       embargo: int | None = None) -> np.ndarray:
    """True for origins that may be used for training next to the block [block_start, block_end]
    (ms timestamps of its first and last origin)."""
    embargo = horizon if embargo is None else embargo
    if embargo < horizon:
        raise ValueError(f"embargo ({embargo} min) must be at least the horizon ({horizon} min)")
    ts = np.asarray(origin_ts, np.int64)
    lo = block_start - horizon * MINUTE_MS
    hi = block_end + (horizon + embargo) * MINUTE_MS
    return ~((ts >= lo) & (ts <= hi))


def chronological_split(origins: np.ndarray, ts: np.ndarray, val_start: int, test_start: int,
                        test_end: int | None = None, horizon: int = 30, embargo: int | None = None) -> Split:
    """train: origins before val_start, val: [val_start, test_start), test: [test_start, test_end];
    purged and embargoed at both cuts (times in ms)."""
    embargo = horizon if embargo is None else embargo
    o = np.asarray(origins)
    t = ts[o]
    test_end = int(t.max()) if test_end is None else test_end
    test = o[(t >= test_start) & (t <= test_end)]
    val = o[(t >= val_start) & (t < test_start)]
    train = o[t < val_start]
    if len(test):
        val = val[purge_embargo_mask(ts[val], int(ts[test].min()), int(ts[test].max()), horizon, embargo)]
        train = train[purge_embargo_mask(ts[train], int(ts[test].min()), int(ts[test].max()), horizon, embargo)]
    if len(val):
        train = train[purge_embargo_mask(ts[train], int(ts[val].min()), int(ts[val].max()), horizon, embargo)]
    return Split(train, val, test, {"kind": "chronological", "val_start": int(val_start),
                                    "test_start": int(test_start), "test_end": int(test_end),
                                    "horizon": horizon, "embargo": embargo})


def fraction_split(origins: np.ndarray, ts: np.ndarray, val_frac: float = 0.15, test_frac: float = 0.15,
                   horizon: int = 30, embargo: int | None = None) -> Split:
    """Cut the time span of the origins (not their count) into train / val / test fractions."""
    t = ts[np.asarray(origins)]
    t0, t1 = int(t.min()), int(t.max())
    # cut on the distinct minutes so that several symbols share the same cut
    minutes = np.unique(t)
    n = len(minutes)
    test_start = int(minutes[min(n - 1, int(n * (1 - test_frac)))]) if test_frac > 0 else t1 + MINUTE_MS
    val_start = int(minutes[min(n - 1, int(n * (1 - test_frac - val_frac)))]) if val_frac > 0 else test_start
    sp = chronological_split(origins, ts, val_start, test_start, t1, horizon, embargo)
    sp.spec.update({"kind": "fraction", "val_frac": val_frac, "test_frac": test_frac, "span": [t0, t1]})
    return sp


def walk_forward(origins: np.ndarray, ts: np.ndarray, start: int, end: int, n_folds: int, horizon: int = 30,
                 embargo: int | None = None, val_minutes: int = 0) -> list[Split]:
    """Anchored (expanding) walk-forward over [start, end]: fold k tests on the k-th of n_folds
    equal time blocks and trains on everything before it (purged), optionally holding out the last
    ``val_minutes`` before the block (purged on both sides) for early stopping and tuning."""
    embargo = horizon if embargo is None else embargo
    edges = np.linspace(start, end + MINUTE_MS, n_folds + 1).astype(np.int64)
    edges = (edges // MINUTE_MS) * MINUTE_MS
    folds = []
    for k in range(n_folds):
        a, b = int(edges[k]), int(edges[k + 1]) - MINUTE_MS
        val_start = a - val_minutes * MINUTE_MS if val_minutes else a
        sp = chronological_split(origins, ts, val_start, a, b, horizon, embargo)
        sp.spec.update({"kind": "walk_forward", "fold": k, "n_folds": n_folds})
        folds.append(sp)
    return folds


def assert_no_leakage(split: Split, ts: np.ndarray, horizon: int) -> None:
    """Raise if any training/validation label interval touches a later block's label interval."""
    def check(a_idx, b_idx, name):
        if len(a_idx) == 0 or len(b_idx) == 0:
            return
        ta, tb = ts[a_idx], ts[b_idx]
        if ta.max() + horizon * MINUTE_MS >= tb.min() and ta.min() <= tb.max():
            # overlapping spans: any a within H of the b block?
            lo, hi = tb.min() - horizon * MINUTE_MS, tb.max() + horizon * MINUTE_MS
            if np.any((ta >= lo) & (ta <= hi)):
                raise AssertionError(f"{name}: label intervals overlap (purge failed)")
    check(split.train, split.test, "train/test")
    check(split.train, split.val, "train/val")
    check(split.val, split.test, "val/test")
