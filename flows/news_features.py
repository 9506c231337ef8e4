"""News features of one symbol: counts, trust-weighted sentiment and recency over event-time windows.

Pure and deterministic: no wall clock, no framework. ``NewsWindows.add(record)`` takes the
symbol's NewsItem records (``schemas/avro/news_item.avsc``) in processing (``gw_seq``) order;
``values(window_end_ms)`` gives every feature of ``NEWS_FEATURES`` for the windows ending there.

Definitions (W in 15 s, 1 min, 15 min, 1 h; an item's time is its ``exchange_ts``: the published
time, else the receive time; a window ending at E holds the items with E - W <= time < E, the same
half-open interval as the engine's 1-second tiles, so an item stamped exactly E belongs to the next
window):

- ``news_count_W``: items that mention the symbol's asset (``mentioned``);
- ``news_sent_mean_W``: trust-weighted mean sentiment of those items, fsum(w*s) / fsum(w), with
  w = ``source_weight`` (an unknown or low-trust source counts less: the seed doc's fake-news
  risk); 0.0 when there are none (or all weights are 0);
- ``news_sent_min_W`` / ``news_sent_max_W``: the extremes of the trust-weighted scores w*s of
  those items (a low-trust source cannot set an extreme alone); 0.0 when there are none;
- ``news_market_count_W``: all items, whichever asset they name (market-wide news flow);
- ``news_minutes_since_last``: minutes from the newest mentioned item before E to E, capped at
  ``MINUTES_SINCE_CAP`` (24 h), which is also the value before any mentioned item was seen.

Missing news is zero items, never null. Sums are ``math.fsum`` (exactly rounded, so independent of
the order items arrived in), and the item list is kept sorted by (time, item_id): the same records
give bit-identical values however they were batched. A record whose ``item_id`` is already held is
ignored (a re-delivered item after a connector restart counts once).

Memory: after ``values(E)`` the items older than E - 1 h can never be in a window again and are
dropped (only the newest mentioned time survives, for the recency feature); window ends must
therefore never decrease (asking again for the latest one is fine). ``MAX_ITEMS`` bounds the
state even if ``values`` is never called. The state is plain Python: it pickles (Bytewax recovery
snapshots it).
"""
from __future__ import annotations

import math
from bisect import bisect_left, insort

WINDOWS: tuple[tuple[str, int], ...] = (("15s", 15_000), ("1m", 60_000), ("15m", 900_000), ("1h", 3_600_000))
LONGEST_MS = max(ms for _, ms in WINDOWS)
MINUTES_SINCE_CAP = 1440.0  # 24 h: the value with no mentioned item in that time (or ever)
MAX_ITEMS = 100_000


def _feature_table() -> dict[str, str]:
    out: dict[str, str] = {}
    for w, _ in WINDOWS:
        out[f"news_count_{w}"] = f"items mentioning the symbol's asset in the last {w}"
        out[f"news_sent_mean_{w}"] = f"trust-weighted mean sentiment of those items (0 when none), {w}"
        out[f"news_sent_min_{w}"] = f"lowest trust-weighted sentiment w*s of those items (0 when none), {w}"
        out[f"news_sent_max_{w}"] = f"highest trust-weighted sentiment w*s of those items (0 when none), {w}"
        out[f"news_market_count_{w}"] = f"all news items, any asset, in the last {w}"
    out["news_minutes_since_last"] = f"minutes since the last item mentioning the asset, capped at {MINUTES_SINCE_CAP:g}"
    return out


# name -> description, in the canonical order
NEWS_FEATURES: dict[str, str] = _feature_table()


class NewsWindows:
    """Windowed news state of one symbol (see the module doc)."""

    __slots__ = ("counts", "horizon", "ids", "items", "pruned_last_mention", "symbol")

    def __init__(self, symbol: str | None = None):
        self.symbol = symbol
        # (time ms, item_id, mentioned, weight, sentiment), sorted
        self.items: list[tuple[int, str, bool, float, float]] = []
        self.ids: set[str] = set()
        self.horizon: int | None = None  # items before it are gone (latest window end - 1 h)
        self.pruned_last_mention: int | None = None
        self.counts: dict[str, int] = {"added": 0, "duplicate": 0, "invalid": 0, "late": 0, "overflow": 0}

    # pickling with __slots__ (protocol >= 2 handles it; explicit for clarity and older protocols)
    def __getstate__(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state):
        for k in self.__slots__:
            setattr(self, k, state[k])

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def check(rec: dict) -> str | None:
        """Why ``rec`` cannot be used (None when it can)."""
        try:
            ts, item_id, mentioned = rec["exchange_ts"], rec["item_id"], rec["mentioned"]
            w, s = rec["source_weight"], rec["sentiment"]
        except (KeyError, TypeError) as exc:
            return f"not a NewsItem record: missing {exc}"
        if not isinstance(ts, int) or isinstance(ts, bool):
            return f"exchange_ts must be an int (ms), got {ts!r}"
        if not isinstance(item_id, str) or not item_id:
            return "item_id must be a non-empty string"
        if not isinstance(mentioned, bool):
            return f"mentioned must be a bool, got {mentioned!r}"
        if not isinstance(w, (int, float)) or not math.isfinite(w) or not 0.0 <= w <= 1.0:
            return f"source_weight must be in [0, 1], got {w!r}"
        if not isinstance(s, (int, float)) or not math.isfinite(s) or not -1.0 <= s <= 1.0:
            return f"sentiment must be in [-1, 1], got {s!r}"
        return None

    def add(self, rec: dict) -> bool:
        """Take one NewsItem record; False (and counted) when it is invalid, for another symbol, or
        an item already held."""
        why = self.check(rec)
        if why is None and self.symbol is not None and rec.get("symbol") != self.symbol:
            why = f"record for {rec.get('symbol')!r} given to the {self.symbol} windows"
        if why is not None:
            self.counts["invalid"] += 1
            return False
        ts, item_id, mentioned = rec["exchange_ts"], rec["item_id"], rec["mentioned"]
        if item_id in self.ids:
            self.counts["duplicate"] += 1
            return False
        if self.horizon is not None and ts < self.horizon:
            # too old for any window still to come: it can only be the last mention
            self.counts["late"] += 1
            if mentioned and (self.pruned_last_mention is None or ts > self.pruned_last_mention):
                self.pruned_last_mention = ts
            return True
        insort(self.items, (ts, item_id, mentioned, float(rec["source_weight"]), float(rec["sentiment"])))
        self.ids.add(item_id)
        self.counts["added"] += 1
        if len(self.items) > MAX_ITEMS:
            self.counts["overflow"] += 1
            self._drop(1)
        return True

    def add_many(self, recs) -> int:
        return sum(1 for r in recs if self.add(r))

    def _drop(self, n: int) -> None:
        for ts, item_id, mentioned, _, _ in self.items[:n]:
            self.ids.discard(item_id)
            if mentioned and (self.pruned_last_mention is None or ts > self.pruned_last_mention):
                self.pruned_last_mention = ts
        del self.items[:n]

    def values(self, window_end_ms: int) -> dict[str, float]:
        """Every news feature for the windows ending at ``window_end_ms`` (exclusive)."""
        end = int(window_end_ms)
        if self.horizon is not None and end - LONGEST_MS < self.horizon:
            raise ValueError(f"window end {end} is before an earlier one ({self.horizon + LONGEST_MS}): "
                             f"window ends must not decrease (items before {self.horizon} were dropped)")
        items = self.items
        hi = bisect_left(items, (end,))
        out: dict[str, float] = {}
        for name, width in WINDOWS:
            lo = bisect_left(items, (end - width,), 0, hi)
            window = items[lo:hi]
            mine = [(w, s) for _, _, m, w, s in window if m]
            if mine:
                wsum = math.fsum(w for w, _ in mine)
                ws = [w * s for w, s in mine]
                mean = math.fsum(ws) / wsum if wsum > 0.0 else 0.0
                lo_s, hi_s = min(ws), max(ws)
            else:
                mean = lo_s = hi_s = 0.0
            out[f"news_count_{name}"] = float(len(mine))
            out[f"news_sent_mean_{name}"] = mean
            out[f"news_sent_min_{name}"] = lo_s
            out[f"news_sent_max_{name}"] = hi_s
            out[f"news_market_count_{name}"] = float(len(window))
        last = self.pruned_last_mention
        for i in range(hi - 1, -1, -1):
            if items[i][2]:
                last = items[i][0] if last is None or items[i][0] > last else last
                break
        out["news_minutes_since_last"] = (MINUTES_SINCE_CAP if last is None
                                          else min(MINUTES_SINCE_CAP, (end - last) / 60_000.0))
        # forget what no later window can hold
        horizon = end - LONGEST_MS
        if self.horizon is None or horizon > self.horizon:
            self.horizon = horizon
            k = bisect_left(items, (horizon,))
            if k:
                self._drop(k)
        return out
