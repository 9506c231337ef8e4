"""Avro serde for every tickcast message: Confluent wire format, fastavro underneath.

Wire format (the one Confluent's and Redpanda's schema registries use): one magic byte 0, a 4-byte
big-endian schema id, then the Avro binary body. So any consumer can decode any message:
- without a registry the id is local and deterministic: CRC-32 of the schema's Parsing Canonical
  Form (31 bits), so every process computes the same id from the same .avsc file;
- with a registry (``SCHEMA_REGISTRY_URL``) the schemas are registered under RecordNameStrategy
  subjects (``tickcast.v1.Trade``) and the registry's ids go on the wire; unknown ids are fetched.

Timestamps are Avro ``long`` with timestamp-millis/-micros logical types in the contract. The codec
reads and writes them as plain ints (the binary encoding is the same), because converting to
``datetime`` on every message is slow and would round micros/ns away.

Prices and sizes are the exchange's decimal strings, verbatim: lossless for any instrument's
precision, no per-symbol scale in the contract, and both the online flow and the offline replay
convert the same string with the same function, which is what makes their results bit-identical.
"""
from __future__ import annotations

import copy
import json
import struct
import threading
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import validate as _fastavro_validate

import schemas as _schemas_pkg

SCHEMA_DIR = Path(_schemas_pkg.__file__).parent / "avro"
MAGIC = 0
_HEADER = struct.Struct(">bI")


class SerdeError(ValueError):
    """Base of every encode/decode failure; ``kind`` is a stable short code for dead letters."""

    kind = "serde_error"


class MalformedPayload(SerdeError):
    kind = "malformed_payload"


class UnknownSchema(SerdeError):
    kind = "unknown_schema"


class SchemaMismatch(SerdeError):
    kind = "schema_mismatch"


class EncodeError(SerdeError):
    kind = "schema_violation"


def _strip_logical_types(node: Any) -> Any:
    """Copy of a schema with timestamp logical types removed (same binary encoding, int values)."""
    if isinstance(node, dict):
        if node.get("logicalType", "").startswith(("timestamp-", "local-timestamp-")):
            return node["type"]
        return {k: _strip_logical_types(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip_logical_types(v) for v in node]
    return node


@dataclass(frozen=True)
class AvroSchema:
    name: str  # short record name, e.g. "Trade"
    fullname: str  # "tickcast.v1.Trade"
    raw: dict  # the .avsc content
    canonical: str  # Parsing Canonical Form (what a registry stores and ids hash)
    local_id: int
    codec: Any  # fastavro parsed schema with logical types stripped

    @property
    def field_names(self) -> list[str]:
        return [f["name"] for f in self.raw["fields"]]


def _make_schema(raw: dict) -> AvroSchema:
    # a registry hands back the canonical form: fullname in "name", no "namespace"
    fullname = f'{raw["namespace"]}.{raw["name"]}' if raw.get("namespace") else raw["name"]
    canonical = to_parsing_canonical_form(parse_schema(copy.deepcopy(raw), named_schemas={}))
    local_id = zlib.crc32(canonical.encode()) & 0x7FFFFFFF
    codec = parse_schema(_strip_logical_types(raw), named_schemas={})
    return AvroSchema(fullname.rsplit(".", 1)[-1], fullname, raw, canonical, local_id, codec)


def load_schemas(directory: Path = SCHEMA_DIR) -> dict[str, AvroSchema]:
    """All contracts in ``schemas/avro``, by short record name; ids must not collide."""
    out: dict[str, AvroSchema] = {}
    by_id: dict[int, str] = {}
    for path in sorted(directory.glob("*.avsc")):
        schema = _make_schema(json.loads(path.read_text()))
        if schema.name in out:
            raise ValueError(f"duplicate record name {schema.name} in {path}")
        if schema.local_id in by_id:
            raise ValueError(f"schema id collision: {schema.name} and {by_id[schema.local_id]}")
        out[schema.name] = schema
        by_id[schema.local_id] = schema.name
    return out


class SchemaRegistryClient:
    """The few calls of the Confluent schema-registry REST API that the serde needs."""

    def __init__(self, url: str, timeout: float = 10.0):
        import httpx

        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def register(self, subject: str, canonical: str) -> int:
        resp = self._http.post(
            f"/subjects/{subject}/versions",
            json={"schema": canonical, "schemaType": "AVRO"},
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        resp.raise_for_status()
        return int(resp.json()["id"])

    def schema_by_id(self, schema_id: int) -> str:
        resp = self._http.get(f"/schemas/ids/{schema_id}")
        if resp.status_code == 404:
            raise UnknownSchema(f"schema id {schema_id} is not in the registry")
        resp.raise_for_status()
        return resp.json()["schema"]


class Serde:
    """Encode/decode records of the contracts in ``schemas/avro``. Thread-safe for decode/encode."""

    def __init__(self, registry: SchemaRegistryClient | None = None, schemas: dict[str, AvroSchema] | None = None):
        self.schemas = schemas or load_schemas()
        self._registry = registry
        self._lock = threading.Lock()
        # schema name -> 5-byte header; wire id -> schema (writer schema for decoding)
        self._header: dict[str, bytes] = {}
        self._by_id: dict[int, AvroSchema] = {}
        for s in self.schemas.values():
            wire_id = registry.register(s.fullname, s.canonical) if registry else s.local_id
            self._header[s.name] = _HEADER.pack(MAGIC, wire_id)
            self._by_id[wire_id] = s

    def schema(self, name: str) -> AvroSchema:
        try:
            return self.schemas[name]
        except KeyError:
            raise UnknownSchema(f"no schema named {name!r}; known: {sorted(self.schemas)}") from None

    def schema_id(self, name: str) -> int:
        self.schema(name)
        return _HEADER.unpack(self._header[name])[1]

    def encode(self, name: str, record: dict, *, validate: bool = False) -> bytes:
        """Framed Avro bytes of ``record``; ``validate`` runs fastavro's full type check first
        (the writer alone coerces some wrong types, e.g. any object into a boolean)."""
        schema = self.schema(name)
        if validate:
            try:
                _fastavro_validate(record, schema.codec, raise_errors=True)
            except Exception as exc:  # fastavro raises ValidationError with the failing path
                raise EncodeError(f"{name}: record violates the schema: {exc}") from None
        buf = BytesIO()
        buf.write(self._header[name])
        try:
            schemaless_writer(buf, schema.codec, record)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, struct.error) as exc:
            # the writer's own message may not name the field: let the validator find the path
            try:
                _fastavro_validate(record, schema.codec, raise_errors=True)
                detail = f"{type(exc).__name__}: {exc}"
            except Exception as verr:
                detail = str(verr)
            raise EncodeError(f"{name}: cannot encode record: {detail}") from None
        return buf.getvalue()

    def _writer_schema(self, wire_id: int) -> AvroSchema:
        schema = self._by_id.get(wire_id)
        if schema is not None:
            return schema
        if self._registry is None:
            raise UnknownSchema(f"schema id {wire_id} is not one of tickcast's contracts (no registry configured)")
        with self._lock:
            if wire_id not in self._by_id:
                fetched = _make_schema(json.loads(self._registry.schema_by_id(wire_id)))
                self._by_id[wire_id] = fetched
            return self._by_id[wire_id]

    def decode_any(self, payload: bytes) -> tuple[str, dict]:
        """(schema name, record) of a framed message; typed errors for every kind of bad input."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise MalformedPayload(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) < _HEADER.size:
            raise MalformedPayload(f"payload of {len(payload)} bytes is shorter than the 5-byte header")
        magic, wire_id = _HEADER.unpack_from(payload)
        if magic != MAGIC:
            raise MalformedPayload(f"bad magic byte {magic} (expected {MAGIC}): not a framed Avro message")
        schema = self._writer_schema(wire_id)
        buf = BytesIO(payload)
        buf.seek(_HEADER.size)
        try:
            record = schemaless_reader(buf, schema.codec, None)
        except (EOFError, StopIteration, ValueError, IndexError, UnicodeDecodeError, struct.error, MemoryError,
                OverflowError, TypeError, KeyError) as exc:
            raise MalformedPayload(f"{schema.name}: truncated or corrupt body: {type(exc).__name__}: {exc}") from None
        if buf.tell() != len(payload):
            raise MalformedPayload(f"{schema.name}: {len(payload) - buf.tell()} trailing bytes after the record")
        return schema.name, record

    def decode(self, payload: bytes, expect: str | None = None) -> dict:
        name, record = self.decode_any(payload)
        if expect is not None and name != expect:
            raise SchemaMismatch(f"expected a {expect} message, got {name}")
        return record


_default: Serde | None = None


def default_serde() -> Serde:
    """Process-wide serde built from the settings (registry when SCHEMA_REGISTRY_URL is set)."""
    global _default
    if _default is None:
        from tickcast.config import get_settings

        url = get_settings().schema_registry_url
        _default = Serde(SchemaRegistryClient(url) if url else None)
    return _default
