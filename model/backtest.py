"""Vectorised strategy backtest of the forecast signals (numpy / pandas only: the API and UI import it).

Timing (T+1 execution). A position p_t is decided from the forecast made at the close of minute t
and filled at the OPEN of minute t+1; it is held until the next change. For bar k (minute k):

    gross_k = p_{k-2} * (O_k / C_{k-1} - 1)   # the old position over the gap close(k-1) -> open(k)
            + p_{k-1} * (C_k / O_k - 1)       # the new position from the fill at open(k) to close(k)
    cost_k  = |p_{k-1} - p_{k-2}| * (fee_bps + slippage_bps) / 1e4
    fund_k  = p_{k-1} * rate_k                # at a funding settlement at the end of bar k
                                              # (longs pay a positive rate, shorts receive it)
    net_k   = gross_k - cost_k - fund_k       # a return on capital

Positions are fractions of capital (1 = fully invested long, -1 short). Sizing: ``fixed`` (|p| = 1
when in the market) or ``vol_target`` (|p| = min(max_leverage, target_vol / forecast vol), the
forecast vol per minute being the median realised-vol forecast / sqrt(H)). Equity compounds.

Statistics: Sharpe and Sortino (annualised from 1-minute returns, 525,600 minutes a year), maximum
drawdown, Calmar (arithmetic annualised mean return / max drawdown), win rate and profit factor over round-trip
trades (a trade runs from a fill to the next change of position), P&L per calendar month in quote
currency, the equity curve, fees paid. ``last_n_candles`` is the "last N candles" view the API
and the dashboard call.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

MINUTES_PER_YEAR = 525_600
FUNDING_INTERVAL_MS = 8 * 3600 * 1000


@dataclass
class BacktestConfig:
    fee_bps: float = 5.5          # Bybit linear taker fee, per side
    slippage_bps: float = 1.0     # per side
    sizing: str = "fixed"         # "fixed" | "vol_target"
    target_vol_annual: float = 0.5
    max_leverage: float = 2.0
    capital: float = 10_000.0
    funding: bool = True
    funding_fallback_rate: float | None = None  # per settlement, used when no funding history is given

    def to_dict(self) -> dict:
        return asdict(self)


def positions_from_scores(score: np.ndarray, threshold: float, hold: int = 1,
                          segment_start: np.ndarray | None = None) -> np.ndarray:
    """Signals -1/0/+1: long when score > threshold, short when score < -threshold, flat otherwise;
    re-decided every ``hold`` minutes (counted from each segment's start) and kept in between."""
    score = np.asarray(score, float)
    raw = np.where(score > threshold, 1.0, np.where(score < -threshold, -1.0, 0.0))
    raw[~np.isfinite(score)] = 0.0
    return np.nan_to_num(held_between_decisions(raw, hold, segment_start))


def held_between_decisions(values: np.ndarray, hold: int, segment_start: np.ndarray | None = None) -> np.ndarray:
    """Each value taken every ``hold`` minutes (counted from each segment's first row;
    ``segment_start`` holds that row's position in ``values``) and kept in between."""
    values = np.asarray(values, float)
    if hold <= 1:
        return values
    n = len(values)
    seg = np.zeros(n, np.int64) if segment_start is None else np.asarray(segment_start)
    decide = ((np.arange(n) - seg) % hold) == 0
    return pd.Series(np.where(decide, values, np.nan)).groupby(seg).ffill().to_numpy()


def size_positions(signal: np.ndarray, cfg: BacktestConfig, vol_per_min: np.ndarray | None = None) -> np.ndarray:
    signal = np.asarray(signal, float)
    if cfg.sizing == "fixed":
        return signal
    if cfg.sizing != "vol_target":
        raise ValueError(f"unknown sizing {cfg.sizing!r}: fixed or vol_target")
    if vol_per_min is None:
        raise ValueError("vol_target sizing needs a volatility forecast")
    target = cfg.target_vol_annual / math.sqrt(MINUTES_PER_YEAR)
    with np.errstate(divide="ignore", invalid="ignore"):
        lev = np.minimum(cfg.max_leverage, target / np.asarray(vol_per_min, float))
    lev = np.where(np.isfinite(lev) & (lev > 0), lev, 0.0)
    return signal * lev


def funding_per_bar(minute_ts: np.ndarray, funding: pd.DataFrame | None, fallback: float | None) -> np.ndarray:
    """Rate charged at the end of each bar. With a history: each settlement of it goes to the bar
    whose span (previous bar's end, this bar's end] holds its time, whatever the schedule (8 h, 4 h,
    1 h; a bar after missing minutes takes a settlement that fell in them). Without one (or for an
    8-hour settlement the history lacks): ``fallback`` at 00/08/16 UTC."""
    ts = np.asarray(minute_ts, np.int64)
    bar_end = ts + 60_000
    out = np.zeros(len(ts))
    if not len(ts):
        return out
    charged = np.zeros(len(ts), bool)
    if funding is not None and len(funding):
        f_ts = funding["ts"].to_numpy(np.int64)
        rate = funding["rate"].to_numpy(float)
        k = np.searchsorted(bar_end, f_ts, side="left")  # first bar ending at or after the settlement
        inside = (k < len(ts)) & (f_ts > ts[0]) & np.isfinite(rate)
        np.add.at(out, k[inside], rate[inside])
        charged[k[inside]] = True
    if fallback is not None:
        settle = ((bar_end % FUNDING_INTERVAL_MS) == 0) & ~charged
        out[settle] = fallback
    return out


@dataclass
class BacktestResult:
    ts: np.ndarray
    position: np.ndarray     # p_t decided at the close of t
    gross: np.ndarray        # per-bar returns on capital
    cost: np.ndarray
    funding: np.ndarray
    net: np.ndarray
    equity: np.ndarray       # capital * cumprod(1 + net)
    stats: dict
    trades: np.ndarray       # round-trip trade returns

    def monthly_pnl(self, capital: float | None = None) -> dict[str, float]:
        return self.stats["monthly_pnl"]


def _trades(p1: np.ndarray, p2: np.ndarray, gap_ret: np.ndarray, intra_ret: np.ndarray, cost: np.ndarray,
            fund: np.ndarray) -> np.ndarray:
    """Round-trip trade returns. A trade is a run of bars whose position in force has one sign
    (a resize does not end it). Each bar's parts go to the trade they belong to: the gap return to
    the position held over the gap (p_{k-2}), the intra-bar return and funding to p_{k-1}, the cost
    of a change split between the trade it closes and the trade it opens or resizes."""
    n = len(p1)
    if n == 0:
        return np.zeros(0)
    s1 = np.sign(p1)
    new_run = np.concatenate([[True], s1[1:] != s1[:-1]])
    tid1 = np.cumsum(new_run) - 1                   # run id of p_{k-1}
    tid2 = np.concatenate([[-1], tid1[:-1]])         # run id of p_{k-2}
    acc = np.zeros(tid1[-1] + 1)
    np.add.at(acc, tid2[1:], (p2 * gap_ret)[1:])
    np.add.at(acc, tid1, p1 * intra_ret - fund)
    change = np.abs(p1 - p2)
    with np.errstate(divide="ignore", invalid="ignore"):
        exit_units = np.where(np.sign(p1) != np.sign(p2), np.abs(p2), np.maximum(0.0, np.abs(p2) - np.abs(p1)))
        exit_frac = np.where(change > 0, exit_units / change, 0.0)
    exit_cost = cost * exit_frac
    ok2 = tid2 >= 0
    np.add.at(acc, tid2[ok2], -exit_cost[ok2])
    np.add.at(acc, tid1, -(cost - exit_cost))
    run_sign = np.zeros(len(acc))
    run_sign[tid1] = s1
    return acc[run_sign != 0]


def run_backtest(minute_ts: Sequence[int], open_: Sequence[float], close: Sequence[float],
                 position: Sequence[float], cfg: BacktestConfig | None = None,
                 funding: pd.DataFrame | None = None) -> BacktestResult:
    """Backtest one contiguous minute series (see the module doc for the arithmetic)."""
    cfg = cfg or BacktestConfig()
    ts = np.asarray(minute_ts, np.int64)
    o = np.asarray(open_, float)
    c = np.asarray(close, float)
    p = np.nan_to_num(np.asarray(position, float))
    n = len(c)
    if not (len(ts) == len(o) == len(p) == n):
        raise ValueError("minute_ts, open, close and position must have the same length")
    if n and np.any(np.diff(ts) <= 0):
        raise ValueError("minute_ts must be strictly increasing")
    priced = np.isfinite(o) & np.isfinite(c) & (o > 0) & (c > 0)
    if not priced.all():
        # a minute without a price cannot trade: the backtest runs on the priced minutes, so the
        # move across the missing ones is the next priced minute's gap, earned by the position held
        # over it (not a silent zero), and the last decision before the next priced open (one taken
        # at a minute without a candle included) is what executes there
        idx = np.flatnonzero(priced)
        last_decision = np.append(idx[1:], n) - 1
        return run_backtest(ts[idx], o[idx], c[idx], p[last_decision], cfg, funding)
    p1 = np.concatenate([[0.0], p[:-1]])            # p_{k-1}
    p2 = np.concatenate([[0.0, 0.0], p[:-2]])[:n]   # p_{k-2}
    c_prev = np.concatenate([[np.nan], c[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(np.isfinite(c_prev) & (c_prev > 0), o / c_prev - 1.0, 0.0)
        intra = np.where(o > 0, c / o - 1.0, 0.0)
    gap = np.nan_to_num(gap)
    intra = np.nan_to_num(intra)
    gross = p2 * gap + p1 * intra
    cost = np.abs(p1 - p2) * (cfg.fee_bps + cfg.slippage_bps) / 1e4
    rate = funding_per_bar(ts, funding, cfg.funding_fallback_rate) if cfg.funding else np.zeros(n)
    fund = p1 * rate
    net = gross - cost - fund
    equity = cfg.capital * np.cumprod(1.0 + net)
    trades = _trades(p1, p2, gap, intra, cost, fund)
    stats = backtest_stats(ts, net, equity, p, cost, fund, cfg.capital, trades)
    stats["funding_data"] = "history" if funding is not None and len(funding) else (
        "fallback" if cfg.funding_fallback_rate is not None else "none")
    return BacktestResult(ts, p, gross, cost, fund, net, equity, stats, trades)


def backtest_stats(ts: np.ndarray, net: np.ndarray, equity: np.ndarray, position: np.ndarray,
                   cost: np.ndarray, fund: np.ndarray, capital: float,
                   trade_returns: np.ndarray | None = None) -> dict:
    n = len(net)
    if n == 0:
        return {"n_minutes": 0}
    mu, sd = float(np.mean(net)), float(np.std(net))
    downside = float(np.sqrt(np.mean(np.minimum(net, 0.0) ** 2)))
    ann = math.sqrt(MINUTES_PER_YEAR)
    peak = np.maximum.accumulate(np.concatenate([[capital], equity]))[1:]
    dd = equity / peak - 1.0
    max_dd = float(-dd.min()) if n else 0.0
    total_ret = float(equity[-1] / capital - 1.0)
    ann_ret = mu * MINUTES_PER_YEAR  # arithmetic annualisation (compounding a few days explodes)
    trades = list(trade_returns) if trade_returns is not None else []
    wins = [t for t in trades if t > 0]
    losses = [t for t in trades if t < 0]
    months = pd.to_datetime(ts, unit="ms", utc=True).strftime("%Y-%m")
    prev_eq = np.concatenate([[capital], equity[:-1]])
    pnl_bar = equity - prev_eq
    monthly = pd.Series(pnl_bar).groupby(months).sum()
    fee_quote = float(np.sum(cost * prev_eq))
    days = n / 1440
    return {
        "n_minutes": int(n),
        "total_return": total_ret,
        "pnl": float(equity[-1] - capital),
        "pnl_per_30d": float((equity[-1] - capital) * 30 / days) if days > 0 else 0.0,
        "sharpe": mu / sd * ann if sd > 0 else 0.0,
        "sortino": mu / downside * ann if downside > 0 else 0.0,
        "max_drawdown": max_dd,
        "calmar": ann_ret / max_dd if max_dd > 0 else 0.0,
        "annual_return": ann_ret,
        "n_trades": len(trades),
        "win_rate": len(wins) / len(trades) if trades else 0.0,
        "profit_factor": (sum(wins) / -sum(losses)) if losses else (float("inf") if wins else 0.0),
        "exposure": float(np.mean(np.abs(position) > 0)),
        "fees_paid": fee_quote,
        "funding_paid": float(np.sum(fund * prev_eq)),
        "monthly_pnl": {str(k): float(v) for k, v in monthly.items()},
    }


def score_from_forecast(fc: dict, flat_threshold: float | None = None) -> np.ndarray:
    """A signal score per origin: P(up) - P(down) when the forecast has direction probabilities,
    otherwise the median 30-min log return over the width of [q0.1, q0.9] (a forecast Sharpe)."""
    if fc.get("dir_p") is not None:
        p = np.asarray(fc["dir_p"])
        return p[:, 2] - p[:, 0]
    q = np.asarray(fc["close_q"])[:, -1, :]
    width = np.maximum(q[:, -1] - q[:, 0], 1e-12)
    return q[:, q.shape[1] // 2] / width


def portfolio_backtest(frames: dict[str, pd.DataFrame], cfg: BacktestConfig,
                       funding: dict[str, pd.DataFrame] | None = None) -> dict:
    """Equal capital per symbol: run each symbol's contiguous frame (minute_ts, open, close,
    position) and sum the P&L. Returns per-symbol stats and the combined stats."""
    per, nets, results = {}, [], {}
    for sym, f in frames.items():
        r = run_backtest(f["minute_ts"], f["open"], f["close"], f["position"], cfg,
                         (funding or {}).get(sym))
        per[sym] = r.stats
        results[sym] = r
        nets.append(pd.Series(r.net, index=r.ts))
    if not nets:
        return {"per_symbol": {}, "total": {}}
    # equal-weight portfolio of the per-symbol strategies (each on capital / n_symbols)
    df = pd.concat(nets, axis=1).fillna(0.0).sort_index()
    net = df.mean(axis=1).to_numpy()
    equity = cfg.capital * np.cumprod(1.0 + net)
    pos = np.sign(np.abs(pd.concat([pd.Series(r.position, index=r.ts) for r in results.values()], axis=1)
                         .fillna(0.0).sort_index()).sum(axis=1).to_numpy())
    trades = np.concatenate([r.trades for r in results.values()]) / len(results)
    total = backtest_stats(df.index.to_numpy(np.int64), net, equity, pos, np.zeros(len(net)), np.zeros(len(net)),
                           cfg.capital, trades)
    # the combined net already holds each symbol's costs and funding (on capital / n_symbols)
    total["fees_paid"] = float(sum(s["fees_paid"] for s in per.values()) / max(1, len(per)))
    total["funding_paid"] = float(sum(s["funding_paid"] for s in per.values()) / max(1, len(per)))
    return {"per_symbol": per, "total": total, "results": results}


def last_n_candles(candles: pd.DataFrame, signals: pd.DataFrame, n: int = 100,
                   cfg: BacktestConfig | None = None, funding: pd.DataFrame | None = None) -> dict:
    """Backtest the signals over the last ``n`` candles (what the API's backtest endpoint and the
    dashboard show).

    ``candles``: minute_ts (candle start, ms), open, close (extra columns ignored), one symbol.
    ``signals``: minute_ts and ``position`` (-1..1, decided at that minute's close) or ``signal``
    (-1/0/1; sized with ``cfg.sizing``; ``vol_per_min`` needed for vol targeting). Minutes without a
    signal are flat. Returns JSON-ready stats, the equity curve and the per-bar positions.
    """
    cfg = cfg or BacktestConfig()
    if n < 2:
        raise ValueError("n must be at least 2")
    need = {"minute_ts", "open", "close"}
    if not need <= set(candles.columns):
        raise ValueError(f"candles need columns {sorted(need)}")
    if "minute_ts" not in signals.columns or not ({"position", "signal"} & set(signals.columns)):
        raise ValueError("signals need minute_ts and position (or signal)")
    c = candles.sort_values("minute_ts").drop_duplicates("minute_ts", keep="last").tail(n + 1).reset_index(drop=True)
    s = signals.sort_values("minute_ts").drop_duplicates("minute_ts", keep="last").set_index("minute_ts")
    if "position" in s.columns:
        pos = s["position"].reindex(c["minute_ts"]).fillna(0.0).to_numpy(float)
    else:
        sig = s["signal"].reindex(c["minute_ts"]).fillna(0.0).to_numpy(float)
        vol = s["vol_per_min"].reindex(c["minute_ts"]).to_numpy(float) if "vol_per_min" in s.columns else None
        pos = size_positions(sig, cfg, vol)
    # the first candle only provides the entry reference for the second one
    r = run_backtest(c["minute_ts"].to_numpy(np.int64), c["open"].to_numpy(float), c["close"].to_numpy(float),
                     pos, cfg, funding)
    stats = {k: v for k, v in r.stats.items()}
    for k, v in list(stats.items()):
        if isinstance(v, float) and not math.isfinite(v):
            stats[k] = None
    return {"n_candles": int(len(c)), "config": cfg.to_dict(), "stats": stats,
            "equity": [{"minute_ts": int(t), "equity": float(e)} for t, e in zip(r.ts, r.equity)],
            "position": [float(x) for x in r.position]}
