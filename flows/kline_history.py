"""Historical klines (and funding settlements) into the bronze tables, so kline-only datasets cover
months before the live archive has accumulated.

Inputs:
- any iterable of ``Kline`` records (the Bybit REST backfill in ``connectors/`` yields them);
- CSV files ``timestamp,open,high,low,close,volume[,turnover]`` (Bybit's kline layout as the
  cobra0506 download writes it, ISO timestamps with ``+00:00``; Binance spot files in the same
  layout with naive-UTC timestamps are labelled ``binance.spot.csv``, never passed off as Bybit);
- Bybit's REST ``/v5/market/kline`` response (``result.list`` of
  ``[startTime, open, high, low, close, volume, turnover]``, newest first);
- funding-rate history CSV ``ts,rate`` (settlements) into ``raw_funding``.

Historical rows have ``gw_seq = -1`` (not part of a live stream: the replay skips them), no Kafka
coordinates and ``ingest = history:<source>``. They were not observed by the gateway, so
``exchange_ts`` is the candle's last millisecond (``end_ts``, when it was final) and ``recv_ts`` the
same instant in µs. Prices and volumes keep the file's text exactly. Only closed candles are
imported (a REST page's still-open newest candle is skipped).

Idempotent: a kline whose (symbol, interval, start_ts) already has a confirmed row in ``raw_kline``
(live or historical) is skipped, and so is a funding settlement already present for (symbol,
exchange_ts). Rows that are not valid candles (bad timestamp, not a decimal, high below low, ...)
become dead-letter rows with the reason and the raw line, once.
"""
from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from flows.lake import BRONZE, DAY_MS, DEAD_LETTER_TABLE, Lake, dates_between, rows_to_arrow, with_meta
from tickcast.logs import get_logger

log = get_logger("kline_history")

MINUTE_MS = 60_000
INTERVAL_MS = {"1": MINUTE_MS, "3": 3 * MINUTE_MS, "5": 5 * MINUTE_MS, "15": 15 * MINUTE_MS,
               "30": 30 * MINUTE_MS, "60": 60 * MINUTE_MS, "120": 120 * MINUTE_MS, "240": 240 * MINUTE_MS,
               "360": 360 * MINUTE_MS, "720": 720 * MINUTE_MS, "D": DAY_MS, "W": 7 * DAY_MS}
CSV_HEADER = ["timestamp", "open", "high", "low", "close", "volume"]
# Bybit's REST column names (``tickcast backfill --out`` writes them): the same layout, ms timestamps
CSV_HEADER_ALIASES = {"starttime": "timestamp", "start_time": "timestamp", "start": "timestamp"}
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$")
_SYMBOL = re.compile(r"^[A-Z0-9]{2,30}$")
_FILE_NAME = re.compile(r"^([A-Z0-9]+)_(\d+[mhdw]?|D|W)(?:_|\.|$)", re.IGNORECASE)
HISTORY_GW_SEQ = -1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class HistoryError(ValueError):
    """An input that cannot be imported at all (bad file layout, unknown interval, ...)."""


@dataclass
class BadRow:
    """A row that is not a valid record: becomes a dead letter."""

    symbol: str | None
    error_kind: str
    reason: str
    payload: bytes


@dataclass
class ImportReport:
    table: str
    source: str
    read: int = 0
    inserted: int = 0
    skipped_existing: int = 0
    duplicates_in_input: int = 0
    skipped_open: int = 0
    dead_letters: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    version: int | None = None
    venues: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# readers


def normalise_interval(interval: str) -> str:
    s = str(interval).strip()
    aliases = {"1m": "1", "3m": "3", "5m": "5", "15m": "15", "30m": "30", "1h": "60", "2h": "120",
               "4h": "240", "6h": "360", "12h": "720", "1d": "D", "1w": "W"}
    s = aliases.get(s.lower(), s.upper() if s.isalpha() else s)
    if s not in INTERVAL_MS:
        raise HistoryError(f"unknown kline interval {interval!r}: use one of {sorted(INTERVAL_MS)} or 1m/5m/1h/1d")
    return s


def infer_from_filename(path: str | Path) -> tuple[str | None, str | None]:
    """(symbol, interval) from names like ``BTCUSDT_1m_20250530-20250629.csv``."""
    m = _FILE_NAME.match(Path(path).name)
    if not m:
        return None, None
    return m.group(1).upper(), normalise_interval(m.group(2).lower() if m.group(2)[-1].isalpha()
                                                  and m.group(2)[0].isdigit() else m.group(2))


def _parse_ts(text: str) -> int:
    """ISO timestamp (with offset, or naive = UTC) or epoch milliseconds -> ms."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _check_decimal(name: str, text: str) -> Decimal:
    if not isinstance(text, str) or not _DECIMAL.match(text):
        raise ValueError(f"{name} {text!r} is not a non-negative decimal string")
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{name} {text!r} is not a decimal") from None
    if not d.is_finite():
        raise ValueError(f"{name} {text!r} is not finite")
    return d


def validate_kline(rec: dict) -> None:
    """Raise ValueError naming the problem when ``rec`` is not a sane candle."""
    if not isinstance(rec.get("symbol"), str) or not _SYMBOL.match(rec["symbol"]):
        raise ValueError(f"bad symbol {rec.get('symbol')!r}")
    iv = rec.get("interval")
    if iv not in INTERVAL_MS:
        raise ValueError(f"unknown interval {iv!r}")
    start = rec.get("start_ts")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"bad start_ts {start!r}")
    if iv != "W" and start % INTERVAL_MS[iv] != 0:
        raise ValueError(f"start_ts {start} is not aligned to the {iv} interval")
    o, h, lo, c = (_check_decimal(k, rec.get(k)) for k in ("open", "high", "low", "close"))
    _check_decimal("volume", rec.get("volume"))
    if rec.get("turnover") is not None:
        _check_decimal("turnover", rec["turnover"])
    if min(o, h, lo, c) <= 0:
        raise ValueError("prices must be positive")
    if h < max(o, c, lo) or lo > min(o, c, h):
        raise ValueError(f"inconsistent candle: open {o} high {h} low {lo} close {c}")


def make_kline(symbol: str, interval: str, start_ts: int, o: str, h: str, lo: str, c: str, v: str,
               turnover: str | None, venue: str) -> dict:
    end = start_ts + INTERVAL_MS[interval] - 1
    return {"symbol": symbol, "venue": venue, "exchange_ts": end, "recv_ts": end * 1000,
            "gw_seq": HISTORY_GW_SEQ, "interval": interval, "start_ts": start_ts, "end_ts": end,
            "open": o, "high": h, "low": lo, "close": c, "volume": v, "turnover": turnover, "confirm": True}


def read_kline_csv(path: str | Path, *, symbol: str | None = None, interval: str | None = None,
                   venue: str) -> Iterator[dict | BadRow]:
    """Kline records of a ``timestamp,open,high,low,close,volume[,turnover]`` CSV (text kept exactly)."""
    path = Path(path)
    fsym, fint = infer_from_filename(path)
    symbol = (symbol or fsym or "").upper()
    interval = normalise_interval(interval) if interval else fint
    if not symbol or not _SYMBOL.match(symbol):
        raise HistoryError(f"{path.name}: pass the symbol (it is not in the file name)")
    if not interval:
        raise HistoryError(f"{path.name}: pass the interval (it is not in the file name)")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        header = [CSV_HEADER_ALIASES.get(h, h) for h in header[:1]] + header[1:]
        if header[:6] != CSV_HEADER or len(header) > 7 or (len(header) == 7 and header[6] != "turnover"):
            raise HistoryError(f"{path.name}: header {header} is not {','.join(CSV_HEADER)}[,turnover]")
        has_turnover = len(header) == 7
        for lineno, row in enumerate(reader, start=2):
            raw = ",".join(row).encode()
            if not row or all(not x.strip() for x in row):
                continue
            if len(row) != len(header):
                yield BadRow(symbol, "bad_csv_row", f"{path.name}:{lineno}: {len(row)} fields, expected "
                             f"{len(header)}", raw)
                continue
            try:
                start = _parse_ts(row[0])
                rec = make_kline(symbol, interval, start, row[1], row[2], row[3], row[4], row[5],
                                 row[6] if has_turnover else None, venue)
                validate_kline(rec)
            except ValueError as exc:
                yield BadRow(symbol, "invalid_kline", f"{path.name}:{lineno}: {exc}", raw)
                continue
            yield rec


def read_bybit_kline_csv(path, *, symbol=None, interval=None, category: str = "linear"):
    return read_kline_csv(path, symbol=symbol, interval=interval, venue=f"bybit.{category}.csv")


def read_binance_spot_csv(path, *, symbol=None, interval=None):
    return read_kline_csv(path, symbol=symbol, interval=interval, venue="binance.spot.csv")


def read_bybit_rest_klines(response: Any, *, symbol: str | None = None, interval: str | None = None,
                           category: str | None = None) -> Iterator[dict | BadRow]:
    """Kline records of Bybit ``/v5/market/kline`` response(s): a dict, a list of them, a JSON
    text or a path to a JSON file. The page's ``time`` marks its still-open newest candle."""
    if isinstance(response, (str, Path)) and Path(str(response)).suffix == ".json" and Path(str(response)).exists():
        response = json.loads(Path(response).read_text())
    elif isinstance(response, (str, bytes)):
        response = json.loads(response)
    pages = response if isinstance(response, list) else [response]
    for page in pages:
        if not isinstance(page, dict) or "result" not in page:
            raise HistoryError("not a Bybit /v5/market/kline response (no result)")
        if page.get("retCode", 0) != 0:
            raise HistoryError(f"Bybit error response: retCode={page.get('retCode')} {page.get('retMsg')}")
        res = page["result"]
        sym = (symbol or res.get("symbol") or "").upper()
        cat = category or res.get("category") or "linear"
        iv = normalise_interval(interval or res.get("interval") or "")
        now = page.get("time")
        for item in sorted(res.get("list") or [], key=lambda x: int(x[0]) if str(x[0]).isdigit() else -1):
            raw = json.dumps(item).encode()
            try:
                if not isinstance(item, list) or len(item) < 6:
                    raise ValueError(f"expected [startTime, open, high, low, close, volume, turnover], got {item!r}")
                start = int(item[0])
                rec = make_kline(sym, iv, start, *(str(x) for x in item[1:6]),
                                 str(item[6]) if len(item) > 6 else None, f"bybit.{cat}.rest")
                validate_kline(rec)
            except (ValueError, TypeError) as exc:
                yield BadRow(sym or None, "invalid_kline", str(exc), raw)
                continue
            if isinstance(now, int) and start + INTERVAL_MS[iv] > now:
                rec["confirm"] = False  # still open when the page was fetched
            yield rec


def read_funding_csv(path: str | Path, *, symbol: str | None = None, venue: str = "bybit.linear.csv",
                     interval_hours: int | None = None) -> Iterator[dict | BadRow]:
    """Funding settlements of a ``ts,rate`` CSV (ms, decimal text; any row order)."""
    path = Path(path)
    if symbol is None:
        m = re.search(r"([A-Z0-9]{5,})", path.stem)
        symbol = m.group(1) if m else None
    if not symbol or not _SYMBOL.match(symbol.upper()):
        raise HistoryError(f"{path.name}: pass the symbol")
    symbol = symbol.upper()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if header != ["ts", "rate"]:
            raise HistoryError(f"{path.name}: header {header} is not ts,rate")
        for lineno, row in enumerate(reader, start=2):
            raw = ",".join(row).encode()
            try:
                if len(row) != 2 or not row[0].strip().isdigit():
                    raise ValueError("expected <ms>,<rate>")
                rate = row[1].strip()
                if not re.match(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$", rate):
                    raise ValueError(f"rate {rate!r} is not a decimal")
                ts = int(row[0])
            except ValueError as exc:
                yield BadRow(symbol, "invalid_funding", f"{path.name}:{lineno}: {exc}", raw)
                continue
            yield {"symbol": symbol, "venue": venue, "exchange_ts": ts, "recv_ts": ts * 1000,
                   "gw_seq": HISTORY_GW_SEQ, "kind": "settlement", "funding_rate": rate,
                   "next_funding_time": None, "funding_interval_hour": interval_hours}


# ---------------------------------------------------------------------------------------------
# import


def _existing_kline_keys(lake: Lake, symbol: str, interval: str, lo: int, hi: int) -> set[int]:
    dates = dates_between(lo - DAY_MS, hi + INTERVAL_MS[interval] + DAY_MS)
    at = lake.read("raw_kline", symbols=[symbol], dates=dates, columns=["start_ts"],
                   filter=(pc.field("interval") == interval) & pc.field("confirm")
                   & (pc.field("start_ts") >= lo) & (pc.field("start_ts") <= hi))
    return set(at.column("start_ts").to_pylist())


def _existing_funding_keys(lake: Lake, symbol: str, lo: int, hi: int) -> set[int]:
    at = lake.read("raw_funding", symbols=[symbol], dates=dates_between(lo, hi + 1), columns=["exchange_ts"],
                   filter=(pc.field("kind") == "settlement") & (pc.field("exchange_ts") >= lo)
                   & (pc.field("exchange_ts") <= hi))
    return set(at.column("exchange_ts").to_pylist())


def _write_dead_letters(lake: Lake, bad: list[BadRow], source: str, origin: str) -> int:
    """Dead-letter rows for bad input rows, skipping those already recorded for the same origin."""
    if not bad:
        return 0
    t = BRONZE[DEAD_LETTER_TABLE]
    seen = set()
    existing = lake.read(DEAD_LETTER_TABLE, columns=["payload", "reason"],
                         filter=(pc.field("source") == source) & (pc.field("topic") == origin))
    seen = set(zip(existing.column("payload").to_pylist(), existing.column("reason").to_pylist()))
    now_us = int(time.time() * 1_000_000)
    rows = []
    for b in bad:
        if (b.payload, b.reason) in seen:
            continue
        seen.add((b.payload, b.reason))
        rec = {"source": source, "topic": origin, "symbol": b.symbol, "error_kind": b.error_kind,
               "reason": b.reason, "payload": b.payload, "ts": now_us}
        rows.append(with_meta(t, rec, topic=None, partition=None, offset=None, kafka_ts=None,
                              ingest=f"history:{origin}"))
    if rows:
        lake.append(DEAD_LETTER_TABLE, rows_to_arrow(t, rows))
    return len(rows)


def _import(lake: Lake, table: str, records: Iterable[dict | BadRow], *, source: str, origin: str,
            key, existing, validate, chunk_rows: int, progress: bool, trusted: bool = False) -> ImportReport:
    from tqdm import tqdm

    from tickcast.serde import default_serde

    lake.ensure_tables([table, DEAD_LETTER_TABLE])
    schema = default_serde().schema(BRONZE[table].schema_name)
    rep = ImportReport(table, origin)
    t = BRONZE[table]
    bar = tqdm(desc=f"import {origin} -> {table}", unit="rows", disable=not progress, mininterval=1.0)

    def flush(good: list[dict], bad: list[BadRow]) -> None:
        rep.dead_letters += _write_dead_letters(lake, bad, f"history.{source}", origin)
        by_group: dict[tuple, list[dict]] = {}
        for r in good:
            by_group.setdefault(key(r)[:-1], []).append(r)
        rows = []
        for group, recs in sorted(by_group.items()):
            ks = [key(r)[-1] for r in recs]
            have = existing(lake, group, min(ks), max(ks))
            for r in sorted(recs, key=lambda r: key(r)[-1]):
                k = key(r)[-1]
                if k in have:
                    rep.skipped_existing += 1
                    continue
                have.add(k)
                rows.append(with_meta(t, r, topic=None, partition=None, offset=None, kafka_ts=None,
                                      ingest=f"history:{origin}"))
                rep.venues[r["venue"]] = rep.venues.get(r["venue"], 0) + 1
                rep.first_ts = k if rep.first_ts is None else min(rep.first_ts, k)
                rep.last_ts = k if rep.last_ts is None else max(rep.last_ts, k)
        if rows:
            lake.append(table, rows_to_arrow(t, rows))
            rep.version = lake.table(table).version()
            rep.inserted += len(rows)

    good: list[dict] = []
    bad: list[BadRow] = []
    seen_in_chunk: set = set()
    from fastavro.validation import validate as avro_validate

    for item in records:
        rep.read += 1
        bar.update(1)
        if isinstance(item, BadRow):
            bad.append(item)
        else:
            rec = dict(item)
            rec["gw_seq"] = HISTORY_GW_SEQ
            try:
                if not trusted:  # the readers above validated their records already
                    avro_validate(rec, schema.codec, raise_errors=True)
                    validate(rec)
            except Exception as exc:  # fastavro's ValidationError or our ValueError: a dead letter
                bad.append(BadRow(rec.get("symbol") if isinstance(rec.get("symbol"), str) else None,
                                  "invalid_record", str(exc), json.dumps(rec, default=str, sort_keys=True).encode()))
                continue
            if table == "raw_kline" and not rec["confirm"]:
                rep.skipped_open += 1
                continue
            k = key(rec)
            if k in seen_in_chunk:
                rep.duplicates_in_input += 1
                continue
            seen_in_chunk.add(k)
            good.append(rec)
        if len(good) + len(bad) >= chunk_rows:
            flush(good, bad)
            good, bad = [], []
    flush(good, bad)
    bar.close()
    log.info("history import", extra={"table": table, "source": origin, "counts": {
        k: v for k, v in rep.as_dict().items() if isinstance(v, int)}})
    return rep


def import_klines(lake: Lake, records: Iterable[dict | BadRow], *, source: str = "records", origin: str | None = None,
                  chunk_rows: int = 200_000, progress: bool = False, trusted: bool = False) -> ImportReport:
    """Import kline records (e.g. from the REST backfill, or ``read_*`` above) into ``raw_kline``.
    Records are validated (Avro schema + candle sanity) unless ``trusted`` (they come from the
    ``read_*`` functions, which validate each row and turn bad ones into BadRow)."""
    return _import(lake, "raw_kline", records, source=source, origin=origin or source,
                   key=lambda r: (r["symbol"], r["interval"], r["start_ts"]),
                   existing=lambda lk, g, lo, hi: _existing_kline_keys(lk, g[0], g[1], lo, hi),
                   validate=validate_kline, chunk_rows=chunk_rows, progress=progress, trusted=trusted)


def import_funding(lake: Lake, records: Iterable[dict | BadRow], *, source: str = "records",
                   origin: str | None = None, chunk_rows: int = 200_000, progress: bool = False) -> ImportReport:
    """Import funding settlements into ``raw_funding`` (idempotent on symbol and settlement time)."""
    def check(rec):
        if rec["kind"] != "settlement":
            raise ValueError("only settlements are historical funding events")
    return _import(lake, "raw_funding", records, source=source, origin=origin or source,
                   key=lambda r: (r["symbol"], r["exchange_ts"]),
                   existing=lambda lk, g, lo, hi: _existing_funding_keys(lk, g[0], lo, hi),
                   validate=check, chunk_rows=chunk_rows, progress=progress)


def detect_layout(path: str | Path) -> str:
    """bybit-rest-json, bybit-csv or binance-csv from the file itself and its path; else an error."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return "bybit-rest-json"
    with open(p, encoding="utf-8") as fh:
        head = fh.readline()
    cols = [h.strip().lower() for h in head.split(",")]
    if cols and cols[0] in CSV_HEADER_ALIASES:
        return "bybit-csv"  # Bybit's REST columns, as `tickcast backfill --out` writes them
    if cols[:6] != CSV_HEADER:
        raise HistoryError(f"{p.name}: not a kline CSV (header {head.strip()!r})")
    low = str(p).lower()
    if "binance" in low:
        return "binance-csv"
    if "bybit" in low:
        return "bybit-csv"
    raise HistoryError(f"{p.name}: cannot tell the venue from the path: pass --layout bybit-csv or binance-csv")


def import_kline_file(lake: Lake, path: str | Path, *, layout: str = "auto", symbol: str | None = None,
                      interval: str | None = None, category: str = "linear", progress: bool = False) -> ImportReport:
    """Import one file (CSV in Bybit's or Binance's kline layout, or a Bybit REST JSON response)."""
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"{path}: no such file")
    layout = detect_layout(path) if layout == "auto" else layout
    if layout == "bybit-csv":
        recs = read_bybit_kline_csv(path, symbol=symbol, interval=interval, category=category)
        source = "bybit_csv"
    elif layout == "binance-csv":
        recs = read_binance_spot_csv(path, symbol=symbol, interval=interval)
        source = "binance_csv"
    elif layout == "bybit-rest-json":
        recs = read_bybit_rest_klines(path, symbol=symbol, interval=interval)
        source = "bybit_rest"
    else:
        raise HistoryError(f"unknown layout {layout!r}: auto, bybit-csv, binance-csv or bybit-rest-json")
    return import_klines(lake, recs, source=source, origin=path.name, progress=progress, trusted=True)


def import_funding_file(lake: Lake, path: str | Path, *, symbol: str | None = None,
                        venue: str = "bybit.linear.csv", progress: bool = False) -> ImportReport:
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"{path}: no such file")
    return import_funding(lake, read_funding_csv(path, symbol=symbol, venue=venue), source="funding_csv",
                          origin=path.name, progress=progress)
