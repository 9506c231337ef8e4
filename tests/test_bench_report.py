"""`tickcast bench`: RESULT lines are collected and judged against the required figures."""
from __future__ import annotations

import textwrap

from tickcast.bench import REQUIRED, run_script, write_report


def test_results_are_parsed_and_judged(tmp_path):
    script = tmp_path / "online_latency.py"
    script.write_text(textwrap.dedent("""
        print("noise RESULT x=1 in the middle is ignored")
        print("RESULT p50_ms=4.5")
        print("RESULT p99_ms=25")
    """))
    results, status, _ = run_script(script, timeout=30)
    assert status == "ok" and results == {"p50_ms": 4.5, "p99_ms": 25.0}
    text = write_report([("online_latency", results, status, 1.0)], tmp_path / "R.md", "test machine")
    assert "| online_latency | p99_ms | 25 | <= 20 (issue 4) | **no** |" in text
    assert "| online_latency | p50_ms | 4.5 |  |  |" in text


def test_failures_are_reported_not_raised(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("raise SystemExit(3)\n")
    results, status, _ = run_script(script, timeout=30)
    assert results == {} and status == "exit 3"
    assert REQUIRED[("gateway_throughput", "msgs_per_s")].met(20_000)
