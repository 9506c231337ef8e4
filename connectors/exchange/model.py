"""A seeded market model whose order book, trades, tickers and klines are mutually consistent.

One :class:`SymbolSim` per symbol runs in virtual time (milliseconds, 10 ms steps), never reading
the wall clock, so a seed and a start time give the same messages byte for byte at any speed.

* **Price process**: a latent fair log-price takes a step every 100 ms whose variance follows a
  GARCH(1,1) recursion updated every second (volatility clusters), with rare jumps.
* **Book**: integer price levels (ticks) and sizes (lots) on both sides, ~1,200 levels each.
  Market makers keep the top dense around the fair price (quotes left behind when the price moves
  are cancelled, a few are taken), add orders at geometric distances and cancel at random.
* **Trades**: taker orders (Poisson, intensity rising with volatility, side leaning toward the fair
  price) sweep the book level by level: each fill is a trade print at that level's price and the
  level shrinks or disappears, so every trade is visible as a book change.
* **Klines** aggregate exactly the trade prints (open, high, low, close, volume, turnover as integer
  sums), **tickers** carry the book's best bid/ask as published, the last trade, rolling 24 h
  statistics over the klines, mark/index prices, open interest and funding.
* **Publishing** follows Bybit's linear cadence: ``orderbook.1`` every 10 ms when the top changes (and
  the same snapshot with the same ``u`` after 3 s unchanged), ``orderbook.50`` 20 ms, ``.200`` 100 ms,
  ``.1000`` 200 ms when the visible levels changed (``u`` + 1 per message, cross ``seq``), ``tickers``
  every 100 ms with only the changed fields, klines every second when changed and a two-candle message
  when a candle closes, trades as they happen.
* **History**: 1-minute klines for the days before the start (GARCH at minute scale), ending exactly at
  the live start price, plus funding settlements; the REST kline endpoint serves history and live
  candles as one series.
"""
from __future__ import annotations

import math
import random
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from connectors.exchange import protocol as P
from connectors.exchange.instruments import Instrument, fmt_fixed, fmt_trim, rescale

MINUTE = 60_000
DAY = 86_400_000
STEP = 10                      # ms of virtual time per simulation step
FAIR_EVERY = 100               # ms between fair-price steps
BUY, SELL = "Buy", "Sell"


class Out(NamedTuple):
    """One data message: its topic, exact text, ``snapshot``/``delta``, symbol and book ``u`` (or 0)."""
    topic: str
    text: str
    kind: str
    symbol: str
    u: int = 0
    ts: int = 0


@dataclass(frozen=True)
class Params:
    price: str               # start price (on the tick grid)
    vol_1m: float            # long-run standard deviation of 1-minute log returns
    level_lots: float        # median size of a resting level, in lots
    taker_rate: float        # taker orders per second at average volatility
    taker_lots: float        # median taker order size, in lots
    oi_lots: int             # open interest at the start, in lots (kept even: singleOpenInterest = half)
    levels: int = 1200       # resting levels kept per side (orderbook.1000 stays full)
    fill_p: float = 0.75     # probability that a tick among the top few is occupied
    spread_ticks: int = 1    # target spread in ticks
    minute_volume_lots: float | None = None  # mean 1-minute volume of the live model (calibrates history)


DEFAULT_PARAMS: dict[str, Params] = {
    # minute_volume_lots: measured mean of the live model (4 seeds x 10 min), so history and live agree
    "BTCUSDT": Params("65114.30", 0.00030, level_lots=60, taker_rate=3.0, taker_lots=12, oi_lots=59_891_732,
                      minute_volume_lots=21_600),
    "ETHUSDT": Params("1922.50", 0.00045, level_lots=220, taker_rate=2.5, taker_lots=30, oi_lots=83_009_066,
                      minute_volume_lots=48_000),
    "LTCUSDT": Params("68.50", 0.00060, level_lots=160, taker_rate=0.9, taker_lots=20, oi_lots=5_231_240,
                      minute_volume_lots=6_900),
    "POLUSDT": Params("0.18500", 0.00080, level_lots=9000, taker_rate=0.7, taker_lots=1800,
                      oi_lots=321_540_000, minute_volume_lots=410_000),
}


def params_for(inst: Instrument, price: str | None = None) -> Params:
    """Defaults for the MVP symbols; a generic profile derived from the price for any other symbol."""
    p = DEFAULT_PARAMS.get(inst.symbol)
    if p is not None and price is None:
        return p
    if price is None:
        raise ValueError(f"no start price for {inst.symbol}: pass one (e.g. --price {inst.symbol}=1.23)")
    ticks = inst.to_ticks(price)
    notional_per_lot = float(price) * float(inst.qty_step)

    def lots_for(usd: float) -> int:
        return max(1, round(usd / notional_per_lot))

    return Params(inst.px(ticks), 0.0006, level_lots=lots_for(3000), taker_rate=1.0, taker_lots=lots_for(800),
                  oi_lots=2 * lots_for(5e7))


def trade_id(rng: random.Random) -> str:
    """A Bybit-looking trade id (UUID text, version nibble 5), drawn from the seeded generator."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


class BookView:
    """What one ``orderbook.{depth}`` topic has published: its levels, ``u``, ``seq``, ``cts``.

    ``wb``/``wa`` are the published windows as sets of sort keys (``-price`` for bids, ``price`` for
    asks), ``bids``/``asks`` the published sizes, ``pb``/``pa`` the prices changed in the book since the
    last refresh: a refresh then costs set operations on the window plus the changed prices only.
    """

    __slots__ = (
        "asks",
        "bids",
        "cts",
        "depth",
        "every",
        "pa",
        "pb",
        "phase",
        "sent_ts",
        "seq",
        "topic",
        "u",
        "version",
        "wa",
        "wb",
    )

    def __init__(self, depth: int, symbol: str, phase: int, u0: int):
        self.depth = depth
        self.topic = f"orderbook.{depth}.{symbol}"
        self.every = P.BOOK_INTERVAL_MS[depth]
        self.phase = phase % self.every
        self.u = u0
        self.seq = 0
        self.cts = 0
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.wb: set[int] = set()
        self.wa: set[int] = set()
        self.pb: set[int] = set()
        self.pa: set[int] = set()
        self.version = -1
        self.sent_ts = 0


class Candle:
    __slots__ = ("c", "h", "l", "n", "o", "start", "turn", "vol")

    def __init__(self, start: int, o: int, h: int, lo: int, c: int, vol: int = 0, turn: int = 0, n: int = 0):
        self.start, self.o, self.h, self.l, self.c, self.vol, self.turn, self.n = start, o, h, lo, c, vol, turn, n

    def add(self, px: int, lots: int) -> None:
        # Bybit's candles open at the previous close (43,199 of 43,199 real 1m candles do): the high and
        # low include the open, the trades move them and the close
        self.h = max(self.h, px)
        self.l = min(self.l, px)
        self.c = px
        self.vol += lots
        self.turn += px * lots
        self.n += 1

    def key(self) -> tuple:
        return (self.o, self.h, self.l, self.c, self.vol, self.turn)


class History:
    """1-minute candles for ``days`` before ``end_ms`` ending at ``end_close`` ticks, plus funding."""

    def __init__(self, inst: Instrument, params: Params, seed: int, end_ms: int, days: float, end_close: int,
                 minute_volume_lots: float):
        rng = random.Random(f"{seed}:{inst.symbol}:history")
        n = max(1, round(days * 1440))
        self.start_ms = end_ms - n * MINUTE
        self.n = n
        var_bar = params.vol_1m ** 2
        a, b = 0.06, 0.92
        omega = var_bar * (1 - a - b)
        v = var_bar
        rets, sig = [], []
        for _ in range(n):
            z = rng.gauss(0.0, 1.0)
            if rng.random() < 0.003:
                z *= 4.0
            r = math.sqrt(v) * z
            rets.append(r)
            sig.append(math.sqrt(v))
            v = omega + a * r * r + b * v
        tick = float(inst.tick_size)
        closes = [0] * n
        logc = math.log(end_close * tick)
        for i in range(n - 1, -1, -1):
            closes[i] = max(1, round(math.exp(logc) / tick))
            logc -= rets[i]
        first_open = max(1, round(math.exp(logc) / tick))
        o_, h_, l_, c_, vol_, turn_ = [], [], [], [], [], []
        sbar = params.vol_1m
        prev = first_open
        for i in range(n):
            o, c = prev, closes[i]
            px = c * tick
            st = sig[i] * px / tick  # this minute's sigma in ticks
            h = max(o, c) + int(abs(rng.gauss(0.0, 1.0)) * 0.5 * st)
            lo = max(1, min(o, c) - int(abs(rng.gauss(0.0, 1.0)) * 0.5 * st))
            vol = max(1, int(minute_volume_lots * math.exp(0.6 * rng.gauss(0.0, 1.0) - 0.18) * (sig[i] / sbar)))
            o_.append(o), h_.append(h), l_.append(lo), c_.append(c), vol_.append(vol)
            turn_.append(vol * ((o + h + lo + c) // 4))
            prev = c
        self.o, self.h, self.l, self.c, self.vol, self.turn = o_, h_, l_, c_, vol_, turn_
        # funding settlements at multiples of the funding interval inside the window
        step = inst.funding_interval_min * MINUTE
        cap = round(float(inst.funding_cap) * 1e8)
        self.funding: list[tuple[int, int]] = []  # (settlement ms, rate in 1e-8)
        rate = 10_000
        t = (self.start_ms // step + 1) * step
        while t <= end_ms:
            rate = round(10_000 + 0.7 * (rate - 10_000) + rng.gauss(0.0, 3_000))
            rate = max(-cap, min(cap, rate))
            self.funding.append((t, rate))
            t += step

    def candle(self, start: int) -> Candle | None:
        i = (start - self.start_ms) // MINUTE
        if 0 <= i < self.n and (start - self.start_ms) % MINUTE == 0:
            return Candle(start, self.o[i], self.h[i], self.l[i], self.c[i], self.vol[i], self.turn[i], 1)
        return None


class SymbolSim:
    """The market of one symbol: book, taker flow, candles, ticker state and published views."""

    TICKER_ORDER: ClassVar[list[str]] = ["symbol", "tickDirection", "price24hPcnt", "lastPrice", "prevPrice24h", "highPrice24h",
                    "lowPrice24h", "prevPrice1h", "markPrice", "indexPrice", "openInterest", "openInterestValue",
                    "turnover24h", "volume24h", "fundingIntervalHour", "fundingCap", "singleOpenInterest",
                    "singleOpenInterestValue", "nextFundingTime", "fundingRate", "bid1Price", "bid1Size",
                    "ask1Price", "ask1Size", "preOpenPrice", "preQty", "curPreListingPhase"]
    # deltas list the same fields in this order (singleOpenInterest* last), as the recording shows
    DELTA_ORDER: ClassVar[list[str]] = ["symbol", "tickDirection", "price24hPcnt", "lastPrice", "prevPrice24h", "highPrice24h",
                   "lowPrice24h", "prevPrice1h", "markPrice", "indexPrice", "openInterest", "openInterestValue",
                   "turnover24h", "volume24h", "fundingIntervalHour", "fundingCap", "nextFundingTime",
                   "fundingRate", "bid1Price", "bid1Size", "ask1Price", "ask1Size", "singleOpenInterest",
                   "singleOpenInterestValue", "preOpenPrice", "preQty", "curPreListingPhase"]
    PAIRS: ClassVar[dict[str, str]] = {"bid1Price": "bid1Size", "bid1Size": "bid1Price", "ask1Price": "ask1Size", "ask1Size": "ask1Price"}

    def __init__(self, inst: Instrument, params: Params, seed: int, start_ms: int, history_days: float,
                 depths=P.LINEAR_DEPTHS):
        self.inst = inst
        self.sym = inst.symbol
        self.p = params
        self.rng = rng = random.Random(f"{seed}:{inst.symbol}")
        self.t = start_ms
        self.start_ms = start_ms
        tick = float(inst.tick_size)
        self.tick = tick
        start_ticks = inst.to_ticks(params.price)
        self.logp = math.log(start_ticks * tick)
        self.var_bar = params.vol_1m ** 2 / 60.0           # per-second variance
        self.var = self.var_bar
        self.garch = (0.10, 0.89)  # per-second GARCH(1,1): volatility clusters over minutes
        self.acc_r = 0.0
        self.seq = rng.randrange(10 ** 11, 9 * 10 ** 11)
        self.cts = start_ms
        self.version = 0
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.bk: list[int] = []   # -price, ascending = best bid first
        self.ak: list[int] = []   # price, ascending = best ask first
        self.last_px = start_ticks
        self.tick_dir = "ZeroPlusTick"
        self._vl: list[BookView] = []
        self._init_book(start_ticks)
        # candles and history
        self.minute_volume = params.minute_volume_lots or max(1.0, params.taker_rate * 60 * params.taker_lots * 9)
        self.history = History(inst, params, seed, start_ms - start_ms % MINUTE, max(history_days, 1.0), start_ticks,
                               self.minute_volume)
        self.candles: dict[int, Candle] = {}
        self.cur = Candle(start_ms - start_ms % MINUTE, start_ticks, start_ticks, start_ticks, start_ticks)
        self.candles[self.cur.start] = self.cur
        # phases of the periodic pushes (multiples of 10 ms)
        self.phase_book = rng.randrange(0, 100) * 10
        self.phase_ticker = self.phase_book % 100  # tickers leave with the books they describe
        self.phase_kline = rng.randrange(5, 95) * 10
        self.phase_mark = rng.randrange(0, 100) * 10
        self.views = {d: BookView(d, self.sym, self.phase_book, rng.randrange(10 ** 6, 9 * 10 ** 7)) for d in depths}
        self._vl = list(self.views.values())
        for v in self._vl:
            self._refresh_view(v)
            v.sent_ts = start_ms
        # ticker state
        self.index_units = self._fair_scaled()
        self.mark_units = self.index_units
        self.basis = 0.0
        self.oi = params.oi_lots - params.oi_lots % 2
        self.fund_step = inst.funding_interval_min * MINUTE
        self.next_funding = (start_ms // self.fund_step + 1) * self.fund_step
        self.funding_rate = self.history.funding[-1][1] if self.history.funding else 10_000
        self.funding_log: list[tuple[int, int]] = list(self.history.funding)
        self._roll_window(self.cur.start)
        self.ticker_pub: dict[str, str] = self._ticker_state()
        self.ticker_cs = self.seq
        self.ticker_ts = start_ms
        self.kline_pub: dict[str, tuple] = {}
        self.kline_ivals: set[str] = {"1"}
        self.kline_last: dict[str, int] = {"1": self.cur.start}

    # ------------------------------------------------------------------ book primitives
    def _set(self, bid: bool, px: int, lots: int, bump: bool = True) -> None:
        if bid:
            d, keys, k = self.bids, self.bk, -px
            for v in self._vl:
                v.pb.add(px)
        else:
            d, keys, k = self.asks, self.ak, px
            for v in self._vl:
                v.pa.add(px)
        if lots <= 0:
            if px in d:
                del d[px]
                del keys[bisect_left(keys, k)]
        else:
            if px not in d:
                insort(keys, k)
            d[px] = lots
        self.version += 1
        if bump:
            self.seq += 1

    def best_bid(self) -> int:
        return -self.bk[0]

    def best_ask(self) -> int:
        return self.ak[0]

    def _size(self) -> int:
        return max(1, int(self.p.level_lots * math.exp(1.1 * self.rng.gauss(0.0, 1.0))))

    def _init_book(self, mid: int) -> None:
        rng = self.rng
        bid = math.floor(mid - self.p.spread_ticks / 2.0 + 0.5)
        ask = bid + self.p.spread_ticks
        for side_bid, best in ((True, bid), (False, ask)):
            px, n = best, 0
            while n < self.p.levels:
                self._set(side_bid, px, self._size())
                n += 1
                gap = 1 if n < 10 and rng.random() < self.p.fill_p else 1 + int(rng.expovariate(0.6))
                px = px - gap if side_bid else px + gap
                if px <= 0:
                    break

    # ------------------------------------------------------------------ the simulation step
    def _fair_ticks(self) -> float:
        return math.exp(self.logp) / self.tick

    def _fair_scaled(self) -> int:
        return round(math.exp(self.logp) * 10 ** self.inst.price_scale)

    def step(self, t: int, out: list[Out]) -> None:
        """Advance to ``t`` (one 10 ms step) and append the messages due at ``t`` to ``out``."""
        rng = self.rng
        self.t = t
        since = t - self.start_ms
        if since % FAIR_EVERY == 0:
            z = rng.gauss(0.0, 1.0)
            if rng.random() < 0.002:
                z *= 5.0
            r = math.sqrt(self.var * FAIR_EVERY / 1000.0) * z
            self.logp += r
            self.acc_r += r
            if since % 1000 == 0:
                a, b = self.garch
                self.var = self.var_bar * (1 - a - b) + a * self.acc_r * self.acc_r + b * self.var
                self.var = min(self.var, self.var_bar * 60)
                self.acc_r = 0.0
        fair = self._fair_ticks()
        hs = self.p.spread_ticks / 2.0
        tb = math.floor(fair - hs + 0.5)           # target best bid
        ta = tb + self.p.spread_ticks                    # target best ask
        trades: list[tuple[int, str, int, int, int]] = []  # (T, side, px, lots, seq)
        v0 = self.version
        t0 = t - STEP
        # quotes left on the wrong side of the fair price: mostly cancelled, a few taken
        while self.ak and self.ak[0] <= tb:
            px = self.ak[0]
            if rng.random() < 0.02:
                self._take(True, self.asks[px], t0 + rng.randint(1, STEP), trades)
            else:
                self._set(False, px, 0)
        while self.bk and -self.bk[0] >= ta:
            px = -self.bk[0]
            if rng.random() < 0.02:
                self._take(False, self.bids[px], t0 + rng.randint(1, STEP), trades)
            else:
                self._set(True, px, 0)
        # makers keep the top dense
        bb = self.best_bid() if self.bk else tb - 1
        ba = self.best_ask() if self.ak else ta + 1
        for off in range(6):
            px = tb - off
            if px not in self.bids and px < ba and px > 0 and rng.random() < (self.p.fill_p if off else 0.9):
                self._set(True, px, self._size())
            px = ta + off
            if px not in self.asks and px > bb and rng.random() < (self.p.fill_p if off else 0.9):
                self._set(False, px, self._size())
        # new orders at geometric distances, cancels and partial cancels
        for _ in range(self._poisson(1.2)):
            bid = rng.random() < 0.5
            off = int(rng.expovariate(0.12)) if rng.random() < 0.85 else rng.randrange(0, self.p.levels)
            if bid:
                px = min(tb, (self.best_ask() - 1) if self.ak else tb) - off
                if px > 0:
                    self._set(True, px, self.bids.get(px, 0) + self._size())
            else:
                px = max(ta, (self.best_bid() + 1) if self.bk else ta) + off
                self._set(False, px, self.asks.get(px, 0) + self._size())
        for _ in range(self._poisson(1.0)):
            bid = rng.random() < 0.5
            keys = self.bk if bid else self.ak
            if len(keys) < 20:
                continue
            i = int(rng.random() ** 2 * len(keys))
            px = -keys[i] if bid else keys[i]
            d = self.bids if bid else self.asks
            if rng.random() < 0.5:
                self._set(bid, px, 0)
            else:
                self._set(bid, px, max(0, d[px] - max(1, int(d[px] * rng.random()))))
        # taker orders: intensity grows with volatility, side leans toward the fair price
        lam = self.p.taker_rate * math.sqrt(self.var / self.var_bar) * STEP / 1000.0
        n_takers = self._poisson(lam)
        if n_takers:
            mid = (self.best_bid() + self.best_ask()) / 2.0 if (self.bk and self.ak) else fair
            p_buy = 0.5 + 0.35 * math.tanh((fair - mid) / max(1.0, self.p.spread_ticks))
            times = sorted(t0 + rng.randint(1, STEP) for _ in range(n_takers))
            for T in times:
                buy = rng.random() < p_buy
                lots = max(1, int(self.p.taker_lots * math.exp(1.4 * rng.gauss(0.0, 1.0))))
                self._take(buy, lots, T, trades)
        self._maintain_depth()
        if self.version != v0:
            self.cts = t
        if trades:
            self._emit_trades(trades, out)
        self._funding(t)
        self._publish(t, out)

    def _poisson(self, lam: float) -> int:
        if lam <= 0:
            return 0
        n, p, lim = 0, 1.0, math.exp(-lam)
        while True:
            p *= self.rng.random()
            if p < lim:
                return n
            n += 1

    def _take(self, buy: bool, lots: int, T: int, trades: list) -> None:
        """A taker order sweeping the opposite side; each level filled is one trade print."""
        keys, d = (self.ak, self.asks) if buy else (self.bk, self.bids)
        depth20 = sum(d[(k if buy else -k)] for k in keys[:20])
        lots = min(lots, max(1, depth20 // 2))
        self.seq += 1  # one matching event: its prints share the cross sequence
        while lots > 0 and keys:
            px = keys[0] if buy else -keys[0]
            avail = d[px]
            fill = min(avail, lots)
            self._set(not buy, px, avail - fill, bump=False)
            trades.append((T, BUY if buy else SELL, px, fill, self.seq))
            lots -= fill

    def _maintain_depth(self) -> None:
        """Keep ``levels`` resting levels per side within a bounded span behind the best price."""
        rng = self.rng
        span = int(self.p.levels * 2.2)
        for bid in (True, False):
            keys = self.bk if bid else self.ak
            d = self.bids if bid else self.asks
            if not keys:
                fair = int(self._fair_ticks())
                self._set(bid, fair - 1 if bid else fair + 1, self._size())
            best = -keys[0] if bid else keys[0]
            tries = 0
            while len(keys) < self.p.levels and tries < 50:
                tries += 1
                off = 1 + int(rng.random() * span)
                px = best - off if bid else best + off
                if px > 0 and px not in d:
                    self._set(bid, px, self._size())
            limit = best - span - span // 4 if bid else best + span + span // 4
            while len(keys) > self.p.levels + 100 or (keys and (-keys[-1] < limit if bid else keys[-1] > limit)):
                self._set(bid, -keys[-1] if bid else keys[-1], 0)

    # ------------------------------------------------------------------ trades and candles
    def _emit_trades(self, trades: list, out: list[Out]) -> None:
        inst = self.inst
        topic = f"publicTrade.{self.sym}"
        by_T: dict[int, list[str]] = {}
        order: list[int] = []
        for T, side, px, lots, seq in trades:
            if px > self.last_px:
                self.tick_dir = "PlusTick"
            elif px < self.last_px:
                self.tick_dir = "MinusTick"
            elif self.tick_dir in ("PlusTick", "ZeroPlusTick"):
                self.tick_dir = "ZeroPlusTick"
            else:
                self.tick_dir = "ZeroMinusTick"
            self.last_px = px
            self._candle_for(T).add(px, lots)
            if T not in by_T:
                by_T[T] = []
                order.append(T)
            by_T[T].append(P.trade_item(T, self.sym, side, inst.qty(lots), inst.px(px), self.tick_dir,
                                        trade_id(self.rng), seq))
        for T in order:
            items = by_T[T]
            for i in range(0, len(items), 1024):
                ts = T + 1 + self.rng.randint(0, 1)
                out.append(Out(topic, P.trade_msg(topic, ts, items[i:i + 1024]), "snapshot", self.sym, 0, ts))

    def _candle_for(self, T: int) -> Candle:
        start = T - T % MINUTE
        while self.cur.start < start:
            nxt = self.cur.start + MINUTE
            c = self.cur.c
            self.cur = Candle(nxt, c, c, c, c)
            self.candles[nxt] = self.cur
        return self.cur

    def candle(self, start: int) -> Candle | None:
        c = self.candles.get(start)
        if c is not None:
            return c
        return self.history.candle(start)

    # ------------------------------------------------------------------ funding, marks, open interest
    def _funding(self, t: int) -> None:
        while t >= self.next_funding:
            self.funding_log.append((self.next_funding, self.funding_rate))
            self.next_funding += self.fund_step

    def _marks(self, t: int) -> None:
        rng = self.rng
        if (t - self.phase_mark) % 1000 == 0:
            self.index_units = round(math.exp(self.logp) * (1 + rng.gauss(0.0, 2e-5))
                                         * 10 ** self.inst.price_scale)
            self.basis = 0.9 * self.basis + 0.1 * rng.gauss(0.0, 4e-5)
            self.mark_units = round(self.index_units * (1 + self.basis))
        if (t - self.phase_mark) % 3000 == 0 and rng.random() < 0.7:
            self.oi = max(2, self.oi + 2 * round(rng.gauss(0.0, self.oi * 2e-5)))
        if (t - self.phase_mark) % MINUTE == 0:
            premium = (self.mark_units - self.index_units) / max(1, self.index_units)
            cap = round(float(self.inst.funding_cap) * 1e8)
            target = round((0.0001 + 0.3 * premium) * 1e8)
            self.funding_rate = max(-cap, min(cap, round(0.8 * self.funding_rate + 0.2 * target)))

    # ------------------------------------------------------------------ rolling 24 h window
    def _roll_window(self, cur_start: int) -> None:
        """Aggregates of the closed candles of the last 24 h before ``cur_start``."""
        vol = turn = 0
        hi, lo = 0, None
        for k in range(1, 1440):
            c = self.candle(cur_start - k * MINUTE)
            if c is None:
                break
            vol += c.vol
            turn += c.turn
            hi = max(hi, c.h)
            lo = c.l if lo is None else min(lo, c.l)
        prev24 = self.candle(cur_start - 1440 * MINUTE) or self.candle(cur_start - 1439 * MINUTE)
        prev1h = self.candle(cur_start - 60 * MINUTE)
        self.win = (cur_start, vol, turn, hi, lo,
                    prev24.c if prev24 else self.history.o[0], prev1h.c if prev1h else self.history.o[0])

    def _ticker_state(self) -> dict[str, str]:
        inst = self.inst
        cur = self.cur
        if self.win[0] != cur.start:
            self._roll_window(cur.start)
        _, vol, turn, hi, lo, prev24, prev1h = self.win
        vol += cur.vol
        turn += cur.turn
        if cur.vol:
            hi = max(hi, cur.h)
            lo = cur.l if lo is None else min(lo, cur.l)
        last = self.last_px
        pcnt = round((last - prev24) * 1_000_000 / prev24) if prev24 else 0
        scale = inst.price_scale
        oi_half = self.oi // 2
        oiv = self.oi * inst.lot_units * self.mark_units  # units: 10**-(qty_dec+scale)
        soiv = oi_half * inst.lot_units * self.mark_units
        vdec = inst.price_dec + inst.qty_dec
        bpx = self.best_bid()
        apx = self.best_ask()
        bq, aq = self.bids[bpx], self.asks[apx]
        return {
            "symbol": self.sym, "tickDirection": self.tick_dir, "price24hPcnt": fmt_trim(pcnt, 6),
            "lastPrice": inst.px(last), "prevPrice24h": inst.px(prev24), "highPrice24h": inst.px(hi or last),
            "lowPrice24h": inst.px(lo or last), "prevPrice1h": inst.px(prev1h),
            "markPrice": fmt_fixed(self.mark_units, scale), "indexPrice": fmt_fixed(self.index_units, scale),
            "openInterest": inst.qty(self.oi),
            "openInterestValue": fmt_fixed(rescale(oiv, inst.qty_dec + scale, 2), 2),
            "turnover24h": fmt_fixed(rescale(turn * inst.tick_units * inst.lot_units, vdec, 4), 4),
            "volume24h": fmt_fixed(rescale(vol * inst.lot_units, inst.qty_dec, 4), 4),
            "fundingIntervalHour": str(inst.funding_interval_min // 60), "fundingCap": inst.funding_cap,
            "singleOpenInterest": inst.qty(oi_half),
            "singleOpenInterestValue": fmt_fixed(rescale(soiv, inst.qty_dec + scale, 2), 2),
            "nextFundingTime": str(self.next_funding), "fundingRate": fmt_trim(self.funding_rate, 8),
            "bid1Price": inst.px(bpx), "bid1Size": inst.qty(bq), "ask1Price": inst.px(apx),
            "ask1Size": inst.qty(aq), "preOpenPrice": "", "preQty": "", "curPreListingPhase": "",
        }

    # ------------------------------------------------------------------ publishing
    def _refresh_view(self, v: BookView) -> tuple[list, list]:
        """Bring the view to the book's top ``depth`` levels; return the changed (price, size) per side."""
        D = v.depth
        out = []
        for keys, d, old, sizes, pend, sign in ((self.bk, self.bids, v.wb, v.bids, v.pb, -1),
                                                 (self.ak, self.asks, v.wa, v.asks, v.pa, 1)):
            new = set(keys[:D])
            ch = []
            for k in old - new:
                p = sign * k
                del sizes[p]
                ch.append((p, 0))
            for k in new - old:
                p = sign * k
                sizes[p] = d[p]
                ch.append((p, d[p]))
            for p in pend:
                k = sign * p
                if k in new and k in old:
                    q = d[p]
                    if sizes[p] != q:
                        sizes[p] = q
                        ch.append((p, q))
            pend.clear()
            out.append((new, ch))
        (v.wb, db), (v.wa, da) = out
        v.version = self.version
        if db or da:  # an unchanged view keeps its seq and cts: a resend is the same snapshot
            v.seq = self.seq
            v.cts = self.cts
        return db, da

    def view_levels(self, v: BookView) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The view's published levels, best first."""
        return ([(p, v.bids[p]) for p in sorted(v.bids, reverse=True)],
                [(p, v.asks[p]) for p in sorted(v.asks)])

    def book_snapshot(self, v: BookView, ts: int) -> Out:
        inst = self.inst
        bl, al = self.view_levels(v)
        b = P.levels((inst.px(p), inst.qty(q)) for p, q in bl)
        a = P.levels((inst.px(p), inst.qty(q)) for p, q in al)
        text = P.orderbook_msg(v.topic, "snapshot", ts, self.sym, b, a, v.u, v.seq, v.cts, level1=v.depth == 1)
        return Out(v.topic, text, "snapshot", self.sym, v.u, ts)

    def _publish(self, t: int, out: list[Out]) -> None:
        inst = self.inst
        for v in self.views.values():
            if (t - v.phase) % v.every:
                continue
            if v.depth == 1:
                if v.version != self.version:
                    db, da = self._refresh_view(v)
                    if db or da:
                        v.u += 1
                        v.sent_ts = t
                        out.append(self.book_snapshot(v, t + self._lag()))
                        continue
                if t - v.sent_ts >= 3000:  # unchanged for 3 s: the same snapshot, same u
                    v.sent_ts = t
                    out.append(self.book_snapshot(v, t + self._lag()))
                continue
            if v.version == self.version:
                continue
            db, da = self._refresh_view(v)
            if not db and not da:
                continue
            v.u += 1
            db.sort(key=lambda x: -x[0])
            da.sort()
            ts = t + self._lag()
            text = P.orderbook_msg(v.topic, "delta", ts, self.sym,
                                   P.levels((inst.px(p), inst.qty(q)) for p, q in db),
                                   P.levels((inst.px(p), inst.qty(q)) for p, q in da), v.u, v.seq, v.cts)
            out.append(Out(v.topic, text, "delta", self.sym, v.u, ts))
        self._marks(t)
        if (t - self.phase_ticker) % 100 == 0:
            self._publish_ticker(t, out)
        if (t - self.phase_kline) % 1000 == 0:
            self._publish_klines(t, out)

    def _lag(self) -> int:
        return 1 + self.seq % 3  # the push leaves a few ms after the matching engine's time

    def _publish_ticker(self, t: int, out: list[Out]) -> None:
        self._candle_for(t)
        state = self._ticker_state()
        old = self.ticker_pub
        changed = {k for k, v in state.items() if old.get(k) != v}
        if not changed:
            return
        for k in list(changed):
            if k in self.PAIRS:
                changed.add(self.PAIRS[k])
        changed.add("symbol")
        fields = [(k, state[k]) for k in self.DELTA_ORDER if k in changed]
        self.ticker_pub = state
        self.ticker_cs = self.seq
        self.ticker_ts = t
        topic = f"tickers.{self.sym}"
        out.append(Out(topic, P.ticker_msg(topic, "delta", fields, self.seq, t), "delta", self.sym, 0, t))

    def ticker_snapshot(self, ts: int) -> Out:
        topic = f"tickers.{self.sym}"
        fields = [(k, self.ticker_pub[k]) for k in self.TICKER_ORDER]
        return Out(topic, P.ticker_msg(topic, "snapshot", fields, self.ticker_cs, ts), "snapshot", self.sym, 0, ts)

    def kline_candle(self, interval: str, start: int, upto: int) -> Candle | None:
        """The candle of ``interval`` starting at ``start`` from the 1-minute candles up to ``upto``."""
        ms = P.KLINE_INTERVALS[interval]
        if ms == MINUTE:
            return self.candle(start)
        agg = None
        for s in range(start, min(start + ms, upto + 1), MINUTE):
            c = self.candle(s)
            if c is None:
                continue
            if agg is None:
                agg = Candle(start, c.o, c.h, c.l, c.c, c.vol, c.turn, c.n)
            else:
                agg.h, agg.l, agg.c = max(agg.h, c.h), min(agg.l, c.l), c.c
                agg.vol += c.vol
                agg.turn += c.turn
                agg.n += c.n
        return agg

    def kline_item(self, interval: str, c: Candle, confirm: bool, ts: int) -> str:
        inst = self.inst
        ms = P.KLINE_INTERVALS[interval]
        return P.kline_item(c.start, c.start + ms - 1, interval, inst.px_trim(c.o), inst.px_trim(c.c),
                            inst.px_trim(c.h), inst.px_trim(c.l), inst.qty_trim(c.vol),
                            inst.turnover_trim(c.turn), confirm, ts)

    def _publish_klines(self, t: int, out: list[Out]) -> None:
        self._candle_for(t)
        for iv in sorted(self.kline_ivals):
            ms = P.KLINE_INTERVALS[iv]
            start = t - t % ms
            topic = f"kline.{iv}.{self.sym}"
            items = []
            last = self.kline_last.get(iv, start)
            if last < start:
                closed = self.kline_candle(iv, last, start - 1)
                if closed is not None:
                    items.append(self.kline_item(iv, closed, True, t))
            cur = self.kline_candle(iv, start, t)
            if cur is None:
                continue
            if items or self.kline_pub.get(iv) != cur.key():
                items.append(self.kline_item(iv, cur, False, t))
                self.kline_pub[iv] = cur.key()
                self.kline_last[iv] = start
                out.append(Out(topic, P.kline_msg(topic, items, t), "snapshot", self.sym, 0, t))

    def kline_snapshot(self, interval: str, ts: int) -> Out | None:
        if interval not in self.kline_ivals:
            ms = P.KLINE_INTERVALS[interval]
            self.kline_ivals.add(interval)
            self.kline_last[interval] = self.t - self.t % ms
        ms = P.KLINE_INTERVALS[interval]
        start = self.t - self.t % ms
        cur = self.kline_candle(interval, start, self.t)
        if cur is None:
            return None
        topic = f"kline.{interval}.{self.sym}"
        return Out(topic, P.kline_msg(topic, [self.kline_item(interval, cur, False, ts)], ts), "snapshot",
                   self.sym, 0, ts)


class MarketModel:
    """All symbols of the seeded market, advanced together in virtual time."""

    def __init__(self, instruments: dict[str, Instrument], seed: int = 1, start_ms: int = 1_786_310_760_000,
                 history_days: float = 2.0, params: dict[str, Params] | None = None,
                 depths: tuple[int, ...] = P.LINEAR_DEPTHS):
        if start_ms % STEP:
            raise ValueError(f"start_ms must be a multiple of {STEP} ms")
        self.seed = seed
        self.start_ms = start_ms
        self.t = start_ms
        self.sims: dict[str, SymbolSim] = {}
        for sym, inst in instruments.items():
            p = (params or {}).get(sym) or params_for(inst)
            self.sims[sym] = SymbolSim(inst, p, seed, start_ms, history_days, depths=tuple(sorted(set(depths) | {1})))

    @property
    def symbols(self) -> list[str]:
        return list(self.sims)

    def advance(self, until_ms: int) -> list[Out]:
        """Run the steps up to ``until_ms`` and return the messages they published, in order."""
        return [o for batch in self.steps(until_ms) for o in batch]

    def steps(self, until_ms: int):
        """Run the steps up to ``until_ms``, yielding each symbol-step's messages as soon as they exist:
        a consumer that publishes them before pulling the next batch always publishes a message while
        the model's state is the state right after it (snapshots taken then match the stream)."""
        sims = list(self.sims.values())
        while self.t + STEP <= until_ms:
            self.t += STEP
            for s in sims:
                out: list[Out] = []
                s.step(self.t, out)
                if out:
                    yield out

    def snapshot(self, topic: P.Topic) -> Out | None:
        """The first message a new subscriber of ``topic`` gets (None for trades)."""
        sim = self.sims.get(topic.symbol)
        if sim is None:
            return None
        if topic.channel == "orderbook":
            v = sim.views.get(topic.depth)
            return None if v is None else sim.book_snapshot(v, self.t)
        if topic.channel == "tickers":
            return sim.ticker_snapshot(self.t)
        if topic.channel == "kline":
            return sim.kline_snapshot(topic.interval, self.t)
        return None
