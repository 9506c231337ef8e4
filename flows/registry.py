"""The feature registry: ``flows/features.yaml`` declares every feature; the engine computes what it says.

Each entry: ``name`` (unique), ``kind`` (a computation in ``flows.feature_kinds.KINDS``), ``inputs``
(raw streams such as ``book``/``trades``/``ticker``/``mempool``/``news``/``candles``, or names of
features computed earlier), ``window`` (``0s`` = point in time at the window end, else a duration),
``cadences`` (which of s1/s3/s15/m1 vectors carry it), ``params`` (validated per kind),
``normalisation`` (a hint for models: none, log1p, per_window, zscore) and ``order`` (computation
order; a feature may only use features of a lower order). Any error fails at load with a message
naming the entry. The registry's hash (SHA-256 of its canonical JSON) goes into every output record
and dataset manifest.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).with_name("features.yaml")
CADENCES = {"s1": 1_000, "s3": 3_000, "s15": 15_000, "m1": 60_000}
RAW_INPUTS = {"book", "trades", "ticker", "mempool", "news", "candles", "clock"}
NORMALISATIONS = {"none", "log1p", "per_window", "zscore"}
_DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RegistryError(ValueError):
    """A registry that cannot be used; the message names the entry and the problem."""


def parse_duration(text: str) -> int:
    m = _DURATION.match(str(text).strip())
    if not m:
        raise RegistryError(f"bad duration {text!r}: use e.g. 0s, 500ms, 3s, 1m, 1h")
    return int(m.group(1)) * _UNIT_MS[m.group(2)]


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    kind: str
    inputs: tuple[str, ...]
    window_ms: int
    cadences: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    normalisation: str = "none"
    order: int = 0


@dataclass(frozen=True)
class Registry:
    features: tuple[FeatureSpec, ...]
    hash: str
    path: str
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def for_cadence(self, cadence: str) -> list[FeatureSpec]:
        return [f for f in self.features if cadence in f.cadences]

    def names(self, cadence: str | None = None) -> list[str]:
        return [f.name for f in self.features if cadence is None or cadence in f.cadences]

    @property
    def warmup_ms(self) -> int:
        """Event time after which every feature is defined (longest window, candle history, z-score
        history): how far before a period an offline replay must start to reproduce it."""
        from flows.feature_kinds import warmup_ms

        return max((warmup_ms(f, self) for f in self.features), default=0)


def _entry_error(i: int, raw: dict, msg: str) -> RegistryError:
    return RegistryError(f"feature #{i} ({raw.get('name', '?')}): {msg}")


def load_registry(path: str | Path = DEFAULT_PATH) -> Registry:
    from flows.feature_kinds import KINDS

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RegistryError(f"cannot read registry {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("features"), list):
        raise RegistryError(f"{path}: expected a mapping with a 'features' list")
    defaults = doc.get("defaults") or {}
    specs: list[FeatureSpec] = []
    seen: dict[str, FeatureSpec] = {}
    for i, raw in enumerate(doc["features"], 1):
        if not isinstance(raw, dict):
            raise RegistryError(f"feature #{i}: expected a mapping, got {raw!r}")
        unknown = set(raw) - {"name", "kind", "inputs", "window", "cadences", "params", "normalisation", "order"}
        if unknown:
            raise _entry_error(i, raw, f"unknown keys {sorted(unknown)}")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _entry_error(i, raw, "name must be lower_snake_case")
        if name in seen:
            raise _entry_error(i, raw, f"duplicate name {name!r}")
        kind = raw.get("kind")
        if kind not in KINDS:
            raise _entry_error(i, raw, f"unknown kind {kind!r}; known: {sorted(KINDS)}")
        inputs = tuple(raw.get("inputs") or ())
        order = int(raw.get("order", defaults.get("order", 0)))
        for inp in inputs:
            if inp in RAW_INPUTS:
                continue
            if inp not in seen:
                raise _entry_error(i, raw, f"unknown input {inp!r}: not a raw stream {sorted(RAW_INPUTS)} "
                                           "nor a feature declared above")
            if seen[inp].order >= order:
                raise _entry_error(i, raw, f"input {inp!r} has order {seen[inp].order} >= {order}: "
                                           "a feature may only use features computed before it")
        window_ms = parse_duration(raw.get("window", "0s"))
        cadences = tuple(raw.get("cadences", defaults.get("cadences", list(CADENCES))))
        bad = [c for c in cadences if c not in CADENCES]
        if bad or not cadences:
            raise _entry_error(i, raw, f"cadences must be a non-empty subset of {list(CADENCES)}, got {cadences}")
        norm = raw.get("normalisation", defaults.get("normalisation", "none"))
        if norm not in NORMALISATIONS:
            raise _entry_error(i, raw, f"normalisation must be one of {sorted(NORMALISATIONS)}")
        params = dict(raw.get("params") or {})
        spec = FeatureSpec(name, kind, inputs, window_ms, cadences, params, norm, order)
        try:
            KINDS[kind].validate(spec)
        except (RegistryError, ValueError, TypeError, KeyError) as exc:
            raise _entry_error(i, raw, str(exc)) from None
        for inp in inputs:  # a derived feature must exist in every cadence it is computed in
            if inp in seen and not set(cadences) <= set(seen[inp].cadences):
                raise _entry_error(i, raw, f"input {inp!r} is not computed in all of {cadences}")
        specs.append(spec)
        seen[name] = spec
    specs.sort(key=lambda s: s.order)  # stable: declaration order within an order level
    config = dict(doc.get("engine") or {})
    canonical = json.dumps({"features": [
        {"name": s.name, "kind": s.kind, "inputs": list(s.inputs), "window_ms": s.window_ms,
         "cadences": list(s.cadences), "params": s.params, "normalisation": s.normalisation, "order": s.order}
        for s in specs], "engine": config}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    return Registry(tuple(specs), digest, str(path), config)
