"""The inference loop: features.live in, forecasts, signals and alerts out, every minute.

One thread owns the Kafka consumer (``assign()`` on every partition of ``features.live``, never a
group subscribe) and everything the loop mutates: per-symbol histories of m1 vectors, the minute
batches waiting to run, the forecasts waiting for their outcome. When a symbol's minute closes (its
m1 vector arrives) the minute joins a batch; the batch runs as soon as every symbol that is live
has delivered that minute, or ``batch_wait_s`` after the first one did, so inference is one
onnxruntime call across the ready symbols. Each forecast and signal is published on
``signals.live`` (Avro), pushed to the SSE hub and queued for the Delta store; a minute that cannot
be forecast is published as a FLAT signal whose reason says why and stored as ``skipped``, and a
minute that never arrived on features.live is counted as a data gap and stored as ``skipped``.

Restarts: the consumer starts at the broker's offset for ``catchup_minutes + lookback + horizon``
ago (from the beginning where the broker cannot look up offsets by time, as tansu), rebuilds the
histories from the backlog and forecasts only recent minutes that the predictions table does not
already hold; forecasts still waiting for their outcome are reloaded from the table.
"""
from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from api import drift
from api.analytics import candle_of
from api.champion import ChampionWatcher
from api.forecasting import ForecastError, build_forecast, derive_signal, no_forecast_signal
from api.metrics import ApiMetrics
from api.modelrt import OnnxModel
from api.outcomes import compute_outcome, horizon_status
from api.sse import EventHub
from api.store import ALERTS, CANDLES, OUTCOMES, PREDICTIONS, Store
from api.window import MINUTE_MS, MinuteObs, SymbolHistory, assemble_window
from flows.targets import DEFAULT_FLAT_THRESHOLD
from tickcast.kafka import consume_ready
from tickcast.logs import get_logger
from tickcast.serde import Serde, SerdeError
from tickcast.topics import CONTROL, DEAD_LETTER, FEATURES_LIVE, SIGNALS_LIVE

log = get_logger("api.loop")

TARGETS = ("close", "realized_vol", "price_range")
_INSIDE_COL = {"close": "close_inside", "realized_vol": "rv_inside", "price_range": "range_inside"}


@dataclass
class ApiOptions:
    """Tunables of the prediction service (defaults are the production values)."""

    champion_poll_s: float = 10.0
    batch_wait_s: float = 1.0
    history_minutes: int = 2000
    max_missing_frac: float = 0.25
    catchup_minutes: int = 90
    outcome_grace_minutes: int = 2
    gap_rows_limit: int = 1440
    sse_buffer: int = 4096
    sse_queue: int = 256
    heartbeat_s: float = 15.0
    sse_ping_s: float = 15.0
    stale_feature_s: float = 150.0
    store_flush_s: float = 3.0
    psi_window: int = 240
    psi_every_minutes: int = 5
    coverage_window: int = 500
    start_consumer: bool = True
    start_champion: bool = True
    ort_threads: int = 1
    fee_bps: float = 5.5
    model_wait_s: float = 30.0


def _now_us() -> int:
    return time.time_ns() // 1000


def _reason_kind(reason: str) -> str:
    r = reason.lower()
    for key, kind in (("no champion", "no_model"), ("lookback minutes", "history"), ("valid close", "no_close"),
                      ("inference failed", "inference_error"), ("output", "bad_output"),
                      ("no m1 feature vector", "gap")):
        if key in r:
            return kind
    return "other"


class PredictionService:
    def __init__(self, settings, options: ApiOptions | None = None, *, metrics: ApiMetrics | None = None,
                 hub: EventHub | None = None, store: Store | None = None):
        self.settings = settings
        self.opt = options or ApiOptions()
        self.metrics = metrics or ApiMetrics()
        self.symbols: list[str] = list(settings.symbols)
        self.hub = hub or EventHub(buffer_size=self.opt.sse_buffer, queue_size=self.opt.sse_queue,
                                   heartbeat_s=self.opt.heartbeat_s)
        self.store = store or Store(settings.lake_root, settings.lake_storage_options, flush_s=self.opt.store_flush_s)
        self.serde = Serde()  # local ids, or the registry's when configured (see _connect)
        self.champion: ChampionWatcher | None = None
        self.history: dict[str, SymbolHistory] = {s: SymbolHistory(self.opt.history_minutes) for s in self.symbols}
        self.latest_features: dict[tuple[str, str], tuple[dict, float]] = {}
        self.last_m1_wall: dict[str, float] = {}
        self.latest_prediction: dict[str, dict] = {}
        self.pending: dict[int, dict] = {}
        self.pending_outcomes: dict[str, dict[tuple[int, str], dict]] = {s: {} for s in self.symbols}
        self.served: set[tuple[str, int, str]] = set()
        # minutes with a forecast by any version: after a restart under a new champion, catch-up must not
        # forecast them a second time (a second, stale signal on SSE and signals.live)
        self.forecast_minutes: set[tuple[str, int]] = set()
        self.coverage: dict[tuple[str, str], deque] = defaultdict(lambda: deque(maxlen=self.opt.coverage_window))
        self.psi: dict[str, dict[str, float]] = {}
        self.last_live_minute: dict[str, int] = {}  # newest non-history m1 minute per symbol
        self.counts: dict[str, dict[str, int]] = {s: defaultdict(int) for s in self.symbols}
        self.seq_errors: dict[str, dict[str, int]] = {s: defaultdict(int) for s in self.symbols}  # reason -> n
        self.inference_ms: deque[float] = deque(maxlen=2000)
        self.minute_ms: deque[float] = deque(maxlen=2000)
        self.stale_logged: set[str] = set()
        self.recent_alerts: deque[dict] = deque(maxlen=500)
        self.decisions: dict[str, dict] = {}
        # SSE events waiting to go out with the minute's batch (alerts raised while its vectors arrive),
        # so a client gets one chunk per minute
        self._outbox: list[tuple[str, dict, str | None]] = []
        self.consumer = None
        self.producer = None
        self.backlog_end: dict[int, int] = {}
        self._need_catchup: set[int] = set()
        self.broker_state: dict[str, Any] = {"status": "starting", "detail": None, "ts": None}
        self.publish_error: str | None = None
        self.loop_error: str | None = None
        self.started_ts = time.time()
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._model_ready = threading.Event()
        self._next_periodic = 0.0
        self._last_msg = time.monotonic()
        self._frozen = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.store.start()
        if self.opt.start_champion:
            self.champion = ChampionWatcher(self.settings, poll_s=self.opt.champion_poll_s, on_swap=self._on_swap,
                                            threads=self.opt.ort_threads)
            orig_check = self.champion.check

            def check_and_signal() -> bool:
                try:
                    return orig_check()
                finally:
                    self._model_ready.set()

            self.champion.check = check_and_signal
            self.champion.start()
        else:
            self._model_ready.set()
        if self.opt.start_consumer:
            self._thread = threading.Thread(target=self._run, name="api-loop", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(15)
        if self.champion:
            self.champion.stop()
        if self.producer is not None:
            self.producer.flush(5)
            self.producer = None  # frees the client (and its connections) now
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:
                pass
            self.consumer = None
        self.store.stop()

    @property
    def model(self) -> OnnxModel | None:
        return self.champion.current if self.champion else None

    def _on_swap(self, old: OnnxModel | None, new: OnnxModel) -> None:
        if old is not None:
            self.metrics.model_info.labels(old.spec.version).set(0)
            self.metrics.model_swaps.inc()
        self.metrics.model_info.labels(new.spec.version).set(1)
        # drift is relative to the champion's own training summary: the old one's numbers go with it
        self.psi.clear()
        self.metrics.feature_psi.clear()
        self.metrics.feature_psi_max.clear()
        need = new.spec.lookback + new.spec.horizon + self.opt.outcome_grace_minutes + 5
        for h in self.history.values():
            h.capacity = max(h.capacity, need)

    # ------------------------------------------------------------------ kafka
    def _stats(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
        except ValueError:
            return
        states = [b.get("state") for name, b in (stats.get("brokers") or {}).items() if not name.startswith("GroupCoord")]
        up = any(s == "UP" for s in states)
        self.broker_state = {"status": "ok" if up else "down", "detail": None if up else f"broker states {states}",
                             "ts": time.time()}

    def _error(self, err) -> None:
        self.broker_state = {"status": "down" if err.code() in (-187, -195) else self.broker_state["status"],
                             "detail": str(err), "ts": time.time()}

    def _connect(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Producer, TopicPartition

        from tickcast.kafka import AdaptiveConsumer, consumer_config, producer_config

        bootstrap = self.settings.kafka_bootstrap
        if not bootstrap:
            raise RuntimeError("KAFKA_BOOTSTRAP is not set: the API needs the broker that carries features.live")
        if self.settings.schema_registry_url:
            from tickcast.serde import default_serde

            self.serde = default_serde()
        self.producer = Producer(producer_config(bootstrap, error_cb=self._error))
        # 50 ms: forecasts are per minute and the dashboard polls; every fetch costs the embedded
        # broker a listing of the partition, so a consumer off the latency path fetches less often
        consumer = AdaptiveConsumer(consumer_config(bootstrap, f"tickcast-api-{int(time.time())}",
                                                    **{"statistics.interval.ms": 5000, "stats_cb": self._stats,
                                                       "error_cb": self._error, "fetch.wait.max.ms": 50}))
        md = consumer.list_topics(FEATURES_LIVE, timeout=10)
        topic = md.topics.get(FEATURES_LIVE)
        if topic is None or topic.error is not None or not topic.partitions:
            raise RuntimeError(f"topic {FEATURES_LIVE} does not exist on {bootstrap} (run `tickcast topics`)")
        parts = sorted(topic.partitions)
        back_ms = int(time.time() * 1000) - (self.opt.catchup_minutes + self._model_span()) * MINUTE_MS
        try:
            starts = consumer.offsets_for_times([TopicPartition(FEATURES_LIVE, p, back_ms) for p in parts], timeout=10)
            starts = [TopicPartition(FEATURES_LIVE, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
                      for tp in starts]
        except Exception:
            starts = [TopicPartition(FEATURES_LIVE, p, OFFSET_BEGINNING) for p in parts]
        start_of = {tp.partition: tp.offset for tp in starts}
        for p in parts:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(FEATURES_LIVE, p), timeout=10)
            self.backlog_end[p] = hi
            if hi > max(lo, start_of.get(p, 0)):
                self._need_catchup.add(p)
        # the feature flow's resync requests: its order-book sequence errors, counted per symbol from now
        from confluent_kafka import OFFSET_END

        control = consumer.list_topics(CONTROL, timeout=10).topics.get(CONTROL)
        if control is not None and control.error is None:
            starts += [TopicPartition(CONTROL, p, OFFSET_END) for p in control.partitions]
        consumer.assign(starts)
        self._last_msg = time.monotonic()
        self.consumer = consumer
        self.broker_state = {"status": "ok", "detail": None, "ts": time.time()}
        log.info("consuming features.live", extra={"counts": {"partitions": len(parts),
                                                              "backlog": sum(self.backlog_end.values())}})

    def _model_span(self) -> int:
        m = self.model
        return (m.spec.lookback + m.spec.horizon) if m else 120

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        self._model_ready.wait(self.opt.model_wait_s)
        while not self._stop.is_set() and self.consumer is None:
            try:
                self._connect()
            except Exception as exc:
                self.broker_state = {"status": "down", "detail": f"{type(exc).__name__}: {exc}", "ts": time.time()}
                log.error("cannot connect to the broker; retrying", extra={"error": str(exc)})
                self._stop.wait(2.0)
        try:
            self._restore()
        except Exception as exc:
            log.warning("could not restore state from the store", extra={"error": f"{type(exc).__name__}: {exc}"})
        if not self._need_catchup:
            self.caught_up.set()
        while not self._stop.is_set():
            try:
                msgs = consume_ready(self.consumer, 500, 0.05)
            except Exception as exc:
                self.loop_error = f"consume: {exc}"
                self._stop.wait(0.5)
                continue
            if msgs:
                self._last_msg = time.monotonic()
            elif not self.caught_up.is_set() and time.monotonic() - self._last_msg > 2.0:
                self.caught_up.set()  # the backlog is drained (whatever the broker's watermarks said)
                log.info("caught up with features.live (quiet)")
            if self.caught_up.is_set() and not self._frozen:
                self._frozen = True
                import gc

                gc.collect()
                gc.freeze()  # the state rebuilt from the backlog is long-lived: keep it out of full collections
            for m in msgs:
                try:
                    self._handle(m)
                except Exception as exc:  # one bad record must never stop the loop
                    self.loop_error = f"{type(exc).__name__}: {exc}"
                    log.exception("record handling failed", extra={"error": self.loop_error})
            try:
                self._flush_batches(time.monotonic())
                if self._outbox:  # alerts of minutes whose batch is still waiting: don't hold them back
                    self._send_events([])
                if time.monotonic() >= self._next_periodic:
                    self._periodic()
                self.producer.poll(0)
            except Exception as exc:
                self.loop_error = f"{type(exc).__name__}: {exc}"
                log.exception("loop step failed", extra={"error": self.loop_error})

    def _handle(self, m) -> None:
        if m.error():
            self.broker_state = {**self.broker_state, "detail": str(m.error()), "ts": time.time()}
            return
        if m.topic() == CONTROL:
            self._on_control(m)
            return
        part, off = m.partition(), m.offset()
        backlog = not self.caught_up.is_set() and off < self.backlog_end.get(part, 0)
        if not self.caught_up.is_set() and off >= self.backlog_end.get(part, 0) - 1:
            self._need_catchup.discard(part)
            if not self._need_catchup:
                self.caught_up.set()
                log.info("caught up with features.live")
        try:
            rec = self.serde.decode(m.value(), expect="FeatureVector")
        except SerdeError as exc:
            self.metrics.records_in.labels("bad").inc()
            self._dead_letter(m, exc.kind, str(exc))
            return
        sym = rec["symbol"]
        if sym not in self.history:
            self.metrics.records_in.labels("other_symbol").inc()
            return
        cadence = rec["cadence"]
        if cadence == "m1" and rec["window_end"] % MINUTE_MS:
            self.metrics.records_in.labels("bad").inc()
            self._dead_letter(m, "misaligned_window",
                              f"m1 window_end {rec['window_end']} is not on a minute boundary", sym)
            return
        self.metrics.records_in.labels("ok").inc()
        self.latest_features[(sym, cadence)] = (rec, time.time())
        if cadence == "m1":
            self._on_minute(rec, backlog)

    def _on_control(self, m) -> None:
        """A resync request of the feature flow: an order-book sequence error (gap, crossed or
        stale book) it saw for the symbol; at most one per symbol per resync interval."""
        try:
            name, rec = self.serde.decode_any(m.value())
        except SerdeError:
            return  # not ours to dead-letter: the control topic has other writers
        sym = rec.get("symbol") if name == "ControlCommand" else None
        if sym in self.seq_errors and rec.get("command") == "resync":
            # by kind ("gap", "crossed", "book stale"...): the full reason carries sequence numbers and
            # prices, one new key per resync for as long as the API runs
            reason = str(rec.get("reason") or "unknown")
            self.seq_errors[sym][reason.split(":", 1)[0].strip()[:60] or "unknown"] += 1

    def _on_minute(self, rec: dict, backlog: bool) -> None:
        sym = rec["symbol"]
        minute = rec["window_end"] - MINUTE_MS
        obs = MinuteObs(minute, dict(rec["values"]), rec["venue"], rec["registry_hash"], rec["book_valid"],
                        dict(rec["nulls"]), rec["emit_ts"])
        hist = self.history[sym]
        res = hist.add(obs)
        if res.kind == "duplicate":
            self.metrics.records_in.labels("duplicate").inc()
            return
        self.last_m1_wall[sym] = time.time()
        self.stale_logged.discard(sym)
        history = bool(rec.get("history"))
        self.store.put(CANDLES, [{**candle_of(obs), "symbol": sym, "venue": obs.venue, "history": history}])
        if res.gap_minutes:  # also before a history vector: the minutes before it never came
            self._record_gap(sym, res.gap_from, res.gap_minutes)
        if history:  # a minute before the live stream (rebuilt from klines): lookback only, no forecast
            self.metrics.records_in.labels("history").inc()
            live = self.last_live_minute.get(sym)
            if live is not None and minute > live:  # in this API's live period: it leaves a row
                self._record_skips(sym, [minute], "the minute came only as a history vector (the feature "
                                                  "flow restarted and rebuilt it from klines): no forecast")
            return
        self.last_live_minute[sym] = max(minute, self.last_live_minute.get(sym, minute))
        if not obs.book_valid:
            self.counts[sym]["book_invalid_minutes"] += 1
        self._join_outcomes(sym)
        if res.kind == "late":
            return
        if backlog and minute < int(time.time() * 1000) - self.opt.catchup_minutes * MINUTE_MS:
            return
        self._enqueue(sym, minute)

    def _enqueue(self, sym: str, minute: int) -> None:
        # a symbol that runs ahead (partitions are read unevenly) leaves its minutes waiting for the others,
        # each at most batch_wait_s; batches always run oldest first
        batch = self.pending.setdefault(minute, {"syms": set(), "deadline": time.monotonic() + self.opt.batch_wait_s})
        batch["syms"].add(sym)
        if self._complete(minute, batch):
            self._flush_batches(time.monotonic())  # oldest first, stopping at one still waiting

    def _complete(self, minute: int, batch: dict) -> bool:
        for s in self.symbols:
            if s in batch["syms"]:
                continue
            latest = self.history[s].latest
            if latest is not None and minute - 5 * MINUTE_MS <= latest < minute:
                return False  # a live symbol whose minute has not arrived yet
        return True

    def _flush_batches(self, now: float) -> None:
        for origin in sorted(self.pending):
            b = self.pending.get(origin)
            if b is None:
                continue
            if not (now >= b["deadline"] or self._complete(origin, b)):
                break  # the minutes go out in order: a later one waits for this one
            self._run_batch(origin)

    # ------------------------------------------------------------------ inference
    def _run_batch(self, origin: int) -> None:
        batch = self.pending.pop(origin, None)
        if not batch:
            return
        t0 = time.perf_counter()
        model = self.model
        version = model.spec.version if model else ""
        issued = _now_us()
        ready, skips = [], []
        for sym in sorted(batch["syms"]):
            if (sym, origin, version) in self.served or (sym, origin) in self.forecast_minutes:
                continue
            obs = self.history[sym].get(origin)
            simulated = bool(obs and obs.venue.startswith("sim"))
            if model is None:
                why = self.champion.last_error if self.champion and self.champion.last_error else "not loaded yet"
                skips.append((sym, f"no champion model ({why})", simulated))
                continue
            w = assemble_window(self.history[sym], origin, model.spec.variates, model.spec.lookback,
                                max_missing_frac=self.opt.max_missing_frac,
                                model_registry_hash=model.spec.registry_hash)
            if w.x is None:
                skips.append((sym, w.reason, simulated))
            else:
                ready.append((sym, w))
        forecasts: list[tuple[dict, dict]] = []
        if ready:
            ti = time.perf_counter()
            try:
                out = model.predict(np.stack([w.x for _, w in ready]))
            except Exception as exc:
                out = None
                for sym, w in ready:
                    skips.append((sym, f"inference failed: {type(exc).__name__}: {exc}", w.simulated))
            dt = time.perf_counter() - ti
            self.metrics.inference_seconds.observe(dt)
            self.metrics.batch_size.observe(len(ready))
            self.inference_ms.append(dt * 1000)
            if out is not None:
                for i, (sym, w) in enumerate(ready):
                    try:
                        fc = build_forecast(model.spec, out, i, symbol=sym, origin_ts=origin, last_close=w.last_close,
                                            degraded=w.degraded, reasons=w.reasons, simulated=w.simulated,
                                            registry_hash=w.registry_hash, issued_ts=issued)
                        held = self._held(sym, origin, model)
                        sig = derive_signal(model.spec, fc, held)
                    except ForecastError as exc:
                        skips.append((sym, f"model output unusable: {exc}", w.simulated))
                        continue
                    except Exception as exc:  # a bug must still leave a trace for the minute, never a gap
                        log.exception("forecast building failed", extra={"symbol": sym, "origin_ts": origin})
                        skips.append((sym, f"internal error building the forecast: {type(exc).__name__}: {exc}",
                                      w.simulated))
                        continue
                    if held is None and model.spec.signal and model.spec.signal["hold"] > 1:
                        self.decisions[sym] = {"origin_ts": origin, "action": sig["action"],
                                               "strength": sig["strength"], "version": version}
                    forecasts.append((fc, sig))
        self._publish(origin, version, model, forecasts, skips, issued)
        total = time.perf_counter() - t0
        self.metrics.minute_seconds.observe(total)
        self.minute_ms.append(total * 1000)
        if model is not None and forecasts and (origin // MINUTE_MS) % max(1, self.opt.psi_every_minutes) == 0:
            self._update_psi(model, origin, [fc["symbol"] for fc, _ in forecasts])

    def _held(self, sym: str, origin: int, model: OnnxModel) -> dict | None:
        """The decision still in force when the model's signal is re-decided every ``hold`` minutes."""
        sig = model.spec.signal
        d = self.decisions.get(sym)
        if not sig or sig["hold"] <= 1 or d is None or d["version"] != model.spec.version:
            return None
        return d if 0 < origin - d["origin_ts"] < sig["hold"] * MINUTE_MS else None

    def _publish(self, origin: int, version: str, model: OnnxModel | None, forecasts: list[tuple[dict, dict]],
                 skips: list[tuple[str, str, bool]], issued: int) -> None:
        events: list[tuple[str, dict, str | None]] = []
        rows: list[dict] = []
        for fc, sig in forecasts:
            sym = fc["symbol"]
            self._produce("Forecast", fc, sym)
            self._produce("Signal", sig, sym)
            events.append(("forecast", fc, sym))
            events.append(("signal", sig, sym))
            status = "degraded" if fc["degraded"] else "served"
            rows.append(self._prediction_row(fc, sig, status))
            self._set_latest(sym, {"status": status, "forecast": fc, "signal": sig, "reason": fc["reason"]})
            self.served.add((sym, origin, version))
            self.forecast_minutes.add((sym, origin))
            self.pending_outcomes[sym][(origin, version)] = {
                "fc": fc, "q_lo": model.spec.q_low_index, "q_hi": model.spec.q_high_index,
                "flat": model.spec.flat_threshold}
            self.counts[sym][status] += 1
            self.metrics.minutes_served.labels(sym, "degraded" if fc["degraded"] else "full").inc()
        for sym, reason, simulated in skips:
            sig = no_forecast_signal(sym, origin, reason, version, simulated, issued)
            self._produce("Signal", sig, sym)
            events.append(("signal", sig, sym))
            rows.append(self._skip_row(sym, origin, version, model, reason, sig))
            self._set_latest(sym, {"status": "skipped", "forecast": None, "signal": sig, "reason": reason})
            self.served.add((sym, origin, version))
            self.counts[sym]["skipped"] += 1
            self.metrics.minutes_skipped.labels(sym, _reason_kind(reason)).inc()
            log.warning("no forecast", extra={"symbol": sym, "origin_ts": origin, "reason": reason})
        self._send_events(events)
        if rows:
            self.store.put(PREDICTIONS, rows)
        self.producer.poll(0)

    def _send_events(self, events: list[tuple[str, dict, str | None]]) -> None:
        """One SSE batch: the waiting alerts first, then ``events``."""
        batch = self._outbox + events
        self._outbox = []
        if batch:
            self.hub.publish_threadsafe(batch)
            for ev, _, _ in batch:
                self.metrics.sse_events.labels(ev).inc()

    def _set_latest(self, sym: str, entry: dict) -> None:
        cur = self.latest_prediction.get(sym)
        if cur is None or entry["signal"]["origin_ts"] >= cur["signal"]["origin_ts"]:
            self.latest_prediction[sym] = entry

    def _prediction_row(self, fc: dict, sig: dict, status: str) -> dict:
        return {**{k: fc[k] for k in ("symbol", "origin_ts", "model_name", "model_version", "degraded", "reason",
                                      "registry_hash", "horizon", "quantile_levels", "last_close", "close_path",
                                      "realized_vol", "price_range", "p_up", "p_flat", "p_down", "simulated",
                                      "issued_ts")},
                "status": status, "action": sig["action"], "strength": sig["strength"],
                "signal_reason": sig["reason"]}

    def _skip_row(self, sym: str, origin: int, version: str, model: OnnxModel | None, reason: str,
                  sig: dict | None) -> dict:
        obs = self.history[sym].get(origin)
        close = obs.value("close") if obs else None
        return {"symbol": sym, "origin_ts": origin, "model_name": model.spec.name if model else "",
                "model_version": version, "status": "skipped", "degraded": True, "reason": reason,
                "registry_hash": obs.registry_hash if obs else "", "horizon": model.spec.horizon if model else None,
                "quantile_levels": list(model.spec.quantiles) if model else None, "last_close": close,
                "close_path": None, "realized_vol": None, "price_range": None, "p_up": None, "p_flat": None,
                "p_down": None, "action": sig["action"] if sig else None, "strength": sig["strength"] if sig else None,
                "signal_reason": sig["reason"] if sig else None,
                "simulated": bool(obs and obs.venue.startswith("sim")), "issued_ts": _now_us()}

    def _produce(self, schema: str, rec: dict, key: str, topic: str = SIGNALS_LIVE) -> None:
        try:
            payload = self.serde.encode(schema, rec)
        except SerdeError as exc:
            self.publish_error = f"{schema}: {exc}"
            log.error("cannot encode", extra={"symbol": key, "error": str(exc)})
            return
        try:
            self.producer.produce(topic, key=key.encode(), value=payload, on_delivery=self._delivered)
        except BufferError:
            self.producer.poll(0.1)
            self.producer.produce(topic, key=key.encode(), value=payload, on_delivery=self._delivered)

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.publish_error = str(err)
            self.metrics.publish_errors.inc()

    def _dead_letter(self, m, kind: str, reason: str, symbol: str | None = None) -> None:
        self.metrics.dead_letters.labels(kind).inc()
        key = m.key()
        rec = {"source": "api.features", "topic": FEATURES_LIVE,
               "symbol": symbol or (key.decode("utf-8", "replace") if key else None), "error_kind": kind,
               "reason": reason, "payload": bytes(m.value() or b""), "ts": _now_us()}
        log.warning("dead-lettered a features.live record", extra={"symbol": rec["symbol"], "error_kind": kind,
                                                                   "reason": reason})
        self._produce("DeadLetter", rec, rec["symbol"] or "", topic=DEAD_LETTER)

    # ------------------------------------------------------------------ gaps, outcomes, drift
    def _record_gap(self, sym: str, first: int, n: int) -> None:
        self.metrics.data_gaps.labels(sym).inc(n)
        self.counts[sym]["gap_minutes"] += n
        log.warning("data gap on features.live", extra={"symbol": sym, "from_ts": first,
                                                         "counts": {"missing_minutes": n}})
        start = max(first, first + (n - self.opt.gap_rows_limit) * MINUTE_MS)
        self._record_skips(sym, range(start, first + n * MINUTE_MS, MINUTE_MS),
                           "no m1 feature vector on features.live for this minute (data gap)")

    def _record_skips(self, sym: str, minutes, reason: str) -> None:
        """Skipped prediction rows (no forecast, with the reason) for minutes not served yet."""
        model = self.model
        version = model.spec.version if model else ""
        rows = []
        for m in minutes:
            if (sym, m, version) in self.served or (sym, m) in self.forecast_minutes:
                continue
            self.served.add((sym, m, version))
            rows.append(self._skip_row(sym, m, version, model, reason, None))
        if rows:
            self.store.put(PREDICTIONS, rows)

    def _join_outcomes(self, sym: str) -> None:
        pend = self.pending_outcomes.get(sym)
        if not pend:
            return
        hist = self.history[sym]
        rows, alert_rows, events = [], [], []
        for key in sorted(pend):
            item = pend[key]
            fc = item["fc"]
            st = horizon_status(hist, fc["origin_ts"], fc["horizon"], self.opt.outcome_grace_minutes)
            if st == "wait":
                continue
            del pend[key]
            row, alerts = compute_outcome(hist, fc, flat_threshold=item["flat"], q_lo=item["q_lo"],
                                          q_hi=item["q_hi"], joined_ts=_now_us())
            rows.append(row)
            for target in TARGETS:
                inside = row[_INSIDE_COL[target]]
                if inside is None:
                    continue
                self.coverage[(sym, target)].append(inside)
                cov = self.coverage[(sym, target)]
                self.metrics.coverage.labels(sym, target).set(sum(cov) / len(cov))
                self.metrics.outcomes.labels(sym, target, str(inside).lower()).inc()
            for a in alerts:
                self.metrics.alerts.labels(sym, a["target"], a["direction"]).inc()
                self.counts[sym]["alerts"] += 1
                log.warning("actual outside the forecast interval", extra={
                    "symbol": sym, "origin_ts": a["origin_ts"], "target": a["target"], "actual": a["actual"],
                    "q_low": a["q_low"], "q_high": a["q_high"], "direction": a["direction"],
                    "model_version": a["model_version"]})
                self._produce("Alert", a, sym)
                events.append(("alert", a, sym))
                alert_rows.append(a)
                self.recent_alerts.append(a)
        if rows:
            self.store.put(OUTCOMES, rows)
            last = rows[-1]
            lp = self.latest_prediction.get(sym)
            if lp and lp.get("forecast") and lp["forecast"]["origin_ts"] == last["origin_ts"]:
                lp["outcome"] = last
        if alert_rows:
            self.store.put(ALERTS, alert_rows)
        self._outbox.extend(events)  # published with the minute's batch (or at the end of this loop step)

    def _update_psi(self, model: OnnxModel, origin: int, symbols: list[str]) -> None:
        summary = model.spec.feature_summary
        if not summary:
            return
        start = origin - (self.opt.psi_window - 1) * MINUTE_MS
        for sym in symbols:
            bins = drift.summary_for(summary, sym)
            vals = {}
            for var in model.spec.variates:
                b = bins.get(var)
                if not isinstance(b, dict) or "cuts" not in b or "fractions" not in b:
                    continue
                v = drift.psi(self.history[sym].series(var, start, origin), b["cuts"], b["fractions"])
                if v is not None:
                    vals[var] = v
                    self.metrics.feature_psi.labels(sym, var).set(v)
            if vals:
                self.psi[sym] = vals
                self.metrics.feature_psi_max.labels(sym).set(max(vals.values()))

    # ------------------------------------------------------------------ housekeeping
    def _periodic(self) -> None:
        self._next_periodic = time.monotonic() + 5.0
        now = time.time()
        for sym in self.symbols:
            seen = self.last_m1_wall.get(sym)
            if seen is None:
                continue
            age = now - seen
            self.metrics.feature_age.labels(sym).set(age)
            if age > self.opt.stale_feature_s and sym not in self.stale_logged:
                self.stale_logged.add(sym)
                log.warning("no m1 feature vector for a while", extra={"symbol": sym, "age_s": round(age, 1)})
        # forget served keys older than the catch-up horizon (the store keeps them)
        if len(self.served) > 50_000:
            cutoff = int(now * 1000) - (self.opt.catchup_minutes + 2 * self._model_span()) * MINUTE_MS
            self.served = {k for k in self.served if k[1] >= cutoff}
            self.forecast_minutes = {k for k in self.forecast_minutes if k[1] >= cutoff}

    def _restore(self) -> None:
        """Served keys, forecasts still waiting for their outcome and the latest prediction per symbol."""
        now_ms = int(time.time() * 1000)
        since = now_ms - (self.opt.catchup_minutes + 2 * self._model_span() + 60) * MINUTE_MS
        rows = self.store.query(PREDICTIONS, symbols=self.symbols, origin_from=since)
        if not rows:
            return
        done = self.store.keys(OUTCOMES, origin_from=since)
        for r in rows:
            key = (r["symbol"], r["origin_ts"], r["model_version"])
            self.served.add(key)
            if r["status"] != "skipped":
                self.forecast_minutes.add((r["symbol"], r["origin_ts"]))
            if r["status"] == "skipped":
                fc = None
            else:
                fc = {k: r[k] for k in ("symbol", "origin_ts", "model_name", "model_version", "registry_hash",
                                        "horizon", "quantile_levels", "last_close", "close_path", "realized_vol",
                                        "price_range", "p_up", "p_flat", "p_down", "degraded", "reason",
                                        "simulated", "issued_ts")}
                if key not in done:
                    levels = r["quantile_levels"]
                    self.pending_outcomes[r["symbol"]][(r["origin_ts"], r["model_version"])] = {
                        "fc": fc, "q_lo": min(range(len(levels)), key=lambda i: abs(levels[i] - 0.1)),
                        "q_hi": min(range(len(levels)), key=lambda i: abs(levels[i] - 0.9)),
                        "flat": DEFAULT_FLAT_THRESHOLD}
            sig = {"symbol": r["symbol"], "origin_ts": r["origin_ts"], "action": r["action"] or "FLAT",
                   "strength": r["strength"] or 0.0, "reason": r["signal_reason"] or "",
                   "model_version": r["model_version"], "degraded": r["degraded"], "simulated": r["simulated"],
                   "issued_ts": r["issued_ts"]}
            self.latest_prediction[r["symbol"]] = {"status": r["status"], "forecast": fc, "signal": sig,
                                                   "reason": r["reason"]}
        log.info("restored from the predictions table", extra={"counts": {
            "predictions": len(rows), "awaiting_outcome": sum(len(v) for v in self.pending_outcomes.values())}})

    # ------------------------------------------------------------------ views for the endpoints
    def feature_age_s(self, sym: str) -> float | None:
        seen = self.last_m1_wall.get(sym)
        return None if seen is None else time.time() - seen

    @staticmethod
    def _pcts(values) -> dict:
        v = list(values)
        if not v:
            return {"n": 0, "p50_ms": None, "p99_ms": None, "last_ms": None}
        a = np.asarray(v)
        return {"n": len(v), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                "last_ms": float(v[-1])}

    def latency(self) -> dict:
        return {"inference": self._pcts(self.inference_ms), "inference_and_publish": self._pcts(self.minute_ms)}

    def coverage_of(self, sym: str) -> dict[str, dict]:
        out = {}
        for target in TARGETS:
            cov = self.coverage.get((sym, target))
            n = len(cov) if cov else 0
            out[target] = {"n": n, "inside": int(sum(cov)) if cov else 0,
                           "coverage": (sum(cov) / n) if n else None}
        return out

    def finite_or_none(self, v) -> float | None:
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None
