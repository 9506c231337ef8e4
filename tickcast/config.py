"""Settings for every component, from the environment (and a git-ignored ``.env``).

Names: ``TICKCAST_<FIELD>``; the well-known ones also answer to their common names
(``KAFKA_BOOTSTRAP``, ``SCHEMA_REGISTRY_URL``, ``MLFLOW_TRACKING_URI``, ``ALCHEMY_API_KEY``).
Lists accept ``A,B,C`` or JSON. Invalid settings stop the program at start with a readable message.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MVP_SYMBOLS = ["BTCUSDT", "ETHUSDT", "LTCUSDT", "POLUSDT"]
VALID_DEPTHS = (1, 50, 200, 1000)
# news feeds (connectors/news): the seed doc's cryptonews.com plus CoinDesk and Cointelegraph
DEFAULT_NEWS_FEEDS = ["cryptonews=https://cryptonews.com/news/feed/",
                      "coindesk=https://www.coindesk.com/arc/outboundfeeds/rss/",
                      "cointelegraph=https://cointelegraph.com/rss"]
DEFAULT_NEWS_WEIGHTS = {"cryptonews": 1.0, "coindesk": 1.0, "cointelegraph": 1.0}


class ConfigError(RuntimeError):
    """Settings that cannot work; the message names each bad variable."""


def _env(name: str, *aliases: str):
    return AliasChoices(f"TICKCAST_{name.upper()}", *aliases)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      populate_by_name=True)

    # market data
    symbols: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(MVP_SYMBOLS),
                                                    validation_alias=_env("symbols"))
    category: Literal["linear", "spot", "inverse"] = Field("linear", validation_alias=_env("category"))
    orderbook_depth: int = Field(50, validation_alias=_env("orderbook_depth"))
    source: Literal["auto", "bybit", "local"] = Field(
        "auto", validation_alias=_env("source"),
        description="auto: Bybit when reachable, otherwise the local simulated exchange")
    bybit_ws_url: str = Field("wss://stream.bybit.com/v5/public", validation_alias=_env("bybit_ws_url"))
    bybit_rest_url: str = Field("https://api.bybit.com", validation_alias=_env("bybit_rest_url"))
    alchemy_api_key: SecretStr | None = Field(None, validation_alias=_env("alchemy_api_key", "ALCHEMY_API_KEY"))

    # kafka
    kafka_bootstrap: str | None = Field(None, validation_alias=_env("kafka_bootstrap", "KAFKA_BOOTSTRAP"),
                                        description="unset: start the embedded broker")
    schema_registry_url: str | None = Field(None, validation_alias=_env("schema_registry_url",
                                                                        "SCHEMA_REGISTRY_URL"))

    # storage and models
    data_dir: Path = Field(Path("data"), validation_alias=_env("data_dir"))
    lake_root: str = Field("data/lake", validation_alias=_env("lake_root"),
                           description="local path or s3://bucket/prefix")
    lake_storage_options: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict,
                                                                      validation_alias=_env("lake_storage_options"))
    retention_days: int = Field(30, ge=1, validation_alias=_env("retention_days"))
    mlflow_tracking_uri: str = Field("sqlite:///data/mlflow/mlflow.db",
                                     validation_alias=_env("mlflow_tracking_uri", "MLFLOW_TRACKING_URI"))
    model_name: str = Field("tickcast-itransformer", validation_alias=_env("model_name"))

    # serving
    api_host: str = Field("127.0.0.1", validation_alias=_env("api_host"))
    api_port: int = Field(8000, ge=1, le=65535, validation_alias=_env("api_port"))
    api_token: SecretStr | None = Field(None, validation_alias=_env("api_token"),
                                        description="bearer token for mutating endpoints")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                         validation_alias=_env("cors_origins"))
    ui_port: int = Field(5006, ge=1, le=65535, validation_alias=_env("ui_port"))

    # news feeds (connectors/news): name=url entries, polite poll interval, trust per source in [0, 1]
    news_feeds: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_NEWS_FEEDS), validation_alias=_env("news_feeds"),
        description="name=url, comma-separated or a JSON list; the name keys the source weights")
    news_poll_interval_s: float = Field(120.0, ge=1.0, validation_alias=_env("news_poll_interval_s"))
    news_source_weights: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_NEWS_WEIGHTS), validation_alias=_env("news_source_weights"),
        description="name=weight, comma-separated or a JSON object; unknown sources get news_default_weight")
    news_default_weight: float = Field(0.3, ge=0.0, le=1.0, validation_alias=_env("news_default_weight"))
    news_local_url: str = Field("http://127.0.0.1:8790", validation_alias=_env("news_local_url"),
                                description="the local feed server (`tickcast newsfeed`) used when source=local")

    @field_validator("news_feeds")
    @classmethod
    def _check_news_feeds(cls, value: list[str]) -> list[str]:
        names = []
        for raw in value:
            name, sep, url = (p.strip() for p in raw.partition("="))
            if not sep or not name or not url.startswith(("http://", "https://")):
                raise ValueError(f"news feed {raw!r} must be name=http(s)://url")
            if not all(c.isalnum() or c in "-_" for c in name) or name in names:
                raise ValueError(f"news feed name {name!r} must be unique letters, digits, - or _")
            names.append(name)
        return value

    @field_validator("news_source_weights", mode="before")
    @classmethod
    def _parse_news_weights(cls, value):
        if isinstance(value, str):
            import json

            value = value.strip()
            if value.startswith("{"):
                return json.loads(value)
            return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in value.split(",") if p.strip())}
        return value

    @field_validator("news_source_weights")
    @classmethod
    def _check_news_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for name, w in value.items():
            if not 0.0 <= w <= 1.0:
                raise ValueError(f"news source weight of {name!r} must be in [0, 1], got {w}")
        return value

    # market-data gateway (connectors/): local exchange, heartbeats, buffer, resync, metrics, mempool feeds
    gateway_local_url: str = Field("http://127.0.0.1:8765", validation_alias=_env("gateway_local_url"),
                                   description="the local exchange (source=local): REST here, WebSocket at "
                                               "ws://.../v5/public/{category}, mempool.space API at .../api (BTC), .../ltc/api (LTC)")
    gateway_heartbeat_ms: int = Field(250, ge=10, le=60_000, validation_alias=_env("gateway_heartbeat_ms"))
    gateway_ping_s: float = Field(20.0, gt=0, le=60, validation_alias=_env("gateway_ping_s"))
    gateway_buffer_max: int = Field(200_000, ge=100, validation_alias=_env("gateway_buffer_max"),
                                    description="records held while the broker is unreachable; beyond: dropped, counted")
    gateway_resync: Literal["resubscribe", "rest"] = Field("resubscribe", validation_alias=_env("gateway_resync"))
    gateway_metrics_port: int = Field(9102, ge=0, le=65535, validation_alias=_env("gateway_metrics_port"),
                                      description="Prometheus metrics of the gateway; 0 = off")
    gateway_rest_rate_per_s: float = Field(10.0, gt=0, le=100, validation_alias=_env("gateway_rest_rate_per_s"))
    gateway_mempool: bool = Field(True, validation_alias=_env("gateway_mempool"))
    gateway_news: bool = Field(True, validation_alias=_env("gateway_news"),
                               description="the gateway runs the news input itself (one process numbers gw_seq)")
    mempool_btc_url: str = Field("https://mempool.space", validation_alias=_env("mempool_btc_url"))
    mempool_ltc_url: str = Field("https://litecoinspace.org", validation_alias=_env("mempool_ltc_url"))
    alchemy_eth_url: str = Field("wss://eth-mainnet.g.alchemy.com/v2", validation_alias=_env("alchemy_eth_url"))
    alchemy_pol_url: str = Field("wss://polygon-mainnet.g.alchemy.com/v2", validation_alias=_env("alchemy_pol_url"))
    alchemy_large_transfer: Annotated[dict[str, float], NoDecode] = Field(
        default_factory=lambda: {"ETH": 100.0, "POL": 100_000.0}, validation_alias=_env("alchemy_large_transfer"),
        description="chain=amount in native units above which a pending transfer counts as large")

    @field_validator("alchemy_large_transfer", mode="before")
    @classmethod
    def _parse_large_transfer(cls, value):
        if isinstance(value, str):
            return {k.strip().upper(): v.strip() for k, _, v in (p.partition("=") for p in value.split(",") if p.strip())}
        return value

    features_metrics_port: int = Field(9103, ge=0, le=65535, validation_alias=_env("features_metrics_port"),
                                       description="feature flow's Prometheus /metrics (Bytewax dataflow API); 0: off")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", validation_alias=_env("log_level"))

    @field_validator("symbols", "cors_origins", "news_feeds", mode="before")
    @classmethod
    def _split_list(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("symbols")
    @classmethod
    def _check_symbols(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one symbol is required")
        out = []
        for sym in value:
            s = sym.upper()
            if not s.isalnum():
                raise ValueError(f"symbol {sym!r} must be letters and digits only, e.g. BTCUSDT")
            if s in out:
                raise ValueError(f"symbol {s} is listed twice")
            out.append(s)
        return out

    @field_validator("orderbook_depth")
    @classmethod
    def _check_depth(cls, value: int) -> int:
        if value not in VALID_DEPTHS:
            raise ValueError(f"Bybit order-book depth must be one of {VALID_DEPTHS}, got {value}")
        return value

    @field_validator("lake_storage_options", mode="before")
    @classmethod
    def _parse_options(cls, value):
        if isinstance(value, str):
            import json

            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError:
                raise ValueError('expected a JSON object, e.g. {"AWS_REGION": "eu-west-1"}') from None
        return value


def load_settings(**overrides) -> Settings:
    """Settings from the environment, or a ConfigError that names every bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            # the location is the environment name that was read (an alias), or a field name
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            name = field if field.isupper() else f"TICKCAST_{field.upper()}"
            lines.append(f"  {name}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()


def local_http_url(host: str, port: int) -> str:
    """A URL this machine can reach a server at that listens on ``host``: a wildcard means the
    loopback address, and an IPv6 address goes in brackets (``http://::1:8000`` is no URL)."""
    host = host.strip()
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"
