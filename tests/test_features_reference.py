"""Every feature of the engine against the independent reference (tests/reference_features.py).

Three data sets, each symbol's events fed to ``flows.engine.new_engine(symbol)`` in one batch plus a
flush, and to the reference; every (symbol, cadence, window_end, feature) is compared: values with
``|engine - ref| <= 1e-9 * |ref| + atol`` (atol: ~1000 roundoffs of the terms that cancel, see the
reference's module doc; Roll's measure is compared as (roll/2)^2 = -cov), nulls by reason category.
The vectors' keys, event counts, book validity and closing gw_seq are compared too.

* the real Bybit recording (``shared_real``; ~45 s, 4 symbols);
* ``tests/fixtures/engine/local_exchange.jsonl.xz``: 305 s of the local exchange's messages for 2
  symbols, with a lost delta (gap -> resync snapshot) and a duplicate delta;
* a seeded synthetic run of 75 minutes (Bybit messages through the gateway parser, plus mempool,
  news and heartbeat records) for what needs an hour of history: the candle variates, the m1
  z-scores, the mempool and news features, a stale book, a crossed book, a kline/trade outage.

Engine bugs this suite found (a z-score of a null input, a mempool window one second short, candle
flat-fill limited to the 62-minute buffer) are fixed; their minimal inputs stay below as regression
tests, and the data-set comparisons include those cases again (KNOWN_BUGS is empty; add a named
predicate there to exclude and count the cases of a newly found bug while it is being fixed).
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.recorded import by_symbol, recorded_events
from tests.reference_features import Null, Reference, load_specs

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "engine" / "local_exchange.jsonl.xz"
RECORDING = Path("cryptofeed_bybit_v5_20260809") / "linear_ws_raw.jsonl"
SPECS = {s.name: s for s in load_specs()[0]}

# the engine's null reasons -> the reference's categories
REASONS = [
    (r"^book invalid: no snapshot yet$", "book_invalid:no_snapshot"),
    (r"^book invalid: gap: ", "book_invalid:gap"),
    (r"^book invalid: crossed: ", "book_invalid:crossed"),
    (r"^book stale: ", "book_stale"),
    (r"^book has an empty side$", "book_empty_side"),
    (r"^book has (\d+ (bid|ask) levels < \d+|fewer than \d+ levels)$", "book_levels"),
    (r"^no trades in window$", "no_trades"),
    (r"^no sell volume in window$", "no_sell_volume"),
    (r"^mid unavailable at window start or end$", "mid_unavailable"),
    (r"^only \d+ valid 1 s returns$", "few_returns"),
    (r"^only \d+ seconds with a valid mid change$", "few_mid_changes"),
    (r"^no variation in signed volume$", "no_signed_volume_variation"),
    (r"^only \d+ consecutive trade price changes$", "few_price_changes"),
    (r"^no \w+ from the ticker yet$", "no_ticker_field"),
    (r"^ticker stale: no update for \d+ s$", "ticker_stale"),
    (r"^no mempool data for this symbol$", "no_mempool"),
    (r"^mempool data stale ", "mempool_stale"),
    (r"^mempool source gives no \w+$", "mempool_field_missing"),
    (r"^not enough 1-minute candle history$", "candle_history"),
    (r"^no 1-minute candle yet$", "no_candle"),
    (r"^warming up: \d+/\d+ values of \w+$", "warming_up"),
    (r"^\w+ did not vary over the last \d+ values$", "no_variation"),
    (r"^\w+ is null in this window$", "input_null"),
    (r"^not finite ", "not_finite"),
    (r"^not computable: ", "not_finite"),  # an arithmetic error (the reference's ZeroDivisionError)
    (r"^index price is 0$", "not_finite"),
    (r"^the book \(\d+x\d+ levels\) does not reach \d+ bps on the (bid|ask) side$", "density_beyond_book"),
    (r"^window not full: \d+ of \d+ s ", "window_not_full"),
    (r"^no events in the window ", "no_events"),
]


def category(reason: str) -> str:
    for pattern, cat in REASONS:
        if re.search(pattern, reason):
            return cat
    return f"unknown reason: {reason}"


# --- known engine bugs: (id, predicate(ref, vector, feature name)) -----------------------------------
def _zscore_of_null_input(ref, rv, name):
    return SPECS[name].kind == "zscore" and rv.values[name].value == "input_null"


def _candle_lookback_gap(ref, rv, name):
    spec = SPECS[name]
    return (spec.kind == "candle" and spec.params["variate"] in ("return_60m", "rv_60m", "volume_z_60m")
            and ref.candle_lookback_gap(rv.window_end))


# bug id -> predicate(ref, vector, feature name) selecting its cases; all found so far are fixed
KNOWN_BUGS: dict = {}
FIXED_BUGS = {"zscore_of_null_input": _zscore_of_null_input, "candle_lookback_gap": _candle_lookback_gap}


# --- running and comparing --------------------------------------------------------------------------
def run_engine(symbol: str, events):
    from flows.engine import new_engine

    eng = new_engine(symbol)
    out = eng.process(copy.deepcopy(events)) + eng.flush()
    feats = {}
    for kind, rec in out:
        if kind == "features":
            key = (rec["cadence"], rec["window_end"])
            assert key not in feats, f"window emitted twice: {key}"
            feats[key] = rec
    return feats, eng


class Stats:
    def __init__(self):
        self.vectors = self.values = self.nulls = 0
        self.excluded: Counter = Counter()
        self.nonnull_features: set[str] = set()
        self.null_categories: Counter = Counter()
        self.worst: dict[str, float] = {}
        self.failures: list[str] = []

    def add(self, other: Stats) -> Stats:
        self.vectors += other.vectors
        self.values += other.values
        self.nulls += other.nulls
        self.excluded += other.excluded
        self.nonnull_features |= other.nonnull_features
        self.null_categories += other.null_categories
        for k, v in other.worst.items():
            self.worst[k] = max(self.worst.get(k, 0.0), v)
        self.failures += other.failures
        return self

    def line(self, label: str) -> str:
        ex = ", ".join(f"{k}: {v}" for k, v in sorted(self.excluded.items())) or "none"
        return (f"{label}: {self.vectors} vectors, {self.values} values and {self.nulls} nulls compared "
                f"(known-bug cases excluded: {ex})")


def _close(kind: str, e: float, r: float, atol: float) -> tuple[bool, float]:
    """Within ``1e-9 |ref| + atol``; also the share of that tolerance the error uses."""
    if kind == "roll":  # compared as (roll / 2)^2 = max(-cov, 0), where the atol is expressed
        e, r = (e / 2) ** 2, (r / 2) ** 2
    err, tol = abs(e - r), 1e-9 * abs(r) + atol
    return err <= tol, (err / tol if tol > 0 else (0.0 if err == 0 else math.inf))


_RUNS: dict = {}


def _run(label: str, symbol: str, events):
    """The engine's vectors and the reference's for a data set's symbol (computed once per session)."""
    key = (label, symbol)
    if key not in _RUNS:
        feats, _ = run_engine(symbol, events)
        ref = Reference(symbol, copy.deepcopy(events))
        _RUNS[key] = (feats, ref, ref.vectors())
    return _RUNS[key]


def compare(label: str, symbol: str, events, *, only_bugs: tuple[str, ...] = (), mutate=None) -> Stats:
    """Engine vs reference for one symbol; with ``only_bugs`` only the cases of those known bugs;
    ``mutate(feats)`` alters a copy of the engine's vectors first (to show the comparison can fail)."""
    feats, ref, rvs = _run(label, symbol, events)
    if mutate is not None:
        feats = copy.deepcopy(feats)
        mutate(feats)
    st = Stats()
    keys = {(v.cadence, v.window_end) for v in rvs}
    if set(feats) != keys:
        st.failures.append(f"{symbol}: windows differ: engine only {sorted(set(feats) - keys)[:5]}, "
                           f"reference only {sorted(keys - set(feats))[:5]}")
    for rv in rvs:
        e = feats.get((rv.cadence, rv.window_end))
        if e is None:
            continue
        st.vectors += 1
        where = f"{symbol} {rv.cadence} {rv.window_end}"
        if not only_bugs:
            if set(e["values"]) != set(rv.values):
                st.failures.append(f"{where}: feature names differ: {set(e['values']) ^ set(rv.values)}")
            for meta in ("event_count", "book_valid", "last_gw_seq"):
                if e[meta] != getattr(rv, meta):
                    st.failures.append(f"{where}: {meta} engine {e[meta]} reference {getattr(rv, meta)}")
            if e["symbol"] != symbol:
                st.failures.append(f"{where}: symbol {e['symbol']}")
        for name, rval in rv.values.items():
            bugs = FIXED_BUGS if only_bugs else KNOWN_BUGS  # only_bugs: re-check a fixed bug's cases
            bug = next((b for b, pred in bugs.items() if pred(ref, rv, name)), None)
            if only_bugs and bug not in only_bugs:
                continue
            if bug and not only_bugs:
                st.excluded[bug] += 1
                continue
            ev, reason = e["values"].get(name), e["nulls"].get(name)
            if isinstance(rval.value, Null):
                st.nulls += 1
                st.null_categories[str(rval.value)] += 1
                got = category(reason) if reason is not None else f"value {ev!r}"
                if ev is not None or got != rval.value:
                    st.failures.append(f"{where} {name}: reference null ({rval.value}), engine {got}")
                continue
            st.values += 1
            st.nonnull_features.add(name)
            if ev is None:
                st.failures.append(f"{where} {name}: reference {rval.value!r}, engine null ({reason})")
                continue
            ok, rel = _close(SPECS[name].kind, ev, rval.value, rval.atol)
            st.worst[name] = max(st.worst.get(name, 0.0), rel)
            if not ok:
                st.failures.append(f"{where} {name}: engine {ev!r} reference {rval.value!r} "
                                   f"(diff {ev - rval.value:.3g}, atol {rval.atol:.3g})")
    return st


def _check(st: Stats, label: str) -> None:
    print(st.line(label))
    worst = sorted(st.worst.items(), key=lambda kv: -kv[1])[:3]
    print("  largest share of the tolerance used: " + ", ".join(f"{k} {v:.2g}" for k, v in worst))
    assert not st.failures, f"{len(st.failures)} disagreements, first ones:\n" + "\n".join(st.failures[:25])


# --- data set 1: the real recording -------------------------------------------------------------------
@pytest.mark.shared_data
def test_every_feature_matches_the_reference_on_the_real_recording(shared_real):
    events = by_symbol(recorded_events(shared_real / RECORDING))
    assert sorted(events) == ["BTCUSDT", "DOGEUSDT", "ETHUSDT", "SOLUSDT"]
    total = Stats()
    for sym, evs in sorted(events.items()):
        total.add(compare("real", sym, evs))
    _check(total, "real recording")
    assert total.vectors >= 240 and total.values >= 6_500
    # the recording starts before the first book snapshot: the book nulls are exercised
    assert total.null_categories["book_invalid:no_snapshot"] > 0


# --- data set 2: the local exchange -------------------------------------------------------------------
_FIXTURE: dict = {}


def _fixture_events():
    if not _FIXTURE:
        _FIXTURE.update(by_symbol(recorded_events(FIXTURE)))
    return copy.deepcopy(_FIXTURE)


def test_every_feature_matches_the_reference_on_local_exchange_data():
    events = _fixture_events()
    assert sorted(events) == ["LTCUSDT", "POLUSDT"]
    span = max(r["exchange_ts"] for _, r in events["LTCUSDT"]) - min(r["exchange_ts"] for _, r in events["LTCUSDT"])
    assert span > 300_000
    total = Stats()
    for sym, evs in sorted(events.items()):
        total.add(compare("local", sym, evs))
    _check(total, "local exchange")
    assert total.vectors >= 850 and total.values >= 25_000
    assert total.null_categories["book_invalid:gap"] > 0  # the lost POLUSDT delta
    # the 5-minute features are defined once the fixture spans 5 minutes
    for name in ("volatility_5m", "vpin_5m", "kyle_lambda_5m", "roll_measure_5m"):
        assert name in total.nonnull_features


def test_the_comparison_catches_small_disagreements():
    """A relative error of 1e-7 in one value of a feature, a value turned null or a null with another
    reason each make exactly one failure naming the feature."""
    names = ("vwap_1s", "mid_price", "spread_rel", "depth_bid_top5", "liquidity_density_25bps", "vpin_5m",
             "roll_measure_1m", "kyle_lambda_5m", "volatility_5m", "orderbook_churn_rate_15s",
             "time_to_funding", "spread_rel_z60")
    done: list[str] = []

    def mutate(feats):
        for name in names:
            key = next(k for k in sorted(feats) if abs(feats[k]["values"].get(name) or 0.0) > 1e-12
                       and (not name.endswith("_z60") or abs(feats[k]["values"][name]) > 0.5))
            feats[key]["values"][name] *= 1 + 1e-7
            done.append(name)
        key = next(k for k in sorted(feats) if feats[k]["values"].get("open_interest") is not None)
        feats[key]["values"]["open_interest"] = None
        feats[key]["nulls"]["open_interest"] = "no open_interest from the ticker yet"
        key = next(k for k in sorted(feats) if feats[k]["nulls"].get("vwap_1s") == "no trades in window")
        feats[key]["nulls"]["vwap_1s"] = "no sell volume in window"
        done.extend(["open_interest", "vwap_1s"])

    st = compare("local", "POLUSDT", _fixture_events()["POLUSDT"], mutate=mutate)
    assert len(st.failures) == len(done), "\n".join(st.failures)
    assert sorted(f.split()[3].rstrip(":") for f in st.failures) == sorted(done)


def test_fixed_bug_cases_in_local_exchange_data():
    st = compare("local", "POLUSDT", _fixture_events()["POLUSDT"], only_bugs=("zscore_of_null_input",))
    assert st.nulls > 0
    assert not st.failures, "\n".join(st.failures[:5])


# --- data set 3: a seeded synthetic 75-minute run -----------------------------------------------------
class SyntheticRun:
    """Bybit v5 messages of one symbol (book 200, trades, tickers, klines) and the gateway's other
    records (mempool, news, heartbeats), in arrival order. Deterministic for a seed."""

    def __init__(self, seed: int = 7, symbol: str = "BTCUSDT", start: int = 1_786_310_376_544):
        self.rng = random.Random(seed)
        self.sym = symbol
        self.t = start
        self.start = start
        self.items: list[tuple[str, object]] = []  # ("ws", message) or ("rec", (name, record))
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.u = 4_000_000
        self.seq = 9_000_000
        self.trade_n = 0
        self.minute_trades: dict[int, list[tuple[int, int]]] = {}
        self.last_close: int | None = None
        self.oi = 5_000_000
        self.kline_due: int | None = None
        self.min_levels = 14  # bid levels kept (besides the wall)
        self.walls: set[int] = set()
        self.mempool_ts = 0

    @staticmethod
    def px(ticks: int) -> str:
        return f"{ticks // 10}.{ticks % 10}"

    @staticmethod
    def qty(lots: int) -> str:
        return f"{lots // 1000}.{lots % 1000:03d}"

    def ws(self, msg: dict) -> None:
        self.items.append(("ws", msg))

    def rec(self, name: str, rec: dict) -> None:
        base = {"symbol": self.sym, "exchange_ts": rec.pop("ts", self.t), "recv_ts": self.t * 1000 + 800, "gw_seq": -1}
        self.items.append(("rec", (name, {**base, **rec})))

    # book
    def book_msg(self, kind: str, b: dict, a: dict, u: int) -> None:
        self.seq += 1
        self.ws({"topic": f"orderbook.200.{self.sym}", "type": kind, "ts": self.t,
                 "data": {"s": self.sym, "b": [[self.px(p), self.qty(q)] for p, q in sorted(b.items(), reverse=True)],
                          "a": [[self.px(p), self.qty(q)] for p, q in sorted(a.items())], "u": u, "seq": self.seq},
                 "cts": self.t - 1})

    def snapshot(self, mid: int | None = None) -> None:
        if mid is not None or not self.bids:
            mid = mid or 650_000
            self.bids = {mid - 1 - i - (i > 8) * self.rng.randint(0, 2): self.rng.randint(1, 4000) for i in range(24)}
            self.asks = {mid + i + (i > 8) * self.rng.randint(0, 2): self.rng.randint(1, 4000) for i in range(24)}
            # a resting wall 200 USD (~30 bps) out on each side: the visible book then reaches the
            # registry's liquidity-density bands (10 and 25 bps), as a deep real book does
            self.walls = {mid - 2000, mid + 2000}
            self.bids[mid - 2000] = self.asks[mid + 2000] = 50_000
        self.u += 1
        self.book_msg("snapshot", self.bids, self.asks, self.u)

    def delta(self, skip_u: bool = False) -> None:
        rng = self.rng
        cb, ca = {}, {}
        bb, ba = max(self.bids), min(self.asks)
        r = rng.random()
        if r < 0.2 and len(self.asks) > 12 and len(self.bids) > 7:  # the price ticks up
            del self.asks[ba]
            ca[ba] = 0
            if ba > bb + 1 and rng.random() < 0.7:
                self.bids[bb + 1] = cb[bb + 1] = rng.randint(1, 900)
        elif r < 0.4 and len(self.bids) > 12 and len(self.asks) > 7:  # ... or down
            del self.bids[bb]
            cb[bb] = 0
            if bb < ba - 1 and rng.random() < 0.7:
                self.asks[ba - 1] = ca[ba - 1] = rng.randint(1, 900)
        for _ in range(rng.randint(1, 3)):
            side, ch = (self.bids, cb) if rng.random() < 0.5 else (self.asks, ca)
            p = sorted(side, reverse=side is self.bids)[rng.randint(0, min(len(side), 11) - 1)]
            side[p] = ch[p] = rng.randint(1, 4000)
        for side, ch, sign in ((self.bids, cb, -1), (self.asks, ca, 1)):
            while len(side) < (self.min_levels if side is self.bids else 14) + 1:  # refill the far end
                inner = [q for q in side if q not in self.walls]
                p = (min(inner) if sign < 0 else max(inner)) + sign * rng.randint(1, 3)
                side[p] = ch[p] = rng.randint(1, 4000)
        self.u += 2 if skip_u else 1
        self.book_msg("delta", cb, ca, self.u)

    def crossed_delta(self) -> None:
        ba = min(self.asks)
        self.u += 1
        self.book_msg("delta", {ba + 2: 500}, {}, self.u)

    # trades and klines
    def trades(self) -> None:
        rng = self.rng
        items = []
        for _ in range(rng.randint(1, 3)):
            buy = rng.random() < 0.5
            p = (min(self.asks) + rng.choice((0, 0, 0, 1))) if buy else (max(self.bids) - rng.choice((0, 0, 0, 1)))
            q = rng.randint(1, 600)
            T = self.t - rng.randint(0, 4)
            self.trade_n += 1
            self.seq += 1
            items.append({"T": T, "s": self.sym, "S": "Buy" if buy else "Sell", "v": self.qty(q), "p": self.px(p),
                          "L": "PlusTick" if buy else "MinusTick", "i": f"syn-{self.trade_n}", "BT": False,
                          "RPI": False, "seq": self.seq})
            self.minute_trades.setdefault(T - T % 60_000, []).append((p, q))
        self.ws({"topic": f"publicTrade.{self.sym}", "type": "snapshot", "ts": self.t, "data": items})

    def kline_item(self, start: int, confirm: bool) -> dict:
        tr = self.minute_trades.get(start, [])
        o = self.last_close if self.last_close is not None else (tr[0][0] if tr else max(self.bids))
        c = tr[-1][0] if tr else o
        hi, lo = max([o] + [p for p, _ in tr]), min([o] + [p for p, _ in tr])
        vol = sum(q for _, q in tr)
        if confirm:
            self.last_close = c
        return {"start": start, "end": start + 59_999, "interval": "1", "open": self.px(o), "close": self.px(c),
                "high": self.px(hi), "low": self.px(lo), "volume": self.qty(vol),
                "turnover": str(sum(p * q for p, q in tr) / 10_000), "confirm": confirm, "timestamp": self.t}

    def klines(self, minute: int, closing: bool) -> None:
        data = ([self.kline_item(minute - 60_000, True)] if closing else []) + [self.kline_item(minute, False)]
        self.ws({"topic": f"kline.1.{self.sym}", "data": data, "ts": self.t, "type": "snapshot"})

    # ticker
    def ticker(self, snapshot: bool = False) -> None:
        rng = self.rng
        bb, ba = max(self.bids), min(self.asks)
        mark = (bb + ba) // 2 + rng.randint(-3, 3)
        index = (bb + ba) // 2 + rng.randint(-6, 6)
        self.oi += rng.randint(-500, 500)
        nft = (self.t // 28_800_000 + 1) * 28_800_000
        data = {"symbol": self.sym, "markPrice": self.px(mark), "indexPrice": self.px(index),
                "openInterest": self.qty(self.oi), "bid1Price": self.px(bb), "bid1Size": self.qty(self.bids[bb]),
                "ask1Price": self.px(ba), "ask1Size": self.qty(self.asks[ba])}
        if snapshot or rng.random() < 0.02:
            data.update(fundingRate=f"{rng.randint(-30, 100) / 1e6:.6f}", nextFundingTime=str(nft),
                        fundingIntervalHour="8", lastPrice=self.px(bb))
        self.seq += 1
        self.ws({"topic": f"tickers.{self.sym}", "type": "snapshot" if snapshot else "delta", "data": data,
                 "cs": self.seq, "ts": self.t})

    # other sources
    def mempool(self) -> None:
        rng = self.rng
        # stamped by the source a little before it arrives, never out of order
        self.mempool_ts = max(self.mempool_ts + 1, self.t - rng.randint(1, 900))
        self.rec("MempoolStats", {
            "ts": self.mempool_ts, "venue": "sim.mempool", "chain": "BTC",
            "tx_count": rng.randint(20_000, 90_000), "vsize": rng.randint(10**7, 9 * 10**7),
            "total_fee": rng.uniform(0.5, 3.0), "fee_fastest": float(rng.randint(2, 60)),
            "fee_half_hour": float(rng.randint(2, 40)), "fee_hour": float(rng.randint(1, 30)),
            "fee_economy": None if rng.random() < 0.2 else float(rng.randint(1, 10)), "fee_minimum": 1.0,
            "fee_histogram": [], "projected_blocks": rng.randint(1, 8),
            "next_block_median_fee": rng.uniform(1.0, 40.0), "pending_value": rng.uniform(0.0, 500.0),
            "large_transfers": rng.randint(0, 4)})

    def news(self, item_id: str | None = None) -> None:
        rng = self.rng
        iid = item_id or f"n{rng.getrandbits(40):x}"
        self.rec("NewsItem", {
            "ts": self.t - rng.randint(0, 20_000), "venue": "news.sim", "item_id": iid, "source": "sim",
            "url": f"https://news.example/{iid}", "title": "t", "summary": None, "published_ts": None,
            "assets": ["BTC"], "mentioned": rng.random() < 0.6, "sentiment": rng.uniform(-1, 1),
            "source_weight": rng.choice((0.3, 0.7, 1.0))})

    def run(self, minutes: float = 75) -> list:
        """The timeline (s after the start): a delta before the first snapshot; a kline and trade outage
        at 480-660 s (the candle window edge crosses it 62 minutes later); a missed kline at minute 30;
        35 s with only heartbeats (stale book) from 1200 s; a mempool silence (stale levels) at
        1800-2520 s; a crossed delta at 2500 s (resync snapshot 9 s later); a bid side thinned to 7
        levels at 3000-3020 s; a snapshot with an empty ask side at 3500 s (a full one 6 s later);
        a lost delta at 4130 s (resync snapshot 40 s later)."""
        rng = self.rng
        end = self.start + int(minutes * 60_000)
        self.bids, self.asks = {649_999: 100}, {650_000: 100}
        self.delta()  # before any snapshot: not applicable
        self.bids, self.asks = {}, {}
        next_at = {"book": 1_500, "trade": 2_500, "ticker": 2_000, "mempool": 5_000, "news": 30_000}
        todo = {"crossed": 2500, "thin": 3000, "thick": 3020, "empty": 3500, "gap": 4130}
        resync_at = None
        paused_until = 0.0
        news_n = 0
        minute = self.t - self.t % 60_000
        while self.t < end:
            self.t += 10
            s = (self.t - self.start) / 1000
            outage = 480 <= s < 660
            quiet = 1200 <= s < 1235 or s < paused_until
            if self.t - self.t % 60_000 != minute:
                minute = self.t - self.t % 60_000
                self.kline_due = self.t + 350
            if self.kline_due is not None and self.t >= self.kline_due:
                self.kline_due = None
                if not outage and not quiet and minute != self.start - self.start % 60_000 + 30 * 60_000:
                    self.klines(minute, True)
            if quiet:
                if self.t % 1_000 == 0:
                    self.rec("Heartbeat", {"venue": "bybit.linear"})
                if paused_until and s >= paused_until - 0.01:
                    paused_until = 0.0
                    self.snapshot()  # the full book again
                continue
            due = [k for k, at in todo.items() if s >= at]
            if s * 1000 >= next_at["book"] or due:
                if not self.bids:
                    self.snapshot(650_000)
                elif resync_at is not None and self.t >= resync_at:
                    resync_at = None
                    self.snapshot()
                elif "crossed" in due:
                    self.crossed_delta()
                    resync_at = self.t + 9_000
                elif "thin" in due:  # delete every bid level below the best 7; no refill meanwhile
                    deep = sorted(self.bids, reverse=True)[7:]
                    for p in deep:
                        del self.bids[p]
                    self.u += 1
                    self.book_msg("delta", dict.fromkeys(deep, 0), {}, self.u)
                    self.min_levels = 7
                elif "thick" in due:
                    self.min_levels = 14
                    self.delta()
                elif "empty" in due:
                    self.u += 1
                    self.book_msg("snapshot", self.bids, {}, self.u)
                    paused_until = s + 6
                elif "gap" in due:
                    self.delta(skip_u=True)
                    resync_at = self.t + 40_000
                else:
                    self.delta()
                for k in due:
                    del todo[k]
                next_at["book"] = s * 1000 + rng.expovariate(1 / 1400)
            if s * 1000 >= next_at["trade"]:
                if not outage:
                    self.trades()
                next_at["trade"] = s * 1000 + rng.expovariate(1 / 1800)
            if s * 1000 >= next_at["ticker"]:
                self.ticker(snapshot=next_at["ticker"] == 2_000)
                next_at["ticker"] = s * 1000 + rng.expovariate(1 / 2500)
            if s * 1000 >= next_at["mempool"]:
                if not 1800 <= s < 2520:
                    self.mempool()
                next_at["mempool"] = s * 1000 + rng.expovariate(1 / 15_000)
            if s * 1000 >= next_at["news"]:
                news_n += 1
                self.news(item_id="dup-1" if news_n in (3, 4) else None)
                next_at["news"] = s * 1000 + rng.expovariate(1 / 200_000)
        return self.events()

    def events(self) -> list:
        """The gateway's records in arrival order: Bybit messages through its parser, gw_seq dense
        across every source (as connectors.publisher.Publisher.publish assigns it)."""
        from connectors.bybit.parse import BybitParser

        parser = BybitParser(venue="bybit.linear")
        out = []
        for kind, m in self.items:
            recs = parser.events(json.loads(json.dumps(m)), m["ts"] * 1000 + 800) if kind == "ws" else [m]
            for name, rec in recs:
                out.append((name, dict(rec, gw_seq=len(out))))
        return out


_SYNTH: dict = {}


def synthetic_events() -> list:
    if "events" not in _SYNTH:
        _SYNTH["events"] = SyntheticRun().run()
    return copy.deepcopy(_SYNTH["events"])


def test_every_feature_matches_the_reference_on_a_synthetic_long_run():
    events = synthetic_events()
    span = events[-1][1]["exchange_ts"] - events[0][1]["exchange_ts"]
    assert span > 70 * 60_000
    st = compare("synthetic", "BTCUSDT", events)
    _check(st, "synthetic 75 min")
    assert st.vectors >= 6_000 and st.values >= 175_000
    # every feature of the registry was compared with a value somewhere in this run
    assert set(SPECS) - st.nonnull_features == set()
    for cat in ("book_invalid:no_snapshot", "book_invalid:gap", "book_invalid:crossed", "book_stale",
                "book_empty_side", "book_levels", "few_returns", "mid_unavailable", "mempool_stale",
                "mempool_field_missing", "candle_history", "warming_up", "no_trades", "no_sell_volume",
                "no_ticker_field", "no_mempool"):
        assert st.null_categories[cat] > 0, cat


def test_fixed_bug_cases_in_the_synthetic_run():
    st = compare("synthetic", "BTCUSDT", synthetic_events(), only_bugs=("candle_lookback_gap",))
    assert st.values > 0
    assert not st.failures, "\n".join(st.failures[:5])


# --- minimal failing inputs for the engine bugs found ---------------------------------------------------
T0 = 1_786_310_400_000  # a minute boundary


class Records:
    """Schema records for one symbol with dense gw_seq, built by hand."""

    def __init__(self, symbol: str = "BTCUSDT"):
        self.symbol = symbol
        self.out: list[tuple[str, dict]] = []

    def add(self, name: str, ts: int, **fields) -> None:
        self.out.append((name, {"symbol": self.symbol, "venue": "bybit.linear", "exchange_ts": ts,
                                "recv_ts": ts * 1000, "gw_seq": len(self.out), **fields}))

    def book(self, name: str, ts: int, u: int, bids: dict, asks: dict) -> None:
        self.add(name, ts, depth=50, update_id=u, cross_seq=u, match_ts=ts,
                 bid_px=list(bids), bid_sz=list(bids.values()), ask_px=list(asks), ask_sz=list(asks.values()))

    def heartbeat(self, ts: int) -> None:
        self.add("Heartbeat", ts)


def test_zscore_is_null_when_its_input_is_null():
    r = Records()
    r.book("OrderBookSnapshot", T0 + 100, 1000, {"65000.0": "1.000"}, {"65000.1": "1.000"})
    for k in range(1, 63):  # the best ask alternates: spread_rel varies, the book stays valid
        r.book("OrderBookDelta", T0 + k * 1000 + 100, 1000 + k, {}, {"65000.1": "0" if k % 2 else "1.000",
                                                                    "65000.2": "1.000"})
    r.book("OrderBookDelta", T0 + 63_100, 1000 + 64, {}, {"65000.3": "1.000"})  # u skips 1063: gap
    for k in range(64, 67):
        r.heartbeat(T0 + k * 1000 + 100)
    feats, _ = run_engine("BTCUSDT", r.out)
    s1 = [feats[k] for k in sorted(feats) if k[0] == "s1"]
    assert sum(v["values"]["spread_rel_z60"] is not None for v in s1) > 0  # it was defined before the gap
    invalid = [v for v in s1 if v["values"]["spread_rel"] is None and v["window_end"] > T0 + 63_000]
    assert invalid and all(v["nulls"]["spread_rel"].startswith("book invalid: gap") for v in invalid)
    for v in invalid:
        assert v["values"]["spread_rel_z60"] is None, (
            f"window {v['window_end']}: spread_rel is null ({v['nulls']['spread_rel']}) but spread_rel_z60 = "
            f"{v['values']['spread_rel_z60']}")


def test_mempool_sum_covers_the_whole_window_of_per_second_records():
    r = Records("ETHUSDT")
    for sec in range(150):  # connectors/mempool.py::aggregate_record: second [s, s+1) is stamped (s+1)*1000
        r.add("MempoolStats", T0 + (sec + 1) * 1000, chain="ETH", tx_count=3, vsize=None, total_fee=None,
              fee_fastest=2.0, fee_half_hour=1.0, fee_hour=None, fee_economy=0.5, fee_minimum=0.1, fee_histogram=[],
              projected_blocks=None, next_block_median_fee=1.0, pending_value=1.0, large_transfers=1)
        r.heartbeat(T0 + (sec + 1) * 1000 + 1)  # the market clock closes the windows, not the side feed
    feats, _ = run_engine("ETHUSDT", r.out)
    got = feats[("m1", T0 + 120_000)]["values"]
    # the window [E - 60 s, E) holds 60 of these records (stamped E-60 s .. E-1 s): 60 seconds of flow
    sums = {k: got[k] for k in ("mempool_pending_value_1m", "mempool_large_transfers_1m")}
    assert sums == {"mempool_pending_value_1m": 60.0, "mempool_large_transfers_1m": 60.0}, sums


def test_candle_variates_flat_fill_from_a_close_older_than_the_buffer():
    r = Records()
    closes = {}
    for m in range(80):
        if 10 <= m <= 12:  # three minutes without a candle (no trades, no kline)
            continue
        c = 65000 + 7 * m + (m % 3)
        closes[m] = c
        r.add("Kline", T0 + (m + 1) * 60_000 + 500, interval="1", start_ts=T0 + m * 60_000,
              end_ts=T0 + m * 60_000 + 59_999, open=str(c - 1), high=str(c + 2), low=str(c - 3), close=str(c),
              volume=f"{1 + m % 5}.5", turnover=None, confirm=True)
        r.heartbeat(T0 + (m + 1) * 60_000 + 900)
    for m in range(10, 13):  # the clock moves on through the quiet minutes
        r.heartbeat(T0 + (m + 1) * 60_000 + 900)
    r.out.sort(key=lambda e: e[1]["exchange_ts"])
    for i, (_, rec) in enumerate(r.out):
        rec["gw_seq"] = i
    feats, _ = run_engine("BTCUSDT", r.out)
    end = T0 + 73 * 60_000  # the minute 72 just closed; minutes 11 and 12 open its 62-minute buffer
    v = feats[("m1", end)]
    # by the definition minutes 10-12 are flat at the close of minute 9, so C_{t-60} = close of minute 9;
    # minute 72 has no trades and its confirmed kline arrives 500 ms after the window closed, so at the
    # close C_t is minute 72 flat at minute 71's close
    assert v["values"]["return_60m"] == pytest.approx(math.log(closes[71] / closes[9]), rel=1e-12), (
        f"return_60m = {v['values']['return_60m']} ({v['nulls'].get('return_60m')}), rv_60m = {v['values']['rv_60m']}, "
        f"volume_z_60m = {v['values']['volume_z_60m']}")
