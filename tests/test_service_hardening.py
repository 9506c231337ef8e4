"""The API's minute loop, each test a bug found in a review: a restart under a new champion
forecasting served minutes again, a gap before a history vector, live minutes that came only as
history, minute batches out of order, unbounded sequence-error reasons, drift of the previous
champion after a swap. No broker, no ONNX runtime: a fake champion, a fake producer, a real Store."""
from __future__ import annotations

import time

import numpy as np

from api.modelrt import ModelSpec
from api.store import PREDICTIONS, Store
from api.window import MINUTE_MS, MinuteObs

VARS = ("close", "log_return_1m", "range_rel_1m")
A, B = "BTCUSDT", "ETHUSDT"
T0 = 1_790_000_040_000 - 1_790_000_040_000 % MINUTE_MS


class FakeModel:
    def __init__(self, version: str, lookback: int = 4, horizon: int = 3, summary: dict | None = None,
                 variates=VARS):
        self.spec = ModelSpec(name="m", version=version, variates=tuple(variates), lookback=lookback,
                              horizon=horizon, quantiles=(0.1, 0.5, 0.9), flat_threshold=0.001, registry_hash="",
                              cadence="m1", feature_summary=summary)

    def predict(self, x):
        n, h = x.shape[0], self.spec.horizon
        return {"close_logret_q": np.tile(np.array([-0.01, 0.0, 0.01], np.float32), (n, h, 1)),
                "rv_q": np.tile(np.array([0.001, 0.002, 0.003], np.float32), (n, 1)),
                "range_rel_q": np.tile(np.array([0.001, 0.002, 0.003], np.float32), (n, 1)),
                "direction_p": np.tile(np.array([0.3, 0.4, 0.3], np.float32), (n, 1))}


class FakeChampion:
    def __init__(self, model):
        self.current = model
        self.last_error = None if model else "no 'champion' alias"


class Producer:
    def __init__(self):
        self.sent = []

    def produce(self, topic, key, value, on_delivery=None):
        self.sent.append((topic, key))

    def poll(self, *_):
        return 0

    def flush(self, *_):
        return 0


def service(tmp_path, symbols=(A,), model=None, **opts):
    from api.service import ApiOptions, PredictionService
    from tickcast.config import load_settings

    settings = load_settings(symbols=list(symbols), lake_root=str(tmp_path / "lake"), data_dir=str(tmp_path / "d"))
    svc = PredictionService(settings, ApiOptions(start_consumer=False, start_champion=False, **opts))
    svc.champion = FakeChampion(model)
    svc.producer = Producer()
    return svc


def vec(sym: str, minute: int, close: float = 100.0, history: bool = False) -> dict:
    return {"symbol": sym, "window_end": minute + MINUTE_MS, "values": {"close": close, "log_return_1m": 0.0,
                                                                        "range_rel_1m": 0.002},
            "venue": "bybit.linear", "registry_hash": "", "book_valid": True, "nulls": {}, "emit_ts": 0,
            "history": history}


def pred_row(sym, origin, version):
    return {"symbol": sym, "origin_ts": origin, "model_name": "m", "model_version": version, "status": "served",
            "degraded": False, "reason": None, "registry_hash": "", "horizon": 3,
            "quantile_levels": [0.1, 0.5, 0.9], "last_close": 100.0, "close_path": [[99.0, 100.0, 101.0]] * 3,
            "realized_vol": [0.001, 0.002, 0.003], "price_range": [0.1, 0.2, 0.3], "p_up": 0.3, "p_flat": 0.4,
            "p_down": 0.3, "action": "FLAT", "strength": 0.4, "signal_reason": "r", "simulated": False,
            "issued_ts": 5}


# ------------------------------------------------------------------------------------------ restart
def test_restart_does_not_forecast_again_minutes_the_table_already_holds_under_another_version(tmp_path):
    """Module doc: after a restart the service "forecasts only recent minutes that the predictions table
    does not already hold". ``served`` is keyed by (symbol, origin, model_version), so when the champion
    after the restart is another version (promoted while the API was down, the usual deploy), every
    catch-up minute already forecast by the previous version is forecast, stored and published on
    signals.live a second time (and gets a second outcome and possibly a second alert)."""
    now = (int(time.time() * 1000) // MINUTE_MS) * MINUTE_MS
    held = [now - k * MINUTE_MS for k in (3, 2, 1)]
    st = Store(str(tmp_path / "lake"))
    st.put(PREDICTIONS, [pred_row(A, m, "1") for m in held])
    st.flush()

    svc = service(tmp_path, model=FakeModel("2"), batch_wait_s=60)
    svc._restore()
    for k in range(12, 0, -1):  # the backlog replay: lookback minutes, then the minutes already served
        svc._on_minute(vec(A, now - k * MINUTE_MS), backlog=True)
    svc._flush_batches(time.monotonic() + 120)

    again = [r for r in svc.store.query(PREDICTIONS, symbols=[A]) if r["origin_ts"] in held
             and r["model_version"] != "1"]
    assert again == [], [(r["origin_ts"] - now) // MINUTE_MS for r in again]


# ------------------------------------------------------------------------------------------ history vectors
def test_a_gap_before_a_history_vector_is_still_recorded_as_a_data_gap(tmp_path):
    """A minute that never arrived is "counted as a data gap and stored as skipped", except when the
    next vector is a history vector (the feature flow restarted and rebuilt recent minutes from klines):
    ``_on_minute`` returns for history vectors before ``_record_gap``, and the next live vector finds no
    gap any more. The missing minutes leave no row and no data_gaps count."""
    svc = service(tmp_path)  # no champion: every live minute gets a skipped row, which keeps it simple
    for i in range(3):
        svc._on_minute(vec(A, T0 + i * MINUTE_MS), backlog=False)
    # feature flow down for minutes 3..6; on restart it rebuilds 5, 6 from klines (3, 4 are gone)
    for i in (5, 6):
        svc._on_minute(vec(A, T0 + i * MINUTE_MS, history=True), backlog=False)
    svc._on_minute(vec(A, T0 + 7 * MINUTE_MS), backlog=False)
    svc._flush_batches(time.monotonic() + 120)

    origins = {(r["origin_ts"] - T0) // MINUTE_MS for r in svc.store.query(PREDICTIONS, symbols=[A])}
    assert {3, 4} <= origins, sorted(origins)
    assert svc.counts[A]["gap_minutes"] == 2


def test_minutes_of_the_live_period_that_only_came_as_history_vectors_leave_a_row(tmp_path):
    """Same scenario: minutes 5 and 6 are minutes of the API's live period (after its first live
    minute) that came only as history vectors. They are neither forecast nor stored as skipped, so the
    predictions table has a silent hole (store doc: "a skipped minute is stored too: no silent gaps")."""
    svc = service(tmp_path)
    for i in range(3):
        svc._on_minute(vec(A, T0 + i * MINUTE_MS), backlog=False)
    for i in (3, 4):
        svc._on_minute(vec(A, T0 + i * MINUTE_MS, history=True), backlog=False)
    svc._on_minute(vec(A, T0 + 5 * MINUTE_MS), backlog=False)
    svc._flush_batches(time.monotonic() + 120)

    origins = sorted((r["origin_ts"] - T0) // MINUTE_MS for r in svc.store.query(PREDICTIONS, symbols=[A]))
    assert origins == list(range(6)), origins


# ------------------------------------------------------------------------------------------ batch order
def test_minute_batches_run_oldest_first_when_a_symbol_lags(tmp_path):
    """``_enqueue``: "batches always run oldest first". A symbol counts as live only while its latest
    minute is within 5 minutes, so when A runs 6 minutes ahead of B (uneven partition reads during the
    catch-up), minute 6 of A runs at once while minutes 1..5 still wait for B: minutes go out of order
    (SSE, signals.live, and the hold logic of ``_held``, which needs 0 < origin - decided)."""
    svc = service(tmp_path, symbols=(A, B), batch_wait_s=60)
    order = []
    run = svc._run_batch

    def spy(origin):
        if origin in svc.pending:
            order.append((origin - T0) // MINUTE_MS)
        run(origin)

    svc._run_batch = spy
    svc._on_minute(vec(B, T0), backlog=False)
    for i in range(8):
        svc._on_minute(vec(A, T0 + i * MINUTE_MS), backlog=False)
    svc._flush_batches(time.monotonic() + 120)
    assert order == sorted(order), order


# ------------------------------------------------------------------------------------------ drift
def test_psi_of_the_previous_champion_is_not_reported_after_a_swap(tmp_path):
    """``service.psi`` (the /monitoring psi and psi_max) and the tickcast_api_feature_psi gauges are only
    ever overwritten, never cleared: after a swap to a champion that ships no feature summary (or other
    variates), the previous model's drift numbers stay on display forever as if current."""
    from api.drift import summarise

    rng = np.random.default_rng(0)
    summary = summarise({"log_return_1m": rng.normal(0, 1e-3, 5000)})
    old, new = FakeModel("1", summary=summary), FakeModel("2", summary=None)
    svc = service(tmp_path, model=old)
    for i in range(60):
        svc.history[A].add(MinuteObs(
            T0 + i * MINUTE_MS, {"close": 100.0, "log_return_1m": float(rng.normal(0, 1e-3)),
                                 "range_rel_1m": 0.002}, "bybit.linear", "", True, {}, 0))
    origin = T0 + 59 * MINUTE_MS
    svc._update_psi(old, origin, [A])
    assert "log_return_1m" in svc.psi.get(A, {})

    svc.champion.current = new
    svc._on_swap(old, new)
    svc._update_psi(new, origin + 5 * MINUTE_MS, [A])
    assert not svc.psi.get(A), svc.psi
    stale = svc.metrics.registry.get_sample_value("tickcast_api_feature_psi_max", {"symbol": A})
    assert stale is None, stale


# ------------------------------------------------------------------------------------------ memory
def test_sequence_error_reasons_per_symbol_stay_bounded(tmp_path):
    """``_on_control`` keys ``seq_errors[sym]`` by the free-text reason of the feature flow's resync
    request, and flows/book.py puts sequence numbers and prices in it ("gap: u 123 -> 130", "crossed:
    bid X >= ask Y"). One resync per 5 s per symbol gives up to 17,280 new keys a day per symbol that
    are never forgotten, all returned by /monitoring in sequence_error_reasons."""
    svc = service(tmp_path)

    class Msg:
        def __init__(self, reason):
            self.reason = reason

        def value(self):
            return self.reason

    class Serde:
        def decode_any(self, raw):
            return "ControlCommand", {"command": "resync", "symbol": A, "reason": raw}

    svc.serde = Serde()
    for i in range(2000):
        svc._on_control(Msg(f"gap: u {1000 + 7 * i} -> {1003 + 7 * i}"))
    assert sum(svc.seq_errors[A].values()) == 2000
    assert len(svc.seq_errors[A]) <= 50, len(svc.seq_errors[A])
