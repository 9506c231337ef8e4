"""The Avro contracts: round trips of every schema and typed errors for every kind of bad input."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.avro_samples import sample, strategy
from tickcast.serde import (
    SCHEMA_DIR,
    EncodeError,
    MalformedPayload,
    SchemaMismatch,
    Serde,
    SerdeError,
    UnknownSchema,
    load_schemas,
)

SCHEMAS = load_schemas()
SERDE = Serde()

RAW = ["OrderBookSnapshot", "OrderBookDelta", "Trade", "Kline", "Ticker", "Funding", "MempoolStats", "Execution"]
OUTPUTS = ["FeatureVector", "Forecast", "Signal", "Alert", "DatasetReady"]


def test_every_required_contract_exists():
    for name in RAW + OUTPUTS + ["DeadLetter", "ControlCommand", "Heartbeat", "NewsItem"]:
        assert name in SCHEMAS, name


@pytest.mark.parametrize("name", RAW + ["Heartbeat", "NewsItem"])
def test_raw_events_carry_exchange_and_receive_time(name):
    fields = {f["name"]: f["type"] for f in SCHEMAS[name].raw["fields"]}
    assert fields["exchange_ts"]["logicalType"] == "timestamp-millis"
    assert fields["recv_ts"]["logicalType"] == "timestamp-micros"
    assert fields["gw_seq"] == "long"


def test_ids_are_stable_and_distinct():
    again = load_schemas()
    assert {n: s.local_id for n, s in SCHEMAS.items()} == {n: s.local_id for n, s in again.items()}
    assert len({s.local_id for s in SCHEMAS.values()}) == len(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_round_trip_generated(name):
    raw = SCHEMAS[name].raw

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(strategy(raw, {}))
    def check(record):
        payload = SERDE.encode(name, record)
        assert payload[0] == 0
        assert struct.unpack(">I", payload[1:5])[0] == SERDE.schema_id(name)
        assert SERDE.decode(payload, expect=name) == record

    check()


def test_decimal_strings_survive_exactly():
    rec = sample(SCHEMAS["Trade"].raw)
    for px in ["65114.30", "0.000000012345678901", "1e-9", "123456789012345678901234567890.000000000001"]:
        rec.update(price=px, size=px)
        out = SERDE.decode(SERDE.encode("Trade", rec))
        assert out["price"] == px and out["size"] == px


def test_timestamps_stay_integers():
    rec = sample(SCHEMAS["Trade"].raw)
    rec["recv_ts"] = 1_786_310_816_516_123
    out = SERDE.decode(SERDE.encode("Trade", rec))
    assert out["recv_ts"] == 1_786_310_816_516_123 and isinstance(out["recv_ts"], int)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_truncation_is_a_typed_error(name):
    payload = SERDE.encode(name, sample(SCHEMAS[name].raw))
    for cut in range(len(payload)):
        with pytest.raises(MalformedPayload):
            SERDE.decode(payload[:cut])


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_garbage_never_escapes_as_a_bare_exception(data):
    try:
        SERDE.decode_any(data)
    except SerdeError as exc:
        assert str(exc)


def test_specific_errors_name_the_problem():
    good = SERDE.encode("Trade", sample(SCHEMAS["Trade"].raw))
    with pytest.raises(MalformedPayload, match="bad magic"):
        SERDE.decode(b"\x01" + good[1:])
    with pytest.raises(MalformedPayload, match="shorter than the 5-byte header"):
        SERDE.decode(b"\x00\x00")
    with pytest.raises(MalformedPayload, match="trailing bytes"):
        SERDE.decode(good + b"\x00")
    with pytest.raises(UnknownSchema, match="schema id 12345"):
        SERDE.decode(b"\x00" + struct.pack(">I", 12345) + good[5:])
    with pytest.raises(SchemaMismatch, match="expected a Kline message, got Trade"):
        SERDE.decode(good, expect="Kline")
    with pytest.raises(MalformedPayload, match="must be bytes"):
        SERDE.decode("not bytes")  # type: ignore[arg-type]


def test_encode_errors_are_typed():
    rec = sample(SCHEMAS["Trade"].raw)
    with pytest.raises(EncodeError, match="price"):
        SERDE.encode("Trade", {k: v for k, v in rec.items() if k != "price"})
    with pytest.raises(EncodeError, match="gw_seq"):
        SERDE.encode("Trade", {**rec, "gw_seq": "x"})
    with pytest.raises(EncodeError, match="side"):
        SERDE.encode("Trade", {**rec, "side": "Hold"})
    with pytest.raises(EncodeError, match="block_trade"):
        SERDE.encode("Trade", {**rec, "block_trade": "yes"}, validate=True)
    with pytest.raises(UnknownSchema):
        SERDE.encode("NoSuchRecord", rec)


def test_schema_files_are_valid_json_with_docs():
    for path in SCHEMA_DIR.glob("*.avsc"):
        raw = json.loads(path.read_text())
        assert raw["namespace"] == "tickcast.v1" and raw.get("doc"), path.name


class _FakeRegistry:
    """Protocol-level stand-in for a Confluent/Redpanda registry (none can run here)."""

    def __init__(self):
        self.subjects: dict[str, int] = {}
        self.by_id: dict[int, str] = {}

    def register(self, subject, canonical):
        if subject not in self.subjects:
            new_id = len(self.by_id) + 1
            self.subjects[subject] = new_id
            self.by_id[new_id] = canonical
        return self.subjects[subject]

    def schema_by_id(self, schema_id):
        if schema_id not in self.by_id:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        return self.by_id[schema_id]


def test_registry_ids_go_on_the_wire_and_unknown_ids_are_fetched():
    reg = _FakeRegistry()
    producer_side = Serde(reg)
    rec = sample(SCHEMAS["Kline"].raw)
    payload = producer_side.encode("Kline", rec)
    wire_id = struct.unpack(">I", payload[1:5])[0]
    assert wire_id == reg.subjects["tickcast.v1.Kline"]
    # a consumer that registered nothing yet decodes it by fetching the writer schema by id
    consumer_side = Serde(_FakeRegistry())
    consumer_side._registry = reg
    consumer_side._by_id.clear()
    assert consumer_side.decode(payload) == rec
