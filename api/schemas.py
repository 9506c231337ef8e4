"""Response and request models of the HTTP API (they are what /openapi.json documents).

Timestamps: ``*_ts`` fields ending in ``origin_ts``/``window_end`` are epoch milliseconds (exchange
time), ``issued_ts``/``raised_ts``/``joined_ts``/``emit_ts`` epoch microseconds (wall clock), the
``*_at`` and ``*_s`` job/model fields epoch seconds. Prices are floats in quote currency.
Non-finite numbers are always sent as null.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorOut(BaseModel):
    detail: Any = Field(description="what was wrong with the request")


class FeatureVectorOut(BaseModel):
    symbol: str
    venue: str
    cadence: Literal["s1", "s3", "s15", "m1"]
    window_end: int = Field(description="exclusive end of the window, epoch ms (exchange time)")
    registry_hash: str
    values: dict[str, float | None] = Field(description="feature name -> value (null: not computable)")
    nulls: dict[str, str] = Field(description="feature name -> why it is null")
    book_valid: bool
    event_count: int
    last_gw_seq: int
    close_recv_ts: int
    emit_ts: int
    age_s: float = Field(description="seconds since the API received this vector")


class ForecastOut(BaseModel):
    """The Forecast record of schemas/avro/forecast.avsc."""

    symbol: str
    origin_ts: int = Field(description="start of the last closed minute the forecast is conditioned on, epoch ms")
    model_name: str
    model_version: str
    registry_hash: str
    horizon: int
    quantile_levels: list[float]
    last_close: float | None
    close_path: list[list[float]] = Field(description="[step 1..horizon][quantile] forecast close price")
    realized_vol: list[float] = Field(description="[quantile] realised vol of 1-min log returns over [t+1, t+H]")
    price_range: list[float] = Field(description="[quantile] max(High)-min(Low) over [t+1, t+H], price units")
    p_up: float | None = None
    p_flat: float | None = None
    p_down: float | None = None
    degraded: bool = False
    reason: str | None = None
    simulated: bool = False
    issued_ts: int


class SignalOut(BaseModel):
    """The Signal record of schemas/avro/signal.avsc."""

    symbol: str
    origin_ts: int
    action: Literal["BUY", "SELL", "FLAT"]
    strength: float = Field(ge=0, le=1)
    reason: str
    model_version: str
    degraded: bool = False
    simulated: bool = False
    issued_ts: int


class AlertOut(BaseModel):
    """The Alert record of schemas/avro/alert.avsc."""

    symbol: str
    origin_ts: int
    target: Literal["close", "realized_vol", "price_range"]
    actual: float
    q_low: float
    q_high: float
    direction: Literal["above", "below"]
    model_version: str
    raised_ts: int


class OutcomeOut(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: Literal["complete", "incomplete"]
    reason: str | None = None
    close_t: float | None = None
    close_h: float | None = Field(None, description="realised Close(t+H)")
    ret_1m: float | None = None
    ret_h: float | None = None
    realized_vol: float | None = None
    price_range: float | None = None
    q_low_level: float | None = None
    q_high_level: float | None = None
    close_q_low: float | None = None
    close_q_high: float | None = None
    close_inside: bool | None = None
    rv_q_low: float | None = None
    rv_q_high: float | None = None
    rv_inside: bool | None = None
    range_q_low: float | None = None
    range_q_high: float | None = None
    range_inside: bool | None = None
    joined_ts: int | None = None


Status = Literal["served", "degraded", "skipped"]


class PredictionLatestOut(BaseModel):
    symbol: str
    status: Status = Field(description="served: full forecast; degraded: forecast from filled inputs; "
                                       "skipped: no forecast, see reason")
    reason: str | None
    forecast: ForecastOut | None
    signal: SignalOut
    outcome: OutcomeOut | None = None


class HistoryItem(BaseModel):
    origin_ts: int
    model_version: str
    status: Status
    reason: str | None = None
    last_close: float | None = None
    horizon: int | None = None
    quantile_levels: list[float] | None = None
    close_h_q: list[float] | None = Field(None, description="forecast close at the horizon, per quantile")
    median_path: list[float] | None = Field(None, description="median forecast close, steps 1..horizon")
    close_path: list[list[float]] | None = Field(None, description="full path, only with paths=true")
    realized_vol: list[float] | None = None
    price_range: list[float] | None = None
    p_up: float | None = None
    p_flat: float | None = None
    p_down: float | None = None
    action: Literal["BUY", "SELL", "FLAT"] | None = None
    strength: float | None = None
    signal_reason: str | None = None
    simulated: bool = False
    issued_ts: int | None = None
    outcome: OutcomeOut | None = None


class PredictionHistoryOut(BaseModel):
    symbol: str
    from_ts: int
    to_ts: int
    count: int
    truncated: bool = Field(description="true when more rows matched than `limit` (the newest are returned)")
    items: list[HistoryItem]


class CandleOut(BaseModel):
    origin_ts: int = Field(description="minute start, epoch ms")
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    volume: float | None = Field(None, description="base-currency volume of the minute's trades")
    venue: str | None = None
    history: bool = Field(False, description="a minute before the live stream, rebuilt from confirmed klines")


class CandlesOut(BaseModel):
    symbol: str
    from_ts: int
    to_ts: int
    count: int
    truncated: bool = Field(description="true when more rows matched than `limit` (the newest are returned)")
    items: list[CandleOut]


class AlertsOut(BaseModel):
    symbol: str | None
    from_ts: int
    to_ts: int
    count: int
    items: list[AlertOut]


class EquityPoint(BaseModel):
    minute_ts: int
    equity: float = Field(description="capital (BacktestConfig.capital, 10 000 quote units) compounded")


class PnlOut(BaseModel):
    symbol: str
    days: float
    from_ts: int
    to_ts: int
    minutes: int = Field(description="stored candles in the period")
    signals: dict[str, int] = Field(description="minutes per published action (none: no prediction stored)")
    stats: dict[str, Any] | None = Field(description="model/backtest.py statistics: total_return, pnl, "
                                                     "pnl_per_30d, sharpe, sortino, max_drawdown, calmar, n_trades, "
                                                     "win_rate, profit_factor, exposure, fees_paid, monthly_pnl, ...")
    equity: list[EquityPoint]
    config: dict[str, Any] | None = None
    reason: str | None = None


class BacktestRow(BaseModel):
    origin_ts: int
    open: float | None
    close: float | None
    close_h_actual: float | None = Field(description="realised Close(t+H) when the horizon has passed")
    action: Literal["BUY", "SELL", "FLAT"] | None
    position: float
    degraded: bool | None = None
    close_h_q_low: float | None = None
    close_h_median: float | None = None
    close_h_q_high: float | None = None
    p_up: float | None = None
    p_down: float | None = None
    inside: bool | None = None
    reason: str | None = None


class BacktestQuality(BaseModel):
    forecasts: int
    no_forecast: int
    close_interval_coverage: float | None
    coverage_n: int
    nominal_coverage: float
    direction_hit_rate: float | None
    direction_n: int


class BacktestOut(BaseModel):
    symbol: str
    candles: int
    model_version: str | None
    rows: list[BacktestRow]
    quality: BacktestQuality | None = None
    stats: dict[str, Any] | None = Field(None, description="model/backtest.py statistics of the signals' strategy")
    equity: list[EquityPoint] = []
    config: dict[str, Any] | None = None
    reason: str | None = None


class ModelOut(BaseModel):
    name: str = Field(description="registered model name")
    metrics: dict[str, float | None] = Field(
        default_factory=dict, description="the metrics the champion's training run logged: val_*/test_* per target "
        "(pinball, coverage, MAE, ...), the baselines' and the previous champion's (champion_val_*) on the same "
        "split; null where the run logged a non-finite value")
    champion_version: str | None
    loaded_at: float | None = Field(description="when this API loaded it, epoch s")
    promoted_ts: int | None = Field(description="when it became champion, epoch ms (the registry's promotion log, "
                                                "else a promoted_ts tag, else the version's last update)")
    created_ts: int | None
    run_id: str | None
    tags: dict[str, str]
    variates: list[str]
    lookback: int | None
    horizon: int | None
    quantiles: list[float]
    flat_threshold: float | None
    registry_hash: str | None
    signal: dict[str, Any] | None = Field(None, description="the tuned signal rule from the model metadata")
    providers: list[str]
    has_feature_summary: bool
    last_check_ts: float | None
    last_error: str | None
    poll_s: float
    swaps: list[dict[str, Any]]


class SymbolMonitoring(BaseModel):
    minutes_served: int
    minutes_degraded: int
    minutes_skipped: int
    data_gap_minutes: int
    served_ratio: float | None = Field(description="(served + degraded) / all minutes accounted for")
    alerts: int
    feature_age_s: float | None
    book_invalid_minutes: int = Field(0, description="live minutes whose order book was not valid at the close")
    sequence_errors: int = Field(0, description="resync requests of the feature flow (order-book gap, crossed or "
                                                "stale book), at most one per symbol per resync interval")
    sequence_error_reasons: dict[str, int] = Field(default_factory=dict)
    coverage: dict[str, dict[str, float | int | None]]
    psi: dict[str, float]
    psi_max: float | None


class MonitoringOut(BaseModel):
    model_version: str | None
    latency: dict[str, dict[str, float | int | None]]
    symbols: dict[str, SymbolMonitoring]
    recent_alerts: list[AlertOut]
    sse_clients: int
    psi_note: str | None


class ComponentOut(BaseModel):
    status: Literal["ok", "degraded", "down", "starting"]
    detail: Any = None


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "down", "starting"]
    components: dict[str, ComponentOut]


class SymbolOut(BaseModel):
    symbol: str
    last_minute_ts: int | None
    feature_age_s: float | None


class SymbolsOut(BaseModel):
    symbols: list[SymbolOut]


class JobOut(BaseModel):
    id: str
    kind: Literal["dataset_build", "train"]
    status: Literal["queued", "running", "succeeded", "failed"]
    params: dict[str, Any]
    created_ts: float
    started_ts: float | None
    finished_ts: float | None
    returncode: int | None
    result: Any = None
    error: str | None
    log_tail: list[str]


class DatasetListOut(BaseModel):
    available: bool = Field(description="false when the dataset builder is not installed here")
    detail: str | None = None
    datasets: list[dict[str, Any]]


class DatasetBuildIn(BaseModel):
    """A dataset spec (flows/datasets.py DatasetSpec)."""

    model_config = ConfigDict(extra="forbid")
    symbols: list[str] | None = Field(None, min_length=1, max_length=64,
                                      description="default: every configured symbol")
    start: str = Field(description="period start, ISO 8601 or epoch ms", max_length=40)
    end: str = Field(description="period end (exclusive), ISO 8601 or epoch ms", max_length=40)
    kind: Literal["klines", "features"] = Field("klines", description="klines: candle variates; features: "
                                                                     "the replayed m1 feature vectors")
    horizon: int = Field(30, ge=1, le=1440)
    flat_threshold: float = Field(0.001, ge=0, lt=1)


class TrainConfigIn(BaseModel):
    """The trainer settings a caller may override (the rest come from the model's config file)."""
    model_config = ConfigDict(extra="forbid")
    epochs: int | None = Field(None, ge=1, le=1000, description="passed to the trainer as --epochs")
    threads: int | None = Field(None, ge=1, le=64, description="passed to the trainer as --threads")


class TrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    config: TrainConfigIn | None = None


class RegistryReloadOut(BaseModel):
    registry_hash: str
    path: str
    features: int
    m1_features: int
    changed: bool
    previous_hash: str | None
    live_hashes: dict[str, str] = Field(description="registry hash on the latest m1 vector of each symbol")
    model_registry_hash: str | None
    note: str
