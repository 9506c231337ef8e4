from __future__ import annotations

import pytest

from tickcast.config import MVP_SYMBOLS, ConfigError, load_settings


def test_defaults(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env
    s = load_settings()
    assert s.symbols == MVP_SYMBOLS and s.orderbook_depth == 50 and s.kafka_bootstrap is None


def test_env_names_and_lists(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    monkeypatch.setenv("TICKCAST_SYMBOLS", "btcusdt, ethusdt")
    monkeypatch.setenv("TICKCAST_API_TOKEN", "s3cret")
    s = load_settings()
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.symbols == ["BTCUSDT", "ETHUSDT"]
    assert s.api_token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)


def test_dotenv_is_read(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("TICKCAST_ORDERBOOK_DEPTH=200\n")
    assert load_settings().orderbook_depth == 200


@pytest.mark.parametrize("var,value,needle", [
    ("TICKCAST_ORDERBOOK_DEPTH", "500", "depth must be one of"),
    ("TICKCAST_SYMBOLS", "BTC-USDT", "letters and digits"),
    ("TICKCAST_SYMBOLS", "BTCUSDT,BTCUSDT", "listed twice"),
    ("TICKCAST_API_PORT", "70000", "TICKCAST_API_PORT"),
    ("TICKCAST_RETENTION_DAYS", "0", r"^invalid configuration:\n  TICKCAST_RETENTION_DAYS:"),
    ("TICKCAST_SOURCE", "binance", "TICKCAST_SOURCE"),
])
def test_invalid_config_is_a_clear_error(monkeypatch, tmp_path, var, value, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=needle):
        load_settings()


def test_cli_reports_bad_config(monkeypatch, tmp_path):
    import subprocess
    import sys

    env = {"TICKCAST_ORDERBOOK_DEPTH": "7", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "tickcast.cli", "topics"], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "invalid configuration" in r.stderr and "depth" in r.stderr
