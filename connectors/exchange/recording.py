"""Recordings made by the market model: JSONL files the replay driver (and anyone else) can read.

The file holds what one client subscribed to the chosen topics from the start would have
received: a snapshot per book/ticker/kline topic, then every message in order. Deterministic: the
same arguments write the same bytes.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from connectors.exchange import protocol as P
from connectors.exchange.instruments import MVP, InstrumentBook
from connectors.exchange.model import MarketModel


def _keep(topic: str, prefixes: list[str]) -> bool:
    return any(topic.startswith(p + ".") for p in prefixes)


def model_messages(symbols: list[str], *, seed: int, start_ms: int, seconds: float, prefixes: list[str],
                   snapshots: bool = True, history_days: float = 1.0,
                   progress: Callable[[int], object] | None = None):
    """Yield ``(ts, text)`` for the kept topics of a model run of ``seconds`` of exchange time."""
    ib = InstrumentBook.generated() if all(s in MVP for s in symbols) else InstrumentBook.load()
    model = MarketModel({s: ib.require(s) for s in symbols}, seed=seed, start_ms=start_ms,
                        history_days=history_days)
    if snapshots:
        for s in symbols:
            for prefix in prefixes:
                t = P.parse_topic(f"{prefix}.{s}")
                if t is None:
                    raise ValueError(f"not a topic prefix: {prefix!r}")
                snap = model.snapshot(t)
                if snap is not None:
                    yield snap.ts, snap.text
    end = start_ms + int(seconds * 1000)
    while model.t < end:
        before = model.t
        for out in model.advance(min(end, model.t + 1000)):
            if _keep(out.topic, prefixes):
                yield out.ts, out.text
        if progress is not None:
            progress(model.t - before)


def record_model(path: str | Path, symbols: list[str], *, seed: int, start_ms: int, seconds: float,
                 prefixes: list[str], snapshots: bool = True, recv_form: bool = False, history_days: float = 1.0,
                 progress: Callable[[int], object] | None = None) -> int:
    """Write the run to ``path`` (raw lines, or ``{"recv_ts", "msg"}`` lines 5 ms after ``ts``)."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for ts, text in model_messages(symbols, seed=seed, start_ms=start_ms, seconds=seconds, prefixes=prefixes,
                                       snapshots=snapshots, history_days=history_days, progress=progress):
            if recv_form:
                fh.write('{"recv_ts":' + f"{(ts + 5) / 1000:.3f}" + ',"msg":' + text + "}\n")
            else:
                fh.write(text + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[str]:
    return [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def parse(text: str) -> dict:
    return json.loads(text)
