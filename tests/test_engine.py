"""Engine behaviour: gw_seq ordering, batch invariance, snapshot/restore, desync paths and recovery."""
from __future__ import annotations

import copy
import pickle
import random

import pytest

from flows.engine import Sequencer, SymbolEngine, new_engine
from flows.registry import load_registry
from tests.synth import SynthStream


def features(out, cadence=None):
    return [r for k, r in out if k == "features" and (cadence is None or r["cadence"] == cadence)]


def controls(out):
    return [r for k, r in out if k == "control"]


def values_by_key(out):
    return {(r["cadence"], r["window_end"]): (r["values"], r["nulls"]) for r in features(out)}


# --- the sequencer --------------------------------------------------------------------------------
def push_all(seq, items):
    out = []
    for s, ts in items:
        seq.push(s, ts, s, out)
    return out


def test_sequencer_restores_order_within_the_hold():
    items = [(i, 1000 + i) for i in range(200)]
    rng = random.Random(3)
    shuffled = items[:]
    for i in range(0, 200, 10):  # bounded disorder, as the Kafka topic merge produces
        chunk = shuffled[i:i + 10]
        rng.shuffle(chunk)
        shuffled[i:i + 10] = chunk
    seq = Sequencer(hold_events=50, hold_ms=10_000)
    out = push_all(seq, shuffled)
    seq.flush(out)
    assert out == list(range(200)) and seq.holes == 0


def test_sequencer_skips_a_real_hole_after_the_hold_and_drops_late_and_duplicates():
    seq = Sequencer(hold_events=5, hold_ms=10_000)
    out = push_all(seq, [(0, 0), (1, 1), (3, 3), (4, 4), (5, 5), (6, 6)])
    assert out == [0, 1]  # 2 missing: waiting
    push_all(seq, [(7, 7)])  # 5 pending: hole declared
    assert out == [0, 1] and seq.next == 8 and seq.holes == 1 and seq.skipped == 1
    out2 = push_all(seq, [(2, 2), (7, 7), (8, 8)])
    assert out2 == [8] and seq.late == 2


def test_sequencer_hole_by_event_time():
    seq = Sequencer(hold_events=1000, hold_ms=500)
    out = push_all(seq, [(0, 0), (2, 100), (3, 400)])
    assert out == []  # the start is held too: it is the smallest gw_seq within the hold
    out += push_all(seq, [(4, 600)])  # 600 ms past the first pending event
    assert out == [0, 2, 3, 4] and seq.holes == 1 and seq.skipped == 1 and seq.next == 5


# --- determinism ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream():
    return SynthStream(seed=7).run(140)


def run(events, batch_sizes=None, seed=0):
    eng = new_engine("BTCUSDT")
    out = []
    if batch_sizes is None:
        out += eng.process(events)
    else:
        rng = random.Random(seed)
        i = 0
        while i < len(events):
            n = rng.choice(batch_sizes)
            out += eng.process(events[i:i + n])
            i += n
    out += eng.flush()
    return out, eng


def test_outputs_do_not_depend_on_batching_or_bounded_disorder(stream):
    whole, _ = run(stream)
    assert len(features(whole, "m1")) == 2 and len(features(whole, "s1")) > 130
    small, _ = run(stream, [1, 2, 7, 50])
    assert small == whole
    disordered = stream[:]
    rng = random.Random(5)
    for i in range(0, len(disordered), 40):
        chunk = disordered[i:i + 40]
        rng.shuffle(chunk)
        disordered[i:i + 40] = chunk
    shuffled, eng = run(disordered, [13, 100])
    assert shuffled == whole and eng.seq.holes == 0


def test_snapshot_restore_mid_stream_gives_the_same_outputs(stream):
    whole, _ = run(stream)
    eng = new_engine("BTCUSDT")
    half = len(stream) // 2
    out = eng.process(stream[:half])
    eng = pickle.loads(pickle.dumps(eng))  # what Bytewax recovery stores and restores
    out += eng.process(stream[half:])
    out += eng.flush()
    assert out == whole


def test_a_snapshot_freezes_the_engine_and_restores_as_an_engine(stream):
    """Bytewax snapshots with copy.deepcopy, then pickles the copy later: the frozen copy must not
    follow the live engine, and must unpickle as a working SymbolEngine."""
    import copy

    whole, _ = run(stream)
    eng = new_engine("BTCUSDT")
    half = len(stream) // 2
    out = eng.process(stream[:half])
    frozen = copy.deepcopy(eng)
    eng.process(stream[half:half + 500])  # the live engine moves on before the epoch's snapshot is written
    restored = pickle.loads(pickle.dumps(frozen))
    assert isinstance(restored, SymbolEngine) and isinstance(frozen.thaw(), SymbolEngine)
    out += restored.process(stream[half:])
    out += restored.flush()
    assert out == whole


def test_every_value_is_a_float_or_an_explained_null(stream):
    out, _ = run(stream)
    want_hash = load_registry().hash
    for r in features(out):
        for name, v in r["values"].items():
            assert (v is None) == (name in r["nulls"]), name
            assert v is None or isinstance(v, float)
        assert r["registry_hash"] == want_hash


# --- desync paths ---------------------------------------------------------------------------------
def reseq(events):
    """Renumber gw_seq densely after editing a stream (the gateway assigns them on arrival)."""
    out = []
    for i, (name, rec) in enumerate(events):
        rec = dict(rec, gw_seq=i)
        out.append((name, rec))
    return out


def with_edit(seconds, edit):
    s = SynthStream(seed=11)
    s.run(seconds)
    events = copy.deepcopy(s.out)
    return reseq(edit(events, s)), s


def first_delta_after(events, ts):
    return next(i for i, (n, r) in enumerate(events) if n == "OrderBookDelta" and r["exchange_ts"] >= ts)


def test_gap_requests_resync_suppresses_book_features_and_recovers():
    t_gap = SynthStream().ts + 10_000

    def edit(events, s):
        i = first_delta_after(events, t_gap)
        del events[i]  # a missed delta: the next u jumps by 2
        j = first_delta_after(events, t_gap + 5_000)
        snap = dict(events[j][1])
        # the gateway answers the resync with a fresh snapshot (here: rebuilt from the synth's book)
        s2 = SynthStream(seed=11)
        s2.run((events[j][1]["exchange_ts"] - SynthStream().ts) / 1000)
        fresh = s2.book_record(True)
        fresh.update(exchange_ts=snap["exchange_ts"], recv_ts=snap["recv_ts"], update_id=snap["update_id"] - 1)
        events.insert(j, ("OrderBookSnapshot", fresh))
        return events

    events, _ = with_edit(30, edit)
    out, eng = run(events)
    assert eng.counters["book_gap"] == 1 and eng.counters["book_recoveries"] >= 1
    ctl = controls(out)
    assert len(ctl) == 1 and ctl[0]["command"] == "resync" and "gap" in ctl[0]["reason"]
    s1 = features(out, "s1")
    during = [r for r in s1 if t_gap + 1_000 < r["window_end"] <= t_gap + 5_000]
    assert during and all(r["values"]["mid_price"] is None and "gap" in r["nulls"]["mid_price"] for r in during)
    assert all(not r["book_valid"] for r in during)
    after = [r for r in s1 if r["window_end"] > t_gap + 6_000]
    assert after and all(r["values"]["mid_price"] is not None for r in after)


def test_duplicate_delta_is_ignored_without_changing_values():
    def edit(events, s):
        i = first_delta_after(events, SynthStream().ts + 3_000)
        events.insert(i + 1, copy.deepcopy(events[i]))
        return events

    dup, _ = with_edit(20, edit)
    clean, _ = with_edit(20, lambda e, s: e)
    out_dup, eng = run(dup)
    out_clean, _ = run(clean)
    assert eng.counters["book_duplicate"] == 1 and not controls(out_dup)
    a, b = values_by_key(out_dup), values_by_key(out_clean)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_exchange_restart_u1_overwrites_the_book():
    t = SynthStream().ts + 8_000

    def edit(events, s):
        i = first_delta_after(events, t)
        s2 = SynthStream(seed=11)
        s2.run((events[i][1]["exchange_ts"] - SynthStream().ts) / 1000)
        full = s2.book_record(True, u=1)
        full.update(exchange_ts=events[i][1]["exchange_ts"], recv_ts=events[i][1]["recv_ts"])
        events[i] = ("OrderBookDelta", full)
        u = 1
        for k in range(i + 1, len(events)):  # the exchange counts again from 1
            if events[k][0] == "OrderBookDelta":
                u += 1
                events[k] = (events[k][0], dict(events[k][1], update_id=u))
        return events

    events, _ = with_edit(20, edit)
    out, eng = run(events)
    assert eng.counters["book_reset"] == 1 and eng.counters.get("book_gap", 0) == 0 and not controls(out)
    assert all(r["values"]["mid_price"] is not None for r in features(out, "s1"))


def test_crossed_book_takes_the_resync_path():
    t = SynthStream().ts + 5_000

    def edit(events, s):
        i = first_delta_after(events, t)
        rec = dict(events[i][1])
        rec.update(bid_px=["99999.0"], bid_sz=["1"], ask_px=[], ask_sz=[])
        events[i] = ("OrderBookDelta", rec)
        return events

    events, _ = with_edit(15, edit)
    out, eng = run(events)
    assert eng.counters["book_crossed"] == 1
    ctl = controls(out)
    assert ctl and "crossed" in ctl[0]["reason"]
    later = [r for r in features(out, "s1") if r["window_end"] > t + 1_000]
    assert later and all("crossed" in r["nulls"]["mid_price"] for r in later)


def test_stale_book_with_heartbeats():
    """The book stops updating while heartbeats keep the clock going: windows still close and book
    features turn null as stale after book_stale_ms, with one resync request."""
    s = SynthStream(seed=3)
    s.run(10)
    for _ in range(45 * 4):  # 45 s of heartbeats only
        s.ts += 250
        s.heartbeat()
    out, eng = run(s.out)
    s1 = features(out, "s1")
    assert s1[-1]["window_end"] >= s.ts - 1_000  # heartbeats closed the windows
    stale = [r for r in s1 if "stale" in (r["nulls"].get("mid_price") or "")]
    assert stale and stale[0]["window_end"] > 10_000 + SynthStream().ts + 29_000
    assert len(controls(out)) == 1 and "stale" in controls(out)[0]["reason"]


def test_late_events_are_counted_and_kept():
    s = SynthStream(seed=5)
    s.run(5)
    late = s.trade()
    late["exchange_ts"] -= 2_500  # arrives after later events of another channel
    out, eng = run(s.out)
    assert eng.counters["late_events"] == 1


def test_registry_reload_switches_hash(tmp_path):
    s = SynthStream(seed=2)
    s.run(3)
    eng = new_engine("BTCUSDT")
    eng.process(s.out)
    small = tmp_path / "r.yaml"
    small.write_text("features:\n  - {name: mid_price, kind: mid, inputs: [book]}\n")
    reg = load_registry(small)
    eng.reload(reg)
    out = eng.process(SynthStream(seed=2).run(26)[len(s.out):])  # past the 20 s gw_seq hold
    vec = features(out)
    assert vec and all(r["registry_hash"] == reg.hash and set(r["values"]) == {"mid_price"} for r in vec)


def test_bad_trade_values_are_counted_not_fatal():
    s = SynthStream(seed=4)
    s.run(2)
    bad = s.trade()
    bad["size"] = "nan"
    out, eng = run(s.out)
    assert eng.counters["bad_trades"] == 1


def test_engine_from_explicit_registry_object():
    eng = SymbolEngine("ETHUSDT", load_registry())
    assert eng.symbol == "ETHUSDT" and eng.process([]) == []


def test_history_klines_give_history_vectors_and_warm_candle_variates():
    """At start the gateway publishes recent confirmed klines: the engine emits one m1 vector per
    past minute (candle variates only) and its live m1 vectors have full candle history at once."""
    import math

    s = SynthStream(seed=9)
    start = s.ts
    rng = random.Random(1)
    price = 65000.0
    for k in range(70, 0, -1):  # 70 closed minutes before the stream, oldest first
        m = start - k * 60_000
        o = price
        price *= math.exp(rng.gauss(0, 0.001))
        rec = s._base(start)
        rec.update(interval="1", start_ts=m, end_ts=m + 59_999, open=f"{o:.1f}", high=f"{max(o, price) + 5:.1f}",
                   low=f"{min(o, price) - 5:.1f}", close=f"{price:.1f}", volume="12.5", turnover="0", confirm=True)
        s.emit("Kline", rec)
    s.run(65)
    out, eng = run(s.out)
    m1 = features(out, "m1")
    history = [r for r in m1 if r["window_end"] <= start]
    live = [r for r in m1 if r["window_end"] > start]
    assert [r["window_end"] for r in history] == [start - k * 60_000 for k in range(69, -1, -1)]
    assert all(r["history"] for r in history) and not any(r["history"] for r in live)
    assert eng.counters["history_vectors"] == 70
    last = history[-1]
    assert last["values"]["rv_60m"] is not None and last["values"]["close"] == float(f"{price:.1f}")
    assert last["values"]["mid_price"] is None and "history minute" in last["nulls"]["mid_price"]
    assert history[0]["values"]["rv_15m"] is None  # not enough candles yet for the oldest minute
    assert live and live[0]["values"]["rv_60m"] is not None  # warm from the first live minute
    # re-published history (a reconnect) emits nothing new
    again = eng.process([("Kline", dict(s.out[5][1], gw_seq=s.seq))])
    assert not features(again)


def test_old_dated_news_first_does_not_start_the_stream_past_earlier_events():
    """A NewsItem's exchange_ts is its *published* time (minutes old): the online source's event-time
    merge hands such items over before earlier gw_seqs (the start-up history klines, stamped now).
    Their time must not count toward the sequencer's hold, or the stream starts after them and the
    earlier events are dropped as late (found by the soak: history lost, no forecast, parity broken)."""
    import math

    s = SynthStream(seed=11)
    start = s.ts
    price = 65000.0
    for k in range(5, 0, -1):  # the gateway's start-up history klines, published now
        m = start - k * 60_000
        rec = s._base(start)
        rec.update(interval="1", start_ts=m, end_ts=m + 59_999, open=f"{price:.1f}", high=f"{price + 5:.1f}",
                   low=f"{price - 5:.1f}", close=f"{price * math.exp(0.001 * k):.1f}", volume="1.5", turnover="0",
                   confirm=True)
        s.emit("Kline", rec)
    news = []
    for i, age_min in enumerate((20, 10)):
        rec = s._base(start - age_min * 60_000)
        rec.update(venue="sim.news.x", item_id=f"n{i}", source="x", url=f"https://x.test/{i}", title=f"t{i}",
                   summary=None, published_ts=rec["exchange_ts"], assets=["BTC"], mentioned=True, sentiment=0.5,
                   source_weight=1.0)
        news.append(("NewsItem", s.emit("NewsItem", rec)))
    s.run(20)
    in_order, _ = run(s.out)
    eng = new_engine("BTCUSDT")
    merged = eng.process(news)  # what the event-time merge hands over first
    merged += eng.process([e for e in s.out if e[0] != "NewsItem"])
    merged += eng.flush()
    assert eng.seq.late == 0 and eng.seq.holes == 0
    assert eng.counters.get("history_vectors") == 5
    assert values_by_key(merged) == values_by_key(in_order)


def test_sequencer_items_without_event_time_do_not_move_the_hold():
    seq = Sequencer(hold_events=1000, hold_ms=500)
    out = push_all(seq, [(0, 10_000), (1, 10_600)])  # the start: released once the hold is spanned
    out += push_all(seq, [(2, None)])  # no event time of the stream (an old-dated news item)
    assert out == [0, 1, 2]
    out += push_all(seq, [(4, 10_700)])  # 3 missing: 100 ms past the last event *time* (10_600): wait
    assert out == [0, 1, 2] and seq.holes == 0
    out += push_all(seq, [(3, 10_650)])
    assert out == [0, 1, 2, 3, 4] and seq.holes == 0 and seq.late == 0


def test_sequencer_hold_does_not_count_an_outage_gap():
    """After a gateway restart the stream resumes seconds later in event time, and its first
    events may reach the engine from another topic before the start-up history klines (lower
    gw_seq). The hold must run from the first event that waits, not from the last event before the
    outage, or those klines are declared a hole at once and dropped (found by the soak)."""
    seq = Sequencer(hold_events=1000, hold_ms=5_000)
    out = push_all(seq, [(i, 1_000 + 100 * i) for i in range(10)])  # 0..9 up to ts 1_900, then ~5.5 s quiet
    out += push_all(seq, [(20, 7_400), (21, 7_500)])  # live events of the new gateway first
    assert out == list(range(10)) and seq.holes == 0  # 10..19 are waited for
    out += push_all(seq, [(i, 7_000) for i in range(10, 20)])  # its history klines (stamped at its start)
    assert out == list(range(22)) and seq.holes == 0 and seq.late == 0
    out += push_all(seq, [(23, 7_600), (24, 12_700)])  # a real hole (22) is still skipped after the hold
    assert out == list(range(22)) + [23, 24] and seq.holes == 1 and seq.skipped == 1


def test_sequencer_snapshot_from_before_wait_ts_restores():
    import pickle

    seq = Sequencer(hold_events=10, hold_ms=500)
    push_all(seq, [(0, 0), (1, 600)])
    state = seq.__getstate__()
    old = (state[0], {k: v for k, v in state[1].items() if k != "wait_ts"})  # as pickled before
    restored = Sequencer.__new__(Sequencer)
    restored.__setstate__(old)
    assert push_all(restored, [(2, 700)]) == [2] and pickle.loads(pickle.dumps(restored)).next == 3
