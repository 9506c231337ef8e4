"""A small, deterministic stream of raw event records for one symbol (engine unit tests).

Records follow schemas/avro exactly (decimal strings, int timestamps, dense gw_seq): a ticker and a
book snapshot, then book deltas every 20 ms (u + 1), trades at the touch, ticker deltas every
100 ms, heartbeats every 250 ms and a confirmed kline per minute. Not a market model (that is the
local exchange's job): just enough structure for every feature to be defined.
"""
from __future__ import annotations

import random
from decimal import Decimal

T0 = 1_786_310_400_000  # 2026-08-09 20:00:00 UTC, a minute boundary


def _px(units: int) -> str:
    return str(Decimal(units) / 10)  # tick 0.1


def _sz(units: int) -> str:
    return str(Decimal(units) / 1000)  # lot 0.001


class SynthStream:
    def __init__(self, symbol: str = "BTCUSDT", seed: int = 1, start_ts: int = T0, levels: int = 50):
        self.symbol = symbol
        self.rng = random.Random(seed)
        self.ts = start_ts
        self.levels = levels
        self.seq = 0
        self.u = 1000
        self.cross = 5000
        self.trade_id = 0
        mid = 650000  # 65000.0 in ticks
        self.bids = {mid - 1 - i: self.rng.randint(1, 3000) for i in range(levels)}
        self.asks = {mid + i: self.rng.randint(1, 3000) for i in range(levels)}
        self.out: list[tuple[str, dict]] = []
        self.minute_trades: list[tuple[float, float]] = []

    # -- records ----------------------------------------------------------------------------------
    def _base(self, ts: int | None = None) -> dict:
        ts = self.ts if ts is None else ts
        return {"symbol": self.symbol, "venue": "sim.linear", "exchange_ts": ts, "recv_ts": ts * 1000 + 700}

    def emit(self, name: str, rec: dict) -> dict:
        rec["gw_seq"] = self.seq
        self.seq += 1
        self.out.append((name, rec))
        return rec

    def book_record(self, snapshot: bool, changes_b: dict | None = None, changes_a: dict | None = None,
                    u: int | None = None) -> dict:
        if snapshot:
            b = sorted(self.bids.items(), reverse=True)
            a = sorted(self.asks.items())
        else:
            b = sorted((changes_b or {}).items(), reverse=True)
            a = sorted((changes_a or {}).items())
        rec = self._base()
        rec.update(depth=self.levels, update_id=self.u if u is None else u, cross_seq=self.cross,
                   match_ts=self.ts - 2, bid_px=[_px(p) for p, _ in b], bid_sz=[_sz(s) for _, s in b],
                   ask_px=[_px(p) for p, _ in a], ask_sz=[_sz(s) for _, s in a])
        return rec

    def snapshot(self) -> dict:
        self.u += 1
        self.cross += 1
        return self.emit("OrderBookSnapshot", self.book_record(True))

    def delta(self) -> dict:
        rng = self.rng
        cb, ca = {}, {}
        for _ in range(rng.randint(1, 4)):
            side, changes = (self.bids, cb) if rng.random() < 0.5 else (self.asks, ca)
            p = rng.choice(list(side))
            if rng.random() < 0.15 and len(side) > self.levels // 2:
                del side[p]
                changes[p] = 0
            else:
                side[p] = rng.randint(1, 3000)
                changes[p] = side[p]
        # occasionally move the touch by inserting a level inside the spread
        bb, ba = max(self.bids), min(self.asks)
        if ba - bb > 1 and rng.random() < 0.3:
            if rng.random() < 0.5:
                self.bids[bb + 1] = cb[bb + 1] = rng.randint(1, 500)
            else:
                self.asks[ba - 1] = ca[ba - 1] = rng.randint(1, 500)
        self.u += 1
        self.cross += 1
        return self.emit("OrderBookDelta", self.book_record(False, cb, ca))

    def trade(self) -> dict:
        rng = self.rng
        buy = rng.random() < 0.5
        side = self.asks if buy else self.bids
        p = min(side) if buy else max(side)
        size = rng.randint(1, max(1, min(side[p], 800)))
        self.trade_id += 1
        rec = self._base()
        rec.update(trade_ts=self.ts - 1, trade_id=f"t{self.trade_id}", side="Buy" if buy else "Sell", price=_px(p),
                   size=_sz(size), tick_direction="PlusTick" if buy else "MinusTick", block_trade=False, rpi=False,
                   cross_seq=self.cross)
        self.minute_trades.append((float(_px(p)), float(_sz(size))))
        return self.emit("Trade", rec)

    def ticker(self, snapshot: bool = False) -> dict:
        bb, ba = max(self.bids), min(self.asks)
        mid = (bb + ba) / 20
        rec = self._base()
        rec.update(is_snapshot=snapshot, changed=["bid1Price", "ask1Price"], last_price=_px(bb),
                   mark_price=f"{mid + 1.5:.2f}", index_price=f"{mid:.2f}", open_interest="59891.732",
                   open_interest_value="3899996265.01", funding_rate="0.0001",
                   next_funding_time=(self.ts // 28_800_000 + 1) * 28_800_000, funding_interval_hour=8,
                   bid1_price=_px(bb), bid1_size=_sz(self.bids[bb]), ask1_price=_px(ba), ask1_size=_sz(self.asks[ba]),
                   volume_24h="17573.9120", turnover_24h="1142118412.9021", cross_seq=self.cross)
        return self.emit("Ticker", rec)

    def heartbeat(self) -> dict:
        return self.emit("Heartbeat", self._base())

    def kline(self, minute_start: int) -> dict | None:
        trades, self.minute_trades = self.minute_trades, []
        if not trades:
            return None
        rec = self._base()
        rec.update(interval="1", start_ts=minute_start, end_ts=minute_start + 59_999,
                   open=str(trades[0][0]), high=str(max(p for p, _ in trades)), low=str(min(p for p, _ in trades)),
                   close=str(trades[-1][0]), volume=str(sum(Decimal(str(s)) for _, s in trades)),
                   turnover="0", confirm=True)
        return self.emit("Kline", rec)

    # -- a run ------------------------------------------------------------------------------------
    def run(self, seconds: float, *, trade_every_ms: int = 100) -> list[tuple[str, dict]]:
        """Events for ``seconds`` of exchange time after a snapshot; returns all records so far."""
        if not self.out:
            self.ticker(snapshot=True)
            self.snapshot()
        end = self.ts + int(seconds * 1000)
        minute = self.ts - self.ts % 60_000
        while self.ts < end:
            self.ts += 20
            if self.ts - self.ts % 60_000 != minute:
                self.kline(minute)
                minute = self.ts - self.ts % 60_000
            self.delta()
            if self.ts % trade_every_ms == 0:
                self.trade()
            if self.ts % 100 == 0:
                self.ticker()
            if self.ts % 250 == 0:
                self.heartbeat()
        return self.out
