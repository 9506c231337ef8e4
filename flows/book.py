"""Per-symbol order book from Bybit v5 snapshots and deltas, with exact integer prices.

Prices and sizes arrive as decimal strings; the book keys levels by integers in units of
10^-FIXED_DECIMALS (never float keys), so "65114.30" and "65114.3" are the same level and
arithmetic on depths is exact. Floats appear only when a feature is computed.

Update rules (Bybit v5, linear): a snapshot replaces the book at any ``u``; a delta applies only
when its ``u`` is the previous ``u`` + 1; ``u == 1`` means the exchange restarted and the message
overwrites the book; size 0 deletes a level; sizes are absolute. Gaps, duplicates, out-of-order
deltas and crossed books are detected and reported as a status; the book becomes invalid on a
gap or a cross and stays invalid until the next snapshot.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from enum import StrEnum

FIXED_DECIMALS = 12
FIXED_SCALE = 10**FIXED_DECIMALS
_PAD = "0" * FIXED_DECIMALS


class BadDecimal(ValueError):
    pass


def _to_fixed(s: str) -> int:
    i, dot, f = s.partition(".")
    if not (i.isascii() and i.isdigit() and (not dot or (f.isascii() and f.isdigit()))):
        raise BadDecimal(f"not a non-negative decimal: {s!r}")
    n = len(f)
    if n > FIXED_DECIMALS:
        raise BadDecimal(f"more than {FIXED_DECIMALS} decimals: {s!r}")
    return int(i + f + _PAD[n:]) if n else int(i) * FIXED_SCALE


# Book prices and sizes repeat constantly (the same levels, round lots): a bounded memo of the
# conversion makes parsing a delta a few dict lookups.
_MEMO: dict[str, int] = {}
_MEMO_MAX = 500_000


def to_fixed(s: str) -> int:
    """Non-negative decimal string -> integer units of 10^-12, exactly; BadDecimal otherwise."""
    v = _MEMO.get(s)
    if v is None:
        v = _to_fixed(s)
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[s] = v
    return v


def from_fixed(units: int) -> float:
    return units / FIXED_SCALE  # int/int true division is correctly rounded: deterministic


class BookStatus(StrEnum):
    APPLIED = "applied"
    SNAPSHOT = "snapshot"
    RESET = "reset"  # u == 1: exchange restart, overwrote the book
    GAP = "gap"  # u jumped: desync
    DUPLICATE = "duplicate"  # u == last u: ignored
    OUT_OF_ORDER = "out_of_order"  # u < last u: ignored
    CROSSED = "crossed"  # best bid >= best ask after applying: desync
    NOT_READY = "not_ready"  # delta while the book waits for a snapshot: ignored
    BAD_INPUT = "bad_input"  # unparsable level: ignored, book unchanged


class Side:
    """One side of the book: size by price and the prices kept sorted ascending."""

    __slots__ = ("sizes", "prices")

    def __init__(self):
        self.sizes: dict[int, int] = {}
        self.prices: list[int] = []

    def clear(self):
        self.sizes.clear()
        self.prices.clear()

    def set(self, price: int, size: int) -> None:
        sizes = self.sizes
        if size == 0:
            if price in sizes:
                del sizes[price]
                prices = self.prices
                del prices[bisect_left(prices, price)]
        else:
            if price not in sizes:
                insort(self.prices, price)
            sizes[price] = size

    def __len__(self) -> int:
        return len(self.prices)


def _parse_levels(px: list[str], sz: list[str]) -> list[tuple[int, int]]:
    if len(px) != len(sz):
        raise BadDecimal(f"{len(px)} prices but {len(sz)} sizes")
    get = _MEMO.get
    out = []
    for p, s in zip(px, sz):
        a = get(p)
        b = get(s)
        out.append((to_fixed(p) if a is None else a, to_fixed(s) if b is None else b))
    return out


class OrderBook:
    __slots__ = ("symbol", "bids", "asks", "last_u", "last_seq", "last_ts", "valid", "invalid_reason",
                 "best_bid", "best_ask", "best_changes", "version")

    def __init__(self, symbol: str):
        self.symbol = symbol
        self.bids = Side()
        self.asks = Side()
        self.last_u: int | None = None
        self.last_seq: int | None = None
        self.last_ts: int | None = None  # exchange ts of the last applied update (ms)
        self.valid = False
        self.invalid_reason = "no snapshot yet"
        self.best_bid: int | None = None
        self.best_ask: int | None = None
        self.best_changes = 0  # running count of best-price changes (for churn)
        self.version = 0  # incremented by every change of the levels

    # -- updates -------------------------------------------------------------------------------
    def apply(self, rec: dict, is_snapshot: bool) -> BookStatus:
        """Apply an OrderBookSnapshot/OrderBookDelta record; the status says what happened."""
        u = rec["update_id"]
        try:
            bids = _parse_levels(rec["bid_px"], rec["bid_sz"])
            asks = _parse_levels(rec["ask_px"], rec["ask_sz"])
        except BadDecimal as exc:
            if not is_snapshot and u != 1 and self.valid:  # a lost delta: the book no longer matches the exchange's
                self.invalidate(f"bad input: {exc}")
            return BookStatus.BAD_INPUT
        if is_snapshot or u == 1:
            self.bids.clear()
            self.asks.clear()
            status = BookStatus.SNAPSHOT if is_snapshot and u != 1 else BookStatus.RESET
        else:
            if not self.valid:
                return BookStatus.NOT_READY
            last = self.last_u
            if u == last:
                return BookStatus.DUPLICATE
            if u < last:
                return BookStatus.OUT_OF_ORDER
            if u != last + 1:
                self.invalidate(f"gap: u {last} -> {u}")
                return BookStatus.GAP
            status = BookStatus.APPLIED
        bset, aset = self.bids.set, self.asks.set
        for p, s in bids:
            bset(p, s)
        for p, s in asks:
            aset(p, s)
        self.version += 1
        self.last_u = u
        self.last_seq = rec["cross_seq"]
        self.last_ts = rec["exchange_ts"]
        self._update_best()
        if self.best_bid is not None and self.best_ask is not None and self.best_bid >= self.best_ask:
            self.invalidate(f"crossed: bid {from_fixed(self.best_bid)} >= ask {from_fixed(self.best_ask)}")
            return BookStatus.CROSSED
        if status is not BookStatus.APPLIED:
            self.valid = True
            self.invalid_reason = ""
        return status

    def _update_best(self) -> None:
        bb = self.bids.prices[-1] if self.bids.prices else None
        ba = self.asks.prices[0] if self.asks.prices else None
        if bb != self.best_bid or ba != self.best_ask:
            self.best_changes += 1
            self.best_bid, self.best_ask = bb, ba

    def invalidate(self, reason: str) -> None:
        self.valid = False
        self.invalid_reason = reason

    # -- reads ---------------------------------------------------------------------------------
    def top_bids(self, n: int) -> list[tuple[int, int]]:
        """Best n bid levels (price, size), best first."""
        prices = self.bids.prices
        sizes = self.bids.sizes
        return [(p, sizes[p]) for p in reversed(prices[-n:])]

    def top_asks(self, n: int) -> list[tuple[int, int]]:
        sizes = self.asks.sizes
        return [(p, sizes[p]) for p in self.asks.prices[:n]]

    def depth_within(self, lo: int, hi: int) -> tuple[int, int]:
        """Total bid and ask size with price in [lo, hi] (units)."""
        bp, bs = self.bids.prices, self.bids.sizes
        ap, asz = self.asks.prices, self.asks.sizes
        bid = sum(bs[p] for p in bp[bisect_left(bp, lo):])
        ask = sum(asz[p] for p in ap[:bisect_left(ap, hi + 1)])
        return bid, ask
