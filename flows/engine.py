"""The per-symbol feature engine: plain Python, no Bytewax, no wall clock.

``SymbolEngine.process(batch)`` takes raw events ``(schema_name, record)`` of one symbol in any
order and returns outputs ``("features", FeatureVector record)`` and ``("control", ControlCommand
record)``. Everything it computes is a function of the events in ``gw_seq`` order, so the online
flow (small batches from Kafka) and the offline replay (large batches from Delta) produce the same
records, bit for bit.

Pipeline per event: ``Sequencer`` (reorder by gw_seq, detect holes) -> event clock (the symbol's
largest exchange timestamp; heartbeats advance it when the symbol is quiet) -> close every 1-second
tile that ended before the new time (the book is captured at the tile end, before the event that
crossed it is applied) -> apply the event to the book / current tile / candles / ticker / mempool /
news state. At each closed tile, the vectors of the cadences whose period divides the tile end are
computed from the registry (``flows.feature_kinds``).
"""
from __future__ import annotations

import math
import pickle
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

from flows.book import BadDecimal, BookStatus, OrderBook, from_fixed, to_fixed
from flows.candles import KLINE_VARIATES, KLINE_WARMUP, MINUTE_MS, kline_variates
from flows.feature_kinds import KINDS, Missing
from flows.registry import CADENCES, Registry, load_registry
from tickcast.logs import get_logger

log = get_logger("features.engine")

_fsum = math.fsum
_isfinite = math.isfinite
_log = math.log
TILE_MS = 1_000


@dataclass(frozen=True)
class EngineConfig:
    """Behaviour that shapes outputs; lives in the registry's ``engine:`` block (so in its hash)."""

    book_stale_ms: int = 30_000  # no book update for this long at a window end: book features null
    ticker_stale_ms: int = 60_000  # no ticker for this long at a window end: ticker features null
    resync_interval_ms: int = 5_000  # at most one resync request per symbol per interval (event time)
    seq_hold_events: int = 5_000  # a gw_seq hole is declared when this many later events wait ...
    seq_hold_ms: int = 5_000  # ... or when they span this much event time (features.yaml: 20 s)
    max_empty_ms: int = 3_600_000  # a longer silence restarts the windows instead of filling them
    tile_history_s: int = 301  # closed 1-second tiles kept (longest tile window + 1)

    @classmethod
    def from_registry(cls, reg: Registry) -> EngineConfig:
        known = cls.__dataclass_fields__
        bad = set(reg.config) - set(known)
        if bad:
            raise ValueError(f"unknown engine settings in the registry: {sorted(bad)}")
        bad_values = [f"{k}={v!r}" for k, v in reg.config.items()
                      if isinstance(v, bool) or not isinstance(v, (int, float, str)) or not str(v).strip().isdigit()]
        if bad_values:
            raise ValueError(f"engine settings must be non-negative integers: {', '.join(bad_values)}")
        return cls(**{k: int(v) for k, v in reg.config.items()})


def check_engine_config(registry: Registry) -> EngineConfig:
    """The registry's ``engine:`` block, checked against its features; ValueError with the reason."""
    cfg = EngineConfig.from_registry(registry)
    need = max([s.window_ms // TILE_MS + 1 for s in registry.features if {"book", "trades"} & set(s.inputs)] + [2])
    if cfg.tile_history_s < need:
        raise ValueError(f"engine.tile_history_s={cfg.tile_history_s} is shorter than the longest "
                         f"book/trade window of the registry ({need - 1} s) + 1")
    return cfg


@lru_cache(maxsize=8)
def _registry_cached(path: str) -> Registry:
    return load_registry(path)


# --- gw_seq ordering -------------------------------------------------------------------------------
class Sequencer:
    """Releases events strictly in gw_seq order. A missing gw_seq is waited for until
    ``hold_events`` later events are pending or they reach ``hold_ms`` of event time past the first
    event that waits (never earlier than the last released one: a quiet gap in the data before it,
    such as a gateway restart, does not count toward the hold); then it is declared a hole and
    skipped. The first release waits for the same
    bound, so the stream starts at the smallest gw_seq seen. Duplicates and events older than what
    was released are dropped and counted. An item pushed with ``ts=None`` has no event time of the
    stream (a news item's time is its publication, possibly minutes old): it is ordered like any
    other but never moves the hold."""

    __slots__ = ("next", "pending", "hold_events", "hold_ms", "ref_ts", "max_ts", "holes", "skipped",
                 "duplicates", "late", "wait_ts")

    def __init__(self, hold_events: int, hold_ms: int):
        self.next: int | None = None
        self.pending: dict[int, tuple] = {}  # seq -> (ts, item)
        self.hold_events = hold_events
        self.hold_ms = hold_ms
        self.ref_ts: int | None = None  # ts of the last released event (or the first pending one)
        self.max_ts: int | None = None  # largest ts pending
        self.wait_ts: int | None = None  # smallest ts pending (None: to be computed)
        self.holes = self.skipped = self.duplicates = self.late = 0

    def __getstate__(self):
        return None, {k: getattr(self, k) for k in self.__slots__ if hasattr(self, k)}

    def __setstate__(self, state):  # also snapshots taken before wait_ts existed
        self.wait_ts = None
        for k, v in (state[1] if isinstance(state, tuple) else state).items():
            setattr(self, k, v)

    def push(self, seq: int, ts: int, item, out: list) -> None:
        nxt = self.next
        if seq == nxt and not self.pending:  # fast path: in order
            self.next = seq + 1
            if ts is not None:
                self.ref_ts = ts
            out.append(item)
            return
        if nxt is not None and seq < nxt:
            self.late += 1
            return
        if seq in self.pending:
            self.duplicates += 1
            return
        self.pending[seq] = (ts, item)
        if ts is not None:
            if self.ref_ts is None:
                self.ref_ts = ts
            if self.max_ts is None or ts > self.max_ts:
                self.max_ts = ts
            if self.wait_ts is not None and ts < self.wait_ts:
                self.wait_ts = ts
        self._drain(out, False)

    def _waiting(self) -> bool:
        """Still within the hold: fewer than hold_events pending and less than hold_ms of event time
        between the first waiting event (not before the last released one) and the newest."""
        if len(self.pending) >= self.hold_events:
            return False
        if self.max_ts is None:
            return True
        if self.wait_ts is None:
            self.wait_ts = min((ts for ts, _ in self.pending.values() if ts is not None), default=None)
        start = self.ref_ts if self.wait_ts is None else max(self.ref_ts, self.wait_ts)
        return self.max_ts - start < self.hold_ms

    def _drain(self, out: list, force: bool) -> None:
        pending = self.pending
        while pending:
            nxt = self.next
            if nxt not in pending:
                if not force and self._waiting():
                    return
                first = min(pending)
                if nxt is not None:
                    self.holes += 1
                    self.skipped += first - nxt
                nxt = first
            ts, item = pending.pop(nxt)
            out.append(item)
            self.next = nxt + 1
            self.wait_ts = None  # recomputed over what is left when it is needed
            if ts is not None:
                self.ref_ts = ts
        self.max_ts = None

    def flush(self, out: list) -> None:
        """Release everything pending (end of a finite input), skipping holes."""
        self._drain(out, True)


# --- 1-second tiles --------------------------------------------------------------------------------
class Tile:
    """Mergeable partial aggregates of one second of a symbol's events (exchange time)."""

    __slots__ = ("start", "n_events", "n_trades", "buy_vol", "sell_vol", "buy_notional", "sell_notional",
                 "best_changes", "n_dp", "sum_dp", "n_prod", "sum_prod", "late", "mid", "ret", "dmid")

    def __init__(self, start: int):
        self.start = start
        self.n_events = self.n_trades = self.best_changes = self.n_dp = self.n_prod = self.late = 0
        self.buy_vol = self.sell_vol = self.buy_notional = self.sell_notional = 0.0
        self.sum_dp = self.sum_prod = 0.0
        self.mid: float | None = None  # mid at the tile end (None: no valid book)
        self.ret: float | None = None  # log(mid / previous tile's mid)
        self.dmid: float | None = None  # mid - previous tile's mid


def last_tiles(tiles: deque, k: int) -> list[Tile]:
    """The newest k tiles, oldest first (deque indexing near its right end is O(1): no full copy)."""
    n = len(tiles)
    return [tiles[i] for i in range(max(0, n - k), n)]


class WindowAgg:
    """Sums over the last k tiles (computed once per window length per tile close)."""

    __slots__ = ("n_tiles", "n_trades", "buy_vol", "sell_vol", "buy_notional", "sell_notional", "best_changes",
                 "returns", "dmid_q", "roll_n_dp", "roll_sum_dp", "roll_pairs", "roll_sum_prod")

    def __init__(self, tiles: list[Tile]):
        if len(tiles) == 1:  # the 1 s window, every second: no sums needed
            t = tiles[0]
            self.n_tiles, self.n_trades, self.best_changes = 1, t.n_trades, t.best_changes
            self.buy_vol, self.sell_vol = t.buy_vol, t.sell_vol
            self.buy_notional, self.sell_notional = t.buy_notional, t.sell_notional
            self.returns = [] if t.ret is None else [t.ret]
            self.dmid_q = [] if t.dmid is None else [(t.dmid, t.buy_vol - t.sell_vol)]
            self.roll_n_dp, self.roll_sum_dp = t.n_dp, t.sum_dp
            self.roll_pairs, self.roll_sum_prod = t.n_prod, t.sum_prod
            return
        self.n_tiles = len(tiles)
        self.n_trades = sum(t.n_trades for t in tiles)
        self.buy_vol = _fsum(t.buy_vol for t in tiles)
        self.sell_vol = _fsum(t.sell_vol for t in tiles)
        self.buy_notional = _fsum(t.buy_notional for t in tiles)
        self.sell_notional = _fsum(t.sell_notional for t in tiles)
        self.best_changes = sum(t.best_changes for t in tiles)
        self.returns = [t.ret for t in tiles if t.ret is not None]
        self.dmid_q = [(t.dmid, t.buy_vol - t.sell_vol) for t in tiles if t.dmid is not None]
        self.roll_n_dp = sum(t.n_dp for t in tiles)
        self.roll_sum_dp = _fsum(t.sum_dp for t in tiles)
        self.roll_pairs = sum(t.n_prod for t in tiles)
        self.roll_sum_prod = _fsum(t.sum_prod for t in tiles)


class BookSnap:
    """Point-in-time book values at a tile end (floats), or invalid with the reason."""

    __slots__ = ("valid", "reason", "bid1", "ask1", "bid1_size", "ask1_size", "mid", "bid_sizes", "ask_sizes",
                 "_density")

    def __init__(self, book: OrderBook | None, reason: str, levels: int, density_bps: tuple):
        self.valid = not reason
        self.reason = reason
        if not self.valid:
            return
        bids, asks = book.top_bids(levels), book.top_asks(levels)
        self.bid1, self.bid1_size = from_fixed(bids[0][0]), from_fixed(bids[0][1])
        self.ask1, self.ask1_size = from_fixed(asks[0][0]), from_fixed(asks[0][1])
        self.mid = (self.bid1 + self.ask1) / 2
        self.bid_sizes = [from_fixed(s) for _, s in bids]
        self.ask_sizes = [from_fixed(s) for _, s in asks]
        # volume within X bps of the mid, bounds computed exactly on integer prices:
        # [mid * (1 - bps/1e4), mid * (1 + bps/1e4)] with mid = mid2 / 2
        mid2 = bids[0][0] + asks[0][0]
        self._density = {}
        deepest_bid, deepest_ask = book.bids.prices[0], book.asks.prices[-1]
        for bps in density_bps:
            lo = -((-mid2 * (10_000 - bps)) // 20_000)  # ceil
            hi = (mid2 * (10_000 + bps)) // 20_000  # floor
            if lo < deepest_bid or hi > deepest_ask:
                # levels beyond the subscribed depth may lie inside the band: the visible sum would
                # understate it (BTCUSDT's 200 levels span ~5 bps), so no value
                side = "bid" if lo < deepest_bid else "ask"
                self._density[bps] = Missing(f"the book ({len(book.bids)}x{len(book.asks)} levels) does not "
                                             f"reach {bps} bps on the {side} side")
                continue
            b, a = book.depth_within(lo, hi)
            self._density[bps] = from_fixed(b + a)

    def depth_within_bps(self, bps) -> float | Missing:
        return self._density[bps]


class MempoolState:
    __slots__ = ("recs", "keep_ms", "any_seen")

    def __init__(self, keep_ms: int):
        self.recs: deque = deque()
        self.keep_ms = keep_ms
        self.any_seen = False

    def add(self, rec: dict) -> None:
        self.recs.append(rec)
        self.any_seen = True
        cutoff = rec["exchange_ts"] - self.keep_ms
        while len(self.recs) > 1 and self.recs[1]["exchange_ts"] <= cutoff:
            self.recs.popleft()

    def latest(self, at_ms: int) -> dict | None:
        for rec in reversed(self.recs):
            if rec["exchange_ts"] <= at_ms:
                return rec
        return None

    def between(self, lo: int, hi: int) -> list[dict]:
        """Records with lo <= ts < hi: the same half-open window as the tiles and the news windows."""
        return [r for r in self.recs if lo <= r["exchange_ts"] < hi]


class Candles:
    """1-minute OHLCV from trades (by match time), reconciled with the exchange's confirmed klines:
    a confirmed kline replaces the trade-built candle (the exchange is the reference for history)."""

    __slots__ = ("bars", "confirmed", "mismatches", "carry")

    def __init__(self):
        self.bars: dict[int, list] = {}  # minute start -> [o, h, l, c, v]
        self.confirmed: set[int] = set()
        self.mismatches = 0
        self.carry: tuple[int, float] | None = None  # (minute, close) of the newest pruned bar

    def trade(self, ts: int, price: float, size: float) -> None:
        m = ts - ts % MINUTE_MS
        if m in self.confirmed:
            return  # the exchange's candle is final
        bar = self.bars.get(m)
        if bar is None:
            self.bars[m] = [price, price, price, price, size]
        else:
            if price > bar[1]:
                bar[1] = price
            if price < bar[2]:
                bar[2] = price
            bar[3] = price
            bar[4] += size

    def kline(self, rec: dict) -> bool:
        """Reconcile a confirmed 1-minute kline; True when the trade-built candle disagreed."""
        m = rec["start_ts"]
        try:
            k = [float(rec["open"]), float(rec["high"]), float(rec["low"]), float(rec["close"]),
                 float(rec["volume"])]
        except ValueError:
            return False
        own = self.bars.get(m)
        differs = own is not None and (own[:4] != k[:4] or abs(own[4] - k[4]) > 1e-9 * max(1.0, k[4]))
        self.mismatches += differs
        self.bars[m] = k
        self.confirmed.add(m)
        return differs

    def variates(self, minute_end: int, funding_rate: float) -> dict[str, float]:
        """flows.candles variates of the minute ending at ``minute_end``; a minute without trades
        is flat at the previous close with zero volume (as the exchange reports it)."""
        n = KLINE_WARMUP + 1
        starts = [minute_end - (n - i) * MINUTE_MS for i in range(n)]
        cols = [[], [], [], [], []]
        # the close before the buffer: the newest older bar (kept or already pruned)
        older = [m for m in self.bars if m < starts[0]]
        if older:
            prev_close = self.bars[max(older)][3]
        elif self.carry is not None and self.carry[0] < starts[0]:
            prev_close = self.carry[1]
        else:
            prev_close = math.nan
        for m in starts:
            bar = self.bars.get(m)
            if bar is None:
                bar = [prev_close] * 4 + [0.0 if prev_close == prev_close else math.nan]
            for col, v in zip(cols, bar):
                col.append(v)
            prev_close = bar[3]
        fr = [math.nan] * (n - 1) + [funding_rate]
        out = kline_variates(starts, *cols, funding_rate=fr, rows=range(n - 1, n))
        bar = {f"bar_{k}": col[-1] for k, col in zip(("open", "high", "low", "close", "volume"), cols)}
        # prune history no longer needed
        oldest = starts[0] - MINUTE_MS
        for m in sorted(m for m in self.bars if m < oldest):
            if self.carry is None or m > self.carry[0]:
                self.carry = (m, self.bars[m][3])
            del self.bars[m]
            self.confirmed.discard(m)
        return {**{k: float(v[0]) for k, v in out.items()}, **bar}


# --- the per-window context handed to feature kinds ------------------------------------------------
class WindowContext:
    __slots__ = ("engine", "window_end", "cadence", "tiles", "book", "values", "point", "_aggs", "_candles", "_news")

    def __init__(self, engine: SymbolEngine, window_end: int):
        self.engine = engine
        self.window_end = window_end
        self.tiles = engine.tiles
        self.book = engine.last_snap
        self.cadence = ""
        self.values: dict[str, float | None] = {}
        self.point: dict[str, object] = {}  # point-in-time results, shared by the cadences of this tile end
        self._aggs: dict[int, WindowAgg] = {}
        self._candles = None
        self._news = None

    def tiles_in(self, window_ms: int) -> list[Tile]:
        return last_tiles(self.tiles, window_ms // TILE_MS)

    def window(self, window_ms: int) -> WindowAgg:
        agg = self._aggs.get(window_ms)
        if agg is None:
            agg = self._aggs[window_ms] = WindowAgg(self.tiles_in(window_ms))
        return agg

    def mid_at(self, ago_ms: int) -> float | None:
        """Mid at the end of the tile that ended ``ago_ms`` before the window end."""
        k = ago_ms // TILE_MS
        if k >= len(self.tiles):
            return None
        return self.tiles[-1 - k].mid

    @property
    def ticker(self) -> dict:
        return self.engine.ticker

    @property
    def mempool(self) -> MempoolState:
        return self.engine.mempool

    def candle_variates(self) -> dict[str, float]:
        if self._candles is None:
            fr = self.engine.ticker.get("funding_rate")
            self._candles = self.engine.candles.variates(self.window_end, float(fr) if fr else math.nan)
        return self._candles

    def news_values(self) -> dict[str, float]:
        if self._news is None:
            self._news = self.engine.news.values(self.window_end)
        return self._news

    def history(self, name: str, n: int) -> list[float]:
        hist = self.engine.history[(self.cadence, name)]
        return list(hist)[-n:]


# --- the engine ------------------------------------------------------------------------------------
_BOOK_COUNTERS = {s: f"book_{s.value}" for s in BookStatus}


class SymbolEngine:
    def __init__(self, symbol: str, registry: Registry, requester: str = "features"):
        self.symbol = symbol
        self.requester = requester
        self.venue = ""
        self._attach(registry)
        self.seq = Sequencer(self.cfg.seq_hold_events, self.cfg.seq_hold_ms)
        self.book = OrderBook(symbol)
        self.tiles: deque[Tile] = deque(maxlen=self.cfg.tile_history_s)
        self.tile: Tile | None = None  # the open tile
        self.last_snap: BookSnap | None = None  # the book at the last tile end
        self.clock: int | None = None
        self.ticker: dict = {}
        self.mempool = MempoolState(keep_ms=2 * 3_600_000)
        self.candles = Candles()
        self.news = None
        if any(s.kind == "news" for s in registry.features):
            from flows.news_features import NewsWindows

            self.news = NewsWindows()
        self.history: dict[tuple[str, str], deque] = {}
        self._init_history()
        self.last_resync: int | None = None
        self.stale_since: int | None = None
        self.first_live_m1: int | None = None  # window_end of the first m1 vector of the live stream
        self.last_history_m1: int | None = None  # newest history m1 vector emitted
        self.counters: dict[str, int] = {}

    # registry handling; the compiled registry is not pickled with the state (Bytewax snapshots)
    def _attach(self, registry: Registry) -> None:
        self.registry = registry
        self._snap_version = -1  # a cached book snapshot holds the old registry's levels and bands
        self.registry_path = registry.path
        self.registry_hash = registry.hash
        self.cfg = check_engine_config(registry)
        # (name, compute, spec, shared): a point-in-time feature (not derived) has one value per tile end
        # whatever the cadence, so it is computed once when several cadences close together
        self._plan = {c: [(s.name, KINDS[s.kind].compute, s, s.window_ms == 0 and s.kind != "zscore")
                          for s in registry.for_cadence(c)] for c in CADENCES}
        # windowed book/trade features: the window's length in tiles (see _window_gap)
        self._window_tiles = {s.name: s.window_ms // TILE_MS for s in registry.features
                              if s.window_ms > 0 and {"book", "trades"} & set(s.inputs)}
        self._levels = max([s.params.get("levels", 1) for s in registry.features] + [10])
        self._density = tuple(sorted({s.params["bps"] for s in registry.features if s.kind == "liquidity_density"}))
        # inputs of derived features need a value history per cadence
        self._hist_n: dict[tuple[str, str], int] = {}
        for s in registry.features:
            if s.kind == "zscore":
                for c in s.cadences:
                    key = (c, s.inputs[0])
                    self._hist_n[key] = max(self._hist_n.get(key, 0), s.params["n"])

    def _init_history(self) -> None:
        old = getattr(self, "history", {})
        self.history = {k: deque(old.get(k, ()), maxlen=n) for k, n in self._hist_n.items()}
        self._hist_by_cadence = {c: {name: h for (cc, name), h in self.history.items() if cc == c} for c in CADENCES}

    def reload(self, registry: Registry) -> None:
        """Switch to another registry at run time (takes effect at the next window), its engine:
        settings included (the gw_seq hold and the tiles kept)."""
        self._attach(registry)
        self._init_history()
        self.seq.hold_events, self.seq.hold_ms = self.cfg.seq_hold_events, self.cfg.seq_hold_ms
        if self.tiles.maxlen != self.cfg.tile_history_s:
            self.tiles = deque(self.tiles, maxlen=self.cfg.tile_history_s)

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("registry", "cfg", "_plan", "_hist_by_cadence")}
        return state

    def __deepcopy__(self, memo):
        """Bytewax's recovery snapshots an operator's state with ``copy.deepcopy`` and pickles the
        copy when the epoch closes. Pickling right away freezes the same state ~6x faster (10
        minutes of BTCUSDT: 1.2 ms against 8 ms, a pause of the whole flow per symbol at every
        epoch), and the frozen engine unpickles as a ``SymbolEngine``."""
        return FrozenEngine(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))

    def __setstate__(self, state):
        self.__dict__.update(state)
        reg = _registry_cached(state["registry_path"])
        if reg.hash != state["registry_hash"]:
            log.warning("registry changed since the snapshot; continuing with the new one",
                        extra={"symbol": self.symbol, "old": state["registry_hash"], "new": reg.hash})
        self._attach(reg)
        self._init_history()

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # -- input -------------------------------------------------------------------------------------
    def process(self, batch) -> list[tuple[str, dict]]:
        """Raw events (schema_name, record) of this symbol, any order -> outputs in order."""
        ready: list = []
        push = self.seq.push
        for item in batch:
            rec = item[1]
            seq = rec["gw_seq"]
            if seq < 0:
                self.count("not_live")  # historical rows are not part of the live order
                continue
            # a news item's exchange_ts is its publication time: not the stream's clock
            push(seq, rec["exchange_ts"] if item[0] != "NewsItem" else None, item, ready)
        out: list = []
        for name, rec in ready:
            self._on_event(name, rec, out)
        return out

    def flush(self) -> list[tuple[str, dict]]:
        """End of a finite input: release held events (holes skipped)."""
        ready: list = []
        self.seq.flush(ready)
        out: list = []
        for name, rec in ready:
            self._on_event(name, rec, out)
        return out

    def _on_event(self, name: str, rec: dict, out: list) -> None:
        if name == "MempoolStats" or name == "NewsItem":
            # side feeds: their exchange_ts is our receive time or a publication time, not the
            # market's clock: they join the open tile and never close one
            if self.tile is not None:
                self.tile.n_events += 1
            if name == "MempoolStats":
                self.mempool.add(rec)
            elif self.news is not None:
                self.news.add(rec)
            return
        ts = rec["exchange_ts"]
        if self.clock is None:
            self.clock = ts
            self.tile = Tile(ts - ts % TILE_MS)
        elif ts > self.clock:
            if ts >= self.tile.start + TILE_MS:
                self._advance(ts, rec, out)
            self.clock = ts
        tile = self.tile
        tile.n_events += 1
        if ts < tile.start:
            tile.late += 1
            self.count("late_events")
        self.venue = rec["venue"]
        if name == "OrderBookDelta" or name == "OrderBookSnapshot":
            self._on_book(rec, name == "OrderBookSnapshot", out)
        elif name == "Trade":
            self._on_trade(rec, tile)
        elif name == "Ticker":
            self.ticker = rec
        elif name == "Funding":
            self.ticker = {**self.ticker, "funding_rate": rec["funding_rate"],
                           "next_funding_time": rec["next_funding_time"] or self.ticker.get("next_funding_time")}
        elif name == "Kline":
            if rec["confirm"] and rec["interval"] == "1":
                if self.candles.kline(rec):
                    self.count("kline_mismatch")
                self._history_vector(rec, out)
        elif name == "Heartbeat":
            pass  # it only moved the clock
        else:
            self.count(f"ignored_{name}")

    def _on_book(self, rec: dict, is_snapshot: bool, out: list) -> None:
        before = self.book.best_changes
        was_valid = self.book.valid
        status = self.book.apply(rec, is_snapshot)
        self.tile.best_changes += self.book.best_changes - before
        self.count(_BOOK_COUNTERS[status])
        if status is BookStatus.APPLIED:
            return
        if status in (BookStatus.SNAPSHOT, BookStatus.RESET):
            self.stale_since = None
            if not was_valid:
                self.count("book_recoveries")
            if status is BookStatus.RESET:
                log.warning("exchange restart (u=1): book overwritten", extra={"symbol": self.symbol})
            return
        extra = {"symbol": self.symbol, "status": status.value, "u": rec["update_id"], "last_u": self.book.last_u,
                 "gw_seq": rec["gw_seq"], "counts": dict(self.counters)}
        if status in (BookStatus.DUPLICATE, BookStatus.OUT_OF_ORDER):
            log.warning("order-book sequence error: delta ignored", extra=extra)
            return
        if status is BookStatus.NOT_READY and self.counters.get("book_not_ready", 0) > 1:
            # the book is invalid: since its first snapshot, or since a gap, a crossed book, bad input
            self._request_resync(self.book.invalid_reason or "delta before any snapshot", rec, out)
            return
        log.warning("order-book desync", extra={**extra, "reason": self.book.invalid_reason})
        self._request_resync(self.book.invalid_reason or status.value, rec, out)

    def _on_trade(self, rec: dict, tile: Tile) -> None:
        try:
            price = float(rec["price"])
            size = float(rec["size"])
        except ValueError:
            price = size = math.nan
        if not (price > 0 and size > 0 and _isfinite(price) and _isfinite(size)):
            self.count("bad_trades")
            return
        tile.n_trades += 1
        if rec["side"] == "Buy":
            tile.buy_vol += size
            tile.buy_notional += price * size
        else:
            tile.sell_vol += size
            tile.sell_notional += price * size
        # Roll: consecutive trade price changes; a change belongs to the tile of its later trade
        last = self._last_px
        if last is not None:
            dp = price - last
            tile.n_dp += 1
            tile.sum_dp += dp
            if self._last_dp is not None:
                tile.n_prod += 1
                tile.sum_prod += dp * self._last_dp
            self._last_dp = dp
        self._last_px = price
        self.candles.trade(rec["trade_ts"], price, size)

    _last_px: float | None = None
    _last_dp: float | None = None
    _snap_version: int = -1

    def _request_resync(self, reason: str, rec: dict, out: list) -> None:
        now = self.clock
        if self.last_resync is not None and now - self.last_resync < self.cfg.resync_interval_ms:
            self.count("resync_suppressed")
            return
        self.last_resync = now
        self.count("resync_requests")
        out.append(("control", {"command": "resync", "symbol": self.symbol, "reason": reason,
                                "requester": self.requester, "requested_ts": rec["recv_ts"]}))

    # -- event time ----------------------------------------------------------------------------------
    def _advance(self, ts: int, rec: dict, out: list) -> None:
        """Close every tile that ended at or before ``ts``, emitting the due vectors."""
        target = ts - ts % TILE_MS
        if target - self.tile.start > self.cfg.max_empty_ms:
            self.count("clock_jumps")
            log.warning("event-time jump: windows restarted",
                        extra={"symbol": self.symbol, "gap_ms": target - self.tile.start})
            self._close_tile(self.tile, rec, out)
            self.tiles.clear()
            self.tile = Tile(target)
            return
        while self.tile.start < target:
            closed = self.tile
            self._close_tile(closed, rec, out)
            self.tile = Tile(closed.start + TILE_MS)

    def _snap(self, end: int) -> BookSnap:
        book = self.book
        if not book.valid:
            reason = f"book invalid: {book.invalid_reason}"
        elif book.last_ts is not None and end - book.last_ts > self.cfg.book_stale_ms:
            reason = f"book stale: no update for {(end - book.last_ts) // 1000} s"
        elif not book.bids.prices or not book.asks.prices:
            reason = "book has an empty side"
        else:
            last = self.last_snap
            if last is not None and last.valid and self._snap_version == book.version:
                return last  # the book did not change since the last tile end
            self._snap_version = book.version
            return BookSnap(book, "", self._levels, self._density)
        return BookSnap(None, reason, 0, ())

    def _close_tile(self, tile: Tile, rec: dict, out: list) -> None:
        end = tile.start + TILE_MS
        self.last_snap = snap = self._snap(end)
        tile.mid = snap.mid if snap.valid else None
        if snap.reason.startswith("book stale"):
            if self.book.valid and self.stale_since is None:
                self.stale_since = end
                log.warning("order-book stale", extra={"symbol": self.symbol, "reason": snap.reason})
                self._request_resync(snap.reason, rec, out)
        elif self.stale_since is not None and snap.valid:
            self.stale_since = None  # fresh again (deltas resumed): the next stale episode asks again
        prev = self.tiles[-1].mid if self.tiles else None
        if tile.mid is not None and prev is not None:
            tile.ret = _log(tile.mid / prev)
            tile.dmid = tile.mid - prev
        self.tiles.append(tile)
        ctx = None
        for cadence, period in CADENCES.items():
            if end % period == 0 and self._plan[cadence]:
                ctx = ctx or WindowContext(self, end)
                out.append(("features", self._vector(ctx, cadence, period, rec)))
                if cadence == "m1" and self.first_live_m1 is None:
                    self.first_live_m1 = end

    def _history_vector(self, rec: dict, out: list) -> None:
        """A confirmed 1-minute kline of a minute before the live stream began (the gateway
        publishes recent history at start): an m1 vector of that minute from the candles alone,
        so consumers that need a lookback (the model) have one from the first live minute on.
        Only candle variates and the clock are computed; everything else is null with the reason."""
        end = rec["start_ts"] + MINUTE_MS
        if self.first_live_m1 is not None and end >= self.first_live_m1:
            return  # a live minute: its vector is (or will be) the regular one
        if self.tile is not None and end > self.tile.start - self.tile.start % MINUTE_MS:
            return  # the minute is not over in the stream's own time
        if self.last_history_m1 is not None and end <= self.last_history_m1:
            return  # already emitted (history re-published after a reconnect)
        self.last_history_m1 = end
        self.count("history_vectors")
        ctx = WindowContext.__new__(WindowContext)
        ctx.engine, ctx.window_end, ctx.cadence, ctx.values = self, end, "m1", {}
        ctx._aggs, ctx._candles, ctx._news, ctx.tiles, ctx.book = {}, None, None, (), None
        values: dict[str, float | None] = {}
        nulls: dict[str, str] = {}
        for name, fn, spec, _ in self._plan["m1"]:
            try:
                v = fn(ctx, spec) if spec.kind in ("candle", "candle_bar", "time_of_day") else Missing(
                    "history minute (before the live stream): candle variates only")
            except (ArithmeticError, ValueError) as exc:
                v = Missing(f"not computable: {type(exc).__name__}: {exc}")
                self.count("feature_errors")
            if isinstance(v, Missing) or not _isfinite(v):
                values[name] = None
                nulls[name] = str(v) if isinstance(v, Missing) else f"not finite ({v})"
            else:
                values[name] = float(v)
        out.append(("features", {
            "symbol": self.symbol, "venue": self.venue, "cadence": "m1", "window_end": end,
            "registry_hash": self.registry_hash, "values": values, "nulls": nulls, "book_valid": False,
            "event_count": 0, "last_gw_seq": rec["gw_seq"], "close_recv_ts": rec["recv_ts"], "emit_ts": 0,
            "history": True}))

    def _window_gap(self, k: int) -> str:
        """Why a window of the last ``k`` tiles cannot give a book/trade feature ("" when it can): it
        is not covered yet (start-up, or windows restarted after an event-time jump), or nothing at
        all, not even a heartbeat, arrived in it (an outage: zero trades would be invented)."""
        tiles = self.tiles
        if len(tiles) < k:
            return f"window not full: {len(tiles)} of {k} s since the stream (re)started"
        if not any(t.n_events for t in last_tiles(tiles, k)):
            return "no events in the window (feed outage)"
        return ""

    def _vector(self, ctx: WindowContext, cadence: str, period: int, rec: dict) -> dict:
        ctx.cadence = cadence
        ctx.values = values = {}
        nulls: dict[str, str] = {}
        point = ctx.point
        hists = self._hist_by_cadence[cadence]
        window_tiles = self._window_tiles
        gaps: dict[int, str] = {}
        for name, fn, spec, shared in self._plan[cadence]:
            k = window_tiles.get(name)
            if k is not None:
                why = gaps.get(k)
                if why is None:
                    why = gaps[k] = self._window_gap(k)
                if why:
                    values[name] = None
                    nulls[name] = why
                    continue
            try:
                if shared:
                    v = point.get(name, point)
                    if v is point:
                        v = point[name] = fn(ctx, spec)
                else:
                    v = fn(ctx, spec)
            except (ArithmeticError, ValueError) as exc:  # bad input reached a formula: a null, not a crash
                v = Missing(f"not computable: {type(exc).__name__}: {exc}")
                self.count("feature_errors")
            if v.__class__ is not float:
                if isinstance(v, Missing):
                    values[name] = None
                    nulls[name] = str(v)
                    continue
                v = float(v)
            if v - v != 0.0:  # inf or nan
                values[name] = None
                nulls[name] = f"not finite ({v})"
                continue
            values[name] = v
            if name in hists:
                hists[name].append(v)
        k = period // TILE_MS
        tiles = self.tiles
        events = sum(t.n_events for t in last_tiles(tiles, k))
        return {
            "symbol": self.symbol, "venue": self.venue, "cadence": cadence, "window_end": ctx.window_end,
            "registry_hash": self.registry_hash, "values": values, "nulls": nulls,
            "book_valid": bool(ctx.book.valid), "event_count": events, "last_gw_seq": rec["gw_seq"],
            "close_recv_ts": rec["recv_ts"], "emit_ts": 0, "history": False,
        }


class FrozenEngine:
    """A ``SymbolEngine`` pickled at snapshot time (see ``SymbolEngine.__deepcopy__``)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes):
        self.blob = blob

    def __reduce__(self):
        return pickle.loads, (self.blob,)  # stored as the engine's own pickle: restores as the engine

    def thaw(self) -> SymbolEngine:
        return pickle.loads(self.blob)


def new_engine(symbol: str, registry_path: str | None = None) -> SymbolEngine:
    from flows.registry import DEFAULT_PATH

    return SymbolEngine(symbol, _registry_cached(str(registry_path or DEFAULT_PATH)))


__all__ = ["SymbolEngine", "EngineConfig", "Sequencer", "Tile", "new_engine", "BadDecimal", "to_fixed",
           "KLINE_VARIATES"]
