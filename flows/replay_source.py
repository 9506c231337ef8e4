"""A Bytewax source over the Delta Lake bronze archive: each symbol's raw events in gw_seq order.

``DeltaReplaySource(lake, symbols, start_ms, end_ms)`` yields ``(symbol, [(schema_name, record), ...])``
exactly like the online Kafka source, with records exactly as ``Serde.decode`` returned them
(``flows.lake.batch_to_records``), so ``flows.dataflow.build_flow`` runs unchanged on it.

Order and bounds. gw_seq is dense per symbol across every raw topic, so the replay order is simply
ascending gw_seq over all feature-input tables. Each bronze file holds one (symbol, date) and is
sorted by gw_seq (the archive sorts every micro-batch; compaction z-orders on gw_seq), and Delta's
file statistics give each file's min/max gw_seq. The source merges files lazily: a file is opened
only when the merge reaches its smallest gw_seq, read in record batches, and the rows of all open
files up to a common bound are merged with one vectorised sort. Memory is a few record batches per
open file, never a day. A file that turns out unsorted (written by something else) is sorted on
its own, with a warning.

Start: the replay must rebuild the order book, so it starts at the last order-book snapshot at or
before ``start_ms`` (looking back at most ``book_lookback_ms``), else at the first event at or after
``start_ms``. Stop: at the first event, in gw_seq order, whose exchange time is at or after
``end_ms`` (cutting by order, not by filtering, so no hole appears in gw_seq). Historical rows
(gw_seq -1) are not part of the live order and are skipped.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from flows.lake import BRONZE, DAY_MS, TABLE_OF_TOPIC, Lake, date_of_ms, dates_between
from tickcast.logs import get_logger
from tickcast.topics import FEATURE_INPUT_TOPICS

log = get_logger("replay.source")

REPLAY_TABLES: tuple[str, ...] = tuple(TABLE_OF_TOPIC[t] for t in FEATURE_INPUT_TOPICS)
SNAPSHOT_TABLE = "raw_orderbook_snapshots"


@dataclass
class _File:
    table: str
    fragment: object  # pyarrow dataset fragment
    min_seq: int
    max_seq: int
    rows: int


def _open_batches(f: _File, columns: list[str], batch_size: int):
    """Record batches of one bronze file: straight through the Parquet reader (cheap to open),
    via the dataset fragment where the file system does not allow it."""
    import pyarrow.parquet as pq

    frag = f.fragment
    try:
        handle = frag.filesystem.open_input_file(frag.path)
        return pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns, use_threads=False)
    except (AttributeError, OSError, NotImplementedError, pa.ArrowException):
        return frag.to_batches(columns=columns, batch_size=batch_size)


class _Stream:
    """One bronze file as a gw_seq-sorted stream of record batches."""

    __slots__ = (
        "batch_size",
        "done",
        "ets",
        "fields",
        "it",
        "lo_seq",
        "names",
        "pos",
        "read_rows",
        "recs",
        "schema_name",
        "seq",
        "symbol",
        "table",
    )

    def __init__(self, f: _File, symbol: str, lo_seq: int, batch_size: int):
        t = BRONZE[f.table]
        self.table = f.table
        self.schema_name = t.schema_name
        self.names = list(t.avro_fields)
        self.fields = [c for c in t.avro_fields if c != "symbol"]  # symbol is the partition value
        self.symbol = symbol
        self.lo_seq = lo_seq
        self.batch_size = batch_size
        self.it = _open_batches(f, self.fields, batch_size)
        self.seq = np.empty(0, np.int64)
        self.ets = np.empty(0, np.int64)
        self.recs: list = []
        self.pos = 0
        self.done = False
        self.read_rows = 0

    def _records(self, batch) -> list[tuple[str, dict]]:
        # (schema name, record): the record's own field order, the symbol (a partition value, not
        # stored in the file) in its place
        names = self.names
        name = self.schema_name
        cols = [repeat(self.symbol) if n == "symbol" else batch.column(n).to_pylist() for n in names]
        return [(name, dict(zip(names, vals))) for vals in zip(*cols)]

    def fill(self) -> bool:
        """Make sure rows are buffered; False when the file is exhausted."""
        while self.pos >= len(self.seq):
            if self.done:
                return False
            try:
                batch = next(self.it)
            except StopIteration:
                self.done = True
                return False
            self.read_rows += batch.num_rows
            seq = batch.column("gw_seq").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            keep = seq >= max(self.lo_seq, 0)
            if not keep.all():
                batch = batch.filter(pa.array(keep))
                seq = seq[keep]
            if len(seq) == 0:
                continue
            if len(seq) > 1 and np.any(seq[1:] < seq[:-1]):
                batch, seq = self._sort_rest(batch)
            self.seq = seq
            self.ets = batch.column("exchange_ts").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            self.recs = self._records(batch)
            self.pos = 0
        return True

    def _sort_rest(self, batch):
        """Fallback for a file not sorted by gw_seq: read the rest of it and sort it whole."""
        log.warning("bronze file not sorted by gw_seq: sorting it in memory", extra={"table": self.table})
        rest = [batch] + [b for b in self.it]
        self.done = True
        t = pa.Table.from_batches(rest).combine_chunks()
        t = t.filter(pc.greater_equal(t.column("gw_seq"), max(self.lo_seq, 0))).sort_by("gw_seq")
        b = t.to_batches()[0] if t.num_rows else batch.slice(0, 0)
        return b, b.column("gw_seq").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    @property
    def head(self) -> int:
        return int(self.seq[self.pos])

    @property
    def last(self) -> int:
        return int(self.seq[-1])


def find_start_seq(lake: Lake, symbol: str, start_ms: int, *, versions: dict[str, int] | None = None,
                   book_lookback_ms: int = DAY_MS, tables: Sequence[str] = REPLAY_TABLES,
                   end_ms: int | None = None) -> tuple[int | None, int | None]:
    """(gw_seq to start at, its exchange_ts): the last book snapshot at or before ``start_ms``
    within the lookback, else the first event in [``start_ms``, ``end_ms``] (the first two days
    when no end is given); (None, None) if none."""
    versions = versions or {}
    if SNAPSHOT_TABLE in tables:
        snaps = lake.read(SNAPSHOT_TABLE, symbols=[symbol], dates=dates_between(start_ms - book_lookback_ms, start_ms + 1),
                          columns=["gw_seq", "exchange_ts"],
                          filter=(pc.field("exchange_ts") <= start_ms) & (pc.field("exchange_ts") >= start_ms - book_lookback_ms)
                          & (pc.field("gw_seq") >= 0), version=versions.get(SNAPSHOT_TABLE))
        if snaps.num_rows:
            i = int(np.argmax(snaps.column("gw_seq").to_numpy()))
            return int(snaps.column("gw_seq")[i].as_py()), int(snaps.column("exchange_ts")[i].as_py())
    best: tuple[int, int] | None = None
    for name in tables:
        last = end_ms if end_ms is not None else start_ms + 2 * DAY_MS
        at = lake.read(name, symbols=[symbol], dates=dates_between(start_ms, last + 1),
                       columns=["gw_seq", "exchange_ts"],
                       filter=(pc.field("exchange_ts") >= start_ms) & (pc.field("gw_seq") >= 0),
                       version=versions.get(name))
        if at.num_rows:
            i = int(np.argmin(at.column("gw_seq").to_numpy()))
            cand = (int(at.column("gw_seq")[i].as_py()), int(at.column("exchange_ts")[i].as_py()))
            best = cand if best is None or cand < best else best
    return best if best else (None, None)


# tables whose date partition does not follow the replay order (gw_seq): never pruned by date
UNDATED_ORDER_TABLES = frozenset({"raw_news"})


def plan_files(lake: Lake, symbol: str, from_date_ms: int, end_ms: int, lo_seq: int, *,
               versions: dict[str, int] | None = None, tables: Sequence[str] = REPLAY_TABLES) -> list[_File]:
    """The bronze files of ``symbol`` that may hold events from ``lo_seq`` until ``end_ms``, by min gw_seq."""
    import pyarrow.dataset as pads

    versions = versions or {}
    lo_date, hi_date = date_of_ms(from_date_ms - DAY_MS), date_of_ms(end_ms + DAY_MS)
    files: list[_File] = []
    for name in tables:
        dt = lake.table(name, versions.get(name))
        if dt is None:
            continue
        add = pa.table(dt.get_add_actions(flatten=True))
        if add.num_rows == 0:
            continue
        stats, dates = {}, set()
        cols = add.column_names
        for i, path in enumerate(add.column("path").to_pylist()):
            sym = add.column("partition.symbol")[i].as_py()
            date = add.column("partition.date")[i].as_py()
            if sym != symbol or date is None:
                continue
            # a news row's date is its publication time, which can be days before it arrived (RSS
            # feeds deliver old items): only the gw_seq statistics below can tell whether it is needed
            if name not in UNDATED_ORDER_TABLES and not lo_date <= date <= hi_date:
                continue
            mn = add.column("min.gw_seq")[i].as_py() if "min.gw_seq" in cols else None
            mx = add.column("max.gw_seq")[i].as_py() if "max.gw_seq" in cols else None
            stats[path] = (mn, mx, add.column("num_records")[i].as_py())
            dates.add(date)
        if not stats:
            continue
        ds = dt.to_pyarrow_dataset(file_pruning_predicate=[("symbol", "=", symbol), ("date", "in", sorted(dates))])
        for frag in ds.get_fragments(filter=(pads.field("symbol") == symbol)):
            rel = _relative(frag.path, stats)
            if rel not in stats:
                continue
            mn, mx, n = stats[rel]
            if mx is not None and mx < lo_seq:
                continue
            files.append(_File(name, frag, -1 if mn is None else int(mn), -1 if mx is None else int(mx), int(n or 0)))
    files.sort(key=lambda f: (f.min_seq, f.table))
    return files


def _relative(frag_path: str, stats: dict) -> str:
    """A fragment's path as the Delta log names it (relative to the table root)."""
    from urllib.parse import quote, unquote

    for cand in (frag_path, unquote(frag_path), quote(frag_path, safe="/=")):
        if cand in stats:
            return cand
    return frag_path


def merged_events(lake: Lake, symbol: str, start_ms: int, end_ms: int, *, versions: dict[str, int] | None = None,
                  tables: Sequence[str] = REPLAY_TABLES, batch_size: int = 4_096, book_lookback_ms: int = DAY_MS,
                  on_rows: Callable[[int], None] | None = None,
                  stats: dict | None = None) -> Iterator[list[tuple[str, dict]]]:
    """Chunks of ``(schema_name, record)`` of one symbol in gw_seq order (see the module docstring).
    ``stats`` (a dict) receives files planned/opened and the most files open at once."""
    lo_seq, lo_ts = find_start_seq(lake, symbol, start_ms, versions=versions, book_lookback_ms=book_lookback_ms,
                                   tables=tables, end_ms=end_ms)
    if lo_seq is None:
        return
    pending = plan_files(lake, symbol, min(lo_ts, start_ms), end_ms, lo_seq, versions=versions, tables=tables)
    pending.reverse()  # pop() from the end = smallest min_seq
    active: list[_Stream] = []
    st = stats if stats is not None else {}
    st.update(files=len(pending), opened=0, max_open=0, start_seq=lo_seq)
    while True:
        head = min((s.head for s in active), default=None)
        while pending and (head is None or pending[-1].min_seq <= head):
            s = _Stream(pending.pop(), symbol, lo_seq, batch_size)
            st["opened"] += 1
            if s.fill():
                active.append(s)
                head = s.head if head is None else min(head, s.head)
        if not active:
            return
        st["max_open"] = max(st["max_open"], len(active))
        bound = min(s.last for s in active)
        if pending:
            bound = min(bound, pending[-1].min_seq - 1)
        parts = []
        for s in active:
            k = int(np.searchsorted(s.seq[s.pos:], bound, side="right"))
            if k:
                parts.append((s, s.pos, s.pos + k))
        if len(parts) == 1:
            s, a, b = parts[0]
            items = s.recs[a:b]
            ets = s.ets[a:b]
        else:
            seqs = np.concatenate([s.seq[a:b] for s, a, b in parts])
            order = np.argsort(seqs, kind="stable").tolist()
            all_items = list(chain.from_iterable(s.recs[a:b] for s, a, b in parts))
            items = [all_items[i] for i in order]
            ets = np.concatenate([s.ets[a:b] for s, a, b in parts])[order]
        for s, _a, b in parts:
            s.pos = b
        past = np.flatnonzero(ets >= end_ms)
        if len(past):
            items = items[:int(past[0])]
            if on_rows is not None:
                on_rows(len(items))
            if items:
                yield items
            return
        if on_rows is not None:
            on_rows(len(items))
        yield items
        active = [s for s in active if s.fill()]


class _SymbolPartition(StatefulSourcePartition):
    def __init__(self, it: Iterator[list], symbol: str, max_events: int):
        self._it = it
        self._symbol = symbol
        self._max = max_events
        self._buf: list = []

    def next_batch(self):
        while len(self._buf) < self._max:
            try:
                self._buf.extend(next(self._it))
            except StopIteration:
                break
        if not self._buf:
            raise StopIteration()
        out, self._buf = self._buf[:self._max], self._buf[self._max:]
        return [(self._symbol, out)]

    def snapshot(self):
        return None  # a replay is re-run from its period, never resumed


class DeltaReplaySource(FixedPartitionedSource):
    """One partition per symbol: that symbol's archived raw events in gw_seq order."""

    def __init__(self, lake: Lake, symbols: Sequence[str], start_ms: int, end_ms: int, *,
                 versions: dict[str, int] | None = None, tables: Sequence[str] = REPLAY_TABLES,
                 batch_events: int = 10_000, book_lookback_ms: int = DAY_MS,
                 on_rows: Callable[[int], None] | None = None):
        self.lake = lake
        self.symbols = list(symbols)
        self.start_ms, self.end_ms = start_ms, end_ms
        self.versions = dict(versions or {})
        self.tables = tuple(tables)
        self.batch_events = batch_events
        self.book_lookback_ms = book_lookback_ms
        self.on_rows = on_rows

    def list_parts(self):
        return list(self.symbols)

    def build_part(self, step_id, for_part, resume_state):
        it = merged_events(self.lake, for_part, self.start_ms, self.end_ms, versions=self.versions, tables=self.tables,
                           book_lookback_ms=self.book_lookback_ms, on_rows=self.on_rows)
        return _SymbolPartition(iter(it), for_part, self.batch_events)


def estimate_rows(lake: Lake, symbols: Sequence[str], start_ms: int, end_ms: int, *,
                  versions: dict[str, int] | None = None, tables: Sequence[str] = REPLAY_TABLES) -> int:
    """Rows in the date partitions the replay touches (the progress bar's total)."""
    lo_date, hi_date = date_of_ms(start_ms), date_of_ms(end_ms - 1)
    total = 0
    for name in tables:
        dt = lake.table(name, (versions or {}).get(name))
        if dt is None:
            continue
        add = pa.table(dt.get_add_actions(flatten=True))
        for sym, date, n in zip(add.column("partition.symbol").to_pylist(), add.column("partition.date").to_pylist(),
                                add.column("num_records").to_pylist()):
            if sym in symbols and date is not None and lo_date <= date <= hi_date:
                total += int(n or 0)
    return total
