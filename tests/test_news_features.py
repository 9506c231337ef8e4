"""News features: against an independent brute-force reference, bit for bit, whatever the batching."""
from __future__ import annotations

import math
import pickle
import random
from fractions import Fraction

import pytest

from flows.news_features import MINUTES_SINCE_CAP, NEWS_FEATURES, WINDOWS, NewsWindows

H = 3_600_000


def rec(ts, item_id, mentioned=True, w=1.0, s=0.0, symbol="BTCUSDT"):
    return {"symbol": symbol, "exchange_ts": ts, "item_id": item_id, "mentioned": mentioned,
            "source_weight": w, "sentiment": s}


def reference(history: list[dict], end: int) -> dict[str, float]:
    """Straight from the definitions: every record seen so far (first of each item_id), exact sums."""
    first: dict[str, dict] = {}
    for r in history:
        first.setdefault(r["item_id"], r)
    items = list(first.values())
    out = {}
    for name, width in WINDOWS:
        inside = [r for r in items if end - width <= r["exchange_ts"] < end]
        mine = [r for r in inside if r["mentioned"]]
        ws = [r["source_weight"] * r["sentiment"] for r in mine]
        wsum = sum(Fraction(r["source_weight"]) for r in mine)
        if mine and wsum > 0:
            mean = float(sum(Fraction(x) for x in ws)) / float(wsum)
        else:
            mean = 0.0
        out[f"news_count_{name}"] = float(len(mine))
        out[f"news_sent_mean_{name}"] = mean
        out[f"news_sent_min_{name}"] = min(ws) if ws else 0.0
        out[f"news_sent_max_{name}"] = max(ws) if ws else 0.0
        out[f"news_market_count_{name}"] = float(len(inside))
    before = [r["exchange_ts"] for r in items if r["mentioned"] and r["exchange_ts"] < end]
    out["news_minutes_since_last"] = min(MINUTES_SINCE_CAP, (end - max(before)) / 60_000) if before \
        else MINUTES_SINCE_CAP
    return out


def stream(seed: int, hours: float = 3.0):
    """A symbol's processing order: records (arriving after their published time, some much later,
    some repeated) interleaved with window ends every 1-15 s."""
    rng = random.Random(seed)
    t0 = 1_760_000_000_000
    span = int(hours * H)
    recs = []
    for i in range(int(hours * 150)):
        ts = t0 + rng.randrange(span)
        late = rng.choice([0, 0, 0, rng.randrange(60_000), rng.randrange(20 * 60_000), rng.randrange(2 * H)])
        r = rec(ts, f"id{i}", rng.random() < 0.4, rng.choice([1.0, 1.0, 0.9, 0.3, 0.0]),
                round(rng.uniform(-1, 1), rng.choice([1, 4, 17])))
        recs.append((ts + late, r))
        if rng.random() < 0.05:  # re-delivered
            recs.append((ts + late + rng.randrange(1, 600_000), dict(r)))
    events = [(arr, 0, r) for arr, r in recs]
    end = t0
    while end < t0 + span + H:
        end += rng.choice([1000, 3000, 15_000])
        events.append((end, 1, end))
    events.sort(key=lambda e: (e[0], e[1]))
    return [("q", e[2]) if e[1] else ("a", e[2]) for e in events]


def run_sequential(events) -> list[dict]:
    nw, out = NewsWindows("BTCUSDT"), []
    for kind, x in events:
        if kind == "a":
            nw.add(x)
        else:
            out.append(nw.values(x))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_the_reference(seed):
    events = stream(seed)
    got = run_sequential(events)
    history, k, checked = [], 0, 0
    for kind, x in events:
        if kind == "a":
            history.append(x)
        else:
            if k % 7 == 0 or got[k]["news_count_15s"] > 0:  # every 7th window and every non-empty 15 s one
                assert got[k] == reference(history, x), f"window end {x}"
                checked += 1
            k += 1
    assert checked > 500
    # the stream exercised every feature: non-trivial values appear
    assert any(v["news_count_15s"] > 0 for v in got) and any(v["news_sent_min_1h"] < 0 for v in got)
    assert any(0 < v["news_minutes_since_last"] < 1 for v in got)


@pytest.mark.parametrize("seed", [4, 5])
def test_same_values_whatever_the_batches(seed):
    """Records between two window ends may come one by one, in batches of any size, shuffled inside a
    batch, or across a pickle round trip (a recovery snapshot): the values are bit-identical."""
    events = stream(seed, hours=2.0)
    want = run_sequential(events)
    rng = random.Random(seed)
    nw, got, batch = NewsWindows("BTCUSDT"), [], []
    for kind, x in events:
        if kind == "a":
            batch.append(x)
            if rng.random() < 0.3:  # a batch boundary that is not a window end
                rng.shuffle(batch)
                nw.add_many(batch)
                batch = []
            continue
        rng.shuffle(batch)
        nw.add_many(batch)
        batch = []
        if rng.random() < 0.05:
            nw = pickle.loads(pickle.dumps(nw))
        got.append(nw.values(x))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        assert all(math.copysign(1, a[k]) == math.copysign(1, b[k]) and a[k] == b[k] for k in a)
        assert [x.hex() for x in a.values()] == [x.hex() for x in b.values()]


def test_state_is_bounded_to_the_longest_window():
    events = stream(6, hours=6.0)
    nw = NewsWindows()
    last_end = None
    for kind, x in events:
        if kind == "a":
            nw.add(x)
        else:
            nw.values(x)
            last_end = x
    assert all(ts >= last_end - H for ts, *_ in nw.items)
    assert len(nw.ids) == len(nw.items) < 200
    assert nw.counts["late"] > 0 and nw.counts["duplicate"] > 0
    with pytest.raises(ValueError, match="must not decrease"):
        nw.values(last_end - 1)
    assert nw.values(last_end) == nw.values(last_end)  # the latest end again is fine


def test_definitions_on_a_small_case():
    nw = NewsWindows("ETHUSDT")
    e = 1_760_000_000_000
    assert nw.values(e) == {k: (MINUTES_SINCE_CAP if k == "news_minutes_since_last" else 0.0) for k in NEWS_FEATURES}
    nw.add(rec(e + 1_000, "a", True, 1.0, 0.8, "ETHUSDT"))
    nw.add(rec(e + 2_000, "b", True, 0.3, -0.5, "ETHUSDT"))  # low-trust source
    nw.add(rec(e + 3_000, "c", False, 1.0, 0.9, "ETHUSDT"))  # names another asset
    nw.add(rec(e + 10_000, "d", True, 1.0, 0.1, "ETHUSDT"))  # at the window end: the next window's
    nw.add(rec(e + 2_000, "b", True, 0.3, -0.5, "ETHUSDT"))  # re-delivered
    v = nw.values(e + 10_000)
    assert v["news_count_15s"] == 2.0 and v["news_market_count_15s"] == 3.0
    assert v["news_sent_mean_15s"] == math.fsum([0.8, 0.3 * -0.5]) / 1.3
    assert v["news_sent_min_15s"] == 0.3 * -0.5 and v["news_sent_max_15s"] == 0.8
    assert v["news_minutes_since_last"] == 8_000 / 60_000
    v = nw.values(e + 16_000)  # [e+1s, e+16s): "a" is exactly at the start, still in
    assert v["news_count_15s"] == 3.0 and v["news_minutes_since_last"] == 6_000 / 60_000
    v = nw.values(e + 16_001)
    assert v["news_count_15s"] == 2.0 and v["news_count_1m"] == 3.0
    far = nw.values(e + 10_000 + 30 * H)
    assert far["news_count_1h"] == 0.0 and far["news_minutes_since_last"] == MINUTES_SINCE_CAP
    assert nw.counts == {"added": 4, "duplicate": 1, "invalid": 0, "late": 0, "overflow": 0}
    assert len(nw) == 0  # everything aged out


def test_only_trusted_weight_zero_gives_neutral_mean():
    nw = NewsWindows()
    nw.add(rec(1_000, "x", True, 0.0, -0.9))
    v = nw.values(2_000)
    assert v["news_count_15s"] == 1.0 and v["news_sent_mean_15s"] == 0.0 and v["news_sent_min_15s"] == 0.0


@pytest.mark.parametrize("bad", [
    {"exchange_ts": 1, "item_id": "x", "mentioned": True, "source_weight": 1.0},  # no sentiment
    rec(1, "x", s=float("nan")), rec(1, "x", s=1.5), rec(1, "x", w=-0.1), rec(1, "x", w=float("inf")),
    rec(1.5, "x"), rec(1, ""), {**rec(1, "x"), "mentioned": 1}, rec(1, "x", symbol="LTCUSDT"), "not a dict",
])
def test_invalid_records_are_refused_and_counted(bad):
    nw = NewsWindows("BTCUSDT")
    assert nw.add(bad) is False and nw.counts["invalid"] == 1 and len(nw) == 0


def test_feature_names():
    names = list(NEWS_FEATURES)
    assert all(n.startswith("news_") for n in names) and len(names) == 21
    assert {"news_count_1m", "news_sent_mean_15m", "news_minutes_since_last", "news_market_count_1h",
            "news_sent_min_15s", "news_sent_max_1h"} <= set(names)
    assert list(NewsWindows().values(0)) == names  # the canonical order
