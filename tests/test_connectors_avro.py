"""The gateway's fast encoder writes exactly the bytes of ``Serde.encode`` for every contract."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.avro_fast import FastEncoder, _varint_loop, compile_encoder, zigzag
from connectors.bybit.parse import BybitParser, control_kind, decode
from tests.avro_samples import sample, strategy
from tests.test_gateway_support import SyntheticMarket
from tickcast.serde import EncodeError, Serde

SERDE = Serde()
FAST = FastEncoder(SERDE)


def test_every_contract_is_compiled():
    assert set(FAST._fns) == set(SERDE.schemas)


@pytest.mark.parametrize("name", sorted(SERDE.schemas))
def test_sample_records_encode_identically(name):
    for i in range(1, 6):
        rec = sample(SERDE.schema(name).raw, i)
        assert FAST.encode(name, rec) == SERDE.encode(name, rec)
        assert SERDE.decode(FAST.encode(name, rec), expect=name) == SERDE.decode(SERDE.encode(name, rec))


@pytest.mark.parametrize("name", sorted(SERDE.schemas))
def test_random_records_encode_identically(name):
    @settings(max_examples=60, deadline=None)
    @given(strategy(SERDE.schema(name).raw))
    def check(rec):
        assert FAST.encode(name, rec) == SERDE.encode(name, rec)

    check()


@given(st.integers(-(2 ** 63), 2 ** 63 - 1))
def test_zigzag_matches_the_reference_varint(n):
    assert zigzag(n) == _varint_loop((n << 1) ^ (n >> 63))


def test_edges_of_the_varint_tables():
    for n in [0, -1, 63, 64, -64, -65, 8191, 8192, -8193, 2 ** 27, 2 ** 28, 2 ** 55, 2 ** 62, -(2 ** 63)]:
        assert zigzag(n) == _varint_loop((n << 1) ^ (n >> 63)), n


def test_long_and_non_ascii_strings_in_arrays():
    rec = sample(SERDE.schema("OrderBookDelta").raw, 1)
    rec["bid_px"] = ["1" * 70, "ünïcode", "", "65000.1"]
    rec["bid_sz"] = ["x" * 200, "0", "0.1", "€"]
    assert FAST.encode("OrderBookDelta", rec) == SERDE.encode("OrderBookDelta", rec)


def test_synthetic_market_events_encode_identically():
    p = BybitParser()
    rng = random.Random(5)
    m = SyntheticMarket("BTCUSDT", seed=5)
    msgs = [m.book_snapshot(), m.ticker_snapshot()] + [m.random_message() for _ in range(300)]
    n = 0
    for text in msgs:
        for name, rec in p.events(decode(text), rng.randint(0, 2 ** 60)):
            rec["gw_seq"] = rng.randint(0, 10 ** 9)
            assert FAST.encode(name, rec) == SERDE.encode(name, rec)
            n += 1
    assert n > 300


@pytest.mark.shared_data
def test_recorded_events_encode_identically(shared_real):
    p = BybitParser()
    n = 0
    for i, line in enumerate((shared_real / "cryptofeed_bybit_v5_20260809" / "linear_ws_raw.jsonl").open()):
        msg = decode(line)
        if control_kind(msg):
            continue
        for name, rec in p.events(msg, 1_786_310_816_516_000 + i):
            rec["gw_seq"] = i
            assert FAST.encode(name, rec) == SERDE.encode(name, rec)
            n += 1
    assert n > 2700


def test_wrong_types_raise_serdes_error():
    rec = sample(SERDE.schema("Trade").raw, 1)
    for field, bad in [("price", 1.5), ("trade_ts", "x"), ("side", "Hold"), ("block_trade", "yes")]:
        broken = {**rec, field: bad}
        with pytest.raises(EncodeError):
            FAST.encode("Trade", broken)


def test_generated_source_is_plain_python():
    fn = compile_encoder(SERDE.schema("Heartbeat").raw)
    assert fn.source.startswith("def encode(rec):") and "exec" not in fn.source
