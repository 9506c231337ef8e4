"""The exact order book against a Decimal reference, and every sequencing rule."""
from __future__ import annotations

from decimal import Decimal, localcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.book import FIXED_SCALE, BadDecimal, BookStatus, OrderBook, from_fixed, to_fixed


@pytest.mark.parametrize("text,units", [
    ("65114.30", 65114_300000000000), ("65114.3", 65114_300000000000), ("0", 0), ("0.000000000001", 1),
    ("123456789012345678901234567890", 123456789012345678901234567890 * FIXED_SCALE),
])
def test_to_fixed_is_exact(text, units):
    assert to_fixed(text) == units
    with localcontext() as ctx:
        ctx.prec = 100
        assert Decimal(units) / FIXED_SCALE == Decimal(text)


@pytest.mark.parametrize("bad", ["", "-1", "1e5", "nan", "NaN", "inf", "1.", ".5", "1.2.3", " 1", "1_0", "١٢",
                                 "0.0000000000001"])
def test_to_fixed_rejects(bad):
    with pytest.raises(BadDecimal):
        to_fixed(bad)


def rec(u, bids=(), asks=(), ts=1000, seq=1):
    return {"update_id": u, "cross_seq": seq, "exchange_ts": ts, "bid_px": [p for p, _ in bids],
            "bid_sz": [s for _, s in bids], "ask_px": [p for p, _ in asks], "ask_sz": [s for _, s in asks]}


def test_snapshot_then_deltas():
    b = OrderBook("X")
    assert b.apply(rec(10, [("100.0", "1"), ("99.5", "2")], [("100.5", "3")]), True) is BookStatus.SNAPSHOT
    assert b.valid and from_fixed(b.best_bid) == 100.0 and from_fixed(b.best_ask) == 100.5
    # same price written differently is the same level; size 0 deletes; unknown price inserts
    assert b.apply(rec(11, [("100", "5"), ("99.50", "0")], [("100.25", "1")]), False) is BookStatus.APPLIED
    assert b.top_bids(5) == [(to_fixed("100"), to_fixed("5"))]
    assert b.top_asks(5) == [(to_fixed("100.25"), to_fixed("1")), (to_fixed("100.5"), to_fixed("3"))]
    assert b.best_changes == 2  # snapshot set it, the new ask moved it


def test_gap_duplicate_out_of_order_and_recovery():
    b = OrderBook("X")
    assert b.apply(rec(5, [("1", "1")], [("2", "1")]), False) is BookStatus.NOT_READY
    b.apply(rec(10, [("1", "1")], [("2", "1")]), True)
    assert b.apply(rec(10, [("1", "9")]), False) is BookStatus.DUPLICATE
    assert b.apply(rec(9, [("1", "9")]), False) is BookStatus.OUT_OF_ORDER
    assert b.top_bids(1)[0][1] == to_fixed("1")  # ignored ones changed nothing
    assert b.apply(rec(12, [("1", "9")]), False) is BookStatus.GAP
    assert not b.valid and "gap" in b.invalid_reason
    assert b.apply(rec(13, [("1", "9")]), False) is BookStatus.NOT_READY
    assert b.apply(rec(20, [("1", "4")], [("2", "4")]), True) is BookStatus.SNAPSHOT and b.valid


def test_u1_restart_overwrites():
    b = OrderBook("X")
    b.apply(rec(100, [("1", "1"), ("0.5", "1")], [("2", "1")]), True)
    assert b.apply(rec(1, [("1.5", "2")], [("3", "2")]), False) is BookStatus.RESET
    assert b.valid and b.top_bids(5) == [(to_fixed("1.5"), to_fixed("2"))] and b.last_u == 1
    assert b.apply(rec(2, [("1.5", "3")]), False) is BookStatus.APPLIED


def test_crossed_book_is_detected():
    b = OrderBook("X")
    b.apply(rec(1000, [("1", "1")], [("2", "1")]), True)
    assert b.apply(rec(1001, [("2.5", "1")]), False) is BookStatus.CROSSED
    assert not b.valid and "crossed" in b.invalid_reason
    crossed_snapshot = rec(2000, [("3", "1")], [("2", "1")])
    assert b.apply(crossed_snapshot, True) is BookStatus.CROSSED and not b.valid


def test_bad_levels_leave_the_levels_untouched_and_the_book_invalid():
    b = OrderBook("X")
    b.apply(rec(10, [("1", "1")], [("2", "1")]), True)
    for bad in (rec(11, [("1", "-1")]), rec(11, [("nan", "1")]), {**rec(11), "bid_px": ["1"], "bid_sz": []}):
        assert b.apply(bad, False) is BookStatus.BAD_INPUT
    assert b.last_u == 10 and b.top_bids(1) == [(to_fixed("1"), to_fixed("1"))]
    # the levels are untouched, but a delta was lost: the book no longer matches the exchange's
    assert not b.valid and b.invalid_reason.startswith("bad input")
    assert b.apply(rec(12, [("1", "2")], [("2", "1")]), True) is BookStatus.SNAPSHOT and b.valid


def test_depth_within_is_inclusive():
    b = OrderBook("X")
    b.apply(rec(1, [("99", "1"), ("98", "2"), ("97", "4")], [("101", "8"), ("102", "16")]), True)
    assert b.depth_within(to_fixed("98"), to_fixed("101")) == (to_fixed("3"), to_fixed("8"))


prices = st.integers(1, 400).map(lambda i: f"{i / 4:.2f}")
sizes = st.integers(0, 50).map(lambda i: f"{i / 10}")


@given(st.lists(st.tuples(st.booleans(), prices, sizes), max_size=60))
@settings(max_examples=200, deadline=None)
def test_matches_a_decimal_reference(ops):
    """Random level updates (kept uncrossed) give the same book as a plain Decimal dict."""
    b = OrderBook("X")
    ref = {"bid": {}, "ask": {}}
    b.apply(rec(1, [("50", "1")], [("51", "1")]), True)
    ref["bid"][Decimal("50")] = Decimal("1")
    ref["ask"][Decimal("51")] = Decimal("1")
    u = 1
    for is_bid, px, sz in ops:
        p = Decimal(px)
        side = "bid" if is_bid else "ask"
        if (is_bid and p > 50) or (not is_bid and p < 51):
            continue  # keep it uncrossed
        u += 1
        levels = [(px, sz)]
        status = b.apply(rec(u, levels if is_bid else [], [] if is_bid else levels), False)
        assert status is BookStatus.APPLIED
        if Decimal(sz) == 0:
            ref[side].pop(p, None)
        else:
            ref[side][p] = Decimal(sz)
    want_b = sorted(ref["bid"].items(), reverse=True)
    want_a = sorted(ref["ask"].items())
    got_b = [(Decimal(p) / FIXED_SCALE, Decimal(s) / FIXED_SCALE) for p, s in b.top_bids(1000)]
    got_a = [(Decimal(p) / FIXED_SCALE, Decimal(s) / FIXED_SCALE) for p, s in b.top_asks(1000)]
    assert got_b == want_b and got_a == want_a
