"""An independent reference for the online feature engine, written from the definitions only.

Nothing here imports or copies ``flows.engine``, ``flows.feature_kinds``, ``flows.book``,
``flows.candles``, ``flows.registry`` or ``flows.news_features``: the registry YAML is read with
``yaml.safe_load``, the order book is a pair of plain dicts ``Decimal price -> Decimal size``, and
every feature is recomputed from its documented definition (``flows/feature_kinds.py`` docstrings,
``flows/candles.py::KLINE_VARIATES``, ``flows/news_features.py`` module doc, the issue and the
engine's documented event-time rules). The tests compare only the engine's public outputs.

How the reference computes (and where that differs from the engine's arithmetic):

* **Event time and tiles.** Events are taken in ``gw_seq`` order. An event belongs to the tile
  ``floor(clock / 1 s)`` where ``clock`` is the running maximum of the market events' ``exchange_ts``
  *including* the event (pandas ``cummax``; mempool and news records take the clock of their arrival): that is exactly "a tile [k, k+1 s) closes when the first event with
  ts >= k+1 s arrives, before that event is applied; an event earlier than the open tile goes into
  the open tile". The state at a tile end E is the state after every event of a tile < E; the tiles
  that exist are those from the first event's tile on, and the last (open) tile never closes.
* **Covered windows.** A feature over a window of book or trade tiles is null until the stream has
  closed as many tiles as the window is long, and null when no event at all (not even a heartbeat)
  fell in the window (a feed outage is no "zero activity").
* **Exact arithmetic.** Book levels, trade prices and sizes, ticker fields are ``Decimal``; window
  sums are prefix sums of exact ``Decimal`` values (the engine: ``math.fsum`` of floats converted
  from the same strings), OLS slopes, Kyle's lambda, Roll's covariance and the return statistics are
  evaluated in 60-digit ``Decimal`` arithmetic (``ln``/``sqrt`` included), and VPIN in exact
  ``Fraction``s as interval overlaps of the cumulative volume with the buckets (the engine: a
  greedy float loop). The results are converted to float once at the end.
* **Candle variates** are computed with pandas/numpy float64 on a dense minute grid (reindex +
  forward fill of the close), numpy's pairwise sums instead of ``fsum``.
* **z-scores** use plain two-pass mean/variance (left-to-right sums) of the reference's own input
  values (so their atol carries the inputs' rounding, see ``f_zscore``).

Each reference value comes with ``atol``: an absolute error floor of about 1000 units of roundoff
of the engine's float computation, scaled by the size of the terms that cancel in it (e.g. the mid
for a spread, the gross notional for signed volume); the tests use ``|engine - ref| <= 1e-9 *
|ref| + atol``. Nulls carry a reason category (``Null``), compared with the engine's reason text.
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from decimal import Context, Decimal, localcontext
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

TILE_MS = 1_000
MINUTE_MS = 60_000
DAY_MS = 86_400_000
CADENCE_MS = {"s1": 1_000, "s3": 3_000, "s15": 15_000, "m1": 60_000}
EPS = 2.220446049250313e-16
K_ROUND = 1e3 * EPS  # atol factor: 1000 units of roundoff of the terms' magnitude
CTX = Context(prec=60)
REGISTRY_PATH = Path(__file__).resolve().parents[1] / "flows" / "features.yaml"
NEWS_WINDOWS = {"15s": 15_000, "1m": 60_000, "15m": 900_000, "1h": 3_600_000}
NEWS_CAP_MIN = 1440.0


class Null(str):
    """A null value; the string is the reason category (e.g. ``book_invalid:gap``, ``no_trades``)."""


@dataclass
class RefValue:
    value: float | Null
    atol: float = 0.0


@dataclass
class RefVector:
    symbol: str
    cadence: str
    window_end: int
    values: dict[str, RefValue]
    event_count: int
    book_valid: bool
    last_gw_seq: int


# --- registry (read independently) -----------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    name: str
    kind: str
    inputs: tuple
    window_ms: int
    cadences: tuple
    params: dict = field(hash=False, compare=False)
    order: int = 0


def _duration(text) -> int:
    text = str(text).strip()
    for unit, ms in (("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * ms
    raise ValueError(f"bad duration {text!r}")


def load_specs(path: str | Path = REGISTRY_PATH) -> tuple[list[Spec], dict]:
    doc = yaml.safe_load(Path(path).read_text())
    dflt = doc.get("defaults") or {}
    specs = [Spec(f["name"], f["kind"], tuple(f.get("inputs") or ()), _duration(f.get("window", "0s")),
                  tuple(f.get("cadences", dflt.get("cadences", list(CADENCE_MS)))), dict(f.get("params") or {}),
                  int(f.get("order", 0)))
             for f in doc["features"]]
    specs.sort(key=lambda s: s.order)  # derived features after their inputs
    return specs, dict(doc.get("engine") or {})


# --- the order book -------------------------------------------------------------------------------
class RefBook:
    """Bybit v5 book rules on plain dicts: a snapshot (or ``u == 1``) replaces the book; a delta
    applies only when valid and ``u`` = previous ``u`` + 1 (same ``u``: duplicate, lower: stale, both
    ignored; any other ``u``: gap, the book is invalid until the next snapshot); size 0 deletes; a
    book whose best bid >= best ask is crossed (invalid)."""

    def __init__(self):
        self.bids: dict[Decimal, Decimal] = {}
        self.asks: dict[Decimal, Decimal] = {}
        self.u: int | None = None
        self.valid = False
        self.why = "no_snapshot"
        self.last_ts: int | None = None  # exchange ts of the last message that changed the book
        self.top: tuple = (None, None)  # (best bid, best ask) after the last applied message

    def apply(self, rec: dict, snapshot: bool) -> bool:
        """Apply an OrderBookSnapshot/OrderBookDelta record; True when the best bid or ask changed."""
        u = rec["update_id"]
        if snapshot or u == 1:
            self.bids, self.asks = {}, {}
        elif not self.valid or u <= self.u:
            return False
        elif u != self.u + 1:
            self.valid, self.why = False, "gap"
            return False
        for book, px, sz in ((self.bids, rec["bid_px"], rec["bid_sz"]), (self.asks, rec["ask_px"], rec["ask_sz"])):
            for p, s in zip(px, sz):
                p, s = Decimal(p), Decimal(s)
                if s == 0:
                    book.pop(p, None)
                else:
                    book[p] = s
        self.u = u
        self.last_ts = rec["exchange_ts"]
        top = (max(self.bids) if self.bids else None, min(self.asks) if self.asks else None)
        changed = top != self.top
        self.top = top
        if top[0] is not None and top[1] is not None and top[0] >= top[1]:
            self.valid, self.why = False, "crossed"
        elif snapshot or u == 1:
            self.valid, self.why = True, ""
        return changed

    def best(self) -> tuple:
        return self.top


@dataclass
class BookState:
    """The book at a tile end: validity and the values the point-in-time features need."""

    why: str  # "" when valid; else no_snapshot / gap / crossed
    last_ts: int | None
    bids: list  # top levels, best first: [(price, size)]
    asks: list
    density: dict  # bps -> bid + ask size within bps of the mid (null when the book ends inside the band)

    @staticmethod
    def capture(book: RefBook, levels: int, bps_list) -> BookState:
        if not book.valid:
            return BookState(book.why, book.last_ts, [], [], {})
        bids = [(p, book.bids[p]) for p in heapq.nlargest(levels, book.bids)]
        asks = [(p, book.asks[p]) for p in heapq.nsmallest(levels, book.asks)]
        density = {}
        if bids and asks:
            mid = (bids[0][0] + asks[0][0]) / 2
            for bps in bps_list:
                lo = mid * (1 - Decimal(bps) / 10_000)
                hi = mid * (1 + Decimal(bps) / 10_000)
                if lo < min(book.bids) or hi > max(book.asks):  # the band reaches past the visible book
                    density[bps] = Null("density_beyond_book")
                    continue
                density[bps] = (sum((s for p, s in book.bids.items() if lo <= p <= hi), Decimal(0))
                                + sum((s for p, s in book.asks.items() if lo <= p <= hi), Decimal(0)))
        return BookState("", book.last_ts, bids, asks, density)


# --- the reference computation --------------------------------------------------------------------
class Reference:
    """Every feature vector the engine should emit for one symbol's events."""

    def __init__(self, symbol: str, events: list[tuple[str, dict]], registry: str | Path = REGISTRY_PATH):
        self.symbol = symbol
        self.specs, cfg = load_specs(registry)
        self.stale_ms = int(cfg.get("book_stale_ms", 30_000))
        self.ticker_stale_ms = int(cfg.get("ticker_stale_ms", 60_000))
        max_empty = int(cfg.get("max_empty_ms", 3_600_000))
        evs = sorted(((n, r) for n, r in events if r["gw_seq"] >= 0), key=lambda e: e[1]["gw_seq"])
        seen, self.events = set(), []
        for n, r in evs:
            if r["gw_seq"] not in seen:
                seen.add(r["gw_seq"])
                self.events.append((n, r))
        # mempool and news records carry a receive or publication time, not the market's: they take
        # the tile of the market clock at their arrival and move nothing (before any market event
        # they belong to no tile)
        side = np.array([n in ("MempoolStats", "NewsItem") for n, _ in self.events], dtype=bool)
        ts = pd.Series([r["exchange_ts"] for _, r in self.events], dtype="float64")
        ts[side] = np.nan
        clock = ts.cummax().ffill()
        self.in_tile = clock.notna().to_numpy()
        first = clock.first_valid_index()
        clock = clock.fillna(clock[first] if first is not None else 0)
        self.tile = (clock.astype("int64") // TILE_MS * TILE_MS).to_numpy()
        if len(self.tile) and np.diff(self.tile).max(initial=0) > max_empty:
            raise NotImplementedError("an event-time jump restarts the engine's windows: not modelled here")
        self.levels = max([s.params.get("levels", 1) for s in self.specs] + [10])
        self.bps = sorted({s.params["bps"] for s in self.specs if s.kind == "liquidity_density"})
        self._replay()
        self._tile_aggregates()

    # -- one pass over the events: book, ticker, candles; states at tile ends ---------------------
    def _replay(self) -> None:
        book = RefBook()
        ticker: dict = {}
        bars: dict[int, list] = {}  # minute start -> [o, h, l, c, v] (Decimal)
        confirmed: set[int] = set()
        self.state_tiles: list[int] = []  # tiles that held events, ascending
        self.states: list[tuple[BookState, dict]] = []  # state after the last event of each
        self.bars_at: dict[int, dict] = {}  # minute window end -> bars as they were then
        self.churn = np.zeros(len(self.events), dtype=np.int64)
        trades, self.mempool, self.news = [], [], []
        tiles = self.tile
        for i, (name, rec) in enumerate(self.events):
            if i and tiles[i] != tiles[i - 1]:
                self._close(tiles[i - 1], tiles[i], book, ticker, bars)
            if name in ("OrderBookSnapshot", "OrderBookDelta"):
                self.churn[i] = book.apply(rec, name == "OrderBookSnapshot")
            elif name == "Trade":
                p, s = Decimal(rec["price"]), Decimal(rec["size"])
                if p > 0 and s > 0:
                    trades.append((tiles[i], rec["side"] == "Buy", p, s))
                    m = rec["trade_ts"] // MINUTE_MS * MINUTE_MS
                    if m not in confirmed:
                        bar = bars.get(m)
                        if bar is None:
                            bars[m] = [p, p, p, p, s]
                        else:
                            bar[1], bar[2], bar[3], bar[4] = max(bar[1], p), min(bar[2], p), p, bar[4] + s
            elif name == "Ticker":
                ticker = dict(rec)
            elif name == "Funding":
                ticker = {**ticker, "funding_rate": rec["funding_rate"],
                          "next_funding_time": rec["next_funding_time"] or ticker.get("next_funding_time")}
            elif name == "Kline":
                if rec["confirm"] and rec["interval"] == "1":
                    bars[rec["start_ts"]] = [Decimal(rec[k]) for k in ("open", "high", "low", "close", "volume")]
                    confirmed.add(rec["start_ts"])
            elif name == "MempoolStats":
                self.mempool.append((tiles[i], rec))
            elif name == "NewsItem":
                self.news.append((tiles[i], rec))
        self.book = book
        self.trades = pd.DataFrame(trades, columns=["tile", "buy", "price", "size"])

    def _close(self, tile: int, next_tile: int, book: RefBook, ticker: dict, bars: dict) -> None:
        self.state_tiles.append(int(tile))
        self.states.append((BookState.capture(book, self.levels, self.bps), ticker))
        first_end = (tile + TILE_MS + MINUTE_MS - 1) // MINUTE_MS * MINUTE_MS
        for end in range(first_end, int(next_tile) + 1, MINUTE_MS):
            self.bars_at[end] = {m: list(b) for m, b in bars.items()}

    # -- per-tile aggregates ----------------------------------------------------------------------
    def _tile_aggregates(self) -> None:
        if not len(self.events):
            self.ends = np.array([], dtype=np.int64)
            return
        first, last = int(self.tile[0]), int(self.tile[-1])
        self.first_tile = first
        self.ends = np.arange(first + TILE_MS, last + 1, TILE_MS, dtype=np.int64)  # closed tiles' ends
        n = len(self.ends)
        def idx(t):
            return (np.asarray(t, dtype=np.int64) - first) // TILE_MS
        self.n_events = np.bincount(idx(self.tile[self.in_tile]), minlength=n + 1)[:n]
        self.n_churn = np.bincount(idx(self.tile), weights=self.churn, minlength=n + 1)[:n].astype(np.int64)
        tr = self.trades
        zero = Decimal(0)
        cols = {k: [zero] * (n + 1) for k in ("buy_vol", "sell_vol", "buy_not", "sell_not")}
        self.n_trades = np.zeros(n + 1, dtype=np.int64)
        self.trade_seq: list[tuple[int, Decimal]] = []  # (tile index, price) in processing order
        with localcontext(CTX):
            for t, buy, p, s in tr.itertuples(index=False):
                k = int(idx(t))
                self.n_trades[k] += 1
                side = "buy" if buy else "sell"
                cols[f"{side}_vol"][k] += s
                cols[f"{side}_not"][k] += p * s
                self.trade_seq.append((k, p))
            # prefix sums (exact): window [i, j) = P[j] - P[i]
            self.prefix = {k: np.concatenate([[zero], np.cumsum(np.array(v[:n], dtype=object))]) for k, v in cols.items()}
            self.tile_q = [cols["buy_vol"][k] - cols["sell_vol"][k] for k in range(n)]
            # volumes in integer units of the finest size decimal (VPIN)
            places = max([-s.as_tuple().exponent for s in tr["size"]] + [0]) if len(tr) else 0
            unit = Decimal(10) ** places
            self.buy_u = [int(cols["buy_vol"][k] * unit) for k in range(n)]
            self.vol_u = [int((cols["buy_vol"][k] + cols["sell_vol"][k]) * unit) for k in range(n)]
            # state (book + ticker) at each tile end, and the mid there
            pos = [bisect_right(self.state_tiles, int(e) - TILE_MS) - 1 for e in self.ends]
            self.end_state = [self.states[p] for p in pos]
            self.book_why = [self._book_why(j) for j in range(n)]
            self.mid = [None if self.book_why[j] else (st[0].bids[0][0] + st[0].asks[0][0]) / 2
                        for j, st in enumerate(self.end_state)]
            # 1-second log mid returns and mid changes: tile j's (needs tile j-1's end)
            self.ret: list[Decimal | None] = [None] * n
            self.dmid: list[Decimal | None] = [None] * n
            for j in range(1, n):
                if self.mid[j] is not None and self.mid[j - 1] is not None:
                    self.ret[j] = (self.mid[j] / self.mid[j - 1]).ln()
                    self.dmid[j] = self.mid[j] - self.mid[j - 1]
            # Roll: the change between consecutive trades belongs to the later trade's tile, and so
            # does the product of a change with the one before it
            dp_tile, dp, prod_tile, prod = [], [], [], []
            for a in range(1, len(self.trade_seq)):
                k, p = self.trade_seq[a]
                dp_tile.append(k)
                dp.append(p - self.trade_seq[a - 1][1])
                if a >= 2:
                    prod_tile.append(k)
                    prod.append(dp[-1] * dp[-2])
            self.dp = (np.array(dp_tile, dtype=np.int64), dp)
            self.prod = (np.array(prod_tile, dtype=np.int64), prod)

    def _book_why(self, j: int) -> str:
        st = self.end_state[j][0]
        end = int(self.ends[j])
        if st.why:
            return f"book_invalid:{st.why}"
        if st.last_ts is not None and end - st.last_ts > self.stale_ms:
            return "book_stale"
        if not st.bids or not st.asks:
            return "book_empty_side"
        return ""

    # -- windows ------------------------------------------------------------------------------------
    def _span(self, j: int, window_ms: int) -> tuple[int, int]:
        """Tile indices [i, j+1) of the window of ``window_ms`` ending at tile j's end."""
        return max(0, j + 1 - window_ms // TILE_MS), j + 1

    def vectors(self) -> list[RefVector]:
        with localcontext(CTX):
            return self._vectors()

    def _vectors(self) -> list[RefVector]:
        out: list[RefVector] = []
        history: dict[tuple[str, str], list[float]] = {}
        self._same: dict[tuple[str, int], RefValue] = {}  # a feature's value at a window end, any cadence
        self._windows: dict[tuple[int, int], tuple] = {}
        for j, end in enumerate(self.ends):
            end = int(end)
            for cadence, period in CADENCE_MS.items():
                if end % period:
                    continue
                specs = [s for s in self.specs if cadence in s.cadences]
                if not specs:
                    continue
                values: dict[str, RefValue] = {}
                for s in specs:
                    v = self._feature(s, j, end, cadence, values, history)
                    values[s.name] = v
                    if not isinstance(v.value, Null):
                        history.setdefault((cadence, s.name), []).append(v.value)
                i, k = self._span(j, period)
                crossing = int(np.searchsorted(self.tile, end, side="left"))
                out.append(RefVector(self.symbol, cadence, end, values, int(self.n_events[i:k].sum()),
                                     not self.book_why[j], self.events[crossing][1]["gw_seq"]))
        return out

    # -- the features ---------------------------------------------------------------------------------
    def _feature(self, s: Spec, j: int, end: int, cadence: str, values: dict, history: dict) -> RefValue:
        if s.kind != "zscore":  # the same definition at every cadence: computed once per window end
            key = (s.name, j)
            v = self._same.get(key)
            if v is None:
                v = self._same[key] = self._compute(s, j, end, cadence, values, history)
            return RefValue(v.value, v.atol)
        return self._compute(s, j, end, cadence, values, history)

    def _compute(self, s: Spec, j: int, end: int, cadence: str, values: dict, history: dict) -> RefValue:
        k = s.window_ms // TILE_MS
        if k and {"book", "trades"} & set(s.inputs):
            # a book/trade window must be covered by the stream and hold at least one event
            if j + 1 < k:
                return RefValue(Null("window_not_full"))
            i, kk = self._span(j, s.window_ms)
            if not self.n_events[i:kk].sum():
                return RefValue(Null("no_events"))
        try:
            r = getattr(self, f"f_{s.kind}")(s, j, end, cadence=cadence, values=values, history=history)
        except ZeroDivisionError:
            return RefValue(Null("not_finite"))
        if isinstance(r, RefValue):
            v = r
        elif isinstance(r, Null):
            v = RefValue(r)
        else:
            v = RefValue(r, 0.0)
        if not isinstance(v.value, Null):
            v.value = float(v.value)
            if not math.isfinite(v.value):
                v = RefValue(Null("not_finite"))
        return v

    def _top(self, j: int):
        why = self.book_why[j]
        return (Null(why), None) if why else (None, self.end_state[j][0])

    # point-in-time book features
    def f_mid(self, s, j, end, **_):
        return self._top(j)[0] or self.mid[j]

    def f_spread_abs(self, s, j, end, **_):
        null, b = self._top(j)
        return null or RefValue(b.asks[0][0] - b.bids[0][0], K_ROUND * float(b.asks[0][0]))

    def f_spread_rel(self, s, j, end, **_):
        null, b = self._top(j)
        return null or RefValue((b.asks[0][0] - b.bids[0][0]) / self.mid[j], K_ROUND)

    def f_microprice(self, s, j, end, **_):
        null, b = self._top(j)
        if null:
            return null
        (bp, bs), (ap, a_s) = b.bids[0], b.asks[0]
        return (bp * a_s + ap * bs) / (bs + a_s)

    def f_obi_l1(self, s, j, end, **_):
        null, b = self._top(j)
        if null:
            return null
        bs, a_s = b.bids[0][1], b.asks[0][1]
        return RefValue((bs - a_s) / (bs + a_s), K_ROUND)

    def _sizes(self, b, side, n):
        lv = b.bids if side == "bid" else b.asks
        return [sz for _, sz in lv[:n]] if len(lv) >= n else None

    def f_depth(self, s, j, end, **_):
        null, b = self._top(j)
        if null:
            return null
        sizes = self._sizes(b, s.params["side"], s.params["levels"])
        return Null("book_levels") if sizes is None else sum(sizes, Decimal(0))

    def f_depth_imbalance(self, s, j, end, **_):
        null, b = self._top(j)
        if null:
            return null
        n = s.params["levels"]
        bid, ask = self._sizes(b, "bid", n), self._sizes(b, "ask", n)
        if bid is None or ask is None:
            return Null("book_levels")
        bid, ask = sum(bid, Decimal(0)), sum(ask, Decimal(0))
        return RefValue((bid - ask) / (bid + ask), K_ROUND)

    def f_slope(self, s, j, end, **_):
        null, b = self._top(j)
        if null:
            return null
        n = s.params["levels"]
        y = self._sizes(b, s.params["side"], n)
        if y is None or n < 2:
            return Null("book_levels")
        x = [Decimal(i) for i in range(1, n + 1)]
        xm, ym = sum(x) / n, sum(y) / n
        sxy = sum((a - xm) * (c - ym) for a, c in zip(x, y))
        sxx = sum((a - xm) ** 2 for a in x)
        return RefValue(sxy / sxx, K_ROUND * float(max(y)))

    def f_liquidity_density(self, s, j, end, **_):
        null, b = self._top(j)
        return null or b.density[s.params["bps"]]

    # trades over the window
    def _trade_window(self, s, j):
        w = self._windows.get((j, s.window_ms))
        if w is None:
            i, k = self._span(j, s.window_ms)
            w = self._windows[(j, s.window_ms)] = ({key: p[k] - p[i] for key, p in self.prefix.items()},
                                                   int(self.n_trades[i:k].sum()))
        return w

    def f_volume(self, s, j, end, **_):
        w, _ = self._trade_window(s, j)
        return w["buy_vol"] + w["sell_vol"]

    def f_trade_count(self, s, j, end, **_):
        return self._trade_window(s, j)[1]

    def f_vwap(self, s, j, end, **_):
        w, _ = self._trade_window(s, j)
        vol = w["buy_vol"] + w["sell_vol"]
        return Null("no_trades") if vol == 0 else (w["buy_not"] + w["sell_not"]) / vol

    def f_signed_volume(self, s, j, end, **_):
        w, _ = self._trade_window(s, j)
        return RefValue(w["buy_not"] - w["sell_not"], K_ROUND * float(w["buy_not"] + w["sell_not"]))

    def f_net_aggressor_pressure(self, s, j, end, **_):
        w, _ = self._trade_window(s, j)
        return RefValue(w["buy_vol"] - w["sell_vol"], K_ROUND * float(w["buy_vol"] + w["sell_vol"]))

    def f_buy_sell_ratio(self, s, j, end, **_):
        w, _ = self._trade_window(s, j)
        return Null("no_sell_volume") if w["sell_vol"] == 0 else w["buy_vol"] / w["sell_vol"]

    # book dynamics over the window
    def _mid_at(self, j_end: int):
        return self.mid[j_end] if j_end >= 0 else None

    def f_log_return(self, s, j, end, **_):
        a, b = self._mid_at(j), self._mid_at(j - s.window_ms // TILE_MS)
        if a is None or b is None:
            return Null("mid_unavailable")
        return RefValue((a / b).ln(), K_ROUND)

    def f_return_std(self, s, j, end, **_):
        i, k = self._span(j, s.window_ms)
        rets = [r for r in self.ret[i:k] if r is not None]
        if len(rets) < max(2, (k - i) // 2):
            return Null("few_returns")
        m = sum(rets) / len(rets)
        return RefValue((sum((r - m) ** 2 for r in rets) / (len(rets) - 1)).sqrt(), K_ROUND * 0.01)

    def f_churn_rate(self, s, j, end, **_):
        i, k = self._span(j, s.window_ms)
        return Decimal(int(self.n_churn[i:k].sum())) / (Decimal(s.window_ms) / 1000)

    def f_kyle_lambda(self, s, j, end, **_):
        i, k = self._span(j, s.window_ms)
        pairs = [(self.dmid[t], self.tile_q[t]) for t in range(i, k) if self.dmid[t] is not None]
        if len(pairs) < 10:
            return Null("few_mid_changes")
        n = len(pairs)
        pm = sum(p for p, _ in pairs) / n
        qm = sum(q for _, q in pairs) / n
        sqq = sum((q - qm) ** 2 for _, q in pairs)
        if sqq == 0:
            return Null("no_signed_volume_variation")
        lam = sum((q - qm) * (p - pm) for p, q in pairs) / sqq
        mid = max(self.mid[t] for t in range(i, k) if self.mid[t] is not None)
        scale = float(sum(abs(q - qm) for _, q in pairs) / sqq * mid)
        return RefValue(lam, K_ROUND * scale)

    def f_roll(self, s, j, end, **_):
        i, k = self._span(j, s.window_ms)
        dpt, dp = self.dp
        pt, prod = self.prod
        d = [dp[a] for a in np.flatnonzero((dpt >= i) & (dpt < k))]
        pr = [prod[a] for a in np.flatnonzero((pt >= i) & (pt < k))]
        if len(pr) < 10:
            return Null("few_price_changes")
        cov = sum(pr) / len(pr) - (sum(d) / len(d)) ** 2
        price = max(p for t, p in self.trade_seq if i <= t < k)
        mean_abs = sum(abs(x) for x in d) / len(d)
        # compared as (roll / 2)^2 = max(-cov, 0): atol there
        scale = float(4 * price * mean_abs + sum(abs(x) for x in pr) / len(pr) + mean_abs ** 2)
        roll = 2 * (-cov).sqrt() if cov < 0 else Decimal(0)
        return RefValue(roll, K_ROUND * scale)

    def f_vpin(self, s, j, end, **_):
        """Buckets as intervals of the cumulative volume: with volumes in integer units u and positions
        multiplied by the bucket count nb, bucket b is [b*T, (b+1)*T) (T = total volume in u), a
        second of volume v at [c, c+v) puts overlap * buy/v of its buy volume into each bucket it
        overlaps; VPIN = sum |2 buy_b - T| / (nb T), in exact integers and Fractions."""
        i, k = self._span(j, s.window_ms)
        vols = [(self.vol_u[t], self.buy_u[t]) for t in range(i, k) if self.vol_u[t] > 0]
        total = sum(v for v, _ in vols)
        if total <= 0:
            return Null("no_trades")
        nb = s.params["buckets"]
        buys = [Fraction(0)] * nb
        c = 0
        for v, b in vols:
            lo, hi = c * nb, (c + v) * nb
            q = lo // total
            while q < nb and q * total < hi:
                buys[q] += Fraction((min(hi, (q + 1) * total) - max(lo, q * total)) * b, v)
                q += 1
            c += v
        return float(sum(abs(2 * x - total) for x in buys) / (nb * total))

    # perpetual contract
    def _ticker(self, j, key):
        state = self.end_state[j][1]
        v = state.get(key)
        if v is None:
            return Null("no_ticker_field"), None
        if "exchange_ts" in state and int(self.ends[j]) - state["exchange_ts"] > self.ticker_stale_ms:
            return Null("ticker_stale"), None  # the last ticker is too old to stand for the present
        return None, v

    def f_funding_rate(self, s, j, end, **_):
        null, v = self._ticker(j, "funding_rate")
        return null or Decimal(v)

    def f_open_interest(self, s, j, end, **_):
        null, v = self._ticker(j, "open_interest")
        return null or Decimal(v)

    def f_time_to_funding(self, s, j, end, **_):
        null, v = self._ticker(j, "next_funding_time")
        return null or Decimal(v - end) / MINUTE_MS

    def f_basis(self, s, j, end, **_):
        n1, m = self._ticker(j, "mark_price")
        n2, i = self._ticker(j, "index_price")
        return n1 or n2 or RefValue(Decimal(m) - Decimal(i), K_ROUND * float(m))

    def f_basis_rel(self, s, j, end, **_):
        n1, m = self._ticker(j, "mark_price")
        n2, i = self._ticker(j, "index_price")
        return n1 or n2 or RefValue((Decimal(m) - Decimal(i)) / Decimal(i), K_ROUND * float(m) / float(i))

    # mempool: the records processed before the window closed (tile < E); the level at a time T is
    # the newest of them by source time with exchange_ts <= T (a record stamped before T that arrived
    # after T still tells the level at T)
    def _mempool_level(self, s, at: int, end: int):
        recs = [(r["exchange_ts"], i, r) for i, (t, r) in enumerate(self.mempool) if t < end and r["exchange_ts"] <= at]
        if not recs:
            return Null("no_mempool")
        rec = max(recs, key=lambda x: x[:2])[2]
        if at - rec["exchange_ts"] > s.params["max_age_s"] * 1000:
            return Null("mempool_stale")
        v = rec.get(s.params["field"])
        return Null("mempool_field_missing") if v is None else Decimal(float(v))

    def f_mempool_level(self, s, j, end, **_):
        return self._mempool_level(s, end, end)

    def f_mempool_change(self, s, j, end, **_):
        now = self._mempool_level(s, end, end)
        then = self._mempool_level(s, end - s.window_ms, end)
        if isinstance(now, Null) or isinstance(then, Null):
            return now if isinstance(now, Null) else then
        return RefValue(now - then, K_ROUND * float(abs(now) + abs(then)))

    def f_mempool_sum(self, s, j, end, **_):
        recs = [r for t, r in self.mempool if t < end]
        if not recs:
            return Null("no_mempool")
        f = s.params["field"]
        vals = [Decimal(float(r[f])) for r in recs
                if end - s.window_ms <= r["exchange_ts"] < end and r.get(f) is not None]
        return sum(vals, Decimal(0))

    # news (flows/news_features.py module doc)
    def f_news(self, s, j, end, **_):
        feat = s.params["feature"]
        items, ids = [], set()
        for t, r in self.news:
            if t < end and r["item_id"] not in ids:
                ids.add(r["item_id"])
                items.append(r)
        if feat == "news_minutes_since_last":
            times = [r["exchange_ts"] for r in items if r["mentioned"] and r["exchange_ts"] < end]
            return NEWS_CAP_MIN if not times else min(NEWS_CAP_MIN, (end - max(times)) / 60_000)
        stat, w = feat[len("news_"):].rsplit("_", 1)
        inwin = [r for r in items if end - NEWS_WINDOWS[w] <= r["exchange_ts"] < end]
        mine = [r for r in inwin if r["mentioned"]]
        ws = [Fraction(r["source_weight"]) * Fraction(r["sentiment"]) for r in mine]
        if stat == "count":
            return len(mine)
        if stat == "market_count":
            return len(inwin)
        if stat == "sent_mean":
            wsum = sum((Fraction(r["source_weight"]) for r in mine), Fraction(0))
            return float(sum(ws, Fraction(0)) / wsum) if mine and wsum > 0 else 0.0
        if stat == "sent_min":
            return float(min(ws)) if ws else 0.0
        if stat == "sent_max":
            return float(max(ws)) if ws else 0.0
        raise KeyError(feat)

    def f_time_of_day(self, s, j, end, **_):
        return Fraction(end % DAY_MS, DAY_MS)

    # candle variates of the minute that just closed (flows/candles.py definitions)
    def f_candle(self, s, j, end, **_):
        v = self.candle_variates(end)[s.params["variate"]]
        return Null("candle_history") if not math.isfinite(v) else v

    # a field of the minute's candle (the same flat-filled bars as the variates)
    def f_candle_bar(self, s, j, end, **_):
        v = self.candle_variates(end).get("bar_" + s.params["field"], math.nan)
        return Null("no_candle") if not math.isfinite(v) else v

    def candle_variates(self, end: int) -> dict[str, float]:
        cache = self.__dict__.setdefault("_candle_cache", {})
        if end in cache:
            return cache[end]
        t = end - MINUTE_MS
        bars = self.bars_at.get(end, {})
        ts = pd.Timestamp(t, unit="ms", tz="UTC")
        minute_of_day, dow = ts.hour * 60 + ts.minute, ts.weekday()
        out = {k: math.nan for k in ("close", "log_return_1m", "return_15m", "return_60m", "range_rel_1m",
                                     "body_rel_1m", "log_volume_1m", "rv_15m", "rv_60m", "parkinson_15m",
                                     "volume_z_60m")}
        out.update(tod_sin=math.sin(2 * math.pi * minute_of_day / 1440), tod_cos=math.cos(2 * math.pi * minute_of_day / 1440),
                   dow_sin=math.sin(2 * math.pi * dow / 7), dow_cos=math.cos(2 * math.pi * dow / 7))
        known = sorted(m for m in bars if m <= t)
        if known:
            df = pd.DataFrame.from_dict({m: [float(x) for x in bars[m]] for m in known}, orient="index",
                                        columns=["o", "h", "l", "c", "v"])
            df = df.reindex(np.arange(known[0], t + 1, MINUTE_MS))
            # a minute without a candle is flat at the previous close, with zero volume
            gap = df["c"].isna()
            prev = df["c"].ffill()
            for col in ("o", "h", "l", "c"):
                df.loc[gap, col] = prev[gap]
            df.loc[gap, "v"] = 0.0
            c, h, lo, o, v = (df[k].to_numpy() for k in ("c", "h", "l", "o", "v"))
            r = np.log(c[1:] / c[:-1])
            logv = np.log1p(v)
            n = len(c)

            def last(a, k):  # the last k values, when that many exist
                return a[-k:] if len(a) >= k else None

            out["close"] = c[-1]
            out.update(bar_open=o[-1], bar_high=h[-1], bar_low=lo[-1], bar_close=c[-1], bar_volume=v[-1])
            out["log_return_1m"] = r[-1] if n >= 2 else math.nan
            out["return_15m"] = math.log(c[-1] / c[-16]) if n >= 16 else math.nan
            out["return_60m"] = math.log(c[-1] / c[-61]) if n >= 61 else math.nan
            out["range_rel_1m"] = (h[-1] - lo[-1]) / c[-1]
            out["body_rel_1m"] = (c[-1] - o[-1]) / o[-1]
            out["log_volume_1m"] = logv[-1]
            for name, k in (("rv_15m", 15), ("rv_60m", 60)):
                w = last(r, k)
                out[name] = math.sqrt(np.sum(w * w)) if w is not None else math.nan
            w = last(np.log(h / lo), 15)
            out["parkinson_15m"] = math.sqrt(np.sum(w * w) / (4 * math.log(2))) if w is not None else math.nan
            prev60 = logv[-61:-1] if n >= 61 else None
            if prev60 is not None and np.ptp(prev60) > 0:
                out["volume_z_60m"] = (logv[-1] - prev60.mean()) / prev60.std(ddof=0)
        cache[end] = out
        return out

    def candle_lookback_gap(self, end: int) -> bool:
        """The minutes end-62 and end-61 have no candle but an earlier minute has one (see the tests)."""
        bars = self.bars_at.get(end, {})
        t = end - MINUTE_MS
        return (t - 61 * MINUTE_MS not in bars and t - 60 * MINUTE_MS not in bars
                and any(m < t - 61 * MINUTE_MS for m in bars))

    # derived: z-score of the input's current value against its last n values at this cadence
    def f_zscore(self, s, j, end, cadence, values, history, **_):
        src, n = s.inputs[0], s.params["n"]
        cur = values[src].value
        hist = history.get((cadence, src), [])[-n:]  # the current value was appended already
        if len(hist) < n:
            return Null("warming_up")
        if isinstance(cur, Null):  # no current value: no z-score (never the last value's, presented as now)
            return Null("input_null")
        if min(hist) == max(hist):
            return Null("no_variation")
        # two-pass population statistics, plain left-to-right sums
        mean = sum(hist) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in hist) / n)
        z = (hist[-1] - mean) / sd
        # the inputs carry the engine's rounding (a one-tick spread_rel: ~2e-12 relative), amplified by
        # max|x| / sd in a z-score: atol 1e-10 max|x| / sd
        return RefValue(z, 1e-10 * max(abs(x) for x in hist) / sd)


def reference_vectors(symbol: str, events: list[tuple[str, dict]], registry: str | Path = REGISTRY_PATH
                      ) -> list[RefVector]:
    return Reference(symbol, events, registry).vectors()
