"""The dashboard's shared feed (ui/feed.py) and a session's layout (ui/dashboard.py) without a browser.

- the SSE parser on the frames api/sse.py writes (encoded by the API's own ``encode``);
- the feed's bounded buffers: candles from polled m1 vectors, forecasts/signals/alerts from SSE events,
  latency pairing in either arrival order, gaps asking for a backfill, the heartbeat's ``gap``;
- against an address where nothing listens: "unreachable", never an exception;
- a session fed for hours of minutes keeps its Bokeh sources at the window's size (the rollover), and
  its tabs show their data or a clear empty state.
"""
from __future__ import annotations

import json
import math
import time

import pytest

from api.sse import encode
from ui import feed as F

MIN = 60_000
T0 = 1_795_000_000_000 - (1_795_000_000_000 % MIN)


def vec(sym: str, minute: int, close: float, emit: int = 2_000, recv: int = 1_000, venue: str = "bybit.linear") -> dict:
    return {"symbol": sym, "venue": venue, "cadence": "m1", "window_end": minute + MIN, "registry_hash": "",
            "values": {"close": close, "body_rel_1m": 0.001, "volume_1m": 10.0, "spread_rel": 1e-4},
            "nulls": {}, "book_valid": True, "event_count": 1, "last_gw_seq": 1, "close_recv_ts": recv,
            "emit_ts": emit, "age_s": 0.1}


def fc(sym: str, origin: int, close: float, issued: int = 5_000, simulated: bool = False) -> dict:
    return {"symbol": sym, "origin_ts": origin, "model_name": "m", "model_version": "1", "registry_hash": "",
            "horizon": 3, "quantile_levels": [0.1, 0.5, 0.9], "last_close": close,
            "close_path": [[close * 0.99, close, close * 1.01]] * 3, "realized_vol": [0.1, 0.2, 0.3],
            "price_range": [1.0, 2.0, 3.0], "p_up": 0.5, "p_flat": 0.3, "p_down": 0.2, "degraded": False,
            "reason": None, "simulated": simulated, "issued_ts": issued}


def sig(sym: str, origin: int, action: str) -> dict:
    return {"symbol": sym, "origin_ts": origin, "action": action, "strength": 0.4, "reason": "r",
            "model_version": "1", "degraded": False, "simulated": False, "issued_ts": 1}


def frames(*events: tuple[str, dict, int | None]) -> list[str]:
    """The SSE byte stream the API writes, split into lines the way httpx's iter_lines does."""
    raw = b"".join(encode(e, json.dumps(d), i) for e, d, i in events).decode()
    return raw.replace("\r\n", "\n").split("\n")


def feed_events(feed: F.LiveFeed, *events) -> None:
    p = F.SSEParser()
    for line in frames(*events):
        ev = p.feed(line)
        if ev is not None:
            feed.on_event(ev)


# ------------------------------------------------------------------------------------ SSE parser
def test_sse_parser_on_the_api_encoding():
    p = F.SSEParser()
    lines = frames(("forecast", {"a": 1}, 7), ("heartbeat", {"server_ts": 1}, None)) + [": ping", "",
                                                                                         "data: x", "data: y", ""]
    got = [ev for ln in lines if (ev := p.feed(ln)) is not None]
    assert got[0] == {"event": "forecast", "data": '{"a": 1}', "id": "7"}
    assert got[1] == {"event": "heartbeat", "data": '{"server_ts": 1}', "id": None}
    assert got[2] == {"event": "message", "data": "x\ny", "id": None}
    assert p.last_id == "7"


# ------------------------------------------------------------------------------------ feed state
def test_feed_buffers_are_bounded_and_ordered():
    f = F.LiveFeed("http://127.0.0.1:9", max_minutes=50)
    for i in range(200):
        f.add_vector(vec("BTCUSDT", T0 + i * MIN, 100.0 + i))
        feed_events(f, ("signal", sig("BTCUSDT", T0 + i * MIN, "BUY" if i % 10 < 5 else "SELL"), i))
    b = f.buf["BTCUSDT"]
    assert len(b.times) == len(b.candles) == 50 and b.times[0] == T0 + 150 * MIN
    assert len(b.signals) == len(b.signal_times) == 50
    c = f.candles_between("BTCUSDT", None)[-1]
    assert c["close"] == 299.0 and c["open"] == pytest.approx(299.0 / 1.001) and c["volume"] == 10.0
    assert [x["t"] for x in f.candles_between("BTCUSDT", T0 + 197 * MIN)] == [T0 + k * MIN for k in (197, 198, 199)]
    assert [x["t"] for x in f.candles_between("BTCUSDT", None, after=T0 + 198 * MIN)] == [T0 + 199 * MIN]
    rev = b.rev
    f.add_vector(vec("BTCUSDT", T0 + 199 * MIN, 299.0))  # the same vector polled again: no change
    assert b.rev == rev
    b.candle_backfill_due = False
    f.add_vector(vec("BTCUSDT", T0 + 205 * MIN, 305.0))  # the poll missed minutes: ask the API for them
    assert b.candle_backfill_due


def test_feed_forecasts_alerts_heartbeat_and_latency():
    f = F.LiveFeed("http://127.0.0.1:9")
    # the vector first, then the forecast: features -> forecast = issued - emit
    f.add_vector(vec("ETHUSDT", T0, 10.0, emit=1_000_000, recv=999_000))
    feed_events(f, ("forecast", fc("ETHUSDT", T0, 10.0, issued=1_004_000), 1))
    # the forecast first, then the vector
    feed_events(f, ("forecast", fc("ETHUSDT", T0 + MIN, 11.0, issued=2_003_000), 2))
    f.add_vector(vec("ETHUSDT", T0 + MIN, 11.0, emit=2_000_000, recv=1_998_000))
    lat = f.latency_samples()
    assert lat["feature_emit"] == [1.0, 2.0] and lat["forecast"] == [4.0, 3.0]
    assert len(lat["sse_delivery"]) == 2
    # an older forecast arriving late does not replace the latest
    feed_events(f, ("forecast", fc("ETHUSDT", T0 - MIN, 9.0), 3))
    assert f.buf["ETHUSDT"].latest_forecast["origin_ts"] == T0 + MIN
    alert = {"symbol": "ETHUSDT", "origin_ts": T0, "target": "close", "actual": 12.0, "q_low": 9.0, "q_high": 11.0,
             "direction": "above", "model_version": "1", "raised_ts": 1}
    feed_events(f, ("alert", alert, 4), ("alert", alert, 5))  # the same alert twice (a replay): kept once
    assert f.alerts_list("ETHUSDT") == [alert]
    assert f.last_event_id == "5" and f.events_total == 5
    f.buf["ETHUSDT"].backfilled = 123.0
    feed_events(f, ("heartbeat", {"server_ts": 1, "last_event_id": 5, "model_version": "1", "gap": True}, None))
    assert f.heartbeat["gap"] is True and f.buf["ETHUSDT"].backfilled == 0.0  # events were lost: re-read
    bad = F.SSEParser()
    for line in ["event: forecast", "data: {not json", "", "event: signal", "data: [1, 2]", "",
                 "event: alert", 'data: {"symbol": "ETHUSDT", "origin_ts": "soon"}', ""]:
        ev = bad.feed(line)
        if ev:
            f.on_event(ev)  # ignored, no exception
    assert f.events_total == 7 and f.alerts_list("ETHUSDT") == [alert]


def test_feed_with_nothing_listening_says_unreachable():
    from tickcast.broker import free_port

    f = F.LiveFeed(f"http://127.0.0.1:{free_port()}", poll_s=0.1).start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (f.sse_state == "down" and "refused" in (f.api_error or "")):
            time.sleep(0.05)
        snap = f.snapshot("BTCUSDT")
        assert "refused" in snap["api_error"] and snap["sse_state"] == "down"
        assert snap["symbols"] == [] and snap["times"] == []
    finally:
        f.stop()


def test_get_feed_is_one_per_process_and_url():
    made = []

    class Dummy(F.LiveFeed):
        def start(self):
            made.append(self)
            return self

    a = F.get_feed("http://feed-test-a:1", factory=Dummy)
    assert F.get_feed("http://feed-test-a:1", factory=Dummy) is a and len(made) == 1
    assert F.get_feed("http://feed-test-b:1", factory=Dummy) is not a


# ------------------------------------------------------------------------------------ a session
def test_session_streams_with_rollover_and_shows_states():
    pytest.importorskip("panel")
    from ui.dashboard import Dashboard

    f = F.LiveFeed("http://127.0.0.1:9", max_minutes=1440)
    f.api_error = None
    f.symbols = ["BTCUSDT", "NODATAUSDT"]
    f.model, f.model_checked = {"champion_version": "1", "horizon": 3}, True
    dash = Dashboard(f)
    dash.window.value = 60
    dash.tick()
    assert dash.symbol.value == "BTCUSDT"
    assert "live-state-no_data" in dash.live_msg.div.text  # nothing for the symbol yet
    sizes = []
    for i in range(400):
        f.add_vector(vec("BTCUSDT", T0 + i * MIN, 100.0 + math.sin(i / 7), venue="sim.linear"))
        feed_events(f, ("forecast", fc("BTCUSDT", T0 + i * MIN, 100.0 + math.sin(i / 7), simulated=True), 2 * i),
                    ("signal", sig("BTCUSDT", T0 + i * MIN, "BUY" if (i // 20) % 2 else "SELL"), 2 * i + 1))
        dash.tick()
        sizes.append(len(dash.src_candles.data["x"]))
    assert max(sizes) == 60 and sizes[-1] == 60  # the rollover keeps the window's size, however long it runs
    assert dash.src_candles.data["t"][-1] == T0 + 399 * MIN and dash.src_candles.data["t"][0] == T0 + 340 * MIN
    assert len(dash.src_fan.data["x"]) == 4 and dash.src_fan.data["x"][0] == T0 + 399 * MIN + 30_000
    actions = dash.src_signals.data["action"]
    assert set(actions) == {"BUY", "SELL"} and len(actions) == 3  # changes inside the 60-minute window
    assert dash.live_msg.div.text == "" and "banner-simulated" in dash.banner.div.text
    assert "data-testid=\"last-close-value\"" in dash.live_numbers.div.text
    assert "live-features" in dash.live_features.div.text
    dash.window.value = 30  # a new window redraws at its size
    assert len(dash.src_candles.data["x"]) == 30
    dash.symbol.value = "NODATAUSDT"
    assert "live-state-no_data" in dash.live_msg.div.text and "NODATAUSDT" in dash.live_msg.div.text
    assert dash.live_charts.visible is False  # an empty state, not a blank plot
    dash.symbol.value = "BTCUSDT"
    assert len(dash.src_candles.data["x"]) == 30 and dash.live_charts.visible
    f.api_error = "connection refused"
    dash.tick()
    assert "banner-unreachable" in dash.banner.div.text and "live-state-unreachable" in dash.live_msg.div.text


def test_session_tabs_show_data_or_a_clear_empty_state():
    pytest.importorskip("panel")
    from ui.dashboard import Dashboard

    f = F.LiveFeed("http://127.0.0.1:9")
    f.api_error = None
    f.symbols = ["BTCUSDT"]
    f.model, f.model_checked = {"champion_version": None, "last_error": "no 'champion' alias"}, True
    dash = Dashboard(f)
    dash.tick()
    dash.tabs.active = 1  # Backtest: the API answered 409 (no model)
    v = f.view(("backtest", "BTCUSDT", 100))
    v.error, v.status, v.rev = "HTTP 409: no champion model is loaded: nothing to backtest", 409, 1
    dash.tick()
    assert "bt-empty" in dash.bt_msg.div.text and "no champion model" in dash.bt_msg.div.text
    assert dash.bt_charts.visible is False
    rows = [{"origin_ts": T0 + i * MIN, "open": 100.0 + i, "close": 100.5 + i, "close_h_actual": None,
             "action": "BUY" if i > 2 else "FLAT", "position": 1.0 if i > 2 else 0.0} for i in range(10)]
    v.data, v.error, v.rev = {"symbol": "BTCUSDT", "candles": 10, "model_version": "1", "rows": rows,
                              "quality": {"direction_hit_rate": 0.6, "direction_n": 5}, "stats": {"pnl": 12.5},
                              "equity": [{"minute_ts": r["origin_ts"], "equity": 10_000.0 + i}
                                         for i, r in enumerate(rows)], "config": {"capital": 10_000.0}}, None, 2
    dash.tick()
    assert len(dash.src_bt_candles.data["x"]) == 10 and len(dash.src_bt_trades.data["x"]) == 1
    assert dash.bt_charts.visible and "+12.50" in dash.bt_stats.div.text and "60.0%" in dash.bt_stats.div.text
    dash.tabs.active = 2  # Strategy: not fetched yet
    dash.tick()
    assert "Loading the strategy P&amp;L" in dash.st_msg.div.text
    dash.tabs.active = 3  # Model: no champion
    dash.tick()
    assert "model-empty" in dash.model_card.div.text and "No champion model yet" in dash.model_card.div.text
    dash.tabs.active = 4  # Monitoring: health known, monitoring not yet
    f.health = {"status": "down", "components": {"model": {"status": "down", "detail": {"error": "no alias"}}}}
    dash.tick()
    assert "mon-health" in dash.mon_health.div.text and "down" in dash.mon_health.div.text
    assert "Loading monitoring" in dash.mon_symbols.div.text


# ------------------------------------------------------------------------------------ the CLI
def test_cli_is_light_and_registered(monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, ui.cli; "
            "print(sorted(m for m in ('panel', 'bokeh', 'httpx', 'ui.dashboard') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    from typer.testing import CliRunner

    from tickcast.cli import app
    from ui.cli import resolve_api_url

    out = CliRunner().invoke(app, ["ui", "--help"])
    assert out.exit_code == 0 and "dashboard" in out.output
    monkeypatch.setenv("TICKCAST_API_URL", "http://10.1.2.3:8123/")
    assert resolve_api_url() == "http://10.1.2.3:8123"
    assert resolve_api_url("http://x:1/") == "http://x:1"
    monkeypatch.delenv("TICKCAST_API_URL")
    monkeypatch.setenv("TICKCAST_API_HOST", "0.0.0.0")
    monkeypatch.setenv("TICKCAST_API_PORT", "8111")
    assert resolve_api_url() == "http://127.0.0.1:8111"
