"""The feature engine under unlucky input, each test a bug found in a review: a live registry reload
on an unchanged book, an index price of 0, side feeds (mempool, news) moving the market clock or the
venue, a second stale-book episode without a resync request, book/trade windows not yet covered by
the stream or holding no event at all (an outage is not "zero activity"), ticker values outliving
the ticker stream, a liquidity band wider than the visible book.

Only public entry points are used: ``SymbolEngine`` / ``new_engine`` (process, flush, reload),
``load_registry`` and the synthetic stream of the engine tests.
"""
from __future__ import annotations

import copy
from pathlib import Path

from flows.book import from_fixed
from flows.engine import new_engine
from flows.registry import load_registry
from tests.synth import T0, SynthStream


def features(out, cadence=None):
    return [r for k, r in out if k == "features" and (cadence is None or r["cadence"] == cadence)]


def controls(out):
    return [r for k, r in out if k == "control"]


def reseq(events):
    return [(name, dict(rec, gw_seq=i)) for i, (name, rec) in enumerate(events)]


def run(events):
    eng = new_engine("BTCUSDT")
    out = eng.process(events)
    out += eng.flush()
    return out, eng


def test_registry_reload_with_a_new_density_band_on_an_unchanged_book(tmp_path):
    """After ``reload`` (done live by flows/dataflow.py when features.yaml changes), ``_snap`` reuses
    the last BookSnap when the book version did not change; that snap only holds the density bands
    (and levels) of the old registry, so a new ``liquidity_density`` band raises KeyError inside the
    dataflow step (a quiet symbol, or any second without a book message)."""
    s = SynthStream(seed=2)
    s.run(3)
    for _ in range(2):  # a quiet second: the tile closing at T0+4 s snapshots the current book
        s.ts += 500
        s.heartbeat()
    eng = new_engine("BTCUSDT")
    eng.process(s.out)
    eng.flush()
    reg = tmp_path / "r.yaml"
    reg.write_text("features:\n"
                   "  - {name: mid_price, kind: mid, inputs: [book]}\n"
                   "  - {name: liq_50bps, kind: liquidity_density, inputs: [book], params: {bps: 50}}\n"
                   "  - {name: depth_bid_top20, kind: depth, inputs: [book], params: {side: bid, levels: 20}}\n")
    eng.reload(load_registry(reg))
    n = len(s.out)
    for _ in range(3):  # 1.5 s of heartbeats only: no book change, tiles close
        s.ts += 500
        s.heartbeat()
    out = eng.process(s.out[n:])  # was KeyError: 50
    vec = features(out, "s1")
    # the synthetic book (50 levels of 0.1 at 65000) spans < 1 bps: the new band is a null with its
    # reason, computed for the new registry (not a KeyError, not a value of the old registry's bands)
    assert vec and vec[-1]["values"]["liq_50bps"] is None
    assert "does not reach 50 bps" in vec[-1]["nulls"]["liq_50bps"]
    assert vec[-1]["values"]["depth_bid_top20"] is not None  # the synth book has 50 levels


def test_stale_book_requests_a_resync_again_after_recovering_by_deltas():
    """``stale_since`` is cleared only by a snapshot. When the book resumes with deltas (quiet
    market, or the resync snapshot never came: REST blocked), every later stale episode is silent:
    no resync request, no 'order-book stale' log."""
    s = SynthStream(seed=5)
    s.run(10)

    def quiet(seconds):
        for _ in range(seconds * 4):
            s.ts += 250
            s.heartbeat()

    quiet(45)  # stale #1
    s.run(10)  # deltas resume, u continues: the book is valid and fresh again, no snapshot
    quiet(45)  # stale #2
    out, _ = run(s.out)
    stale_vecs = [r for r in features(out, "s1") if "stale" in (r["nulls"].get("mid_price") or "")]
    assert stale_vecs[-1]["window_end"] > stale_vecs[0]["window_end"] + 40_000  # two episodes
    ctl = [c for c in controls(out) if "stale" in c["reason"]]
    assert len(ctl) == 2, f"expected a resync per stale episode, got {len(ctl)}"


def _mempool(ts: int, recv_ts: int) -> dict:
    return {"symbol": "BTCUSDT", "venue": "mempool.space", "exchange_ts": ts, "recv_ts": recv_ts, "chain": "BTC",
            "tx_count": 1000, "vsize": 10, "total_fee": 0.1, "fee_fastest": 5.0, "fee_half_hour": 4.0,
            "fee_hour": 3.0, "fee_economy": 2.0, "fee_minimum": 1.0, "fee_histogram": [], "projected_blocks": 2,
            "next_block_median_fee": 3.0, "pending_value": None, "large_transfers": None}


def _with_mempool_ahead(events, second_end: int, ahead_ms: int):
    """Insert a MempoolStats stamped ``second_end`` (receive time, or an Alchemy per-second aggregate
    stamped (second+1)*1000) where the market stream is still ``ahead_ms`` before it in exchange time:
    the local clock leads Bybit's push time by the feed latency."""
    events = copy.deepcopy(events)
    i = next(k for k, (n, r) in enumerate(events) if r["exchange_ts"] >= second_end - ahead_ms)
    events.insert(i, ("MempoolStats", _mempool(second_end, second_end * 1000)))
    return reseq(events)


MARKET = ("mid_price", "volume_1s", "trade_count_1s", "signed_volume_1s", "orderbook_churn_rate_1s", "depth_bid_top5")


def test_a_mempool_record_does_not_change_market_features():
    """MempoolStats.exchange_ts is the receive time (schema doc) or the end of an aggregated second,
    not Bybit's clock, yet ``_on_event`` advances the symbol's event clock with it. The tile closes
    early: the book deltas and trades of the last ~100 ms of Bybit's second go into the next tile
    (counted late). The Sequencer already refuses news time as stream time for the same reason."""
    s = SynthStream(seed=6)
    s.run(8)
    base = reseq(copy.deepcopy(s.out))
    end = T0 + 5_000
    with_mp = _with_mempool_ahead(s.out, end, ahead_ms=100)
    a, _ = run(base)
    b, eng = run(with_mp)
    va = {r["window_end"]: r["values"] for r in features(a, "s1")}
    vb = {r["window_end"]: r["values"] for r in features(b, "s1")}
    diff = {(we, k): (va[we][k], vb[we][k]) for we in va for k in MARKET if va[we][k] != vb[we].get(k)}
    assert not diff, f"a mempool record changed market features: {diff}; late_events={eng.counters.get('late_events')}"


def test_vector_venue_is_the_market_venue_not_a_side_feed():
    """``self.venue = rec['venue']`` runs for every event, so a vector closed right after a
    MempoolStats/NewsItem carries venue 'mempool.space' (or the news source)."""
    s = SynthStream(seed=7)
    s.run(8)
    events = copy.deepcopy(s.out)
    end = T0 + 5_000
    i = next(k for k, (n, r) in enumerate(events) if r["exchange_ts"] >= end)
    events.insert(i, ("MempoolStats", _mempool(end - 1, (end - 1) * 1000)))  # just before the tile end
    out, _ = run(reseq(events))
    venues = {r["venue"] for r in features(out)}
    assert venues == {"sim.linear"}, venues


def test_zero_index_price_gives_a_null_not_an_exception():
    """basis_rel divides by float(index_price) unguarded. The parser accepts "0" (a valid decimal;
    only "" becomes None), and nothing in _vector catches exceptions, so one such ticker raises
    ZeroDivisionError in the dataflow step (the reference in tests/reference_features.py maps a
    zero division to a 'not_finite' null)."""
    s = SynthStream(seed=9)
    s.run(2)
    rec = s.ticker()
    rec["index_price"] = "0"
    for _ in range(4):  # the next second closes with that ticker state
        s.ts += 500
        s.heartbeat()
    out, _ = run(s.out)  # ZeroDivisionError today
    vec = features(out, "s1")[-1]
    assert vec["values"]["basis_rel"] is None


def test_windows_over_a_feed_outage_are_null_not_zero_activity():
    """A gateway outage (no events at all, not even heartbeats) of 5 minutes: when the stream
    resumes the engine closes every tile of the gap. The book features of those windows are null
    (stale), but volume/trade_count/signed_volume say 0.0: 'no activity' invented for 'no data'
    (feature_kinds: 'never a stale or invented value'), while the vector's own event_count is 0."""
    s = SynthStream(seed=4)
    s.run(30)
    s.ts += 300_000  # outage
    s.run(5)
    out, _ = run(s.out)
    gap = [r for r in features(out, "m1") if r["event_count"] == 0]
    assert gap, "expected m1 vectors inside the outage"
    r = gap[-1]
    assert r["values"]["mid_price"] is None and "stale" in r["nulls"]["mid_price"]
    bad = {k: r["values"][k] for k in ("volume_1m", "trade_count_1m", "signed_volume_1m") if r["values"][k] is not None}
    assert not bad, f"window with zero events reports {bad}"


def test_five_minute_features_are_null_until_five_minutes_of_tiles_exist():
    """return_std needs 'max(2, half the window's tiles)' returns, but 'the window's tiles' is the
    number of tiles that exist, so at start (and after a >1 h clock jump) volatility_5m is computed
    from 1 minute of data and labelled 5m; vpin_5m / kyle_lambda_5m / roll_measure_5m likewise use
    whatever exists. The offline replay starts warmup_ms early, so these partial values appear
    only online: the model gets a 1-minute statistic under a 5-minute name."""
    s = SynthStream(seed=8)
    s.run(65)
    out, _ = run(s.out)
    first = features(out, "m1")[0]
    assert first["window_end"] == T0 + 60_000
    partial = {k: first["values"][k] for k in ("volatility_5m", "vpin_5m", "kyle_lambda_5m", "roll_measure_5m")
               if first["values"][k] is not None}
    assert not partial, f"5-minute features from 60 s of data: {partial}"


def test_ticker_features_turn_null_when_the_ticker_stops():
    """The book has book_stale_ms and the mempool max_age_s, but funding_rate, basis, basis_rel,
    open_interest and time_to_funding keep the last ticker forever. Here the ticker stream stops
    for 10 minutes while book and trades go on: the values are presented as current."""
    s = SynthStream(seed=3)
    s.run(5)
    last_ticker_ts = max(r["exchange_ts"] for n, r in s.out if n == "Ticker")
    s.ticker = lambda *a, **k: None  # the tickers subscription silently died
    s.run(600)
    out, _ = run(s.out)
    vec = features(out, "m1")[-1]
    assert vec["window_end"] - last_ticker_ts > 590_000
    assert vec["values"]["mid_price"] is not None  # the book is live
    stale = {k: vec["values"][k] for k in ("basis", "basis_rel", "open_interest", "funding_rate")}
    assert all(v is None for v in stale.values()), f"10-minute-old ticker values presented as current: {stale}"


def test_liquidity_density_is_null_when_the_book_does_not_reach_the_band():
    """BTCUSDT orderbook.200 spans ~4-5 bps per side (measured on the real recording in
    data/real/cryptofeed_bybit_v5_20260809: 200 levels, bid span 4.3 bps, ask span 5.1 bps). Here a
    200-level book with tick 0.1 at 65000 spans ~3 bps. "Volume within 10 bps" and "within 25 bps"
    then both equal the whole visible book: an invented value, not the feature. It should be null
    with a reason when the deepest visible level on a side lies inside the band."""
    s = SynthStream(seed=1, levels=200)
    s.run(3)
    out, eng = run(s.out)
    vec = features(out, "s1")[-1]
    book = eng.book
    d10, d25 = vec["values"]["liquidity_density_10bps"], vec["values"]["liquidity_density_25bps"]
    mid = (from_fixed(book.best_bid) + from_fixed(book.best_ask)) / 2
    span_bps = (from_fixed(book.asks.prices[-1]) - mid) / mid * 1e4
    assert span_bps < 10  # the visible book ends inside both bands
    # today: d10 == d25 == everything the feed shows, no null
    assert d10 is None and d25 is None, (
        f"liquidity_density_10bps={d10} == 25bps={d25} while the visible book ends {span_bps:.1f} bps from the mid")


def test_a_reload_applies_the_new_engine_settings(tmp_path):
    """The gw_seq hold and the tiles kept come from the registry's engine: block: a reload must apply
    them to the running engine, not only to engines created after it."""
    from flows.registry import DEFAULT_PATH

    s = SynthStream(seed=9)
    s.run(3)
    eng = new_engine("BTCUSDT")
    eng.process(s.out)
    text = Path(DEFAULT_PATH).read_text()
    text = text.replace("seq_hold_ms: 20000", "seq_hold_ms: 7000").replace("tile_history_s: 301", "tile_history_s: 400")
    reg = tmp_path / "features.yaml"
    reg.write_text(text)
    eng.reload(load_registry(reg))
    assert (eng.seq.hold_ms, eng.tiles.maxlen) == (7000, 400)
