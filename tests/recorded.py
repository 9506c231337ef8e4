"""Raw Bybit v5 WebSocket messages -> the gateway's raw events, for tests that replay recordings.

The glue the gateway itself runs, without Kafka: ``connectors.bybit.parse.decode`` +
``BybitParser(venue="bybit.linear").events(msg, recv_ts)`` turns each data message into records
(``schemas/avro``), and ``gw_seq`` is assigned per symbol in arrival order, 0, 1, 2, ... as
``connectors.publisher.Publisher.publish`` does (dense across every record of the symbol).
Subscribe acknowledgements and pongs carry no data and are skipped; a message the parser refuses
would be a dead letter at the gateway and raises here (a recording used as test input must parse).

Receive times: a line of the form ``{"recv_ts": <seconds>, "msg": {...}}`` (``linear_ws_recv.jsonl``)
carries the real local receive time; for a bare message line (``linear_ws_raw.jsonl``, the local
exchange fixture) the receive time is taken from the sibling ``*_recv.jsonl`` when there is one with
the same messages, else it is the message's exchange ``ts`` (ms -> µs). Only the latency metadata of
the feature records depends on it.
"""
from __future__ import annotations

import json
import lzma
from collections.abc import Iterable
from pathlib import Path

from connectors.bybit.parse import BybitParser, control_kind, decode

Event = tuple[str, dict]  # (schema name, record)


def _lines(path: Path) -> list[str]:
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8") as fh:
            return fh.read().splitlines()
    return path.read_text(encoding="utf-8").splitlines()


def _recv_times(path: Path, n: int) -> list[int] | None:
    """Receive times (µs) from the sibling ``X_recv.jsonl`` of ``X_raw.jsonl``, when it matches."""
    if not path.name.endswith("_raw.jsonl"):
        return None
    sib = path.with_name(path.name[: -len("_raw.jsonl")] + "_recv.jsonl")
    if not sib.is_file():
        return None
    rows = [json.loads(line) for line in sib.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != n:
        return None
    return [round(r["recv_ts"] * 1_000_000) for r in rows]


def messages_to_events(messages: Iterable[tuple[dict, int | None]], venue: str = "bybit.linear"
                       ) -> list[tuple[str, Event]]:
    """(decoded message, receive time µs or None) in arrival order -> [(symbol, (name, record))]."""
    parser = BybitParser(venue=venue)
    next_seq: dict[str, int] = {}
    out: list[tuple[str, Event]] = []
    for msg, recv_ts in messages:
        if control_kind(msg) is not None or "topic" not in msg:
            continue
        if recv_ts is None:
            recv_ts = msg["ts"] * 1000
        for name, rec in parser.events(msg, recv_ts):
            sym = rec["symbol"]
            seq = next_seq.get(sym, 0)
            rec["gw_seq"] = seq
            next_seq[sym] = seq + 1
            out.append((sym, (name, rec)))
    return out


def recorded_events(path: str | Path, venue: str = "bybit.linear") -> list[tuple[str, Event]]:
    """Every raw event of a recording (``.jsonl`` or ``.jsonl.xz``), in the gateway's order."""
    path = Path(path)
    lines = [line for line in _lines(path) if line.strip()]
    recv = _recv_times(path, len(lines))
    msgs: list[tuple[dict, int | None]] = []
    for i, line in enumerate(lines):
        obj = decode(line)
        if "msg" in obj and "recv_ts" in obj and "topic" not in obj:
            msgs.append((obj["msg"], round(obj["recv_ts"] * 1_000_000)))
        else:
            msgs.append((obj, recv[i] if recv is not None else None))
    return messages_to_events(msgs, venue)


def by_symbol(events: list[tuple[str, Event]]) -> dict[str, list[Event]]:
    """Split [(symbol, event)] into each symbol's events, keeping the order."""
    out: dict[str, list[Event]] = {}
    for sym, ev in events:
        out.setdefault(sym, []).append(ev)
    return out
