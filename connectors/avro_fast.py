"""A faster encoder for the gateway's hot path, byte-identical to ``tickcast.serde.Serde.encode``.

fastavro's ``schemaless_writer`` costs 10-25 µs for a ticker or a trade record (most of it in union
and per-field dispatch), which alone would eat the gateway's budget of 50 µs per message. This module
compiles one small Python function per schema from the ``.avsc`` contract itself (so it follows any
change to the schemas), writing the same Avro binary body behind the same 5-byte header that
``Serde`` uses (registry ids included). ``tests/test_connectors_avro.py`` checks it byte for byte
against ``Serde.encode`` over every record of the real recording and random records of every schema.

Anything the compiler does not support falls back to ``Serde.encode``. Wrong value types raise
``tickcast.serde.EncodeError`` from Serde itself (the publisher turns that into a dead letter).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from tickcast.serde import Serde, _strip_logical_types

_PACK_DOUBLE = struct.Struct("<d").pack
_PACK_FLOAT = struct.Struct("<f").pack
_HEADER = struct.Struct(">bI").pack
# zigzag varint of n for 0 <= n < 64 is the single byte 2n: lengths and small counts
_SMALL = [bytes([2 * n]) for n in range(64)]
_PFX = [chr(2 * n) for n in range(64)]


class Unsupported(Exception):
    pass


def _varint_loop(z: int) -> bytes:
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# _V14[x]: the whole varint of x < 2**14; _T14[x]: x's two 7-bit groups, both with the continuation bit
_V14 = [_varint_loop(x) for x in range(1 << 14)]
_T14 = [bytes([(x & 0x7F) | 0x80, (x >> 7) | 0x80]) for x in range(1 << 14)]


def zigzag(n: int) -> bytes:
    """The Avro (zigzag varint) encoding of a long: table look-ups instead of a bit loop."""
    z = (n << 1) ^ (n >> 63)
    if z < 16384:
        return _V14[z]
    if z < 268435456:
        return _T14[z & 16383] + _V14[z >> 14]
    if z < 72057594037927936:  # 2**56: every timestamp in µs
        hi = z >> 28
        return _T14[z & 16383] + _T14[(z >> 14) & 16383] + (
            _V14[hi] if hi < 16384 else _T14[hi & 16383] + _V14[hi >> 14])
    if not -(1 << 63) <= n < (1 << 63):  # zigzag of a wider int is garbage: refuse, like Serde
        raise OverflowError(f"{n} does not fit an Avro long")
    return _varint_loop(z)


def zigzag32(n: int) -> bytes:
    """An Avro int: a long that must fit 32 bits."""
    if not -(1 << 31) <= n < (1 << 31):
        raise OverflowError(f"{n} does not fit an Avro int")
    return zigzag(n)


def _text(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    return (_SMALL[n] + b) if n < 64 else zigzag(n) + b


def _str_array(items: list) -> bytes:
    """A non-empty array of strings: count, items, end marker. Fast path for short ASCII strings."""
    n = len(items)
    head = _SMALL[n] if n < 64 else zigzag(n)
    try:
        body = "".join([_PFX[len(s)] + s for s in items]).encode("ascii")
    except (IndexError, UnicodeEncodeError):
        body = b"".join([_text(s) for s in items])
    return head + body + b"\x00"


def _bool(v: Any) -> bytes:
    if v is True:
        return b"\x01"
    if v is False:
        return b"\x00"
    raise TypeError(f"expected a boolean, got {type(v).__name__}")


class _Compiler:
    """Generates the source of one encoder function per record schema."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.n = 0
        self.named: dict[str, Any] = {}

    def var(self) -> str:
        self.n += 1
        return f"v{self.n}"

    def const(self, value: Any) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def value(self, schema: Any, expr: str, depth: int) -> None:
        """Append the encoding of ``expr`` (a Python expression) of ``schema`` to ``out``."""
        if isinstance(schema, str):
            if schema in self.named:
                return self.value(self.named[schema], expr, depth)
            if schema == "null":
                self.emit(depth, f"if {expr} is not None: raise TypeError('expected null')")
            elif schema == "long":
                self.emit(depth, f"out += zigzag({expr})")
            elif schema == "int":
                self.emit(depth, f"out += zigzag32({expr})")
            elif schema == "string":
                self.emit(depth, f"out += _text({expr})")
            elif schema == "boolean":
                self.emit(depth, f"out += _bool({expr})")
            elif schema == "double":
                self.emit(depth, f"out += _PACK_DOUBLE({expr})")
            elif schema == "float":
                self.emit(depth, f"out += _PACK_FLOAT({expr})")
            elif schema == "bytes":
                v = self.var()
                self.emit(depth, f"{v} = bytes({expr}) if isinstance({expr}, (bytes, bytearray, memoryview)) "
                                 f"else _nobytes({expr})")
                self.emit(depth, f"out += zigzag(len({v})); out += {v}")
            else:
                raise Unsupported(schema)
            return
        if isinstance(schema, list):
            return self.union(schema, expr, depth)
        t = schema["type"]
        if t == "record":
            if "name" in schema:
                self.named[schema["name"]] = schema
                if "namespace" in schema:
                    self.named[f'{schema["namespace"]}.{schema["name"]}'] = schema
            r = self.var()
            self.emit(depth, f"{r} = {expr}")
            for f in schema["fields"]:
                v = self.var()
                if "default" in f:
                    self.emit(depth, f"{v} = {r}.get({f['name']!r}, {self.const(f['default'])})")
                else:
                    self.emit(depth, f"{v} = {r}[{f['name']!r}]")
                self.value(f["type"], v, depth)
        elif t == "enum":
            self.named[schema["name"]] = schema
            index = {s: zigzag(i) for i, s in enumerate(schema["symbols"])}
            self.emit(depth, f"out += {self.const(index)}[{expr}]")
        elif t == "array":
            items = schema["items"]
            if items == "string":
                self.emit(depth, f"out += _str_array({expr}) if {expr} else b'\\x00'")
            else:
                a, item = self.var(), self.var()
                self.emit(depth, f"{a} = {expr}")
                self.emit(depth, f"if {a}:")
                self.emit(depth + 1, f"out += zigzag(len({a}))")
                self.emit(depth + 1, f"for {item} in {a}:")
                self.value(items, item, depth + 2)
                self.emit(depth, "out += b'\\x00'")
        elif t == "map":
            m, k, item = self.var(), self.var(), self.var()
            self.emit(depth, f"{m} = {expr}")
            self.emit(depth, f"if {m}:")
            self.emit(depth + 1, f"out += zigzag(len({m}))")
            self.emit(depth + 1, f"for {k}, {item} in {m}.items():")
            self.emit(depth + 2, f"out += _text({k})")
            self.value(schema["values"], item, depth + 2)
            self.emit(depth, "out += b'\\x00'")
        elif t in ("long", "int", "string", "boolean", "double", "float", "bytes", "null"):
            self.value(t, expr, depth)
        else:
            raise Unsupported(t)

    def union(self, branches: list, expr: str, depth: int) -> None:
        # the unions of the contracts: ["null", X] (optional values)
        if len(branches) != 2 or branches[0] != "null":
            raise Unsupported(branches)
        other = branches[1]
        self.emit(depth, f"if {expr} is None: out += b'\\x00'")
        self.emit(depth, "else:")
        self.emit(depth + 1, "out += b'\\x02'")
        self.value(other, expr, depth + 1)


def _nobytes(v: Any) -> bytes:
    raise TypeError(f"expected bytes, got {type(v).__name__}")


def compile_encoder(raw_schema: dict) -> Callable[[dict], bytearray]:
    """A function record -> Avro body (no header) for one record schema."""
    schema = _strip_logical_types(raw_schema)
    c = _Compiler()
    c.emit(1, "out = bytearray()")
    c.value(schema, "rec", 1)
    c.emit(1, "return out")
    src = "def encode(rec):\n" + "\n".join(c.lines) + "\n"
    env = {"zigzag": zigzag, "zigzag32": zigzag32, "_text": _text, "_str_array": _str_array, "_bool": _bool,
           "_PACK_DOUBLE": _PACK_DOUBLE, "_PACK_FLOAT": _PACK_FLOAT, "_nobytes": _nobytes, **c.consts}
    exec(compile(src, f"<avro encoder {raw_schema.get('name')}>", "exec"), env)  # noqa: S102 - our own codegen
    fn = env["encode"]
    fn.source = src
    return fn


class FastEncoder:
    """``encode(name, record) -> bytes`` identical to ``serde.encode(name, record)``, faster."""

    def __init__(self, serde: Serde):
        self.serde = serde
        self._fns: dict[str, tuple[bytes, Callable]] = {}
        for name, schema in serde.schemas.items():
            try:
                fn = compile_encoder(schema.raw)
            except Unsupported:
                continue
            self._fns[name] = (_HEADER(0, serde.schema_id(name)), fn)

    def encode(self, name: str, record: dict) -> bytes:
        entry = self._fns.get(name)
        if entry is None:
            return self.serde.encode(name, record)
        header, fn = entry
        try:
            return header + fn(record)
        except (TypeError, KeyError, AttributeError, ValueError, OverflowError, IndexError, struct.error):
            # Serde with its full type check is the reference: it names the failing field in its
            # EncodeError (or, should it accept what this encoder refused, its bytes are the right ones)
            return self.serde.encode(name, record, validate=True)
