"""Per-symbol history of 1-minute feature vectors and the model's input window.

The API keeps, per symbol, the last ``capacity`` m1 vectors it has seen on ``features.live``, keyed
by the minute's start (``window_end - 60 s``; the candle convention of ``flows.candles``). The model
input for minute t is the lookback rows [t-L+1, t] of the model's variates, oldest first. Missing
inputs are never invented silently: a missing minute or a null/non-finite value is filled (last value
carried forward, leading gaps from the first value after them, a variate absent from the whole window
with 0) and the forecast is marked degraded with the reason; too many missing rows, or no close at
minute t, give no forecast, with the reason.
"""
from __future__ import annotations

import math
import threading
from bisect import bisect_left, insort
from dataclasses import dataclass, field

import numpy as np

from flows.candles import kline_registry_hash

KLINE_REGISTRY_HASH = kline_registry_hash()

MINUTE_MS = 60_000


def finite(v) -> float | None:
    """float(v) when it is a finite number, else None."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass(frozen=True)
class MinuteObs:
    """One m1 FeatureVector as the API keeps it."""

    minute: int  # start of the minute, ms
    values: dict[str, float | None]
    venue: str
    registry_hash: str
    book_valid: bool
    nulls: dict[str, str]
    emit_ts: int
    _vectors: dict = field(default_factory=dict, compare=False, repr=False)

    def value(self, name: str) -> float | None:
        return finite(self.values.get(name))

    def vector(self, variates: tuple[str, ...]) -> np.ndarray:
        """The values of ``variates`` as float64 (NaN where null or non-finite), computed once per model."""
        vec = self._vectors.get(variates)
        if vec is None:
            vals = self.values
            vec = np.array([_num(vals.get(n)) for n in variates], dtype=np.float64)
            vec[~np.isfinite(vec)] = np.nan
            if len(self._vectors) > 4:  # models come and go: keep the last few layouts
                self._vectors.clear()
            self._vectors[variates] = vec
        return vec


def _num(v) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class AddResult:
    kind: str  # new | duplicate | late
    gap_minutes: int = 0  # minutes skipped between the previous latest minute and this one
    gap_from: int | None = None  # first missing minute


class SymbolHistory:
    """Bounded history of m1 observations of one symbol, keyed by minute start."""

    def __init__(self, capacity: int):
        self.capacity = max(2, int(capacity))
        self._rows: dict[int, MinuteObs] = {}
        self._minutes: list[int] = []  # sorted
        self._lock = threading.Lock()  # add() vs snapshot() from request threads
        self._epoch = 0  # bumped when a past minute changes (a late vector): invalidates the matrix cache
        self._mcache: tuple | None = None

    def __len__(self) -> int:
        return len(self._minutes)

    @property
    def latest(self) -> int | None:
        return self._minutes[-1] if self._minutes else None

    @property
    def oldest(self) -> int | None:
        return self._minutes[0] if self._minutes else None

    def get(self, minute: int) -> MinuteObs | None:
        return self._rows.get(minute)

    def snapshot(self) -> SymbolHistory:
        """A consistent copy for readers on other threads (the inference loop keeps mutating)."""
        with self._lock:
            cp = SymbolHistory(self.capacity)
            cp._rows = dict(self._rows)
            cp._minutes = list(self._minutes)
        return cp

    def add(self, obs: MinuteObs) -> AddResult:
        with self._lock:
            return self._add(obs)

    def _add(self, obs: MinuteObs) -> AddResult:
        m = obs.minute
        if m in self._rows:
            return AddResult("duplicate")
        latest = self.latest
        if latest is not None and m < latest:
            if self._minutes and m < self._minutes[0] and len(self._minutes) >= self.capacity:
                return AddResult("duplicate")  # older than everything kept: nothing to learn
            insort(self._minutes, m)
            self._rows[m] = obs
            self._epoch += 1
            self._trim()
            return AddResult("late")
        gap = 0 if latest is None else (m - latest) // MINUTE_MS - 1
        self._minutes.append(m)
        self._rows[m] = obs
        self._trim()
        return AddResult("new", max(0, gap), None if latest is None or gap <= 0 else latest + MINUTE_MS)

    def _trim(self) -> None:
        while len(self._minutes) > self.capacity:
            old = self._minutes.pop(0)
            self._rows.pop(old, None)

    def rows(self, start: int, end: int) -> list[MinuteObs | None]:
        """Observations for every minute in [start, end] (inclusive), None where missing."""
        n = (end - start) // MINUTE_MS + 1
        if n <= 0:
            return []
        return [self._rows.get(start + i * MINUTE_MS) for i in range(n)]

    def matrix(self, t: int, variates: tuple[str, ...], lookback: int) -> tuple[np.ndarray, np.ndarray]:
        """(values [lookback, n] with NaN for nulls and missing minutes, present-minute mask) of the
        window ending at minute t. Minute after minute, only the new row is computed."""
        key = (variates, lookback)
        c = self._mcache
        if c is not None and c[0] == key and c[4] == self._epoch:
            if t == c[1]:
                return c[2].copy(), c[3].copy()
            if t == c[1] + MINUTE_MS:
                r = self._rows.get(t)
                row = r.vector(variates) if r is not None else np.full(len(variates), np.nan)
                m = np.vstack([c[2][1:], row[None, :]])
                present = np.append(c[3][1:], r is not None)
                self._mcache = (key, t, m, present, self._epoch)
                return m.copy(), present.copy()
        rows = self.rows(t - (lookback - 1) * MINUTE_MS, t)
        blank = np.full(len(variates), np.nan)
        m = np.array([r.vector(variates) if r is not None else blank for r in rows], dtype=np.float64)
        m = m.reshape(lookback, len(variates))
        present = np.array([r is not None for r in rows], dtype=bool)
        self._mcache = (key, t, m, present, self._epoch)
        return m.copy(), present.copy()

    def series(self, name: str, start: int, end: int) -> np.ndarray:
        out = np.full((end - start) // MINUTE_MS + 1, np.nan)
        i = bisect_left(self._minutes, start)
        while i < len(self._minutes) and self._minutes[i] <= end:
            m = self._minutes[i]
            v = self._rows[m].value(name)
            if v is not None:
                out[(m - start) // MINUTE_MS] = v
            i += 1
        return out

    def recent(self, n: int) -> list[MinuteObs]:
        return [self._rows[m] for m in self._minutes[-n:]]


@dataclass
class InputWindow:
    x: np.ndarray | None  # float32 [lookback, n_variates] when a forecast can be made
    degraded: bool = False
    reasons: list[str] = field(default_factory=list)
    last_close: float | None = None
    registry_hash: str = ""
    simulated: bool = False

    @property
    def reason(self) -> str | None:
        return "; ".join(self.reasons) if self.reasons else None


def assemble_window(history: SymbolHistory, t: int, variates: tuple[str, ...] | list[str], lookback: int, *,
                    max_missing_frac: float = 0.25, close_name: str = "close",
                    model_registry_hash: str = "") -> InputWindow:
    """The model input for minute t (see the module doc for the fill and degrade rules)."""
    last = history.get(t)
    if last is None:
        return InputWindow(None, reasons=[f"no m1 feature vector for minute {t}"])
    close = last.value(close_name)
    if close is None or close <= 0:
        return InputWindow(None, reasons=[f"no valid {close_name} for minute t (needed to turn returns into prices)"])
    variates = tuple(variates)
    x, present = history.matrix(t, variates, lookback)
    missing_rows = int(lookback - present.sum())
    if missing_rows > max_missing_frac * lookback:
        have = lookback - missing_rows
        return InputWindow(None, last_close=close, reasons=[
            f"only {have} of the {lookback} lookback minutes have feature vectors "
            f"(at least {math.ceil((1 - max_missing_frac) * lookback)} needed)"])
    reasons: list[str] = []
    if missing_rows:
        reasons.append(f"{missing_rows} of {lookback} lookback minutes missing (filled from neighbours)")
    absent: list[str] = []
    filled: list[str] = []
    complete = np.isfinite(x).all(axis=0)
    for j, name in enumerate(variates):
        if complete[j]:
            continue
        col = x[:, j]
        ok = np.isfinite(col)
        if ok.all():
            continue
        if not ok.any():
            col[:] = 0.0
            absent.append(name)
            continue
        # carry the last value forward; leading gaps take the first value after them
        idx = np.where(ok, np.arange(lookback), 0)
        np.maximum.accumulate(idx, out=idx)
        first = int(np.argmax(ok))
        idx[:first] = first
        x[:, j] = col[idx]
        if (~ok & present).any():  # a null inside a row that exists (not only a missing minute)
            filled.append(name)
    if absent:
        reasons.append(f"variates with no value in the whole window, fed as 0: {', '.join(absent)}")
    if filled:
        reasons.append(f"null or non-finite values filled in: {', '.join(filled)}")
    if (model_registry_hash and last.registry_hash and last.registry_hash != model_registry_hash
            and model_registry_hash != KLINE_REGISTRY_HASH):
        # a kline-only model's variates are computed by the same candle code in every registry
        # (a registry without one of them shows as an absent variate above)
        reasons.append(f"feature registry {last.registry_hash} differs from the model's {model_registry_hash}")
    if not last.book_valid and any(_is_book_feature(v) for v in variates):
        reasons.append("order book invalid at minute t")
    return InputWindow(x.astype(np.float32), degraded=bool(reasons), reasons=reasons, last_close=close,
                       registry_hash=last.registry_hash, simulated=last.venue.startswith("sim"))


_BOOK_PREFIXES = ("mid_", "spread", "depth_", "slope_", "orderbook_", "obi", "book_", "local_liquidity")


def _is_book_feature(name: str) -> bool:
    return name.startswith(_BOOK_PREFIXES)
