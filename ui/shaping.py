"""Data shaping for the dashboard: plain, pure functions from API records to chart columns and tables.

Nothing here touches Panel, Bokeh or the network: every function takes the JSON the API sends
(``api/schemas.py``) and returns dicts of lists (ColumnDataSource columns) or small row lists, so the
dashboard's layout code stays thin and this module is unit-tested on its own (tests/test_ui_shaping.py).

Time axis: epoch milliseconds. A candle of minute ``t`` (its start, the API's ``origin_ts``
convention) is drawn centred on ``t + 30 s``; a forecast of Close(t+h) is drawn at the centre of minute
``t + h`` (the minute whose close it forecasts), so the fan starts at the origin candle's close.
"""
from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

MIN = 60_000
HALF = MIN // 2
NAN = float("nan")

UP_COLOR = "#26a69a"
DOWN_COLOR = "#ef5350"
FLAT_COLOR = "#9e9e9e"

# shown first in the latest-features table (when the vector carries them)
KEY_FEATURES = (
    "close", "log_return_1m", "return_15m", "volume_1m", "trade_count_1m", "vwap_1m", "spread_rel",
    "depth_imbalance_top5", "obi_l1", "volatility_1m", "volatility_5m", "rv_15m", "vpin_5m", "kyle_lambda_1m",
    "roll_measure_1m", "net_aggressor_pressure_1m", "funding_rate", "time_to_funding", "open_interest", "basis_rel",
    "mempool_tx_count", "mempool_fee_fastest", "news_count_1h", "news_sent_mean_1h",
)


# ------------------------------------------------------------------------------------------ numbers
def num(v: Any) -> float | None:
    """float(v) when v is a finite number (bools are not numbers here), else None."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def nan_if_none(v: Any) -> float:
    f = num(v)
    return NAN if f is None else f


def nearest_index(levels: Sequence[float], target: float) -> int | None:
    """Index of the level closest to ``target`` (None for no levels)."""
    if not levels:
        return None
    return min(range(len(levels)), key=lambda i: abs(float(levels[i]) - target))


def fmt_num(v: Any, digits: int = 2, pct: bool = False, signed: bool = False) -> str:
    f = num(v)
    if f is None:
        return "n/a"
    if pct:
        return f"{f * 100:+.{digits}f}%" if signed else f"{f * 100:.{digits}f}%"
    return f"{f:+,.{digits}f}" if signed else f"{f:,.{digits}f}"


def fmt_price(v: Any) -> str:
    """A price with precision that suits its size (BTC 96,123.40; a 0.3 token 0.30125)."""
    f = num(v)
    if f is None:
        return "n/a"
    a = abs(f)
    digits = 2 if a >= 1000 else 3 if a >= 100 else 4 if a >= 1 else 6
    return f"{f:,.{digits}f}"


def fmt_value(v: Any) -> str:
    """A feature value: compact, never scientific for ordinary magnitudes."""
    f = num(v)
    if f is None:
        return "null"
    a = abs(f)
    if a == 0:
        return "0"
    if a >= 1e6:
        return f"{f:,.0f}"
    if a >= 1:
        return f"{f:,.4f}".rstrip("0").rstrip(".")
    if a >= 1e-4:
        return f"{f:.6f}".rstrip("0").rstrip(".")
    return f"{f:.3e}"


def fmt_ts(ms: Any, seconds: bool = False) -> str:
    """UTC time of epoch milliseconds."""
    f = num(ms)
    if f is None:
        return "n/a"
    dt = datetime.fromtimestamp(f / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def fmt_age(seconds: Any) -> str:
    f = num(seconds)
    if f is None:
        return "never"
    if f < 120:
        return f"{f:.0f} s"
    if f < 7200:
        return f"{f / 60:.0f} min"
    if f < 172800:
        return f"{f / 3600:.1f} h"
    return f"{f / 86400:.1f} d"


def esc(v: Any) -> str:
    return html.escape("" if v is None else str(v))


# ------------------------------------------------------------------------------------------ candles
def candle_from_vector(fv: Mapping[str, Any]) -> dict | None:
    """A 1-minute candle from an m1 FeatureVector (``GET /features/latest``), or None without a close.

    ``open`` is the vector's ``open`` when present, else recovered from ``body_rel_1m = (C - O) / O``
    (flows/candles.py) exactly as the API's own candle does; ``high``/``low`` only when the vector
    carries them (``high``/``low`` or ``high_1m``/``low_1m``), never invented; volume from ``volume_1m``
    (trades) or ``log_volume_1m = log(1 + V)``."""
    if fv.get("cadence", "m1") != "m1":
        return None
    end = fv.get("window_end")
    if not isinstance(end, int) or isinstance(end, bool):
        return None
    v = fv.get("values") or {}
    close = num(v.get("close"))
    if close is None or close <= 0:
        return None
    open_ = num(v.get("open_1m"))
    open_ = open_ if open_ is not None else num(v.get("open"))
    if open_ is None:
        b = num(v.get("body_rel_1m"))
        if b is not None and b > -1.0:
            open_ = close / (1.0 + b)
    high = num(v.get("high_1m"))
    high = high if high is not None else num(v.get("high"))
    low = num(v.get("low_1m"))
    low = low if low is not None else num(v.get("low"))
    vol = num(v.get("candle_volume_1m"))  # the minute's candle (trades by match time)
    vol = vol if vol is not None else num(v.get("volume_1m"))
    if vol is None:
        lv = num(v.get("log_volume_1m"))
        vol = math.expm1(lv) if lv is not None and lv >= 0 else None
    return {"t": end - MIN, "open": open_, "high": high, "low": low, "close": close, "volume": vol,
            "venue": fv.get("venue")}


def candles_from_api(items: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Candles from ``GET /candles`` items (the API's stored 1-minute OHLCV, history minutes included)."""
    out = []
    for it in items:
        t, close = it.get("origin_ts"), num(it.get("close"))
        if isinstance(t, int) and not isinstance(t, bool) and close is not None and close > 0:
            out.append({"t": t, "open": num(it.get("open")), "high": num(it.get("high")), "low": num(it.get("low")),
                        "close": close, "volume": num(it.get("volume")), "venue": it.get("venue")})
    return out


def candles_from_history(items: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Close-only candles from ``GET /predictions/history`` items (``last_close`` is the close of the
    origin minute, recorded for skipped minutes too): the price history before any model ran."""
    out = []
    for it in items:
        t, close = it.get("origin_ts"), num(it.get("last_close"))
        if isinstance(t, int) and close is not None and close > 0:
            out.append({"t": t, "open": None, "high": None, "low": None, "close": close, "volume": None,
                        "venue": None})
    return out


def candles_from_backtest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Candles (open/close only) from ``GET /backtest`` rows: the API's own minutes, for a backfill."""
    out = []
    for r in rows:
        t, close = r.get("origin_ts"), num(r.get("close"))
        if isinstance(t, int) and close is not None:
            out.append({"t": t, "open": num(r.get("open")), "high": None, "low": None, "close": close,
                        "volume": None, "venue": None})
    return out


def _richness(c: Mapping[str, Any]) -> int:
    return sum(c.get(k) is not None for k in ("open", "high", "low", "close", "volume"))


def merge_candle(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict:
    """One minute seen twice (a backfill and a live vector): keep every known field, the newer
    value where both know it."""
    if old is None:
        return dict(new)
    out = dict(old)
    for k, v in new.items():
        if v is not None:
            out[k] = v
    return out


def candle_columns(candles: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """ColumnDataSource columns for candlesticks + volume, in the order given.

    The body spans open..close; without a known open the candle is a flat tick at the close. The
    wick spans low..high where both are known and bound the body; otherwise no wick is drawn
    (it collapses onto the body) rather than an invented one."""
    cols: dict[str, list] = {k: [] for k in ("x", "t", "open", "high", "low", "close", "top", "bottom",
                                             "wick_hi", "wick_lo", "volume", "color", "label")}
    for c in candles:
        close = num(c.get("close"))
        if close is None:
            continue
        o = num(c.get("open"))
        body_o = o if o is not None else close
        top, bottom = max(body_o, close), min(body_o, close)
        hi, lo = num(c.get("high")), num(c.get("low"))
        wick_hi = hi if hi is not None and hi >= top else top
        wick_lo = lo if lo is not None and lo <= bottom else bottom
        color = FLAT_COLOR if o is None else UP_COLOR if close >= o else DOWN_COLOR
        t = int(c["t"])
        cols["x"].append(t + HALF)
        cols["t"].append(t)
        cols["open"].append(nan_if_none(o))
        cols["high"].append(nan_if_none(hi))
        cols["low"].append(nan_if_none(lo))
        cols["close"].append(close)
        cols["top"].append(top)
        cols["bottom"].append(bottom)
        cols["wick_hi"].append(wick_hi)
        cols["wick_lo"].append(wick_lo)
        cols["volume"].append(nan_if_none(c.get("volume")))
        cols["color"].append(color)
        cols["label"].append(fmt_ts(t))
    return cols


def marker_pad(candles: Sequence[Mapping[str, Any]]) -> float:
    """How far above/below a candle a marker sits: half the median candle span, at least 2 bps."""
    spans, ref = [], None
    for c in candles:
        close = num(c.get("close"))
        if close is None:
            continue
        ref = close
        hi = num(c.get("high"))
        lo = num(c.get("low"))
        o = num(c.get("open"))
        vals = [x for x in (hi, lo, o, close) if x is not None]
        spans.append(max(vals) - min(vals))
    if ref is None:
        return 0.0
    spans.sort()
    med = spans[len(spans) // 2] if spans else 0.0
    return max(0.5 * med, abs(ref) * 2e-4)


def _extremes(c: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    if not c:
        return None, None
    vals = [v for v in (num(c.get("high")), num(c.get("low")), num(c.get("open")), num(c.get("close")))
            if v is not None]
    return (max(vals), min(vals)) if vals else (None, None)


# ------------------------------------------------------------------------------------------ forecast fan
def forecast_fan(forecast: Mapping[str, Any] | None, q_low: float = 0.1, q_high: float = 0.9) -> dict[str, list]:
    """The fan of a Forecast record: the [q_low, q_high] band and the median close path, anchored at
    the origin candle's close (x in ms at candle centres). Empty columns without a usable forecast."""
    cols: dict[str, list] = {"x": [], "lower": [], "upper": [], "median": [], "step": []}
    if not forecast:
        return cols
    path = forecast.get("close_path") or []
    levels = forecast.get("quantile_levels") or []
    origin = forecast.get("origin_ts")
    last = num(forecast.get("last_close"))
    if not path or not levels or not isinstance(origin, int) or last is None:
        return cols
    lo, hi, mid = nearest_index(levels, q_low), nearest_index(levels, q_high), nearest_index(levels, 0.5)
    cols["x"].append(origin + HALF)
    cols["lower"].append(last)
    cols["upper"].append(last)
    cols["median"].append(last)
    cols["step"].append(0)
    for h, step in enumerate(path, start=1):
        if len(step) != len(levels):
            return {k: [] for k in cols}
        vals = [num(v) for v in step]
        if vals[lo] is None or vals[hi] is None or vals[mid] is None:
            continue
        cols["x"].append(origin + h * MIN + HALF)
        cols["lower"].append(vals[lo])
        cols["upper"].append(vals[hi])
        cols["median"].append(vals[mid])
        cols["step"].append(h)
    if len(cols["x"]) == 1:
        return {k: [] for k in cols}
    return cols


def forecast_summary(forecast: Mapping[str, Any] | None, q_low: float = 0.1, q_high: float = 0.9) -> dict | None:
    """Numbers of the latest forecast: median and interval at the horizon, their returns, p_up/p_down."""
    fan = forecast_fan(forecast, q_low, q_high)
    if not fan["x"]:
        return None
    last = fan["median"][0]
    med, lo, hi = fan["median"][-1], fan["lower"][-1], fan["upper"][-1]
    return {"origin_ts": forecast["origin_ts"], "horizon": fan["step"][-1], "last_close": last, "median": med,
            "lower": lo, "upper": hi, "median_ret": med / last - 1.0, "lower_ret": lo / last - 1.0,
            "upper_ret": hi / last - 1.0, "p_up": num(forecast.get("p_up")), "p_flat": num(forecast.get("p_flat")),
            "p_down": num(forecast.get("p_down")), "degraded": bool(forecast.get("degraded")),
            "reason": forecast.get("reason"), "model_version": forecast.get("model_version"),
            "simulated": bool(forecast.get("simulated"))}


# ------------------------------------------------------------------------------------------ markers
def fired_signals(signals: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The signals that *fired*: a BUY or SELL whose action differs from the previous minute's
    (signals sorted by origin; a repeated BUY while the position is held is not a new marker)."""
    out, prev = [], None
    for s in sorted(signals, key=lambda s: s.get("origin_ts", 0)):
        a = s.get("action")
        if a in ("BUY", "SELL") and a != prev:
            out.append(dict(s))
        prev = a
    return out


def signal_marker_columns(signals: Sequence[Mapping[str, Any]], candles_by_t: Mapping[int, Mapping[str, Any]],
                          pad: float) -> dict[str, list]:
    """BUY markers below the candle's low, SELL markers above its high (at the origin minute)."""
    cols: dict[str, list] = {k: [] for k in ("x", "y", "action", "marker", "color", "strength", "reason", "label")}
    for s in signals:
        t = s.get("origin_ts")
        a = s.get("action")
        if not isinstance(t, int) or a not in ("BUY", "SELL"):
            continue
        hi, lo = _extremes(candles_by_t.get(t))
        if hi is None:
            continue
        buy = a == "BUY"
        cols["x"].append(t + HALF)
        cols["y"].append(lo - pad if buy else hi + pad)
        cols["action"].append(a)
        cols["marker"].append("triangle" if buy else "inverted_triangle")
        cols["color"].append(UP_COLOR if buy else DOWN_COLOR)
        cols["strength"].append(nan_if_none(s.get("strength")))
        cols["reason"].append(str(s.get("reason") or ""))
        cols["label"].append(fmt_ts(t))
    return cols


def alert_marker_columns(alerts: Sequence[Mapping[str, Any]], candles_by_t: Mapping[int, Mapping[str, Any]],
                         horizon: int | None, pad: float) -> dict[str, list]:
    """One marker per forecast origin whose actual left the interval, drawn on the minute whose
    close is Close(t+H): at the actual close for a ``close`` alert, else just beyond that candle."""
    cols: dict[str, list] = {k: [] for k in ("x", "y", "origin", "targets", "direction", "color", "detail",
                                             "label")}
    if not horizon:
        return cols
    by_origin: dict[int, list] = {}
    for a in alerts:
        t = a.get("origin_ts")
        if isinstance(t, int):
            by_origin.setdefault(t, []).append(a)
    for t in sorted(by_origin):
        group = by_origin[t]
        at = t + horizon * MIN
        close_alert = next((a for a in group if a.get("target") == "close"), None)
        hi, lo = _extremes(candles_by_t.get(at))
        if close_alert is not None and num(close_alert.get("actual")) is not None:
            y = num(close_alert["actual"])
        elif hi is not None:
            up = any(a.get("direction") == "above" for a in group)
            y = hi + 2 * pad if up else lo - 2 * pad
        else:
            continue
        direction = (close_alert or group[0]).get("direction")
        detail = "; ".join(
            f"{a.get('target')} {a.get('direction')} [{fmt_value(a.get('q_low'))}, {fmt_value(a.get('q_high'))}]: "
            f"actual {fmt_value(a.get('actual'))}" for a in sorted(group, key=lambda a: str(a.get("target"))))
        cols["x"].append(at + HALF)
        cols["y"].append(y)
        cols["origin"].append(fmt_ts(t))
        cols["targets"].append(", ".join(sorted(str(a.get("target")) for a in group)))
        cols["direction"].append(str(direction))
        cols["color"].append("#ff9800" if direction == "above" else "#7e57c2")
        cols["detail"].append(detail)
        cols["label"].append(fmt_ts(at))
    return cols


# ------------------------------------------------------------------------------------------ features
def feature_rows(fv: Mapping[str, Any] | None, key_first: Sequence[str] = KEY_FEATURES) -> list[dict]:
    """(name, value, note) rows of an m1 vector: the key features first, then the rest by name;
    a null value says why (the vector's ``nulls``)."""
    if not fv:
        return []
    values = fv.get("values") or {}
    nulls = fv.get("nulls") or {}
    order = [k for k in key_first if k in values] + sorted(k for k in values if k not in set(key_first))
    return [{"name": k, "value": fmt_value(values.get(k)), "note": str(nulls.get(k, "")) if num(values.get(k)) is None
             else ""} for k in order]


# ------------------------------------------------------------------------------------------ simulated / states
def is_simulated_venue(venue: Any) -> bool:
    return isinstance(venue, str) and (venue == "sim" or venue.startswith(("sim.", "sim-")))


def simulated_sources(forecasts: Iterable[Mapping[str, Any]] = (), vectors: Iterable[Mapping[str, Any]] = (),
                      history: Iterable[Mapping[str, Any]] = ()) -> dict[str, list[str]]:
    """Why the data counts as simulated: venue -> symbols, for m1 vectors from a ``sim.*`` venue and
    for records flagged ``simulated`` (listed under "flagged simulated"). Empty: nothing simulated."""
    out: dict[str, list[str]] = {}

    def add(key: str, sym: Any) -> None:
        syms = out.setdefault(key, [])
        name = str(sym or "?")
        if name not in syms:
            syms.append(name)

    for v in vectors:
        if v and is_simulated_venue(v.get("venue")):
            add(f"venue {v.get('venue')}", v.get("symbol"))
    for f in list(forecasts) + list(history):
        if f and f.get("simulated"):
            add("flagged simulated", f.get("symbol"))
    return out


def simulated_text(sources: Mapping[str, Sequence[str]]) -> str:
    """One line for the banner: ``venue sim.linear: BTCUSDT, ETHUSDT; flagged simulated: ...``."""
    return "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sources.items())


def live_state(*, api_error: str | None, model_version: str | None, model_checked: bool, has_candles: bool,
               has_forecast: bool, symbol: str | None, last_reason: str | None = None) -> dict:
    """What the Live tab says instead of (or over) its charts: kind in ok / unreachable / no_model /
    no_data / waiting, with a message."""
    if api_error:
        return {"kind": "unreachable", "message": f"The prediction API is unreachable: {api_error}"}
    if not symbol:
        return {"kind": "no_data", "message": "The API serves no symbols."}
    if not model_version and model_checked:
        why = f" The API says: {last_reason}." if last_reason else ""
        return {"kind": "no_model" if has_candles else "no_model_no_data",
                "message": "No champion model yet: no forecasts are being made." + why
                           + ("" if has_candles else f" No market data for {symbol} yet either.")}
    if not has_candles and not has_forecast:
        return {"kind": "no_data", "message": f"No data for {symbol} yet: no m1 feature vector and no forecast "
                                              "has reached the API for this symbol."}
    if not has_forecast:
        why = f": {last_reason}" if last_reason else ""
        return {"kind": "waiting", "message": f"No forecast for {symbol} yet{why}."}
    return {"kind": "ok", "message": ""}


# ------------------------------------------------------------------------------------------ backtest
def trade_marker_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Fills of the backtest's trades: a position decided at the close of minute t (``position``) is
    filled at the open of minute t+1 (model/backtest.py, T+1). A rise in position is a buy, a fall a
    sell; the text says whether it opens, closes or reverses."""
    cols: dict[str, list] = {k: [] for k in ("x", "y", "side", "marker", "color", "text", "label")}
    prev = 0.0
    for k, r in enumerate(rows):
        p = num(r.get("position")) or 0.0
        if p != prev:
            nxt = rows[k + 1] if k + 1 < len(rows) else None
            fill_t = nxt.get("origin_ts") if nxt else None
            fill_px = num(nxt.get("open")) if nxt else None
            if isinstance(fill_t, int) and fill_px is not None:
                buy = p > prev
                if prev == 0:
                    what = "open long" if p > 0 else "open short"
                elif p == 0:
                    what = "close long" if prev > 0 else "close short"
                else:
                    what = "reverse to long" if p > 0 else "reverse to short"
                cols["x"].append(fill_t + HALF)
                cols["y"].append(fill_px)
                cols["side"].append("BUY" if buy else "SELL")
                cols["marker"].append("triangle" if buy else "inverted_triangle")
                cols["color"].append(UP_COLOR if buy else DOWN_COLOR)
                cols["text"].append(f"{'buy' if buy else 'sell'} to {what} (signal at {fmt_ts(r.get('origin_ts'))})")
                cols["label"].append(fmt_ts(fill_t))
        prev = p
    return cols


def equity_columns(equity: Sequence[Mapping[str, Any]], capital: float | None = None) -> dict[str, list]:
    """x (ms, candle centres), equity, pnl = equity - capital (capital: the first point's base when
    not given, i.e. the config's capital)."""
    cols: dict[str, list] = {"x": [], "equity": [], "pnl": []}
    pts = [(p.get("minute_ts"), num(p.get("equity"))) for p in equity]
    pts = [(t, e) for t, e in pts if isinstance(t, int) and e is not None]
    if not pts:
        return cols
    base = num(capital)
    if base is None:
        base = 10_000.0
    for t, e in pts:
        cols["x"].append(t + HALF)
        cols["equity"].append(e)
        cols["pnl"].append(e - base)
    return cols


def backtest_summary(bt: Mapping[str, Any] | None) -> dict:
    """The numbers of the Backtest tab from ``GET /backtest``."""
    if not bt:
        return {}
    st = bt.get("stats") or {}
    q = bt.get("quality") or {}
    rows = bt.get("rows") or []
    cfg = bt.get("config") or {}
    actions: dict[str, int] = {"BUY": 0, "SELL": 0, "FLAT": 0, "none": 0}
    for r in rows:
        actions[r.get("action") or "none"] = actions.get(r.get("action") or "none", 0) + 1
    return {"candles": len(rows), "model_version": bt.get("model_version"), "pnl": num(st.get("pnl")),
            "total_return": num(st.get("total_return")), "hit_rate": num(q.get("direction_hit_rate")),
            "hit_n": q.get("direction_n"), "win_rate": num(st.get("win_rate")), "n_trades": st.get("n_trades"),
            "fees_paid": num(st.get("fees_paid")), "sharpe": num(st.get("sharpe")),
            "max_drawdown": num(st.get("max_drawdown")), "coverage": num(q.get("close_interval_coverage")),
            "coverage_n": q.get("coverage_n"), "nominal_coverage": num(q.get("nominal_coverage")),
            "fee_bps": num(cfg.get("fee_bps")), "slippage_bps": num(cfg.get("slippage_bps")),
            "capital": num(cfg.get("capital")), "actions": actions, "reason": bt.get("reason")}


# ------------------------------------------------------------------------------------------ strategy
def monthly_pnl_columns(stats: Mapping[str, Any] | None) -> dict[str, list]:
    """Months (YYYY-MM, sorted) and their P&L after fees, coloured by sign."""
    cols: dict[str, list] = {"month": [], "pnl": [], "color": [], "text": []}
    monthly = (stats or {}).get("monthly_pnl") or {}
    for m in sorted(monthly):
        v = num(monthly[m])
        if v is None:
            continue
        cols["month"].append(str(m))
        cols["pnl"].append(v)
        cols["color"].append(UP_COLOR if v >= 0 else DOWN_COLOR)
        cols["text"].append(fmt_num(v, 2, signed=True))
    return cols


def strategy_summary(pnl: Mapping[str, Any] | None) -> dict:
    """The numbers of the Strategy tab from ``GET /strategy/pnl``."""
    if not pnl:
        return {}
    st = pnl.get("stats") or {}
    cfg = pnl.get("config") or {}
    return {"days": num(pnl.get("days")), "minutes": pnl.get("minutes"), "pnl": num(st.get("pnl")),
            "pnl_per_30d": num(st.get("pnl_per_30d")), "total_return": num(st.get("total_return")),
            "sharpe": num(st.get("sharpe")), "sortino": num(st.get("sortino")),
            "max_drawdown": num(st.get("max_drawdown")), "n_trades": st.get("n_trades"),
            "win_rate": num(st.get("win_rate")), "fees_paid": num(st.get("fees_paid")),
            "exposure": num(st.get("exposure")), "signals": dict(pnl.get("signals") or {}),
            "capital": num(cfg.get("capital")), "from_ts": pnl.get("from_ts"), "to_ts": pnl.get("to_ts"),
            "reason": pnl.get("reason")}


# ------------------------------------------------------------------------------------------ model quality
def _scored(items: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], dict]]:
    out = []
    for it in items:
        o = it.get("outcome") or {}
        if o.get("status") == "complete" and num(o.get("close_h")) is not None and it.get("close_h_q"):
            out.append((it, o))
    return out


def calibration_rows(items: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Per quantile level: how often the realised Close(t+H) fell at or below the forecast quantile
    (a calibrated q0.1 is above the actual 10 % of the time), over the items with a joined outcome."""
    counts: dict[float, list[int]] = {}
    for it, o in _scored(items):
        levels = it.get("quantile_levels") or []
        qs = it.get("close_h_q") or []
        if len(levels) != len(qs):
            continue
        y = num(o["close_h"])
        for lv, q in zip(levels, qs):
            qv = num(q)
            if qv is None:
                continue
            c = counts.setdefault(round(float(lv), 6), [0, 0])
            c[0] += y <= qv
            c[1] += 1
    return [{"level": lv, "observed": k / n, "n": n, "error": k / n - lv} for lv, (k, n) in sorted(counts.items())]


def rolling_coverage(items: Sequence[Mapping[str, Any]], window: int = 60) -> dict[str, list]:
    """Interval coverage over time: the share of the last ``window`` joined outcomes (by origin) whose
    actual close was inside [q_low, q_high]; x = origin + horizon (when the outcome became known)."""
    cols: dict[str, list] = {"x": [], "coverage": [], "n": []}
    flags: list[bool] = []
    for it in sorted(items, key=lambda i: i.get("origin_ts", 0)):
        o = it.get("outcome") or {}
        inside = o.get("close_inside")
        if o.get("status") != "complete" or not isinstance(inside, bool):
            continue
        flags.append(inside)
        w = flags[-window:]
        h = it.get("horizon") or 0
        cols["x"].append(int(it["origin_ts"]) + int(h) * MIN + HALF)
        cols["coverage"].append(sum(w) / len(w))
        cols["n"].append(len(w))
    return cols


def live_skill(items: Iterable[Mapping[str, Any]]) -> dict:
    """The champion against naive baselines on its own live record (joined outcomes):

    - median MAE of Close(t+H) vs the random walk (Close(t+H) = C_t), and the skill 1 - ratio;
    - direction hit rate of the median vs the always-up baseline;
    - interval coverage vs the nominal q_high - q_low."""
    n = 0
    err_m = err_rw = 0.0
    hits = dir_n = ups = 0
    cover = cov_n = 0
    nominal = None
    for it, o in _scored(items):
        levels = it.get("quantile_levels") or []
        qs = it.get("close_h_q") or []
        c0 = num(it.get("last_close"))
        y = num(o["close_h"])
        mid = nearest_index(levels, 0.5)
        if c0 is None or mid is None or mid >= len(qs) or num(qs[mid]) is None:
            continue
        med = num(qs[mid])
        n += 1
        err_m += abs(med - y)
        err_rw += abs(c0 - y)
        if y != c0 and med != c0:
            dir_n += 1
            hits += (med > c0) == (y > c0)
            ups += y > c0
        if isinstance(o.get("close_inside"), bool):
            cov_n += 1
            cover += o["close_inside"]
            lo, hi = num(o.get("q_low_level")), num(o.get("q_high_level"))
            if lo is not None and hi is not None:
                nominal = hi - lo
    if not n:
        return {"n": 0}
    mae_m, mae_rw = err_m / n, err_rw / n
    return {"n": n, "mae_model": mae_m, "mae_random_walk": mae_rw,
            "skill_vs_random_walk": (1.0 - mae_m / mae_rw) if mae_rw > 0 else None,
            "hit_rate": hits / dir_n if dir_n else None, "hit_rate_always_up": ups / dir_n if dir_n else None,
            "direction_n": dir_n, "coverage": cover / cov_n if cov_n else None, "coverage_n": cov_n,
            "nominal_coverage": nominal}


METRIC_PREFIXES = ("val_", "test_", "champion_val_", "baseline_", "main_")


def model_metric_rows(model: Mapping[str, Any] | None) -> list[dict]:
    """Offline evaluation numbers the API exposes for the champion: ``metrics`` (name -> value) when
    ``GET /model`` carries them, else numeric version tags with a metric-like prefix."""
    if not model:
        return []
    src = model.get("metrics")
    if not isinstance(src, Mapping):
        src = {k: v for k, v in (model.get("tags") or {}).items() if k.startswith(METRIC_PREFIXES)}
    rows = []
    for k in sorted(src):
        if k.startswith(COMPARISON_PREFIX):
            continue  # the baseline-vs-main comparison has its own table
        v = num(src[k])
        if v is not None:
            rows.append({"metric": str(k), "value": fmt_value(v)})
    return rows


COMPARISON_PREFIX = "cmp_"  # model.compare's metrics on the champion's run


def variate_comparison_rows(model: Mapping[str, Any] | None) -> list[dict]:
    """Baseline (without mempool) vs main (with mempool) from the ``cmp_baseline_*`` / ``cmp_main_*``
    metrics that ``python -m model.compare`` logs on the champion's run: per target and metric both
    values and the main model's relative change (for pinball and MAE, negative is better)."""
    m = (model or {}).get("metrics")
    if not isinstance(m, Mapping):
        return []
    rows = []
    for tgt in ("close", "rv", "range"):
        for k in ("pinball", "coverage", "mae", "dir_acc"):
            b, v = num(m.get(f"cmp_baseline_{tgt}_{k}")), num(m.get(f"cmp_main_{tgt}_{k}"))
            if b is None or v is None:
                continue
            change = f"{100 * (v - b) / abs(b):+.1f} %" if b else "n/a"
            rows.append({"target": tgt, "metric": k, "baseline": fmt_value(b), "main": fmt_value(v), "change": change})
    return rows


# ------------------------------------------------------------------------------------------ monitoring
def percentiles(samples: Sequence[float], ps: Sequence[float] = (50, 90, 99)) -> dict:
    """Nearest-rank percentiles (ms) of finite samples; None for no samples."""
    vals = sorted(v for v in (num(s) for s in samples) if v is not None)
    out: dict[str, Any] = {"n": len(vals)}
    for p in ps:
        if not vals:
            out[f"p{p:g}"] = None
            continue
        rank = max(1, math.ceil(p / 100 * len(vals)))
        out[f"p{p:g}"] = vals[rank - 1]
    out["max"] = vals[-1] if vals else None
    return out


def latency_rows(measured: Mapping[str, Sequence[float]], api_latency: Mapping[str, Mapping] | None) -> list[dict]:
    """Pipeline latency table: stages the dashboard measures itself (samples in ms) and the API's own
    inference timings (``GET /monitoring`` latency: n, p50_ms, p99_ms, last_ms)."""
    labels = {
        "feature_emit": "feature flow: window close -> vector emitted (emit_ts - close_recv_ts)",
        "forecast": "features -> forecast issued (issued_ts - emit_ts)",
        "sse_delivery": "forecast issued -> received by the dashboard (SSE)",
    }
    rows = []
    for key, label in labels.items():
        p = percentiles(measured.get(key) or [])
        rows.append({"stage": label, "n": p["n"], "p50": p["p50"], "p90": p["p90"], "p99": p["p99"],
                     "max": p["max"]})
    for key, label in (("inference", "API: ONNX inference (batch)"),
                       ("inference_and_publish", "API: inference + publish of a minute")):
        d = (api_latency or {}).get(key) or {}
        rows.append({"stage": label, "n": d.get("n") or 0, "p50": num(d.get("p50_ms")), "p90": None,
                     "p99": num(d.get("p99_ms")), "max": None})
    return rows


def monitoring_rows(mon: Mapping[str, Any] | None, vectors: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """Per symbol: minutes served / degraded / skipped, data gaps, served %, alerts, coverage, PSI max,
    feature age, sequence errors (the feature flow's resync requests, by reason) and minutes with an
    invalid book, and from the latest m1 vector whether the order book is valid now."""
    out = []
    syms = (mon or {}).get("symbols") or {}
    for sym in sorted(syms):
        s = syms[sym] or {}
        cov = (s.get("coverage") or {}).get("close") or {}
        fv = (vectors or {}).get(sym) or {}
        book = fv.get("book_valid")
        out.append({"symbol": sym, "served": s.get("minutes_served", 0), "degraded": s.get("minutes_degraded", 0),
                    "skipped": s.get("minutes_skipped", 0), "gaps": s.get("data_gap_minutes", 0),
                    "served_ratio": num(s.get("served_ratio")), "alerts": s.get("alerts", 0),
                    "coverage": num(cov.get("coverage")), "coverage_n": cov.get("n") or 0,
                    "psi_max": num(s.get("psi_max")), "feature_age_s": num(s.get("feature_age_s")),
                    "book_valid": None if book is None else bool(book),
                    "seq_errors": s.get("sequence_errors", 0),
                    "seq_reasons": ", ".join(f"{k} {v}" for k, v in sorted((s.get("sequence_error_reasons") or {})
                                                                         .items())),
                    "book_invalid_minutes": s.get("book_invalid_minutes", 0)})
    return out


def psi_rows(mon: Mapping[str, Any] | None, top: int = 8) -> list[dict]:
    """The largest feature PSIs per symbol (drift: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted)."""
    rows = []
    for sym, s in sorted(((mon or {}).get("symbols") or {}).items()):
        psi = (s or {}).get("psi") or {}
        for feat, v in sorted(psi.items(), key=lambda kv: -(num(kv[1]) or 0))[:top]:
            f = num(v)
            if f is None:
                continue
            level = "shifted" if f > 0.25 else "moderate" if f > 0.1 else "stable"
            rows.append({"symbol": sym, "feature": feat, "psi": f, "level": level})
    return rows


def health_rows(health: Mapping[str, Any] | None) -> list[dict]:
    """Components of ``GET /health`` with their status and a one-line detail."""
    rows = []
    for name, comp in ((health or {}).get("components") or {}).items():
        detail = comp.get("detail")
        if isinstance(detail, Mapping):
            bits = []
            for k, v in detail.items():
                if isinstance(v, Mapping):
                    st = v.get("status")
                    bits.append(f"{k}: {st}" if st else f"{k}: {len(v)} fields")
                elif v is not None and not isinstance(v, (list, tuple)):
                    bits.append(f"{k}={v}")
            text = ", ".join(bits)
        else:
            text = "" if detail is None else str(detail)
        rows.append({"component": name, "status": comp.get("status", "unknown"), "detail": text[:300]})
    return rows


STATUS_COLORS = {"ok": "#2e7d32", "degraded": "#ef6c00", "down": "#c62828", "starting": "#546e7a",
                 "unreachable": "#c62828", "unknown": "#546e7a"}
