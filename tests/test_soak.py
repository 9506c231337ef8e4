"""The soak's short version, as users run it (`tickcast soak`): the whole stack in a fresh data dir
with a real (small, quickly trained) champion, every fault kind injected once (kill -9 of the
gateway, feature flow, archive, API and dashboard, WebSocket drop, sequence gap, duplicate delta,
u=1 restart, stall, malformed flood, broker partition), then the audit: nothing the exchange sent
lost or duplicated in the raw archive, the live features bit-identical to the replay of the
archive, a forecast for every minute. About 2.5 minutes on 2 shared cores."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tickcast.soak import FAULTS, audit_exactly_once, event_key

REPO = Path(__file__).resolve().parent.parent
LAST_LINE = re.compile(r"^lost=(\d+) duplicated=(\d+) served=([0-9.]+|n/a) parity=([0-9.]+|n/a)$")


@pytest.mark.slow
def test_soak_short_every_fault_once_nothing_lost_parity_and_every_minute_served(tmp_path):
    run_dir = tmp_path / "run"
    every = 5
    minutes = (len(FAULTS) + 0.5) * every / 60  # each kind once
    cmd = [sys.executable, "-m", "tickcast.cli", "soak", "--minutes", f"{minutes:.3f}", "--fault-every-s", str(every),
           "--symbols", "BTCUSDT", "--keep", str(run_dir), "--train-budget-s", "40", "--train-days", "1",
           "--drain-s", "10"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TICKCAST_", "KAFKA_", "MLFLOW_"))}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420, check=False)
    tail = (r.stdout[-6000:], r.stderr[-4000:])
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, tail
    m = LAST_LINE.match(lines[-1])
    assert m, tail
    report = json.loads((run_dir / "report.json").read_text())
    assert (run_dir / "report.txt").read_text().strip().splitlines()[-1] == lines[-1]
    # every kind injected once, each recovered (component healthy again / fresh valid data)
    faults = report["faults"]
    assert [f["kind"] for f in faults] == list(FAULTS), tail
    assert all(f["recovered"] for f in faults), [(f["kind"], f["note"]) for f in faults if not f["recovered"]]
    assert all(f["healthy_s"] is not None for f in faults if f["kind"].startswith("kill:"))
    eo = report["exactly_once"]
    assert eo["frames"] > 3_000 and eo["events_sent"]["book"] > 2_000 and eo["events_sent"]["trade"] > 50
    assert eo["malformed_sent"] == 100 and eo["dead_letters"] + eo["malformed_transport_loss"] == 100
    assert set(eo["transport_loss"]) <= {f"#{f['n']} {lbl}" for f in faults
                                        for k, lbl in (("kill:gateway", "gateway kill -9"), ("ws_drop", "WebSocket drop"))
                                        if f["kind"] == k}
    par = report["parity_detail"]
    assert par["values_total"] > 10_000 and par["only_online"] == 0 and par["only_offline"] == 0
    assert par["online_inconsistent"] == 0 and not par["meta_mismatches"]
    lost, dup, served, parity = m.groups()
    assert (int(lost), int(dup)) == (0, 0), eo["examples"]
    assert parity == "100", par["examples"]
    assert served != "n/a" and float(served) >= 99.0, report["served_detail"]
    assert r.returncode == 0, tail


def test_exactly_once_audit_counts_loss_duplicates_and_cut_tails(tmp_path):
    """The audit itself, on a real Delta archive: a missing row is lost, unless it sat in the last
    seconds of a connection an injected cut ended; an extra copy is duplicated."""
    from flows.lake import BRONZE, Lake, rows_to_arrow, with_meta

    def frame(u, ts, kind="delta"):
        return {"kind": "data", "text": json.dumps(
            {"topic": "orderbook.50.BTCUSDT", "type": kind, "ts": ts,
             "data": {"s": "BTCUSDT", "b": [["65000.10", "1.000"]], "a": [["65000.20", "2.000"]], "u": u,
                      "seq": 10 * u}, "cts": ts - 1})}

    t0 = 1_795_300_000_000
    sent = {"c1": [frame(1, t0, "snapshot")] + [frame(u, t0 + 100 * u) for u in range(2, 60)],
            "c2": [frame(100, t0 + 10_000, "snapshot")] + [frame(u, t0 + 10_000 + 100 * (u - 100))
                                                         for u in range(101, 120)]}
    from connectors.bybit.parse import BybitParser, decode

    lake = Lake(str(tmp_path / "lake"))
    lake.ensure_tables()
    rows = {"raw_orderbook_snapshots": [], "raw_orderbook_deltas": []}
    off = 0
    for cid, frames in sent.items():
        p = BybitParser("sim.linear", ["BTCUSDT"])
        for f in frames:
            (name, rec), = p.events(decode(f["text"]), 0)
            u = rec["update_id"]
            if (cid, u) in (("c1", 30), ("c2", 118), ("c2", 119)):  # 30: lost; c2's last two: cut in transit
                continue
            copies = 2 if (cid, u) == ("c1", 40) else 1  # 40: archived twice
            table = "raw_orderbook_snapshots" if name == "OrderBookSnapshot" else "raw_orderbook_deltas"
            for _ in range(copies):
                rec = dict(rec, gw_seq=off)
                rows[table].append(with_meta(BRONZE[table], rec, topic="t", partition=0, offset=off, kafka_ts=None,
                                             ingest="kafka"))
                off += 1
    for table, rs in rows.items():
        lake.append(table, rows_to_arrow(BRONZE[table], rs))
    res = audit_exactly_once(sent, lake, ["BTCUSDT"], {"c2": "#3 WebSocket drop"}, tail_s=5.0)
    assert res.frames == 79 and res.events_sent["book"] == 79
    assert res.lost == 1 and res.duplicated == 1 and res.extra == 0
    assert res.transport_loss == {"#3 WebSocket drop": {"events": 2, "conn_id": "c2", "max_age_s": 0.1}}
    assert event_key("OrderBookDelta", {"symbol": "X", "update_id": 1, "cross_seq": 2, "exchange_ts": 3}) == \
        ("book", "X", False, 1, 2, 3)
