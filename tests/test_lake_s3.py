"""The lake on ``s3://`` (deltalake's storage options): bronze appends with their Kafka offsets,
the offline replay, and retention with an S3 archive location, against a real S3 HTTP server on
127.0.0.1 (moto's standalone server: S3's REST protocol, in memory). AWS itself cannot be reached
here; this proves the code paths take no local-filesystem shortcut."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from flows.lake import BRONZE, DAY_MS, Lake, batch_to_records, rows_to_arrow, with_meta
from flows.offline_replay import iter_vectors, replay
from flows.parity import ParityReport, compare
from tests.synth import T0, SynthStream
from tests.test_lake import D0, _fill
from tests.test_replay import archive_events, features_of, strip
from tickcast.broker import free_port

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local S3 server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def bucket(s3_endpoint, request):
    name = request.node.name.replace("_", "-")[:50].strip("-").lower()
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=name)
    # what a user puts in TICKCAST_LAKE_STORAGE_OPTIONS; conditional_put=etag makes concurrent
    # commits safe on S3 without a lock table
    opts = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "conditional_put": "etag"}
    return name, opts


def test_bronze_append_offsets_and_exact_round_trip_on_s3(bucket):
    name, opts = bucket
    lake = Lake(f"s3://{name}/lake", opts)
    lake.ensure_tables(["raw_trades"])
    off = _fill(lake, days=2, per_day=10, files_per_day=2)
    assert lake.committed_offset("raw_trades", "market.trades", 0) == off - 1
    back = batch_to_records(BRONZE["raw_trades"], lake.read("raw_trades"))
    assert sorted(r["gw_seq"] for r in back) == list(range(20))
    # an append that repeats committed offsets is what the archive skips after a restart: the
    # offset bookkeeping lives in the table's own transactions, on S3 as locally
    t = BRONZE["raw_trades"]
    rows = [with_meta(t, {**back[0], "gw_seq": 99}, topic="market.trades", partition=0, offset=off, kafka_ts=None,
                      ingest="kafka")]
    lake.append("raw_trades", rows_to_arrow(t, rows), offsets={("market.trades", 0): off})
    assert lake.committed_offset("raw_trades", "market.trades", 0) == off


def test_replay_from_an_s3_lake_equals_the_engine(bucket, tmp_path):
    name, opts = bucket
    lake = Lake(f"s3://{name}/lake", opts)
    btc = SynthStream("BTCUSDT", seed=21).run(60)
    archive_events(lake, btc)
    lo, hi = T0 + 10_000, T0 + 50_000
    rep = replay(lake, ["BTCUSDT"], lo, hi, tmp_path / "out", progress=False)
    assert rep["events"] == len(btc)
    got = {(r["symbol"], r["cadence"], r["window_end"]): r for r in iter_vectors(tmp_path / "out")}
    ref = {(r["symbol"], r["cadence"], r["window_end"]): strip(r) for r in features_of(btc, "BTCUSDT")
           if lo < r["window_end"] <= hi}
    assert set(got) == set(ref) and len(ref) > 50
    rpt = compare(ref, got, ParityReport((lo, hi), ["BTCUSDT"]))
    assert rpt.ok and rpt.values_compared > 1_000 and rpt.value_mismatches == 0  # bit for bit


def test_retention_to_an_s3_archive_location(bucket):
    name, opts = bucket
    lake = Lake(f"s3://{name}/lake", opts)
    lake.ensure_tables(["raw_trades"])
    total = _fill(lake, days=3, per_day=10, files_per_day=2)
    now = D0 + 2 * DAY_MS + 3_600_000  # during day 3: keep days 2 and 3
    archive_root = f"s3://{name}/expired"
    rep = lake.retention(2, now_ms=now, tables=["raw_trades"], archive_root=archive_root, vacuum_hours=0)["raw_trades"]
    assert rep["expired_rows"] == 10 and rep["expired_partitions"] == ["BTCUSDT/2026-08-01"]
    assert rep["compacted"] == ["BTCUSDT/2026-08-02"] and rep["vacuumed_files"] > 0
    live, moved = lake.read("raw_trades"), Lake(archive_root, opts).read("raw_trades")
    assert sorted(moved.column("kafka_offset").to_pylist() + live.column("kafka_offset").to_pylist()) == \
        list(range(total))
    again = lake.retention(2, now_ms=now, tables=["raw_trades"], archive_root=archive_root, vacuum_hours=0)
    assert again["raw_trades"]["expired_rows"] == 0 and Lake(archive_root, opts).read("raw_trades").num_rows == 10
