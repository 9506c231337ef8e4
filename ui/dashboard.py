"""The tickcast dashboard (Panel + Bokeh), served by ``ui/app.py`` (``tickcast ui`` or ``panel serve ui/app.py``).

Tabs: Live (candles, volume, the 30-minute forecast fan, fired signals, alerts, latest features),
Backtest (the last 100 candles), Strategy (P&L of the signals over the last N days), Model (champion,
live skill vs naive baselines, calibration, coverage) and Monitoring (latency, gaps, served minutes,
drift, coverage over time, API health).

All sessions of a server process share one ``ui.feed.LiveFeed`` (one SSE connection, one poller);
each session's periodic callback reads the feed's buffers and streams what is new into its own
Bokeh sources (``ColumnDataSource.stream`` with ``rollover`` = the chosen window), so memory and CPU
per session stay flat however long it runs. Data shaping lives in ``ui/shaping.py``.

The API URL: ``--args --api-url URL`` on the panel command line, else ``TICKCAST_API_URL``, else
``http://TICKCAST_API_HOST:TICKCAST_API_PORT`` from the settings.
"""
from __future__ import annotations

import argparse
import sys
import time
from bisect import bisect_left

import panel as pn
from bokeh.models import (
    ColumnDataSource,
    DatetimeTickFormatter,
    Div,
    FactorRange,
    HoverTool,
    InlineStyleSheet,
    NumeralTickFormatter,
    Span,
)
from bokeh.plotting import figure

from tickcast.logs import get_logger
from ui import render as R
from ui import shaping as S
from ui.cli import resolve_api_url
from ui.feed import LiveFeed, get_feed

log = get_logger("ui")

MIN = S.MIN
WINDOWS = [30, 60, 120, 240, 480, 1440]
BACKTEST_CANDLES = 100
DAYS = {"1 day": 1, "7 days": 7, "30 days": 30}
TAB_NAMES = ["Live", "Backtest", "Strategy", "Model", "Monitoring"]
DT_FORMAT = DatetimeTickFormatter(minutes="%H:%M", hourmin="%H:%M", hours="%H:%M", days="%m-%d")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tickcast-ui", add_help=False)
    ap.add_argument("--api-url", default=None)
    ap.add_argument("--poll-s", type=float, default=1.0)
    ap.add_argument("--history-minutes", type=int, default=240)
    ap.add_argument("--refresh-ms", type=int, default=1000)
    args, _ = ap.parse_known_args(argv)
    return args


def _fig(height: int, **kw):
    p = figure(height=height, sizing_mode="stretch_width", toolbar_location="above",
               tools="xpan,xwheel_zoom,box_zoom,reset,save", **kw)
    p.background_fill_color = "#fcfcfc"
    if kw.get("x_axis_type") == "datetime":
        p.xaxis.formatter = DT_FORMAT
    return p


def _box(css: InlineStyleSheet) -> pn.pane.Bokeh:
    """A Bokeh ``Div`` for HTML text, updated by setting ``div.text`` directly (a Panel HTML pane
    recomputes its whole model on every change: ~10x the cost on a 1 s tick)."""
    div = Div(text="", stylesheets=[css], sizing_mode="stretch_width")
    box = pn.pane.Bokeh(div, sizing_mode="stretch_width")
    box.div = div
    return box


def _set(src: ColumnDataSource, cols: dict) -> None:
    if dict(src.data) != cols:
        src.data = cols


def _html(box: pn.pane.Bokeh, text: str) -> None:
    if box.div.text != text:
        box.div.text = text


class Dashboard:
    """One browser session's layout and its incremental state."""

    def __init__(self, feed: LiveFeed, refresh_ms: int = 1000):
        self.feed = feed
        self.refresh_ms = refresh_ms
        self.css = InlineStyleSheet(css=R.CSS)  # one per session, shared by its text boxes
        self.symbol = pn.widgets.Select(label="Symbol", options=[], width=170)
        self.window = pn.widgets.Select(label="Last N minutes", options=WINDOWS, value=120, width=130)
        self.days = pn.widgets.RadioButtonGroup(options=list(DAYS), value="30 days", color="primary",
                                                variant="outline")
        self.banner = _box(self.css)
        self.status = _box(self.css)
        self._live_key = None
        self._last_t: int | None = None
        self._marker_key = None
        self._fan_key = None
        self._vector_key = None
        self._view_revs: dict[str, tuple] = {}
        # tabs other than Live are built when first opened (a session starts in a fraction of the time)
        self._builders = {1: self._build_backtest, 2: self._build_strategy, 3: self._build_model,
                          4: self._build_monitoring}
        self._tab_slots = [pn.Column(sizing_mode="stretch_width") for _ in TAB_NAMES]
        self._tab_slots[0].objects = [self._build_live()]
        self.tabs = pn.Tabs(*zip(TAB_NAMES, self._tab_slots), dynamic=False, sizing_mode="stretch_width")
        header = pn.Row(pn.pane.HTML('<h2 style="margin:6px 0;font-family:sans-serif">tickcast '
                                     '<span style="font-weight:400;font-size:15px;color:#666">live forecasts and '
                                     'signals (analytics only, never orders)</span></h2>'),
                        pn.HSpacer(), self.symbol, sizing_mode="stretch_width")
        self.layout = pn.Column(header, self.banner, self.status, self.tabs, sizing_mode="stretch_width")
        self.symbol.param.watch(lambda e: self.tick(), "value")
        self.window.param.watch(lambda e: self.tick(), "value")
        self.days.param.watch(lambda e: self.tick(), "value")
        self.tabs.param.watch(lambda e: self.tick(), "active")

    # ------------------------------------------------------------------ Live
    def _build_live(self):
        self.src_candles = ColumnDataSource(S.candle_columns([]), name="live_candles")
        self.src_fan = ColumnDataSource(S.forecast_fan(None), name="live_fan")
        self.src_signals = ColumnDataSource(S.signal_marker_columns([], {}, 0.0), name="live_signals")
        self.src_alerts = ColumnDataSource(S.alert_marker_columns([], {}, None, 0.0), name="live_alerts")
        self.src_frame = ColumnDataSource({"x": [], "y": []}, name="live_frame")  # keeps the window's x span
        p = _fig(430, x_axis_type="datetime", title="Price, 30-minute forecast fan, signals and alerts")
        wick = p.segment("x", "wick_lo", "x", "wick_hi", color="color", source=self.src_candles)
        body = p.vbar("x", 0.7 * MIN, "top", "bottom", fill_color="color", line_color="color",
                      source=self.src_candles, legend_label="1-min candles")
        band = p.varea("x", "lower", "upper", source=self.src_fan, fill_color="#42a5f5", fill_alpha=0.25,
                       legend_label="forecast q0.1-q0.9")
        med = p.line("x", "median", source=self.src_fan, line_color="#1565c0", line_width=2, line_dash="dashed",
                     legend_label="forecast median")
        sig = p.scatter("x", "y", marker="marker", size=14, fill_color="color", line_color="#222",
                        source=self.src_signals, legend_label="signal fired (BUY/SELL)")
        alr = p.scatter("x", "y", marker="x", size=16, line_width=3, line_color="color", source=self.src_alerts,
                        legend_label="alert: actual outside the interval")
        frame = p.scatter("x", "y", source=self.src_frame, size=0, alpha=0)
        p.x_range.renderers = [body, band, frame]
        p.y_range.renderers = [wick, body, band, med, sig, alr]
        p.legend.orientation = "horizontal"
        p.legend.click_policy = "hide"
        p.legend.label_text_font_size = "11px"
        p.legend.spacing = 12
        p.add_layout(p.legend[0], "above")
        p.yaxis.formatter = NumeralTickFormatter(format="0,0.[0000]")
        p.add_tools(HoverTool(renderers=[body], tooltips=[("minute", "@label"), ("open", "@open{0,0.[0000]}"),
                                                           ("high", "@high{0,0.[0000]}"), ("low", "@low{0,0.[0000]}"),
                                                           ("close", "@close{0,0.[0000]}"),
                                                           ("volume", "@volume{0,0.[00]}")]),
                    HoverTool(renderers=[med], tooltips=[("step", "+@step min"), ("median", "@median{0,0.[0000]}"),
                                                          ("q0.1", "@lower{0,0.[0000]}"),
                                                          ("q0.9", "@upper{0,0.[0000]}")]),
                    HoverTool(renderers=[sig], tooltips=[("signal", "@action @label"), ("strength", "@strength{0.00}"),
                                                          ("why", "@reason")]),
                    HoverTool(renderers=[alr], tooltips=[("alert at", "@label"), ("forecast origin", "@origin"),
                                                          ("targets", "@targets"), ("detail", "@detail")]))
        v = _fig(140, x_axis_type="datetime", x_range=p.x_range,
                 title="Volume (minutes whose m1 feature vector the dashboard received)")
        v.vbar("x", 0.7 * MIN, "volume", 0, fill_color="color", line_color="color", fill_alpha=0.7,
               source=self.src_candles)
        v.yaxis.formatter = NumeralTickFormatter(format="0.[0]a")
        self.fig_price, self.fig_volume = p, v
        self.live_msg = _box(self.css)
        self.live_numbers = _box(self.css)
        self.live_signal = _box(self.css)
        self.live_features_title = _box(self.css)
        self.live_features = _box(self.css)
        self.live_charts = pn.Column(pn.pane.Bokeh(p, sizing_mode="stretch_width"),
                                     pn.pane.Bokeh(v, sizing_mode="stretch_width"), sizing_mode="stretch_width")
        side = pn.Column(self.live_numbers, self.live_signal, self.live_features_title,
                         self.live_features, width=430)
        return pn.Column(pn.Row(self.window, sizing_mode="stretch_width"), self.live_msg,
                         pn.Row(self.live_charts, side, sizing_mode="stretch_width"), sizing_mode="stretch_width")

    def _update_live(self, snap: dict) -> None:
        feed, sym, n = self.feed, self.symbol.value, int(self.window.value)
        times = snap["times"]
        fc = snap["latest_forecast"]
        model = snap["model"] or {}
        last_sig = snap["latest_signal"] or {}
        state = S.live_state(api_error=snap["api_error"], model_version=model.get("champion_version"),
                             model_checked=snap["model_checked"], has_candles=bool(times), has_forecast=bool(fc),
                             symbol=sym, last_reason=(last_sig.get("reason") or "").removeprefix("no forecast: ")
                             or None)
        kind = state["kind"]
        _html(self.live_msg, "" if kind == "ok" else R.empty(state["message"], f"live-state-{kind}"))
        show = bool(times) or bool(fc)
        if self.live_charts.visible != show:
            self.live_charts.visible = show
        # candles: full redraw on a new symbol/window or a non-append change, else stream the new minutes
        start = times[-1] - (n - 1) * MIN if times else None
        key = (sym, n, snap["candle_reset"])
        if key != self._live_key:
            candles = feed.candles_between(sym, start) if sym else []
            self.src_candles.data = S.candle_columns(candles)
            self._live_key = key
            self._last_t = candles[-1]["t"] if candles else None
            self._marker_key = None
        elif sym:
            new = feed.candles_between(sym, None, after=self._last_t)
            if new:
                self.src_candles.stream(S.candle_columns(new), rollover=n)
                self._last_t = new[-1]["t"]
        horizon = (fc or {}).get("horizon") or model.get("horizon")
        if times:
            last_close = (feed.candles_between(sym, times[-1]) or [{}])[0].get("close")
            # at least 30 minutes of x span before the fan, at most the window (a single candle is not
            # blown up to the whole width)
            first = times[bisect_left(times, start)]
            x0 = max(start, min(first, times[-1] - 30 * MIN))
            frame = {"x": [x0, times[-1] + ((horizon or 30) + 1) * MIN], "y": [last_close, last_close]}
        else:
            frame = {"x": [], "y": []}
        _set(self.src_frame, frame)
        title = f"Price, {horizon or 30}-minute forecast fan (q0.1-q0.9, median), fired signals and alerts"
        if self.fig_price.title.text != title:
            self.fig_price.title.text = title
        # the fan of the latest forecast
        fkey = (sym, fc.get("origin_ts") if fc else None, fc.get("issued_ts") if fc else None)
        if fkey != self._fan_key:
            _set(self.src_fan, S.forecast_fan(fc))
            self._fan_key = fkey
        # markers: recomputed when the symbol's buffers changed
        mkey = (sym, n, snap["sym_rev"])
        if mkey != self._marker_key and sym:
            candles = feed.candles_between(sym, start)
            by_t = {c["t"]: c for c in candles}
            pad = S.marker_pad(candles)
            fired = [s for s in S.fired_signals(feed.signals_list(sym)) if start is None or s["origin_ts"] >= start]
            _set(self.src_signals, S.signal_marker_columns(fired, by_t, pad))
            alerts = [a for a in feed.alerts_list(sym)
                      if start is None or not horizon or a["origin_ts"] + horizon * MIN >= start]
            _set(self.src_alerts, S.alert_marker_columns(alerts, by_t, horizon, pad))
            self._marker_key = mkey
            self._update_live_numbers(snap, candles, fired, alerts)
        # the latest features
        vec = snap["vector"]
        vkey = (sym, vec.get("window_end") if vec else None, vec.get("emit_ts") if vec else None)
        if vkey != self._vector_key:
            rows = S.feature_rows(vec)
            _html(self.live_features, '<div style="max-height:360px;overflow-y:auto">' + R.table(
                ["feature", "value", "null because"], [(r["name"], r["value"], r["note"]) for r in rows],
                "live-features") + "</div>" if rows else "")
            self._vector_key = vkey
        if vec:
            title = (f"<b>Latest features</b> <span class='tc-note'>m1 window ending {S.fmt_ts(vec.get('window_end'))}"
                     f", venue {S.esc(vec.get('venue'))}, book {'valid' if vec.get('book_valid') else 'INVALID'}, "
                     f"received {S.fmt_age(vec.get('age_s'))} before the last poll</span>")
        else:
            title = "<b>Latest features</b> " + R.note(f"no m1 feature vector for {sym} yet" if sym else "")
        _html(self.live_features_title, title)

    def _update_live_numbers(self, snap: dict, candles: list[dict], fired: list[dict], alerts: list[dict]) -> None:
        fc = snap["latest_forecast"]
        summ = S.forecast_summary(fc)
        last = candles[-1] if candles else None
        items = [("last close", S.fmt_price(last["close"]) if last else "n/a",
                  S.fmt_ts(last["t"]) if last else "no candle yet", "last-close")]
        if summ:
            items += [(f"median +{summ['horizon']} min", S.fmt_price(summ["median"]),
                       S.fmt_num(summ["median_ret"], 3, pct=True, signed=True), "fc-median"),
                      ("q0.1 - q0.9", f"{S.fmt_price(summ['lower'])} - {S.fmt_price(summ['upper'])}",
                       (f"{S.fmt_num(summ['lower_ret'], 2, pct=True, signed=True)} / "
                        f"{S.fmt_num(summ['upper_ret'], 2, pct=True, signed=True)}"), "fc-interval"),
                      ("p up / flat / down", (f"{S.fmt_num(summ['p_up'], 2)} / {S.fmt_num(summ['p_flat'], 2)} / "
                                              f"{S.fmt_num(summ['p_down'], 2)}"),
                       f"origin {S.fmt_ts(summ['origin_ts'])}", "fc-probs")]
        items += [("signals fired", str(len(fired)), "in the window", "n-fired"),
                  ("alerts", str(len(alerts)), "in the window", "n-alerts")]
        _html(self.live_numbers, R.cards(items))
        sig = snap["latest_signal"]
        if sig:
            deg = " (degraded)" if sig.get("degraded") else ""
            text = (f"<div class='tc-card' data-testid='latest-signal'><div class='l'>latest signal, minute "
                    f"{S.fmt_ts(sig.get('origin_ts'))}{deg}</div><div class='v'>{R.action_html(sig.get('action'))} "
                    f"<span style='font-size:13px'>strength {S.fmt_num(sig.get('strength'), 2)}</span></div>"
                    f"<div class='s'>{S.esc(sig.get('reason'))}</div>"
                    f"<div class='s'>model {S.esc(sig.get('model_version') or 'none')}</div></div>")
        else:
            text = R.note("no signal yet")
        _html(self.live_signal, text)

    # ------------------------------------------------------------------ Backtest
    def _build_backtest(self):
        self.src_bt_candles = ColumnDataSource(S.candle_columns([]), name="bt_candles")
        self.src_bt_trades = ColumnDataSource(S.trade_marker_columns([]), name="bt_trades")
        self.src_bt_equity = ColumnDataSource(S.equity_columns([]), name="bt_equity")
        p = _fig(360, x_axis_type="datetime", title="Candles and the strategy's fills (T+1 at the next open)")
        self.fig_bt = p
        p.segment("x", "wick_lo", "x", "wick_hi", color="color", source=self.src_bt_candles)
        p.vbar("x", 0.7 * MIN, "top", "bottom", fill_color="color", line_color="color", source=self.src_bt_candles,
               legend_label="candles")
        tr = p.scatter("x", "y", marker="marker", size=13, fill_color="color", line_color="#222",
                       source=self.src_bt_trades, legend_label="trade fills")
        p.add_tools(HoverTool(renderers=[tr], tooltips=[("fill", "@label"), ("price", "@y{0,0.[0000]}"),
                                                         ("trade", "@text")]))
        p.legend.orientation = "horizontal"
        p.add_layout(p.legend[0], "above")
        p.yaxis.formatter = NumeralTickFormatter(format="0,0.[0000]")
        e = _fig(220, x_axis_type="datetime", x_range=p.x_range, title="Equity after fees and slippage")
        e.line("x", "equity", source=self.src_bt_equity, line_width=2, color="#3949ab")
        e.yaxis.formatter = NumeralTickFormatter(format="0,0.[00]")
        self.bt_msg = _box(self.css)
        self.bt_stats = _box(self.css)
        self.bt_charts = pn.Column(pn.pane.Bokeh(p, sizing_mode="stretch_width"),
                                   pn.pane.Bokeh(e, sizing_mode="stretch_width"), sizing_mode="stretch_width",
                                   visible=False)
        return pn.Column(self.bt_msg, self.bt_stats, self.bt_charts, sizing_mode="stretch_width")

    def _update_backtest(self, sym: str) -> None:
        v = self.feed.view(("backtest", sym, BACKTEST_CANDLES), ttl=15.0)
        key = (sym, v.rev)
        if self._view_revs.get("backtest") == key:
            return
        self._view_revs["backtest"] = key
        bt = v.data
        if not bt:
            msg = (f"No backtest for {sym}: {v.error}" if v.error else f"Loading the backtest of {sym}...")
            _html(self.bt_msg, R.empty(msg, "bt-empty"))
            _html(self.bt_stats, "")
            self.bt_charts.visible = False
            return
        rows = bt.get("rows") or []
        summ = S.backtest_summary(bt)
        bt_candles = S.candles_from_backtest_rows(rows)
        _set(self.src_bt_candles, S.candle_columns(bt_candles))
        self.fig_bt.title.text = (f"Last {BACKTEST_CANDLES} minutes ({len(bt_candles)} candles the API holds) and the "
                                  "strategy's fills (T+1 at the next open)")
        _set(self.src_bt_trades, S.trade_marker_columns(rows))
        _set(self.src_bt_equity, S.equity_columns(bt.get("equity") or [], summ.get("capital")))
        reason = summ.get("reason")
        _html(self.bt_msg, R.empty(f"{sym}: {reason}", "bt-empty") if reason and not rows else
              (R.banner("warn", reason, "bt-note") if reason else ""))
        a = summ["actions"]
        _html(self.bt_stats, R.cards([
            ("P&L after fees", S.fmt_num(summ["pnl"], 2, signed=True),
             f"{S.fmt_num(summ['total_return'], 3, pct=True, signed=True)} on {S.fmt_num(summ['capital'], 0)}",
             "bt-pnl"),
            ("hit rate", S.fmt_num(summ["hit_rate"], 1, pct=True), f"direction, n={summ['hit_n'] or 0}", "bt-hit"),
            ("trades", str(summ["n_trades"] if summ["n_trades"] is not None else "n/a"),
             f"win rate {S.fmt_num(summ['win_rate'], 1, pct=True)}", "bt-trades"),
            ("fees paid", S.fmt_num(summ["fees_paid"], 2), (f"{S.fmt_num(summ['fee_bps'], 1)} bps fee + "
                                                           f"{S.fmt_num(summ['slippage_bps'], 1)} bps slippage / side"),
             "bt-fees"),
            ("interval coverage", S.fmt_num(summ["coverage"], 1, pct=True),
             f"nominal {S.fmt_num(summ['nominal_coverage'], 0, pct=True)}, n={summ['coverage_n'] or 0}", "bt-cov"),
            ("signals", f"{a.get('BUY', 0)} / {a.get('SELL', 0)} / {a.get('FLAT', 0)}",
             f"BUY / SELL / FLAT; {a.get('none', 0)} minutes without forecast; model {summ['model_version']}",
             "bt-signals"),
        ]))
        self.bt_charts.visible = bool(rows)

    # ------------------------------------------------------------------ Strategy
    def _build_strategy(self):
        self.src_st_equity = ColumnDataSource(S.equity_columns([]), name="st_equity")
        self.src_st_monthly = ColumnDataSource(S.monthly_pnl_columns(None), name="st_monthly")
        p = _fig(300, x_axis_type="datetime", title="Cumulative P&L after fees (quote currency)")
        p.line("x", "pnl", source=self.src_st_equity, line_width=2, color="#00897b")
        p.add_layout(Span(location=0, dimension="width", line_color="#999", line_dash="dotted"))
        p.yaxis.formatter = NumeralTickFormatter(format="0,0.[00]")
        m = figure(height=240, sizing_mode="stretch_width", x_range=FactorRange(), title="Monthly P&L after fees",
                   toolbar_location=None, tools="")
        m.vbar(x="month", top="pnl", width=0.6, color="color", source=self.src_st_monthly)
        m.add_tools(HoverTool(tooltips=[("month", "@month"), ("P&L", "@text")]))
        m.add_layout(Span(location=0, dimension="width", line_color="#999"))
        self.fig_monthly = m
        self.st_msg = _box(self.css)
        self.st_stats = _box(self.css)
        self.st_charts = pn.Column(pn.pane.Bokeh(p, sizing_mode="stretch_width"),
                                   pn.pane.Bokeh(m, sizing_mode="stretch_width"), sizing_mode="stretch_width",
                                   visible=False)
        return pn.Column(pn.Row(pn.pane.HTML("<b style='font-family:sans-serif'>Period</b>"), self.days),
                         self.st_msg, self.st_stats, self.st_charts, sizing_mode="stretch_width")

    def _update_strategy(self, sym: str) -> None:
        days = DAYS[self.days.value]
        v = self.feed.view(("strategy", sym, days), ttl=20.0)
        key = (sym, days, v.rev)
        if self._view_revs.get("strategy") == key:
            return
        self._view_revs["strategy"] = key
        pnl = v.data
        if not pnl:
            msg = f"No strategy P&L for {sym}: {v.error}" if v.error else f"Loading the strategy P&L of {sym}..."
            _html(self.st_msg, R.empty(msg, "st-empty"))
            _html(self.st_stats, "")
            self.st_charts.visible = False
            return
        summ = S.strategy_summary(pnl)
        eq = S.equity_columns(pnl.get("equity") or [], summ.get("capital"))
        _set(self.src_st_equity, eq)
        monthly = S.monthly_pnl_columns(pnl.get("stats"))
        _set(self.src_st_monthly, monthly)
        if list(self.fig_monthly.x_range.factors) != monthly["month"]:
            self.fig_monthly.x_range.factors = monthly["month"]
        if summ.get("reason") or not eq["x"]:
            _html(self.st_msg, R.empty(f"No strategy P&L for {sym} over the last {days} d: "
                                       f"{summ.get('reason') or 'no equity points'}", "st-empty"))
        else:
            _html(self.st_msg, "")
        sg = summ["signals"]
        _html(self.st_stats, R.cards([
            ("P&L after fees", S.fmt_num(summ["pnl"], 2, signed=True),
             f"{S.fmt_num(summ['total_return'], 3, pct=True, signed=True)} over {summ['minutes']} minutes", "st-pnl"),
            ("P&L per 30 days", S.fmt_num(summ["pnl_per_30d"], 2, signed=True), "the business metric (pro rata)",
             "st-pnl30"),
            ("Sharpe", S.fmt_num(summ["sharpe"], 2), f"Sortino {S.fmt_num(summ['sortino'], 2)} (annualised)",
             "st-sharpe"),
            ("max drawdown", S.fmt_num(summ["max_drawdown"], 2, pct=True), "of equity", "st-mdd"),
            ("trades", str(summ["n_trades"] if summ["n_trades"] is not None else "n/a"),
             f"win rate {S.fmt_num(summ['win_rate'], 1, pct=True)}, fees {S.fmt_num(summ['fees_paid'], 2)}",
             "st-trades"),
            ("signals", f"{sg.get('BUY', 0)} / {sg.get('SELL', 0)} / {sg.get('FLAT', 0)}",
             f"BUY / SELL / FLAT minutes; {sg.get('none', 0)} without a published forecast", "st-signals"),
        ]))
        self.st_charts.visible = bool(eq["x"])

    # ------------------------------------------------------------------ Model
    def _build_model(self):
        self.src_calib = ColumnDataSource({"level": [], "observed": [], "n": []}, name="model_calibration")
        self.src_model_cov = ColumnDataSource(S.rolling_coverage([]), name="model_coverage")
        c = figure(height=300, width=360, title="Calibration of Close(t+H) quantiles", x_range=(0, 1), y_range=(0, 1),
                   x_axis_label="quantile level", y_axis_label="share of actuals at or below", toolbar_location=None,
                   tools="")
        c.line([0, 1], [0, 1], line_dash="dashed", color="#999")
        c.line("level", "observed", source=self.src_calib, line_width=2, color="#5e35b1")
        c.scatter("level", "observed", source=self.src_calib, size=9, color="#5e35b1")
        c.add_tools(HoverTool(tooltips=[("level", "@level"), ("observed", "@observed{0.000}"), ("n", "@n")]))
        cov = _fig(300, x_axis_type="datetime", title="Interval coverage over time (rolling 60 outcomes)")
        cov.line("x", "coverage", source=self.src_model_cov, line_width=2, color="#00838f")
        self.model_nominal = Span(location=0.8, dimension="width", line_color="#c62828", line_dash="dashed")
        cov.add_layout(self.model_nominal)
        cov.y_range.start, cov.y_range.end = 0, 1.02
        cov.yaxis.formatter = NumeralTickFormatter(format="0%")
        self.model_card = _box(self.css)
        self.model_skill = _box(self.css)
        self.model_offline = _box(self.css)
        self.model_compare = _box(self.css)
        self.model_quality_msg = _box(self.css)
        self.model_charts = pn.Row(pn.pane.Bokeh(c), pn.pane.Bokeh(cov, sizing_mode="stretch_width"),
                                   sizing_mode="stretch_width", visible=False)
        return pn.Column(self.model_card, self.model_skill, self.model_quality_msg, self.model_charts,
                         self.model_offline, self.model_compare, sizing_mode="stretch_width")

    def _history(self, sym: str):
        return self.feed.view(("history", sym, 1440), ttl=15.0)

    def _update_model(self, sym: str, snap: dict) -> None:
        model = snap["model"]
        if snap["api_error"] and not model:
            _html(self.model_card, R.empty(f"The prediction API is unreachable: {snap['api_error']}", "model-empty"))
        elif not model or not model.get("champion_version"):
            err = (model or {}).get("last_error")
            _html(self.model_card, R.empty("No champion model yet: the registry has no version with the champion "
                                           "alias" + (f" ({err})" if err else "") + ".", "model-empty"))
        else:
            swaps = model.get("swaps") or []
            sig = model.get("signal")
            rule = (f"p_up - p_down vs threshold {S.fmt_num(sig.get('threshold'), 3)}, hold {sig.get('hold')} min"
                    if isinstance(sig, dict) else "fallback rule: favourite direction agrees with the median "
                                                  f"beyond +-{S.fmt_num(model.get('flat_threshold'), 4)}")
            _html(self.model_card, R.cards([
                ("champion", f"v{model.get('champion_version')}", str(model.get("name")), "model-version"),  # cards() escapes
                ("promoted", S.fmt_ts(model.get("promoted_ts")),
                 f"loaded {S.fmt_ts((model.get('loaded_at') or 0) * 1000)}", "model-promoted"),
                ("contract", f"L={model.get('lookback')} H={model.get('horizon')}",
                 f"{len(model.get('variates') or [])} variates, quantiles {model.get('quantiles')}", "model-contract"),
                ("signal rule", "tuned" if isinstance(sig, dict) else "fallback", rule, "model-rule"),
                ("swaps", str(len(swaps)), (f"last: v{swaps[-1].get('from')} -> v{swaps[-1].get('to')}"
                                            if swaps else "none since the API started"), "model-swaps"),
            ]))
        v = self._history(sym)
        key = (sym, v.rev, (model or {}).get("champion_version"))
        if self._view_revs.get("model") == key:
            return
        self._view_revs["model"] = key
        items = (v.data or {}).get("items") or []
        skill = S.live_skill(items)
        calib = S.calibration_rows(items)
        covc = S.rolling_coverage(items)
        if skill["n"]:
            _html(self.model_skill, "<b style='font-family:sans-serif'>Live record of " + S.esc(sym) +
                  f" (last {len(items)} minutes, {skill['n']} outcomes joined)</b>" + R.cards([
                      ("median MAE", S.fmt_price(skill["mae_model"]),
                       f"random walk {S.fmt_price(skill['mae_random_walk'])}", "skill-mae"),
                      ("skill vs random walk", S.fmt_num(skill["skill_vs_random_walk"], 1, pct=True),
                       "1 - MAE ratio (higher is better)", "skill-rw"),
                      ("direction hit rate", S.fmt_num(skill["hit_rate"], 1, pct=True),
                       (f"always-up baseline {S.fmt_num(skill['hit_rate_always_up'], 1, pct=True)}, "
                        f"n={skill['direction_n']}"), "skill-hit"),
                      ("interval coverage", S.fmt_num(skill["coverage"], 1, pct=True),
                       f"nominal {S.fmt_num(skill['nominal_coverage'], 0, pct=True)}, n={skill['coverage_n']}",
                       "skill-cov"),
                  ]))
            _html(self.model_quality_msg, "")
        else:
            why = v.error or ("loading..." if v.data is None else
                              "no forecast has reached its horizon yet (outcomes are joined H minutes later)")
            _html(self.model_skill, "")
            _html(self.model_quality_msg, R.empty(f"No live quality record for {sym} yet: {why}", "model-quality-empty"))
        _set(self.src_calib, {"level": [r["level"] for r in calib], "observed": [r["observed"] for r in calib],
                              "n": [r["n"] for r in calib]})
        _set(self.src_model_cov, covc)
        if skill.get("nominal_coverage"):
            self.model_nominal.location = skill["nominal_coverage"]
        self.model_charts.visible = bool(calib)
        rows = S.model_metric_rows(model)
        if rows:
            _html(self.model_offline, "<b style='font-family:sans-serif'>Offline evaluation (from the registry)</b>"
                  + R.table(["metric", "value"], [(r["metric"], r["value"]) for r in rows], "model-metrics"))
        else:
            _html(self.model_offline, R.banner(
                "info", "The champion's MLflow run carries no offline metrics (GET /model has none): it was "
                        "registered without a validation run. The live record above compares the champion "
                        "with naive baselines on the minutes it actually served.", "model-offline-missing"))
        cmp_rows = S.variate_comparison_rows(model)
        if cmp_rows:
            extra = ((model or {}).get("tags") or {}).get("cmp_main_extra_variates", "")
            title = (f"Baseline (without mempool) vs main (with mempool{': ' + extra if extra else ''}), "
                     "identical origins and splits")
            _html(self.model_compare, "<b style='font-family:sans-serif' data-testid='model-compare-title'>"
                  f"{R.esc(title)}</b>"
                  + R.table(["target", "metric", "baseline", "main", "change"],
                            [(r["target"], r["metric"], r["baseline"], r["main"], r["change"]) for r in cmp_rows],
                            "model-compare"))
        else:
            _html(self.model_compare, R.empty(
                "No baseline (without mempool) vs main (with mempool) comparison on the champion's run: it needs a "
                "dataset with mempool history (`python -m model.compare --dataset <id>` trains both on identical "
                "splits and logs it here). The shared real data has no mempool history.", "model-compare-empty"))

    # ------------------------------------------------------------------ Monitoring
    def _build_monitoring(self):
        self.src_served = ColumnDataSource({"symbol": [], "pct": [], "color": [], "text": []}, name="mon_served")
        self.src_mon_cov = ColumnDataSource(S.rolling_coverage([]), name="mon_coverage")
        s = figure(height=220, sizing_mode="stretch_width", x_range=FactorRange(), y_range=(0, 1.05),
                   title="Minutes served with a forecast (served + degraded) / all minutes", toolbar_location=None,
                   tools="")
        s.vbar(x="symbol", top="pct", width=0.6, color="color", source=self.src_served)
        s.add_layout(Span(location=0.99, dimension="width", line_color="#c62828", line_dash="dashed"))
        s.yaxis.formatter = NumeralTickFormatter(format="0%")
        s.add_tools(HoverTool(tooltips=[("symbol", "@symbol"), ("served", "@text")]))
        self.fig_served = s
        cov = _fig(220, x_axis_type="datetime", title="Interval coverage over time, selected symbol (rolling 60)")
        cov.line("x", "coverage", source=self.src_mon_cov, line_width=2, color="#00838f")
        self.mon_nominal = Span(location=0.8, dimension="width", line_color="#c62828", line_dash="dashed")
        cov.add_layout(self.mon_nominal)
        cov.y_range.start, cov.y_range.end = 0, 1.02
        cov.yaxis.formatter = NumeralTickFormatter(format="0%")
        self.mon_health = _box(self.css)
        self.mon_latency = _box(self.css)
        self.mon_symbols = _box(self.css)
        self.mon_psi = _box(self.css)
        self.mon_msg = _box(self.css)
        self.mon_charts = pn.Row(pn.pane.Bokeh(s, sizing_mode="stretch_width"),
                                 pn.pane.Bokeh(cov, sizing_mode="stretch_width"), sizing_mode="stretch_width")
        return pn.Column(self.mon_msg, self.mon_health, self.mon_charts, self.mon_latency, self.mon_symbols,
                         self.mon_psi, sizing_mode="stretch_width")

    def _update_monitoring(self, sym: str, snap: dict) -> None:
        health = snap["health"]
        if snap["api_error"]:
            _html(self.mon_msg, R.banner("error", f"API health: unreachable ({snap['api_error']}); the numbers below "
                                                  "are the last ones received", "mon-unreachable"))
        else:
            _html(self.mon_msg, "")
        hrows = S.health_rows(health)
        overall = (health or {}).get("status", "unknown")
        _html(self.mon_health, f"<b style='font-family:sans-serif'>API health</b> {R.badge(overall)}" +
              R.table(["component", "status", "detail"], [(r["component"], R.badge(r["status"]), r["detail"])
                                                          for r in hrows], "mon-health", raw_cols=(1,)))
        v = self.feed.view(("monitoring",), ttl=3.0)
        hist = self._history(sym)
        key = (sym, v.rev, hist.rev, snap["rev"] // 50)
        if self._view_revs.get("monitoring") == key:
            return
        self._view_revs["monitoring"] = key
        mon = v.data or {}
        lat = S.latency_rows(self.feed.latency_samples(), mon.get("latency"))
        _html(self.mon_latency, "<b style='font-family:sans-serif'>Pipeline latency (ms)</b>" + R.table(
            ["stage", "n", "p50", "p90", "p99", "max"],
            [(r["stage"], r["n"], S.fmt_num(r["p50"], 1), S.fmt_num(r["p90"], 1), S.fmt_num(r["p99"], 1),
              S.fmt_num(r["max"], 1)) for r in lat], "mon-latency"))
        rows = S.monitoring_rows(mon, self.feed.vectors())
        if rows:
            _html(self.mon_symbols, "<b style='font-family:sans-serif'>Per symbol (since the API started)</b>" +
                  R.table(["symbol", "served", "degraded", "skipped", "data gaps (min)", "served %", "alerts",
                           "close coverage", "PSI max", "feature age", "book", "sequence errors",
                           "invalid-book min"],
                          [(r["symbol"], r["served"], r["degraded"], r["skipped"], r["gaps"],
                            S.fmt_num(r["served_ratio"], 2, pct=True), r["alerts"],
                            f"{S.fmt_num(r['coverage'], 1, pct=True)} (n={r['coverage_n']})",
                            S.fmt_num(r["psi_max"], 3), S.fmt_age(r["feature_age_s"]),
                            "n/a" if r["book_valid"] is None else ("valid" if r["book_valid"] else "INVALID"),
                            f"{r['seq_errors']}" + (f" ({r['seq_reasons']})" if r["seq_reasons"] else ""),
                            r["book_invalid_minutes"])
                           for r in rows], "mon-symbols")
                  + R.note("Sequence errors: the feature flow's order-book resync requests (gap, crossed or stale "
                           "book; at most one per symbol per resync interval). Exact per-event counts (gaps, "
                           "repeats, late events) are the gateway's and the flow's Prometheus metrics."))
        else:
            _html(self.mon_symbols, R.empty(f"No monitoring data: {v.error}" if v.error else "Loading monitoring...",
                                            "mon-empty"))
        served = {"symbol": [r["symbol"] for r in rows], "pct": [r["served_ratio"] or 0.0 for r in rows],
                  "color": [S.UP_COLOR if (r["served_ratio"] or 0) >= 0.99 else "#ef6c00" for r in rows],
                  "text": [S.fmt_num(r["served_ratio"], 2, pct=True) for r in rows]}
        if list(self.fig_served.x_range.factors) != served["symbol"]:
            self.fig_served.x_range.factors = served["symbol"]
        _set(self.src_served, served)
        prow = S.psi_rows(mon)
        note = mon.get("psi_note")
        _html(self.mon_psi, "<b style='font-family:sans-serif'>Feature drift (PSI vs the training distribution)</b>"
              + (R.table(["symbol", "feature", "PSI", "level"], [(r["symbol"], r["feature"], S.fmt_num(r["psi"], 3),
                                                                   r["level"]) for r in prow], "mon-psi")
                 if prow else R.note(note or "no PSI computed yet")))
        items = (hist.data or {}).get("items") or []
        covc = S.rolling_coverage(items)
        _set(self.src_mon_cov, covc)
        nominal = S.live_skill(items).get("nominal_coverage")
        if nominal:
            self.mon_nominal.location = nominal

    # ------------------------------------------------------------------ the tick
    def tick(self) -> None:
        try:
            self._tick()
        except Exception as exc:  # a rendering bug must not kill the session's callback
            log.exception("dashboard tick failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _tick(self) -> None:
        feed = self.feed
        syms = feed.snapshot(None)["symbols"]
        if list(self.symbol.options) != syms:
            self.symbol.options = syms
        if syms and self.symbol.value not in syms:
            self.symbol.value = syms[0]  # triggers a tick of its own
            return
        sym = self.symbol.value
        snap = feed.snapshot(sym)
        self._update_banner(snap, sym)
        self._update_live(snap)
        idx = self.tabs.active if 0 <= self.tabs.active < len(TAB_NAMES) else 0
        if idx in self._builders:
            self._tab_slots[idx].objects = [self._builders.pop(idx)()]
        active = TAB_NAMES[idx]
        if sym and active == "Backtest":
            self._update_backtest(sym)
        elif sym and active == "Strategy":
            self._update_strategy(sym)
        elif active == "Model" and sym:
            self._update_model(sym, snap)
        elif active == "Monitoring" and sym:
            self._update_monitoring(sym, snap)

    def _update_banner(self, snap: dict, sym: str | None = None) -> None:
        parts = []
        if snap["api_error"]:
            parts.append(R.banner("error", f"Prediction API unreachable at {self.feed.api_url}: {snap['api_error']}."
                                           " Retrying; the data shown (if any) is the last received.",
                                  "banner-unreachable"))
        elif snap["sse_state"] != "live":
            parts.append(R.banner("warn", f"Live stream {snap['sse_state']}"
                                          f"{': ' + snap['sse_detail'] if snap['sse_detail'] else ''}; reconnecting.",
                                  "banner-stream"))
        # what the chart shows counts too: after an API restart (or with the feature flow down) it
        # draws the REST backfill (candles of a sim.* venue, signals flagged simulated) with no live data
        shown = [{**c, "symbol": sym} for c in self.feed.last_candles(sym, 5)] if sym else []
        sim = S.simulated_sources(self.feed.latest_forecasts(), [*self.feed.vectors().values(), *shown],
                                  self.feed.signals_list(sym)[-5:] if sym else ())
        if sim:
            parts.append(R.banner("sim", "SIMULATED DATA: these prices come from the local simulated exchange, not "
                                         f"from Bybit ({S.simulated_text(sim)}).", "banner-simulated"))
        _html(self.banner, "".join(parts))
        model = snap["model"] or {}
        last = snap["last_event_at"]
        status = (f"<span class='tc-status' data-testid='status-line'>API {S.esc(self.feed.api_url)} &middot; "
                  f"stream {S.esc(snap['sse_state'])} &middot; events {snap['events_total']} &middot; last event "
                  f"{S.fmt_age(time.time() - last) if last else 'never'} ago &middot; champion "
                  f"{S.esc(model.get('champion_version') or 'none')}</span>")
        _html(self.status, status)


def create_app(feed: LiveFeed | None = None, refresh_ms: int = 1000) -> pn.Column:
    """The dashboard of one session (the feed is the process-wide one unless given)."""
    if feed is None:
        args = parse_args(sys.argv[1:])
        feed = get_feed(resolve_api_url(args.api_url), poll_s=args.poll_s, history_minutes=args.history_minutes)
        refresh_ms = args.refresh_ms
    dash = Dashboard(feed, refresh_ms)
    dash.tick()
    if pn.state.curdoc is not None:
        pn.state.add_periodic_callback(dash.tick, period=refresh_ms)
    return dash.layout

