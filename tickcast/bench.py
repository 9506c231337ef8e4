"""``tickcast bench`` / ``make bench``: run every ``bench/*.py``, collect its ``RESULT name=value``
lines and write ``bench/RESULTS.md`` with each figure next to the figure the issues require and the
machine it was measured on. Benchmarks measure; they never fail the build.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
_RESULT = re.compile(r"^RESULT (\w+)=([-+0-9.eE]+|nan|inf)\s*$")


@dataclass(frozen=True)
class Requirement:
    op: str  # ">=" or "<="
    value: float
    source: str  # where it is required

    def met(self, x: float) -> bool:
        return x >= self.value if self.op == ">=" else x <= self.value


# (script, RESULT name) -> the figure an issue requires; ratios are reported as measured
REQUIRED: dict[tuple[str, str], Requirement] = {
    ("gateway_throughput", "msgs_per_s"): Requirement(">=", 20_000, "issue 3"),
    ("online_latency", "p99_ms"): Requirement("<=", 20, "issue 4"),
    ("replay_throughput", "events_per_s"): Requirement(">=", 50_000, "issue 5"),
    ("api_load", "sse_p99_ms"): Requirement("<=", 100, "issue 7"),
    ("api_load", "inference_publish_ms"): Requirement("<=", 10, "issue 7"),
}
# what each ratio compares, for the table
REFERENCES = {
    "ratio_to_json": "gateway time / bare json.loads of the same messages",
    "ratio_to_decode": "replay events/s / only decoding the same rows from Delta",
    "ratio_to_torch": "ONNX Runtime time / torch eager time, same inputs",
}


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, load average at start {load}"


def run_script(path: Path, timeout: float) -> tuple[dict[str, float], str, float]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = f"timed out after {timeout:.0f} s"
    results = {}
    for line in out.splitlines():
        m = _RESULT.match(line.strip())
        if m:
            results[m.group(1)] = float(m.group(2))
    return results, status if results or status != "ok" else "no RESULT lines", time.monotonic() - t0


def _row(script: str, name: str, value: float) -> str:
    req = REQUIRED.get((script, name))
    return (f"| {script} | {name} | {value:g} | {f'{req.op} {req.value:g} ({req.source})' if req else ''} "
            f"| {('yes' if req.met(value) else '**no**') if req else ''} | {REFERENCES.get(name, '')} |")


def write_report(rows: list[tuple[str, dict[str, float], str, float]], dest: Path, machine_line: str,
                 keep_others: bool = False) -> str:
    """The results table. ``keep_others`` (a run of some scripts only): the rows of the scripts not
    re-run stay as they were, and the header says which scripts were re-run when."""
    now = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    head = [f"Measured {now} on {machine_line}. Written by `make bench` (`tickcast bench`); each script's last "
            "lines are `RESULT name=value`."]
    kept: list[str] = []
    rerun = {script for script, *_ in rows}
    if keep_others and dest.exists():
        old = dest.read_text().splitlines()
        head = [line for line in old[1:] if line and not line.startswith("|")]
        head.append(f"Re-run {now} on {machine_line}: {', '.join(sorted(rerun))} (`tickcast bench "
                    f"{' '.join(sorted(rerun))}`).")
        kept = [line for line in old if line.startswith("| ") and not line.startswith(("| script ", "|---"))
                and line.split("|")[1].strip() not in rerun]
    new: list[str] = []
    for script, results, status, secs in rows:
        if not results:
            new.append(f"| {script} | - | - | - | - | {status} ({secs:.0f} s) |")
        new.extend(_row(script, name, value) for name, value in results.items())
    table = sorted(kept + new, key=lambda line: line.split("|")[1].strip())  # stable: a script's rows keep their order
    lines = ["# Benchmark results", "", *(x for h in head for x in (h, "")),
             "| script | figure | value | required | met | reference of the ratio |", "|---|---|---|---|---|---|", *table]
    text = "\n".join(lines) + "\n"
    dest.write_text(text)
    return text


def main(only: list[str] | None = None, timeout: float = 1800.0) -> int:
    scripts = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))
    if only:
        scripts = [p for p in scripts if p.stem in only]
    machine_line = machine()
    rows = []
    for path in scripts:
        print(f"== {path.stem} ...", flush=True)
        results, status, secs = run_script(path, timeout)
        print(f"   {status}, {secs:.0f} s: " + ", ".join(f"{k}={v:g}" for k, v in results.items()), flush=True)
        rows.append((path.stem, results, status, secs))
    print(write_report(rows, BENCH / "RESULTS.md", machine_line, keep_others=bool(only)))
    return 0
