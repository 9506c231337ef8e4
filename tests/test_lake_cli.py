"""The CLI: `tickcast archive --once`, `tickcast lake ...`, `tickcast dataset ...` as real subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from flows.lake import Lake

REPO = Path(__file__).resolve().parent.parent
FIX = Path(__file__).parent / "fixtures" / "klines"


def tickcast(tmp_path, *args, bootstrap=None, timeout=120):
    env = {**os.environ, "TICKCAST_LAKE_ROOT": str(tmp_path / "lake"), "TICKCAST_DATA_DIR": str(tmp_path / "data"),
           "TICKCAST_LOG_LEVEL": "WARNING"}
    env.pop("KAFKA_BOOTSTRAP", None)
    env.pop("TICKCAST_KAFKA_BOOTSTRAP", None)
    if bootstrap:
        env["KAFKA_BOOTSTRAP"] = bootstrap
    return subprocess.run([sys.executable, "-m", "tickcast.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_import_build_list_show_retention(tmp_path):
    r = tickcast(tmp_path, "lake", "import-klines", str(FIX / "BTCUSDT_1m_bybit_linear_20250530.csv"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["inserted"] == 300
    r = tickcast(tmp_path, "lake", "import-funding", str(FIX / "funding_bybit_BTCUSDT.csv"))
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["inserted"] == 40
    r = tickcast(tmp_path, "dataset", "build", "--from", "2025-05-30T17:40", "--to", "2025-05-30T21:39",
                 "--symbols", "BTCUSDT", "--triple-barrier")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["rows"] == 239 and Path(m["uri"]).is_file()
    assert Path(m["uri"]).is_relative_to(tmp_path / "data" / "datasets")
    r = tickcast(tmp_path, "dataset", "list")
    assert r.returncode == 0 and m["dataset_id"] in r.stdout and "rows=239" in r.stdout
    assert json.loads(tickcast(tmp_path, "dataset", "show", m["dataset_id"]).stdout) == m
    r = tickcast(tmp_path, "dataset", "show", "../../etc")
    assert r.returncode == 2 and "bad dataset id" in r.stderr
    r = tickcast(tmp_path, "lake", "retention", "--days", "3", "--tables", "raw_kline", "--vacuum-hours", "0")
    assert r.returncode == 0 and json.loads(r.stdout)["raw_kline"]["expired_rows"] == 300
    r = tickcast(tmp_path, "lake", "versions")
    assert r.returncode == 0 and "raw_kline" in r.stdout and "rows=0" in r.stdout


def test_archive_once(bootstrap, tmp_path):
    from confluent_kafka import Producer

    from tickcast.kafka import producer_config
    from tickcast.serde import Serde
    from tickcast.topics import HEARTBEAT

    sym = "ZZ" + uuid.uuid4().hex[:8].upper()
    p = Producer(producer_config(bootstrap))
    serde = Serde()
    for i in range(5):
        rec = {"symbol": sym, "venue": "sim.linear", "exchange_ts": 1_786_310_816_516 + i, "recv_ts": 1, "gw_seq": i}
        p.produce(HEARTBEAT, key=sym.encode(), value=serde.encode("Heartbeat", rec))
    assert p.flush(10) == 0
    r = tickcast(tmp_path, "archive", "--once", "--batch-seconds", "0.5", bootstrap=bootstrap, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    at = Lake(str(tmp_path / "lake")).read("raw_heartbeats", symbols=[sym])
    assert sorted(at.column("gw_seq").to_pylist()) == [0, 1, 2, 3, 4]
    r = tickcast(tmp_path, "archive", "--once", bootstrap=bootstrap, timeout=180)
    assert r.returncode == 0
    assert Lake(str(tmp_path / "lake")).read("raw_heartbeats", symbols=[sym]).num_rows == 5
    r = tickcast(tmp_path, "archive", "--once")
    assert r.returncode == 2 and "no broker" in r.stderr
