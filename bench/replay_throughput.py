"""Offline replay throughput: raw events/s of the replay (one process, features included) over a
generated day of 4 symbols in the Delta bronze tables, and its ratio to only decoding the same rows
from Delta (reading the files and building the same record dicts, no merge, no dataflow, no features).

    .venv/bin/python bench/replay_throughput.py [--hours 24] [--symbols 4] [--keep DIR]

The day is written the way the archive writes it (rows sorted by gw_seq, one file per table, symbol,
date and hour, as after the retention job's compaction of a closed day). Per symbol: a book snapshot
every hour, depth-50 book deltas every 100 ms (1-4 changed levels each), a trade every 200 ms on
average, a ticker and a heartbeat every second and a confirmed kline per minute: ~1.5 M events per
symbol-day. Requirement: at least 50,000 raw events/s.

Last lines: ``RESULT events_per_s=<n>`` and ``RESULT ratio_to_decode=<r>``.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.lake import BRONZE, TABLE_OF_TOPIC, Lake, rows_to_arrow, with_meta
from tickcast.topics import RAW_TOPIC_OF

DAY0 = 1_786_233_600_000  # 2026-08-09 00:00:00 UTC
HOUR = 3_600_000
SYMBOLS = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]
MID = {"BTCUSDT": 650_000, "ETHUSDT": 35_000, "LTCUSDT": 8_000, "POLUSDT": 2_000}


class DayGenerator:
    """Deterministic raw events of one symbol, an hour at a time (records exactly as decoded)."""

    def __init__(self, symbol: str, seed: int):
        self.sym = symbol
        self.rng = random.Random(seed)
        self.seq = 0
        self.u = 1
        mid = MID.get(symbol, 10_000)
        self.bids = {mid - 1 - i: self.rng.randint(1, 3000) for i in range(50)}
        self.asks = {mid + i: self.rng.randint(1, 3000) for i in range(50)}
        self.minute: list[tuple[str, str]] = []
        self.tid = 0

    def _base(self, ts: int) -> dict:
        return {"symbol": self.sym, "venue": "sim.linear", "exchange_ts": ts, "recv_ts": ts * 1000 + 650}

    def _emit(self, out: list, name: str, rec: dict) -> None:
        rec["gw_seq"] = self.seq
        self.seq += 1
        out.append((name, rec))

    @staticmethod
    def _px(p: int) -> str:
        return str(Decimal(p) / 10)

    @staticmethod
    def _sz(s: int) -> str:
        return str(Decimal(s) / 1000)

    def _book(self, ts: int, b: list, a: list, snapshot: bool) -> dict:
        rec = self._base(ts)
        rec.update(depth=50, update_id=self.u, cross_seq=self.u * 3, match_ts=ts - 2,
                   bid_px=[self._px(p) for p, _ in b], bid_sz=[self._sz(s) for _, s in b],
                   ask_px=[self._px(p) for p, _ in a], ask_sz=[self._sz(s) for _, s in a])
        return rec

    def hour(self, start: int) -> list[tuple[str, dict]]:
        out: list = []
        rng = self.rng
        self.u += 1
        self._emit(out, "OrderBookSnapshot", self._book(start, sorted(self.bids.items(), reverse=True),
                                                         sorted(self.asks.items()), True))
        for ts in range(start + 100, start + HOUR + 1, 100):
            cb, ca = {}, {}
            for _ in range(rng.randint(1, 4)):
                side, ch = (self.bids, cb) if rng.random() < 0.5 else (self.asks, ca)
                p = rng.choice(list(side))
                if rng.random() < 0.1 and len(side) > 30:
                    del side[p]
                    ch[p] = 0
                else:
                    side[p] = ch[p] = rng.randint(1, 3000)
            bb, ba = max(self.bids), min(self.asks)
            if ba - bb > 1 and rng.random() < 0.3:
                (self.bids if rng.random() < 0.5 else self.asks)[bb + 1 if rng.random() < 0.5 else ba - 1] = 100
            if max(self.bids) >= min(self.asks):  # keep the book uncrossed
                self.bids = {p: s for p, s in self.bids.items() if p < min(self.asks)}
            self.u += 1
            self._emit(out, "OrderBookDelta", self._book(ts, sorted(cb.items(), reverse=True), sorted(ca.items()), False))
            if rng.random() < 0.5:
                buy = rng.random() < 0.5
                p = min(self.asks) if buy else max(self.bids)
                self.tid += 1
                px, sz = self._px(p), self._sz(rng.randint(1, 500))
                rec = self._base(ts)
                rec.update(trade_ts=ts - 1, trade_id=f"{self.sym}-{self.tid}", side="Buy" if buy else "Sell", price=px,
                           size=sz, tick_direction=None, block_trade=False, rpi=None, cross_seq=self.u * 3)
                self._emit(out, "Trade", rec)
                self.minute.append((px, sz))
            if ts % 1000 == 0:
                bb, ba = max(self.bids), min(self.asks)
                rec = self._base(ts)
                rec.update(is_snapshot=False, changed=["bid1Price", "ask1Price"], last_price=self._px(bb),
                           mark_price=self._px(bb), index_price=self._px(ba), open_interest="59891.7",
                           open_interest_value="3899996265.0", funding_rate="0.0001",
                           next_funding_time=(ts // 28_800_000 + 1) * 28_800_000, funding_interval_hour=8,
                           bid1_price=self._px(bb), bid1_size=self._sz(self.bids[bb]), ask1_price=self._px(ba),
                           ask1_size=self._sz(self.asks[ba]), volume_24h="17573.9", turnover_24h="1142118412.9",
                           cross_seq=self.u * 3)
                self._emit(out, "Ticker", rec)
                self._emit(out, "Heartbeat", self._base(ts))
            if ts % 60_000 == 0 and self.minute:
                m, self.minute = self.minute, []
                prices = [Decimal(p) for p, _ in m]
                rec = self._base(ts)
                rec.update(interval="1", start_ts=ts - 60_000, end_ts=ts - 1, open=m[0][0], high=str(max(prices)),
                           low=str(min(prices)), close=m[-1][0], volume=str(sum(Decimal(s) for _, s in m)),
                           turnover=None, confirm=True)
                self._emit(out, "Kline", rec)
        return out


def write_day(lake: Lake, hours: int, symbols: list[str]) -> int:
    from tqdm import tqdm

    lake.ensure_tables()
    gens = {s: DayGenerator(s, i + 1) for i, s in enumerate(symbols)}
    offsets: dict[str, int] = {}
    total = 0
    for h in tqdm(range(hours), desc="generate + write", unit="h"):
        by_table: dict[str, list] = {}
        for g in gens.values():
            for name, rec in g.hour(DAY0 + h * HOUR):
                topic = RAW_TOPIC_OF[name]
                table = TABLE_OF_TOPIC[topic]
                o = offsets.get(topic, 0)
                offsets[topic] = o + 1
                by_table.setdefault(table, []).append(with_meta(BRONZE[table], rec, topic=topic, partition=0,
                                                                offset=o, kafka_ts=None, ingest="kafka"))
                total += 1
        for table, rows in by_table.items():
            lake.append(table, rows_to_arrow(BRONZE[table], rows))
    return total


def decode_only(lake: Lake, symbols: list[str], lo: int, hi: int) -> tuple[int, float]:
    """Read every row of the period from Delta and build the record dicts (the replay's reading cost
    floor): no gw_seq merge, no dataflow, no features."""
    import pyarrow.compute as pc

    from flows.lake import dates_between
    from flows.replay_source import REPLAY_TABLES

    n = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for table in REPLAY_TABLES:
        cols = [c for c in BRONZE[table].avro_fields if c != "symbol"]
        for batch in lake.iter_batches(table, symbols=symbols, dates=dates_between(lo, hi), columns=cols,
                                       filter=pc.field("gw_seq") >= 0, batch_size=16_384):
            fields = cols
            lists = [batch.column(c).to_pylist() for c in fields]
            recs = [dict(zip(fields, vals)) for vals in zip(*lists)]
            n += len(recs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"decode only: {n:,} rows in {wall:.1f} s (cpu {cpu:.1f} s)")
    return n, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--symbols", type=int, default=4)
    ap.add_argument("--keep", help="write the lake here and keep it (default: a temporary folder)")
    a = ap.parse_args()
    os.environ.setdefault("TICKCAST_LOG_LEVEL", "WARNING")
    from flows.offline_replay import replay

    symbols = SYMBOLS[:a.symbols]
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-replay-"))
    try:
        lake = Lake(str(root / "lake"))
        t0 = time.perf_counter()
        written = write_day(lake, a.hours, symbols)
        print(f"generated {written:,} raw events ({a.hours} h x {len(symbols)} symbols) in "
              f"{time.perf_counter() - t0:.1f} s")
        lo, hi = DAY0, DAY0 + a.hours * HOUR
        n_dec, t_dec = decode_only(lake, symbols, lo, hi)
        # the replay's warm-up reaches before the generated day: everything is replayed
        rep = replay(lake, symbols, lo, hi, root / "replay", tail_ms=0, progress=True)
        eps = rep["events"] / rep["wall_s"]
        print(f"replay: {rep['events']:,} events in {rep['wall_s']:.1f} s (cpu {rep['cpu_s']:.1f} s, "
              f"{rep['events'] / rep['cpu_s']:,.0f} events per cpu-second), vectors {rep['vectors']}")
        import resource

        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        print(f"machine load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(wall-clock rates fall when other work shares the cores)")
        print(f"RESULT events_per_s={eps:.0f}")
        print(f"RESULT ratio_to_decode={eps / (n_dec / t_dec):.3f}")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
