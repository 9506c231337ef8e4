"""Dashboard cost over hours: one process-wide feed, several sessions, a new minute every tick.

Requirement (issue 8): streaming chart updates with a rollover so that CPU and memory stay flat over
hours. Setup, in this process: a ``ui.feed.LiveFeed`` (not connected: its buffers are fed directly the
way the SSE reader and the poller do: one m1 vector, one forecast and one signal per symbol per
minute, an alert now and then) and ``--sessions`` dashboards (ui/dashboard.py) attached to Bokeh
documents (so every stream and pane change produces document events as it does in a server). Each
simulated minute, every session ticks once (what its 1 s periodic callback does).

Measured: a session's tick time (p50/p99) with a new minute, early (first hour) against late (last
hour); the Python heap (tracemalloc, after gc) once the feed's bounded buffers are full against the
end; the size of a session's candle source (must equal the window).

Last lines: RESULT tick_p99_ms, RESULT tick_p99_vs_refresh_1000ms (the tick against the 1 s refresh
period), RESULT tick_p99_late_vs_early (1 = flat CPU), RESULT heap_end_vs_steady (1 = flat memory),
RESULT candle_source_rows.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import random
import time
import tracemalloc

MIN = 60_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=12.0, help="simulated hours (one minute per tick)")
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--symbols", type=int, default=4)
    ap.add_argument("--window", type=int, default=120)
    ap.add_argument("--buffer-minutes", type=int, default=240,
                    help="the feed's per-symbol bound (the dashboard's default is 1440: a day)")
    args = ap.parse_args()

    from bokeh.document import Document
    from tqdm import tqdm

    from ui.dashboard import Dashboard
    from ui.feed import LiveFeed

    syms = [f"SYM{i}USDT" for i in range(args.symbols)]
    feed = LiveFeed("http://127.0.0.1:9", max_minutes=args.buffer_minutes)
    feed.api_error, feed.symbols = None, syms
    feed.model, feed.model_checked = {"champion_version": "1", "horizon": 30}, True
    sessions = []
    for k in range(args.sessions):
        d = Dashboard(feed)
        d.layout.get_root(Document())
        d.window.value = args.window
        d.symbol.value = syms[k % len(syms)]
        sessions.append(d)
    rng = random.Random(7)
    price = {s: 100.0 * (i + 1) for i, s in enumerate(syms)}
    t0 = 1_795_000_000_000 - (1_795_000_000_000 % MIN)
    minutes = int(args.hours * 60)
    ticks, heap = [], {}
    steady = min(minutes, args.buffer_minutes + 60)  # every buffer full by then
    tracemalloc.start()
    levels = [0.1, 0.5, 0.9]
    for i in tqdm(range(minutes), desc="simulated minutes", unit="min"):
        t = t0 + i * MIN
        now_us = time.time_ns() // 1000
        for s in syms:
            o = price[s]
            c = o * math.exp(rng.gauss(0, 0.001))
            price[s] = c
            feed.add_vector({"symbol": s, "venue": "sim.linear", "cadence": "m1", "window_end": t + MIN,
                             "registry_hash": "", "values": {"close": c, "body_rel_1m": c / o - 1, "volume_1m": 10.0,
                                                             "spread_rel": 1e-4}, "nulls": {}, "book_valid": True,
                             "event_count": 1, "last_gw_seq": i, "close_recv_ts": now_us - 500, "emit_ts": now_us,
                             "age_s": 0.1})
            path = [[c * math.exp(0.001 * math.sqrt(h) * z) for z in (-1.28, 0.0, 1.28)] for h in range(1, 31)]
            events = [("forecast", {"symbol": s, "origin_ts": t, "model_name": "m", "model_version": "1",
                                    "registry_hash": "", "horizon": 30, "quantile_levels": levels, "last_close": c,
                                    "close_path": path, "realized_vol": [0.01] * 3, "price_range": [1.0] * 3,
                                    "p_up": 0.5, "p_flat": 0.2, "p_down": 0.3, "degraded": False, "reason": None,
                                    "simulated": True, "issued_ts": now_us}),
                      ("signal", {"symbol": s, "origin_ts": t, "action": "BUY" if (i // 17) % 2 else "SELL",
                                  "strength": 0.3, "reason": "r", "model_version": "1", "degraded": False,
                                  "simulated": True, "issued_ts": now_us})]
            if i % 13 == 0 and i > 30:
                events.append(("alert", {"symbol": s, "origin_ts": t - 30 * MIN, "target": "close", "actual": c,
                                         "q_low": c * 1.01, "q_high": c * 1.02, "direction": "below",
                                         "model_version": "1", "raised_ts": now_us}))
            for name, data in events:
                feed.on_event({"event": name, "data": json.dumps(data), "id": str(i)})
        for d in sessions:
            a = time.perf_counter()
            d.tick()
            ticks.append((i, (time.perf_counter() - a) * 1000))
        if i + 1 in (steady, minutes):
            gc.collect()
            heap[i + 1] = tracemalloc.get_traced_memory()[0]
    rows = len(sessions[0].src_candles.data["x"])

    def pct(vals, q):
        v = sorted(vals)
        return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))] if v else float("nan")

    all_ms = [ms for _, ms in ticks]
    early = [ms for i, ms in ticks if i < 60]
    late = [ms for i, ms in ticks if i >= minutes - 60]
    print(f"{args.sessions} sessions, {args.symbols} symbols, window {args.window} min, {minutes} simulated minutes")
    print(f"tick ms: p50 {pct(all_ms, .5):.2f}  p99 {pct(all_ms, .99):.2f}; first hour p99 {pct(early, .99):.2f}, "
          f"last hour p99 {pct(late, .99):.2f}")
    print(f"heap: {heap[steady] / 1e6:.1f} MB once the buffers are full (minute {steady}), "
          f"{heap[minutes] / 1e6:.1f} MB at the end")
    print(f"RESULT tick_p50_ms={pct(all_ms, .5):.3f}")
    print(f"RESULT tick_p99_ms={pct(all_ms, .99):.3f}")
    print(f"RESULT tick_p99_vs_refresh_1000ms={pct(all_ms, .99) / 1000:.4f}")
    print(f"RESULT tick_p99_late_vs_early={pct(late, .99) / pct(early, .99):.3f}")
    print(f"RESULT heap_end_vs_steady={heap[minutes] / heap[steady]:.3f}")
    print(f"RESULT candle_source_rows={rows}")


if __name__ == "__main__":
    main()
