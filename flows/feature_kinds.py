"""The computations a registry entry can name (``kind``), each a small pure function.

A kind receives the window context ``ctx`` (``flows.engine.WindowContext``: the closed 1-second
tiles, the book snapshot at the window end, ticker/mempool/news state, the candle variates, earlier
values of this vector and the per-feature history) and the ``FeatureSpec``, and returns a float or
a ``Missing(reason)``: a feature that cannot be computed is an explicit null with its reason, never
a stale or invented value. Sums over windows use ``math.fsum`` so results do not depend on
evaluation order.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from flows.candles import KLINE_VARIATES, KLINE_WARMUP, MINUTE_MS


class Missing(str):
    """A null feature value; the string is the reason."""


_fsum = math.fsum
_log = math.log
_sqrt = math.sqrt


def _need(spec, key: str, typ, check: Callable[[Any], bool] | None = None, desc: str = ""):
    if key not in spec.params:
        raise ValueError(f"param {key!r} is required")
    v = spec.params[key]
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool or (check and not check(v)):
        raise ValueError(f"param {key!r}={v!r} is invalid{': ' + desc if desc else ''}")
    return v


def _no_params(spec):
    if spec.params:
        raise ValueError(f"takes no params, got {sorted(spec.params)}")


def _point(spec):
    if spec.window_ms != 0:
        raise ValueError("is a point-in-time feature: window must be 0s")


def _windowed(spec):
    if spec.window_ms <= 0 or spec.window_ms % 1000:
        raise ValueError("needs a window that is a whole number of seconds > 0")


def _inputs(spec, *required):
    missing = [r for r in required if r not in spec.inputs]
    if missing:
        raise ValueError(f"needs inputs {list(required)}, missing {missing}")


@dataclass(frozen=True)
class Kind:
    compute: Callable
    validate: Callable


KINDS: dict[str, Kind] = {}


def kind(name: str, *, inputs: tuple[str, ...] = (), point: bool | None = None,
         params: Callable | None = _no_params):
    """Register a computation with its validation rules."""

    def deco(fn):
        def validate(spec):
            _inputs(spec, *inputs)
            if point is True:
                _point(spec)
            elif point is False:
                _windowed(spec)
            if params:
                params(spec)

        KINDS[name] = Kind(fn, validate)
        return fn

    return deco


# --- order book at the window end -----------------------------------------------------------------
def _book(ctx):
    b = ctx.book
    return b if b.valid else Missing(b.reason)


@kind("mid", inputs=("book",), point=True)
def mid(ctx, spec):
    b = _book(ctx)
    return b if isinstance(b, Missing) else b.mid


@kind("spread_abs", inputs=("book",), point=True)
def spread_abs(ctx, spec):
    b = _book(ctx)
    return b if isinstance(b, Missing) else b.ask1 - b.bid1


@kind("spread_rel", inputs=("book",), point=True)
def spread_rel(ctx, spec):
    b = _book(ctx)
    return b if isinstance(b, Missing) else (b.ask1 - b.bid1) / b.mid


@kind("microprice", inputs=("book",), point=True)
def microprice(ctx, spec):
    b = _book(ctx)
    if isinstance(b, Missing):
        return b
    return (b.bid1 * b.ask1_size + b.ask1 * b.bid1_size) / (b.bid1_size + b.ask1_size)


@kind("obi_l1", inputs=("book",), point=True)
def obi_l1(ctx, spec):
    b = _book(ctx)
    if isinstance(b, Missing):
        return b
    return (b.bid1_size - b.ask1_size) / (b.bid1_size + b.ask1_size)


def _levels_param(spec):
    _need(spec, "levels", int, lambda v: 1 <= v <= 200, "1..200")
    extra = set(spec.params) - {"levels", "side"}
    if extra:
        raise ValueError(f"unknown params {sorted(extra)}")


def _side_levels_param(spec):
    _need(spec, "side", str, lambda v: v in ("bid", "ask"), "bid or ask")
    _levels_param(spec)


@kind("depth", inputs=("book",), point=True, params=_side_levels_param)
def depth(ctx, spec):
    b = _book(ctx)
    if isinstance(b, Missing):
        return b
    sizes = b.bid_sizes if spec.params["side"] == "bid" else b.ask_sizes
    n = spec.params["levels"]
    if len(sizes) < n:
        return Missing(f"book has {len(sizes)} {spec.params['side']} levels < {n}")
    return _fsum(sizes[:n])


@kind("depth_imbalance", inputs=("book",), point=True, params=_levels_param)
def depth_imbalance(ctx, spec):
    b = _book(ctx)
    if isinstance(b, Missing):
        return b
    n = spec.params["levels"]
    if len(b.bid_sizes) < n or len(b.ask_sizes) < n:
        return Missing(f"book has fewer than {n} levels")
    bid, ask = _fsum(b.bid_sizes[:n]), _fsum(b.ask_sizes[:n])
    return (bid - ask) / (bid + ask)


@lru_cache(maxsize=32)
def _slope_weights(n: int) -> tuple[tuple[float, ...], float]:
    """x - xbar for level indices x = 1..n, and sum((x - xbar)^2)."""
    xbar = (n + 1) / 2
    w = tuple(i + 1 - xbar for i in range(n))
    return w, _fsum([d * d for d in w])


@kind("slope", inputs=("book",), point=True, params=_side_levels_param)
def slope(ctx, spec):
    """OLS slope of level size on level index 1..n: how fast volume decays away from the top."""
    b = _book(ctx)
    if isinstance(b, Missing):
        return b
    sizes = b.bid_sizes if spec.params["side"] == "bid" else b.ask_sizes
    n = spec.params["levels"]
    if len(sizes) < n or n < 2:
        return Missing(f"book has fewer than {n} levels")
    weights, sxx = _slope_weights(n)
    return _fsum([w * v for w, v in zip(weights, sizes)]) / sxx  # sum (x - xbar)(y - ybar), as sum(x - xbar) = 0


def _bps_param(spec):
    _need(spec, "bps", int, lambda v: 0 < v <= 1000, "an integer, 0 < bps <= 1000")
    if set(spec.params) - {"bps"}:
        raise ValueError("only param is bps")


@kind("liquidity_density", inputs=("book",), point=True, params=_bps_param)
def liquidity_density(ctx, spec):
    """Bid plus ask size (base units) within ``bps`` of the mid."""
    b = _book(ctx)
    if isinstance(b, Missing):
        return b
    return b.depth_within_bps(spec.params["bps"])


# --- trades over the window ------------------------------------------------------------------------
@kind("volume", inputs=("trades",), point=False)
def volume(ctx, spec):
    w = ctx.window(spec.window_ms)
    return w.buy_vol + w.sell_vol


@kind("trade_count", inputs=("trades",), point=False)
def trade_count(ctx, spec):
    return float(ctx.window(spec.window_ms).n_trades)


@kind("vwap", inputs=("trades",), point=False)
def vwap(ctx, spec):
    w = ctx.window(spec.window_ms)
    vol = w.buy_vol + w.sell_vol
    return Missing("no trades in window") if vol == 0 else (w.buy_notional + w.sell_notional) / vol


@kind("signed_volume", inputs=("trades",), point=False)
def signed_volume(ctx, spec):
    """Taker-signed traded notional (quote currency): buys minus sells."""
    w = ctx.window(spec.window_ms)
    return w.buy_notional - w.sell_notional


@kind("net_aggressor_pressure", inputs=("trades",), point=False)
def net_aggressor_pressure(ctx, spec):
    """buy_vol - sell_vol in base units (taker side)."""
    w = ctx.window(spec.window_ms)
    return w.buy_vol - w.sell_vol


@kind("buy_sell_ratio", inputs=("trades",), point=False)
def buy_sell_ratio(ctx, spec):
    w = ctx.window(spec.window_ms)
    if w.sell_vol == 0:
        return Missing("no sell volume in window")
    return w.buy_vol / w.sell_vol


# --- book dynamics over the window -----------------------------------------------------------------
@kind("log_return", inputs=("book",), point=False)
def log_return(ctx, spec):
    """log(mid at window end / mid at window start)."""
    end, start = ctx.mid_at(0), ctx.mid_at(spec.window_ms)
    if end is None or start is None:
        return Missing("mid unavailable at window start or end")
    return _log(end / start)


@kind("return_std", inputs=("book",), point=False)
def return_std(ctx, spec):
    """Sample std of the 1-second log mid returns inside the window (a return needs a valid mid at
    both tile ends); null when fewer than max(2, half the window's tiles) returns exist."""
    rets = ctx.window(spec.window_ms).returns
    if len(rets) < max(2, ctx.window(spec.window_ms).n_tiles // 2):
        return Missing(f"only {len(rets)} valid 1 s returns")
    n = len(rets)
    mean = _fsum(rets) / n
    return _sqrt(_fsum((r - mean) ** 2 for r in rets) / (n - 1))


@kind("churn_rate", inputs=("book",), point=False)
def churn_rate(ctx, spec):
    """Best-price changes per second: messages after which the (best bid, best ask) pair differs
    from before (a snapshot that sets it counts), summed over the window's tiles / window seconds."""
    w = ctx.window(spec.window_ms)
    return w.best_changes / (spec.window_ms / 1000)


@kind("kyle_lambda", inputs=("book", "trades"), point=False)
def kyle_lambda(ctx, spec):
    """OLS slope of the 1-second mid change (price units) on the 1-second taker-signed volume in
    base units (buy - sell), over the seconds with a valid mid change; null below 10 of them."""
    pairs = ctx.window(spec.window_ms).dmid_q
    if len(pairs) < 10:
        return Missing(f"only {len(pairs)} seconds with a valid mid change")
    n = len(pairs)
    qbar = _fsum(q for _, q in pairs) / n
    pbar = _fsum(p for p, _ in pairs) / n
    sqq = _fsum((q - qbar) ** 2 for _, q in pairs)
    if sqq == 0:
        return Missing("no variation in signed volume")
    return _fsum((q - qbar) * (p - pbar) for p, q in pairs) / sqq


@kind("roll", inputs=("trades",), point=False)
def roll(ctx, spec):
    """Roll's effective spread 2*sqrt(-c) over trade prices, 0 when c >= 0, with
    c = mean(dp_t * dp_{t-1}) - mean(dp)^2 over consecutive trade price changes whose later trade
    falls in the window (the first may start before it)."""
    w = ctx.window(spec.window_ms)
    m = w.roll_pairs
    if m < 10:
        return Missing(f"only {m} consecutive trade price changes")
    cov = w.roll_sum_prod / m - (w.roll_sum_dp / w.roll_n_dp) ** 2
    return 2.0 * _sqrt(-cov) if cov < 0 else 0.0


def _vpin_param(spec):
    _need(spec, "buckets", int, lambda v: 2 <= v <= 500, "2..500")
    if set(spec.params) - {"buckets"}:
        raise ValueError("only param is buckets")


@kind("vpin", inputs=("trades",), point=False, params=_vpin_param)
def vpin(ctx, spec):
    """Volume-synchronised probability of informed trading over the window: the window's volume is
    cut into ``buckets`` equal-volume buckets (a second's volume splits proportionally across a
    bucket boundary); VPIN = sum |buy - sell| over buckets / total volume."""
    tiles = ctx.tiles_in(spec.window_ms)
    total = _fsum(t.buy_vol + t.sell_vol for t in tiles)
    if total <= 0:
        return Missing("no trades in window")
    size = total / spec.params["buckets"]
    imbalances = []
    fill = buy = 0.0
    for t in tiles:
        vol = t.buy_vol + t.sell_vol
        if vol <= 0:
            continue
        share = t.buy_vol / vol
        while vol > 0:
            take = min(vol, size - fill)
            fill += take
            buy += take * share
            vol -= take
            if fill >= size * (1 - 1e-12):
                imbalances.append(abs(2 * buy - fill))
                fill = buy = 0.0
    if fill > 0:  # rounding remainder of the last bucket
        imbalances.append(abs(2 * buy - fill))
    return _fsum(imbalances) / total


# --- perpetual contract (ticker state) -------------------------------------------------------------
def _ticker_field(ctx, field: str):
    ticker = ctx.ticker
    v = ticker.get(field)
    if v is None:
        return Missing(f"no {field} from the ticker yet")
    ts = ticker.get("exchange_ts")
    if ts is not None and ctx.window_end - ts > ctx.engine.cfg.ticker_stale_ms:
        return Missing(f"ticker stale: no update for {(ctx.window_end - ts) // 1000} s")
    return v


@kind("funding_rate", inputs=("ticker",), point=True)
def funding_rate(ctx, spec):
    v = _ticker_field(ctx, "funding_rate")
    return v if isinstance(v, Missing) else float(v)


@kind("time_to_funding", inputs=("ticker",), point=True)
def time_to_funding(ctx, spec):
    """Minutes from the window end to the next funding time."""
    v = _ticker_field(ctx, "next_funding_time")
    return v if isinstance(v, Missing) else (v - ctx.window_end) / MINUTE_MS


@kind("open_interest", inputs=("ticker",), point=True)
def open_interest(ctx, spec):
    v = _ticker_field(ctx, "open_interest")
    return v if isinstance(v, Missing) else float(v)


@kind("basis", inputs=("ticker",), point=True)
def basis(ctx, spec):
    """Mark minus index price."""
    m, i = _ticker_field(ctx, "mark_price"), _ticker_field(ctx, "index_price")
    if isinstance(m, Missing) or isinstance(i, Missing):
        return m if isinstance(m, Missing) else i
    return float(m) - float(i)


@kind("basis_rel", inputs=("ticker",), point=True)
def basis_rel(ctx, spec):
    m, i = _ticker_field(ctx, "mark_price"), _ticker_field(ctx, "index_price")
    if isinstance(m, Missing) or isinstance(i, Missing):
        return m if isinstance(m, Missing) else i
    if float(i) == 0.0:
        return Missing("index price is 0")
    return (float(m) - float(i)) / float(i)


# --- mempool ---------------------------------------------------------------------------------------
MEMPOOL_LEVELS = ("tx_count", "vsize", "total_fee", "fee_fastest", "fee_half_hour", "fee_hour", "fee_economy",
                  "fee_minimum", "projected_blocks", "next_block_median_fee")
MEMPOOL_FLOWS = ("pending_value", "large_transfers", "tx_count")


def _mempool_level_param(spec):
    _need(spec, "field", str, lambda v: v in MEMPOOL_LEVELS, f"one of {MEMPOOL_LEVELS}")
    _need(spec, "max_age_s", int, lambda v: v > 0, "> 0")
    if set(spec.params) - {"field", "max_age_s"}:
        raise ValueError("params are field and max_age_s")


def _mempool_value(ctx, spec, at_ms: int):
    rec = ctx.mempool.latest(at_ms)
    if rec is None:
        return Missing("no mempool data for this symbol")
    age = at_ms - rec["exchange_ts"]
    if age > spec.params["max_age_s"] * 1000:
        return Missing(f"mempool data stale ({age // 1000} s old)")
    v = rec.get(spec.params["field"])
    return Missing(f"mempool source gives no {spec.params['field']}") if v is None else float(v)


@kind("mempool_level", inputs=("mempool",), point=True, params=_mempool_level_param)
def mempool_level(ctx, spec):
    return _mempool_value(ctx, spec, ctx.window_end)


@kind("mempool_change", inputs=("mempool",), point=False, params=_mempool_level_param)
def mempool_change(ctx, spec):
    """Level now minus the level at the window start."""
    now = _mempool_value(ctx, spec, ctx.window_end)
    then = _mempool_value(ctx, spec, ctx.window_end - spec.window_ms)
    if isinstance(now, Missing) or isinstance(then, Missing):
        return now if isinstance(now, Missing) else then
    return now - then


def _mempool_flow_param(spec):
    _need(spec, "field", str, lambda v: v in MEMPOOL_FLOWS, f"one of {MEMPOOL_FLOWS}")
    if set(spec.params) - {"field"}:
        raise ValueError("only param is field")


@kind("mempool_sum", inputs=("mempool",), point=False, params=_mempool_flow_param)
def mempool_sum(ctx, spec):
    """Sum of a per-second flow (account chains: pending value, large transfers) over the window."""
    recs = ctx.mempool.between(ctx.window_end - spec.window_ms, ctx.window_end)
    vals = [r[spec.params["field"]] for r in recs if r.get(spec.params["field"]) is not None]
    if not ctx.mempool.any_seen:
        return Missing("no mempool data for this symbol")
    return _fsum(vals)


# --- news ------------------------------------------------------------------------------------------
def _news_param(spec):
    from flows.news_features import NEWS_FEATURES

    _need(spec, "feature", str, lambda v: v in NEWS_FEATURES, f"one of the news features {sorted(NEWS_FEATURES)}")
    if set(spec.params) - {"feature"}:
        raise ValueError("only param is feature")


@kind("news", inputs=("news",), point=True, params=_news_param)
def news(ctx, spec):
    return ctx.news_values()[spec.params["feature"]]


# --- clock and candles -----------------------------------------------------------------------------
@kind("time_of_day", inputs=("clock",), point=True)
def time_of_day(ctx, spec):
    """Fraction of the UTC day at the window end."""
    return (ctx.window_end % 86_400_000) / 86_400_000


_CANDLE_VARIATES = tuple(v for v in KLINE_VARIATES if v != "funding_rate")


def _candle_param(spec):
    _need(spec, "variate", str, lambda v: v in _CANDLE_VARIATES, f"one of {_CANDLE_VARIATES}")
    if set(spec.params) - {"variate"}:
        raise ValueError("only param is variate")
    if spec.cadences != ("m1",):
        raise ValueError("candle variates exist at the m1 cadence only")


@kind("candle", inputs=("candles",), point=True, params=_candle_param)
def candle(ctx, spec):
    """A per-minute kline variate of flows.candles over the minute that just closed."""
    v = ctx.candle_variates()[spec.params["variate"]]
    return v if math.isfinite(v) else Missing("not enough 1-minute candle history")


def _bar_param(spec):
    _need(spec, "field", str, lambda v: v in ("open", "high", "low", "close", "volume"),
          "open, high, low, close or volume")
    if set(spec.params) - {"field"}:
        raise ValueError("only param is field")
    if spec.cadences != ("m1",):
        raise ValueError("candle bars exist at the m1 cadence only")


@kind("candle_bar", inputs=("candles",), point=True, params=_bar_param)
def candle_bar(ctx, spec):
    """A field of the 1-minute candle that just closed: built from trades by match time, replaced by
    the exchange's confirmed kline when it arrived in time; a minute without trades is flat at the
    previous close with zero volume."""
    v = ctx.candle_variates()["bar_" + spec.params["field"]]
    return v if math.isfinite(v) else Missing("no 1-minute candle yet")


# --- derived ---------------------------------------------------------------------------------------
def _zscore_param(spec):
    _need(spec, "n", int, lambda v: 3 <= v <= 10_000, "3..10000")
    if set(spec.params) - {"n"}:
        raise ValueError("only param is n")
    if len(spec.inputs) != 1:
        raise ValueError("needs exactly one input feature")
    if spec.order <= 0:
        raise ValueError("a derived feature needs order > 0")


@kind("zscore", point=True, params=_zscore_param)
def zscore(ctx, spec):
    """z-score of the input's current value against its last n non-null values at this cadence
    (including the current one); null when the current input is null."""
    src = spec.inputs[0]
    hist = ctx.history(src, spec.params["n"])
    n = spec.params["n"]
    if len(hist) < n:
        return Missing(f"warming up: {len(hist)}/{n} values of {src}")
    if ctx.values.get(src) is None:  # never present the last valid value as the current one
        return Missing(f"{src} is null in this window")
    mean = _fsum(hist) / n
    var = _fsum([(v - mean) * (v - mean) for v in hist]) / n
    if var <= 0:
        return Missing(f"{src} did not vary over the last {n} values")
    return (hist[-1] - mean) / _sqrt(var)


def warmup_ms(spec, registry) -> int:
    """Event time a feature needs before it is defined."""
    if spec.kind == "candle":
        return (KLINE_WARMUP + 1) * MINUTE_MS
    if spec.kind == "zscore":
        src = next(f for f in registry.features if f.name == spec.inputs[0])
        cadence_ms = max({"s1": 1_000, "s3": 3_000, "s15": 15_000, "m1": 60_000}[c] for c in spec.cadences)
        return warmup_ms(src, registry) + spec.params["n"] * cadence_ms
    if spec.kind == "news":
        return 3_600_000
    if spec.kind in ("mempool_level", "mempool_change"):
        return spec.window_ms + spec.params["max_age_s"] * 1000
    return spec.window_ms + 1_000
