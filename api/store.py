"""The API's Delta tables: predictions, outcomes and alerts, under ``Settings.lake_root``.

- ``api_predictions``: one row per (symbol, origin_ts, model_version): the forecast (quantiles, the
  price path, probabilities), the signal, and ``status`` served / degraded / skipped with the reason
  (a skipped minute is stored too: no silent gaps in the record).
- ``api_outcomes``: the realised Close(t+H), volatility and range joined to a prediction, with the
  interval bounds and whether the actual fell inside; key (symbol, origin_ts, model_version).
- ``api_alerts``: one row per (symbol, origin_ts, model_version, target) whose actual left the interval.
- ``api_candles``: the minute's open/high/low/close as the API saw them on features.live (see
  api/analytics.py), for the strategy P&L over days; key (symbol, origin_ts).

Every table is partitioned by ``symbol`` and ``date`` (UTC day of origin_ts) like the lake's bronze
tables. Writes are idempotent: a merge that inserts only keys the table does not hold yet. Rows are
written by one background thread in small batches; reads see rows still queued as well, so a
prediction is visible immediately after it is issued. Table locations are fixed names under the
configured lake root: no request value ever becomes part of a path.
"""
from __future__ import annotations

import datetime as _dt
import posixpath
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from tickcast.logs import get_logger

log = get_logger("api.store")

PREDICTIONS = "api_predictions"
OUTCOMES = "api_outcomes"
ALERTS = "api_alerts"
CANDLES = "api_candles"

_F64 = pa.float64()
_LIST = pa.list_(_F64)

SCHEMAS: dict[str, pa.Schema] = {
    PREDICTIONS: pa.schema([
        ("symbol", pa.string()), ("date", pa.string()), ("origin_ts", pa.int64()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("status", pa.string()),
        ("degraded", pa.bool_()), ("reason", pa.string()), ("registry_hash", pa.string()),
        ("horizon", pa.int32()), ("quantile_levels", _LIST), ("last_close", _F64),
        ("close_path", pa.list_(_LIST)), ("realized_vol", _LIST), ("price_range", _LIST),
        ("p_up", _F64), ("p_flat", _F64), ("p_down", _F64),
        ("action", pa.string()), ("strength", _F64), ("signal_reason", pa.string()),
        ("simulated", pa.bool_()), ("issued_ts", pa.int64()),
    ]),
    OUTCOMES: pa.schema([
        ("symbol", pa.string()), ("date", pa.string()), ("origin_ts", pa.int64()), ("model_version", pa.string()),
        ("status", pa.string()), ("reason", pa.string()),
        ("close_t", _F64), ("close_h", _F64), ("ret_1m", _F64), ("ret_h", _F64),
        ("realized_vol", _F64), ("price_range", _F64), ("q_low_level", _F64), ("q_high_level", _F64),
        ("close_q_low", _F64), ("close_q_high", _F64), ("close_inside", pa.bool_()),
        ("rv_q_low", _F64), ("rv_q_high", _F64), ("rv_inside", pa.bool_()),
        ("range_q_low", _F64), ("range_q_high", _F64), ("range_inside", pa.bool_()),
        ("joined_ts", pa.int64()),
    ]),
    ALERTS: pa.schema([
        ("symbol", pa.string()), ("date", pa.string()), ("origin_ts", pa.int64()), ("model_version", pa.string()),
        ("target", pa.string()), ("actual", _F64), ("q_low", _F64), ("q_high", _F64),
        ("direction", pa.string()), ("raised_ts", pa.int64()),
    ]),
    CANDLES: pa.schema([
        ("symbol", pa.string()), ("date", pa.string()), ("origin_ts", pa.int64()),
        ("open", _F64), ("high", _F64), ("low", _F64), ("close", _F64), ("venue", pa.string()),
        ("volume", _F64), ("history", pa.bool_()),
    ]),
}
KEYS: dict[str, tuple[str, ...]] = {
    PREDICTIONS: ("symbol", "origin_ts", "model_version"),
    OUTCOMES: ("symbol", "origin_ts", "model_version"),
    ALERTS: ("symbol", "origin_ts", "model_version", "target"),
    CANDLES: ("symbol", "origin_ts"),
}


def day_of(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC).strftime("%Y-%m-%d")


def _key(table: str, row: dict) -> tuple:
    return tuple(row[k] for k in KEYS[table])


class Store:
    def __init__(self, lake_root: str, storage_options: dict[str, str] | None = None, *, flush_s: float = 3.0,
                 compact_every: int = 120, vacuum_hours: int = 168):
        self.root = str(lake_root)
        self.storage_options = dict(storage_options or {}) or None
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._pending: dict[str, dict[tuple, dict]] = {t: {} for t in SCHEMAS}
        self._inflight: dict[str, dict[tuple, dict]] = {t: {} for t in SCHEMAS}
        self._wake = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.last_write_ts: float | None = None
        self.rows_written: dict[str, int] = {t: 0 for t in SCHEMAS}
        self.dropped: dict[str, int] = {t: 0 for t in SCHEMAS}
        self._io_lock = threading.Lock()
        self.compact_every = compact_every
        self.vacuum_hours = vacuum_hours
        self._commits: dict[str, int] = {t: 0 for t in SCHEMAS}
        self._tables: dict[str, Any] = {}
        self.checkpoint_every = 50

    # ------------------------------------------------------------------ paths and lifecycle
    def uri(self, table: str) -> str:
        if table not in SCHEMAS:
            raise KeyError(table)
        if "://" in self.root:
            return posixpath.join(self.root, table)
        import os

        return os.path.join(os.path.abspath(self.root), table)

    def start(self) -> Store:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="api-store", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.put(None)
        if self._thread:
            self._thread.join(timeout)
            self._thread = None
        self.flush()  # anything queued after the thread's last round

    # ------------------------------------------------------------------ writes
    MAX_QUEUED = 200_000  # rows per table kept while the lake is unwritable (about a month of minutes)

    def put(self, table: str, rows: Iterable[dict]) -> None:
        with self._lock:
            bucket = self._pending[table]
            for r in rows:
                r = dict(r)
                r["date"] = day_of(r["origin_ts"])
                bucket.setdefault(_key(table, r), r)
            if len(bucket) > self.MAX_QUEUED:  # never grow without bound: drop the oldest, loudly
                drop = sorted(bucket, key=lambda k: k[1])[:len(bucket) - self.MAX_QUEUED]
                for k in drop:
                    del bucket[k]
                self.dropped[table] += len(drop)
                log.error("lake unwritable for too long: oldest queued rows dropped",
                          extra={"table": table, "counts": {"dropped": len(drop)}})
        self._wake.put(1)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._wake.get(timeout=60)
            except queue.Empty:
                pass
            # a few seconds after the minute's batch: one commit for its rows, and the write never
            # competes with the batch's SSE fan-out for the CPU
            self._stop.wait(self.flush_s)
            while not self._wake.empty():
                self._wake.get_nowait()
            self.flush()

    def flush(self) -> None:
        with self._io_lock:
            with self._lock:
                batches = {t: rows for t, rows in self._pending.items() if rows}
                for t in batches:
                    self._pending[t] = {}
                    self._inflight[t] = batches[t]
            for table, rows in batches.items():
                try:
                    self._merge(table, list(rows.values()))
                    self.rows_written[table] += len(rows)
                    self._commits[table] += 1
                    if self.compact_every and self._commits[table] % self.compact_every == 0:
                        self._maintain(table)
                    self.last_write_ts = time.time()
                    self.last_error = None
                except Exception as exc:  # keep the rows and retry on the next round
                    self.last_error = f"{table}: {type(exc).__name__}: {exc}"
                    log.error("delta write failed; will retry", extra={"table": table, "error": str(exc),
                                                                        "counts": {"rows": len(rows)}})
                    with self._lock:
                        for k, r in rows.items():
                            self._pending[table].setdefault(k, r)
                finally:
                    with self._lock:
                        self._inflight[table] = {}

    def _merge(self, table: str, rows: list[dict]) -> None:
        from deltalake import DeltaTable, write_deltalake
        from deltalake.exceptions import TableNotFoundError

        schema = SCHEMAS[table]
        data = pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)
        uri = self.uri(table)
        dt = self._tables.get(table)  # one open table per writer: no log replay per write
        if dt is None:
            try:
                dt = self._tables[table] = DeltaTable(uri, storage_options=self.storage_options)
            except TableNotFoundError:
                write_deltalake(uri, data, partition_by=["symbol", "date"], mode="append",
                                storage_options=self.storage_options)
                return
        # partition literals let the merge prune files; symbols are validated alphanumerics and
        # dates come from integers, so the literals cannot inject anything
        syms = ",".join(f"'{s}'" for s in sorted({r['symbol'] for r in rows}))
        dates = ",".join(f"'{d}'" for d in sorted({r['date'] for r in rows}))
        lo = min(r["origin_ts"] for r in rows)
        hi = max(r["origin_ts"] for r in rows)
        pred = " AND ".join([f"t.symbol IN ({syms})", f"t.date IN ({dates})",
                             f"t.origin_ts >= {int(lo)}", f"t.origin_ts <= {int(hi)}"]
                            + [f"t.{k} = s.{k}" for k in KEYS[table]])
        # merge_schema: tables written before a column was added to SCHEMAS gain it (schemas only grow)
        (dt.merge(source=data, predicate=pred, source_alias="s", target_alias="t", merge_schema=True)
           .when_not_matched_insert_all().execute())
        if dt.version() % self.checkpoint_every == 0:
            dt.create_checkpoint()  # readers (and a restarted writer) replay at most this many commits

    def _maintain(self, table: str) -> None:
        """Compact the small per-minute files, write a checkpoint, drop files unreferenced for a week."""
        from deltalake import DeltaTable

        try:
            dt = DeltaTable(self.uri(table), storage_options=self.storage_options)
            self._tables.pop(table, None)
            dt.optimize.compact()
            dt.create_checkpoint()
            dt.vacuum(retention_hours=self.vacuum_hours, dry_run=False, enforce_retention_duration=False)
        except Exception as exc:  # maintenance is best effort; the data is already committed
            log.warning("table maintenance failed", extra={"table": table, "error": str(exc)})

    # ------------------------------------------------------------------ reads
    def _dataset(self, table: str):
        from deltalake import DeltaTable
        from deltalake.exceptions import TableNotFoundError

        try:
            return DeltaTable(self.uri(table), storage_options=self.storage_options).to_pyarrow_dataset()
        except TableNotFoundError:
            return None

    def _unflushed(self, table: str) -> list[dict]:
        with self._lock:
            return list(self._inflight[table].values()) + list(self._pending[table].values())

    def query(self, table: str, *, symbols: Iterable[str] | None = None, origin_from: int | None = None,
              origin_to: int | None = None, columns: list[str] | None = None, extra=None) -> list[dict]:
        """Rows with origin_ts in [origin_from, origin_to], sorted by (symbol, origin_ts), deduplicated."""
        syms = sorted(set(symbols)) if symbols is not None else None
        flt = None

        def _and(a, b):
            return b if a is None else a & b

        if syms is not None:
            flt = _and(flt, pads.field("symbol").isin(syms))
        if origin_from is not None:
            flt = _and(flt, pads.field("origin_ts") >= origin_from)
            flt = _and(flt, pads.field("date") >= day_of(origin_from))
        if origin_to is not None:
            flt = _and(flt, pads.field("origin_ts") <= origin_to)
            flt = _and(flt, pads.field("date") <= day_of(origin_to))
        if extra is not None:
            flt = _and(flt, extra)
        out: dict[tuple, dict] = {}
        # the unflushed rows first: a commit landing between the two reads then leaves its rows in
        # the table's snapshot or in this copy, never in neither (duplicates: the table's row wins)
        unflushed = list(self._unflushed(table))
        ds = self._dataset(table)
        if ds is not None:
            for r in ds.to_table(filter=flt, columns=columns).to_pylist():
                out.setdefault(_key(table, r) if columns is None or all(k in r for k in KEYS[table])
                               else id(r), r)
        for r in unflushed:
            if syms is not None and r["symbol"] not in syms:
                continue
            if origin_from is not None and r["origin_ts"] < origin_from:
                continue
            if origin_to is not None and r["origin_ts"] > origin_to:
                continue
            k = _key(table, r)
            if k not in out:
                out[k] = r if columns is None else {c: r.get(c) for c in columns}
        return sorted(out.values(), key=lambda r: tuple(str(r.get(k, "")) if k != "origin_ts" else r.get(k, 0)
                                                        for k in KEYS[table]))

    def keys(self, table: str, *, origin_from: int | None = None) -> set[tuple]:
        rows = self.query(table, origin_from=origin_from, columns=list(KEYS[table]))
        return {_key(table, r) for r in rows}

    def status(self) -> dict[str, Any]:
        with self._lock:
            queued = {t: len(v) for t, v in self._pending.items()}
        return {"last_error": self.last_error, "last_write_ts": self.last_write_ts, "queued": queued,
                "rows_written": dict(self.rows_written), "dropped": dict(self.dropped), "root": self.root if "://" not in self.root else
                self.root.split("://", 1)[0] + "://..."}
