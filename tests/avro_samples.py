"""Values for any tickcast Avro schema: a hypothesis strategy and a deterministic sample record."""
from __future__ import annotations

from hypothesis import strategies as st

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)


def strategy(avro_type, named: dict | None = None):
    named = {} if named is None else named
    if isinstance(avro_type, str):
        prim = {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(*_INT32),
            "long": st.integers(*_INT64),
            "float": st.floats(allow_nan=False, width=32),
            "double": st.floats(allow_nan=False),
            "string": st.text(max_size=20),
            "bytes": st.binary(max_size=64),
        }
        if avro_type in prim:
            return prim[avro_type]
        return named[avro_type]
    if isinstance(avro_type, list):
        return st.one_of([strategy(t, named) for t in avro_type])
    kind = avro_type["type"]
    if kind == "record":
        fields = {}
        for f in avro_type["fields"]:
            fields[f["name"]] = strategy(f["type"], named)
        s = st.fixed_dictionaries(fields)
        named[avro_type["name"]] = s
        return s
    if kind == "enum":
        s = st.sampled_from(avro_type["symbols"])
        named[avro_type["name"]] = s
        return s
    if kind == "array":
        return st.lists(strategy(avro_type["items"], named), max_size=4)
    if kind == "map":
        return st.dictionaries(st.text(max_size=8), strategy(avro_type["values"], named), max_size=4)
    return strategy(kind, named)  # {"type": "long", "logicalType": ...}


def sample(avro_type, i: int = 1):
    """A small valid value, deterministic in ``i``."""
    if isinstance(avro_type, str):
        return {"null": None, "boolean": bool(i % 2), "int": i, "long": 1_786_310_816_516 + i,
                "float": 0.5 * i, "double": 1.25 * i, "string": f"s{i}", "bytes": b"\x00\x01" * i}[avro_type]
    if isinstance(avro_type, list):
        non_null = [t for t in avro_type if t != "null"]
        return sample(non_null[0], i) if non_null else None
    kind = avro_type["type"]
    if kind == "record":
        return {f["name"]: sample(f["type"], i) for f in avro_type["fields"]}
    if kind == "enum":
        return avro_type["symbols"][i % len(avro_type["symbols"])]
    if kind == "array":
        return [sample(avro_type["items"], i), sample(avro_type["items"], i + 1)]
    if kind == "map":
        return {"a": sample(avro_type["values"], i)}
    return sample(kind, i)
