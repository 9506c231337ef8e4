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


def test_a_partial_run_keeps_the_other_scripts_rows(tmp_path):
    dest = tmp_path / "R.md"
    write_report([("gateway_throughput", {"msgs_per_s": 30_000.0}, "ok", 1.0),
                  ("online_latency", {"p50_ms": 4.0, "p99_ms": 25.0}, "ok", 1.0)], dest, "machine A")
    text = write_report([("online_latency", {"p50_ms": 3.0, "p99_ms": 15.0}, "ok", 1.0)], dest, "machine B",
                        keep_others=True)
    assert "| gateway_throughput | msgs_per_s | 30000 | >= 20000 (issue 3) | yes |" in text
    assert "| online_latency | p99_ms | 15 | <= 20 (issue 4) | yes |" in text
    assert "p99_ms | 25" not in text and text.count("| online_latency | p50_ms") == 1
    assert "machine A" in text and "Re-run" in text and "machine B: online_latency" in text
