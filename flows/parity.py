"""Online/offline parity: what ``features.live`` published vs the offline replay of the archive.

    tickcast parity --from 2026-11-20T10:00 --to 2026-11-20T12:00 [--symbols BTCUSDT] [--json out.json]

Reads every FeatureVector of the period from ``features.live`` (all partitions, assigned, up to the
high watermark at start), replays the Delta archive for the same period through the same dataflow
(``flows.offline_replay``), and compares per (symbol, cadence, window_end) key: every feature value
bit for bit (IEEE-754 bits; null only equals null), the null reasons, and the window's metadata
(book_valid, event_count, last_gw_seq, close_recv_ts, registry_hash). ``emit_ts`` is wall time and
is not compared. A key published several times (at-least-once delivery, a resumed epoch) must carry
identical records; otherwise it counts as ``online_inconsistent``.
"""
from __future__ import annotations

import struct
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tickcast.logs import get_logger

log = get_logger("parity")
META = ("book_valid", "event_count", "last_gw_seq", "close_recv_ts", "registry_hash", "venue")
_D = struct.Struct("<d")


def same_value(a, b) -> bool:
    """Bit-identical doubles (so -0.0 != 0.0 and NaN payloads count), null only equals null."""
    if a is None or b is None:
        return a is None and b is None
    return _D.pack(a) == _D.pack(b)


@dataclass
class ParityReport:
    period: tuple[int, int]
    symbols: list[str]
    windows_online: int = 0
    windows_offline: int = 0
    windows_compared: int = 0
    values_compared: int = 0
    value_mismatches: int = 0
    only_online: int = 0
    only_offline: int = 0
    online_inconsistent: int = 0
    mismatches_by_feature: dict[str, int] = field(default_factory=dict)
    null_reason_mismatches: int = 0
    meta_mismatches: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)
    by_cadence: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        # a published window the replay cannot rebuild is a failure too (a wrong lake, a skipped
        # file), and so is a check that compared nothing
        return (self.windows_compared > 0 and self.only_online == 0 and self.value_mismatches == 0
                and self.null_reason_mismatches == 0 and not self.meta_mismatches and self.online_inconsistent == 0)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["period"] = {"from": self.period[0], "to": self.period[1]}
        d["ok"] = self.ok
        return d

    def text(self) -> str:
        lines = [f"parity {self.period[0]}..{self.period[1]} symbols={','.join(self.symbols)}",
                 f"windows: online={self.windows_online} offline={self.windows_offline} "
                 f"compared={self.windows_compared} only_online={self.only_online} only_offline={self.only_offline} "
                 f"online_inconsistent={self.online_inconsistent}",
                 f"windows compared per cadence: {dict(sorted(self.by_cadence.items()))}",
                 f"values compared={self.values_compared} mismatches={self.value_mismatches} "
                 f"null_reason_mismatches={self.null_reason_mismatches} meta_mismatches={self.meta_mismatches}"]
        if self.mismatches_by_feature:
            lines.append("mismatches per feature:")
            for name, n in sorted(self.mismatches_by_feature.items(), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {name:40s} {n}")
        for ex in self.examples[:10]:
            lines.append(f"  e.g. {ex}")
        lines.append("PARITY OK" if self.ok else "PARITY FAILED")
        return "\n".join(lines)


def read_published(bootstrap: str, from_ms: int, to_ms: int, symbols: Sequence[str] | None = None, *,
                   topic: str | None = None, timeout_s: float = 600.0,
                   seek_margin_ms: int | None = 3_600_000) -> tuple[dict[tuple, dict], int]:
    """FeatureVectors on ``features.live`` with from < window_end <= to: {key: record}, inconsistent count."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from tickcast.kafka import consumer_config
    from tickcast.serde import SerdeError, default_serde
    from tickcast.topics import FEATURES_LIVE

    topic = topic or FEATURES_LIVE
    serde = default_serde()
    c = Consumer(consumer_config(bootstrap, "tickcast-parity", low_latency=False))
    md = c.list_topics(topic, timeout=15)
    if topic not in md.topics or md.topics[topic].error is not None:
        c.close()
        raise RuntimeError(f"topic {topic} does not exist on {bootstrap}")
    parts = sorted(md.topics[topic].partitions)
    highs = {}
    for p in parts:
        lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
        if hi > lo:
            highs[p] = hi
    # a window is published after it ends, so nothing produced before from - margin can be in the
    # period: seek each partition by produce time (the whole topic is read only as a fallback)
    starts = {p: OFFSET_BEGINNING for p in highs}
    if highs and seek_margin_ms is not None:
        found = c.offsets_for_times([TopicPartition(topic, p, max(from_ms - seek_margin_ms, 0)) for p in highs],
                                    timeout=15)
        for tp in found:
            if tp.offset >= 0:
                starts[tp.partition] = tp.offset
            elif tp.offset == -1:  # nothing produced since then
                highs.pop(tp.partition, None)
                starts.pop(tp.partition, None)
    c.assign([TopicPartition(topic, p, starts[p]) for p in highs])
    pos = {p: (starts[p] - 1 if starts[p] >= 0 else -1) for p in highs}
    out: dict[tuple, dict] = {}
    inconsistent = 0
    wanted = set(symbols) if symbols else None
    deadline = time.monotonic() + timeout_s
    while any(pos[p] + 1 < highs[p] for p in highs):
        if time.monotonic() > deadline:
            c.close()
            raise TimeoutError(f"reading {topic} did not reach its end within {timeout_s:.0f} s")
        for m in c.consume(10_000, 0.5):
            if m.error() is not None:
                continue
            pos[m.partition()] = m.offset()
            try:
                rec = serde.decode(m.value(), "FeatureVector")
            except SerdeError:
                continue
            if not (from_ms < rec["window_end"] <= to_ms) or (wanted and rec["symbol"] not in wanted):
                continue
            rec.pop("emit_ts", None)
            key = (rec["symbol"], rec["cadence"], rec["window_end"])
            prev = out.get(key)
            if prev is not None and not records_equal(prev, rec):
                inconsistent += 1
            out[key] = rec
    c.close()
    return out, inconsistent


def records_equal(a: dict, b: dict) -> bool:
    if a["values"].keys() != b["values"].keys():
        return False
    return (all(same_value(a["values"][k], b["values"][k]) for k in a["values"]) and a["nulls"] == b["nulls"]
            and all(a.get(m) == b.get(m) for m in META))


def compare(online: dict[tuple, dict], offline: dict[tuple, dict], report: ParityReport) -> ParityReport:
    report.windows_online, report.windows_offline = len(online), len(offline)
    for key in sorted(set(online) | set(offline)):
        a, b = online.get(key), offline.get(key)
        if a is None:
            report.only_offline += 1
            continue
        if b is None:
            report.only_online += 1
            continue
        report.windows_compared += 1
        report.by_cadence[key[1]] = report.by_cadence.get(key[1], 0) + 1
        for name in sorted(set(a["values"]) | set(b["values"])):
            report.values_compared += 1
            va, vb = a["values"].get(name), b["values"].get(name)
            if name not in a["values"] or name not in b["values"] or not same_value(va, vb):
                report.value_mismatches += 1
                report.mismatches_by_feature[name] = report.mismatches_by_feature.get(name, 0) + 1
                if len(report.examples) < 20:
                    report.examples.append({"key": list(key), "feature": name, "online": va, "offline": vb})
        if a["nulls"] != b["nulls"]:
            report.null_reason_mismatches += 1
        for m in META:
            if a.get(m) != b.get(m):
                report.meta_mismatches[m] = report.meta_mismatches.get(m, 0) + 1
    return report


def parity(bootstrap: str, lake, from_ms: int, to_ms: int, symbols: Sequence[str], *,
           versions: dict[str, int] | None = None, registry_path: str | None = None, work_dir: str | Path | None = None,
           progress: bool = False, topic: str | None = None) -> ParityReport:
    """Compare the published vectors of [from_ms, to_ms) with the replay of the archive."""
    from flows.offline_replay import iter_vectors, replay

    report = ParityReport((from_ms, to_ms), list(symbols))
    online, report.online_inconsistent = read_published(bootstrap, from_ms, to_ms, symbols, topic=topic)
    with tempfile.TemporaryDirectory(prefix="parity-", dir=work_dir) as tmp:
        replay(lake, symbols, from_ms, to_ms, tmp, versions=versions, registry_path=registry_path, progress=progress)
        offline = {}
        for rec in iter_vectors(tmp, symbols=symbols):
            offline[(rec["symbol"], rec["cadence"], rec["window_end"])] = rec
    compare(online, offline, report)
    log.info("parity", extra={"counts": {"values": report.values_compared, "mismatches": report.value_mismatches,
                                         "windows": report.windows_compared}})
    return report
