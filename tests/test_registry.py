"""The feature registry: the default one loads, every kind of mistake is a clear error, the hash is stable."""
from __future__ import annotations

import textwrap

import pytest

from flows.registry import DEFAULT_PATH, RegistryError, load_registry


def test_default_registry_covers_the_mission_list():
    reg = load_registry()
    names = set(reg.names())
    for want in ["mid_price", "spread_abs", "spread_rel", "return_1s", "return_3s", "return_1m", "vwap_3s",
                 "vwap_15s", "vwap_1m", "volume_3s", "volume_15s", "volume_1m", "volatility_1m", "volatility_5m",
                 "signed_volume_3s", "signed_volume_15s", "signed_volume_1m", "buy_sell_ratio_1m",
                 "trade_count_3s", "net_aggressor_pressure_1m", "depth_bid_top5", "depth_ask_top5",
                 "depth_imbalance_top5", "depth_bid_top10", "depth_ask_top10", "slope_bid", "slope_ask",
                 "orderbook_churn_rate_1m", "liquidity_density_10bps", "obi_l1", "vpin_5m", "kyle_lambda_1m",
                 "roll_measure_1m", "funding_rate", "time_to_funding", "open_interest", "basis", "mempool_tx_count",
                 "mempool_vsize", "mempool_fee_fastest", "mempool_fee_fastest_chg_5m", "mempool_large_transfers_1m",
                 "news_count_1m", "news_sent_mean_1h", "time_of_day", "spread_rel_z60", "close", "rv_15m"]:
        assert want in names, want
    assert all(reg.for_cadence(c) for c in ("s1", "s3", "s15", "m1"))
    assert reg.warmup_ms >= 62 * 60_000


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_registry()
    assert load_registry().hash == a.hash
    changed = tmp_path / "r.yaml"
    changed.write_text(DEFAULT_PATH.read_text().replace("params: {bps: 25}", "params: {bps: 30}"))
    assert load_registry(changed).hash != a.hash


def write(tmp_path, features: str, engine: str = "") -> str:
    p = tmp_path / "reg.yaml"
    p.write_text("features:\n" + textwrap.indent(textwrap.dedent(features), "  ") + "\n" + engine)
    return str(p)


@pytest.mark.parametrize("features,needle", [
    ("- {name: a, kind: nope, inputs: [book]}", "unknown kind 'nope'"),
    ("- {name: a, kind: mid, inputs: [book]}\n- {name: a, kind: mid, inputs: [book]}", "duplicate name 'a'"),
    ("- {name: a, kind: zscore, inputs: [b], params: {n: 5}, order: 1}", "unknown input 'b'"),
    ("- {name: a, kind: depth, inputs: [book], params: {side: middle, levels: 5}}", "param 'side'"),
    ("- {name: a, kind: depth, inputs: [book], params: {side: bid}}", "param 'levels' is required"),
    ("- {name: a, kind: vwap, inputs: [trades], window: 3x}", "bad duration"),
    ("- {name: a, kind: vwap, inputs: [trades]}", "needs a window"),
    ("- {name: a, kind: mid, inputs: [book], window: 3s}", "window must be 0s"),
    ("- {name: a, kind: mid, inputs: [book], cadences: [s2]}", "cadences must be"),
    ("- {name: A, kind: mid, inputs: [book]}", "lower_snake_case"),
    ("- {name: a, kind: mid, inputs: [trades]}", "needs inputs ['book']"),
    ("- {name: a, kind: mid, inputs: [book], colour: red}", "unknown keys"),
    ("- {name: a, kind: mid, inputs: [book], params: {x: 1}}", "takes no params"),
    ("- {name: a, kind: candle, inputs: [candles], params: {variate: close}}", "m1 cadence only"),
    ("- {name: a, kind: mid, inputs: [book], order: 2}\n- {name: z, kind: zscore, inputs: [a], params: {n: 5}, order: 1}",
     "has order 2 >= 1"),
    ("- {name: a, kind: mid, inputs: [book], cadences: [m1]}\n"
     "- {name: z, kind: zscore, inputs: [a], cadences: [s1], params: {n: 5}, order: 1}", "not computed in all"),
    ("- {name: a, kind: liquidity_density, inputs: [book], params: {bps: 2.5}}", "param 'bps'"),
    ("- {name: a, kind: news, inputs: [news], params: {feature: news_nothing}}", "param 'feature'"),
])
def test_registry_errors_name_the_entry(tmp_path, features, needle):
    with pytest.raises(RegistryError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_registry(write(tmp_path, features))


def test_unreadable_registry(tmp_path):
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: {not: a list}")
    with pytest.raises(RegistryError, match="'features' list"):
        load_registry(bad)


def test_unknown_engine_setting_fails(tmp_path):
    from flows.engine import SymbolEngine

    reg = load_registry(write(tmp_path, "- {name: a, kind: mid, inputs: [book]}", "engine:\n  bogus: 1\n"))
    with pytest.raises(ValueError, match="unknown engine settings"):
        SymbolEngine("X", reg)


def test_running_flow_picks_up_registry_changes_and_rejects_broken_ones(tmp_path):
    import os

    from flows.dataflow import RegistryWatcher

    path = tmp_path / "reg.yaml"
    path.write_text("features:\n  - {name: a, kind: mid, inputs: [book]}\n")
    w = RegistryWatcher(str(path), every_s=0)
    first = w.current.hash
    path.write_text("features:\n  - {name: b, kind: mid, inputs: [book]}\n")
    os.utime(path, (1, 1))
    assert w.poll().hash != first and w.current.names() == ["b"]
    good = w.current.hash
    path.write_text("features:\n  - {name: c, kind: nope, inputs: [book]}\n")
    os.utime(path, (2, 2))
    assert w.poll().hash == good  # the broken file is refused, the running registry stays
