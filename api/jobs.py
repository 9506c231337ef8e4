"""Background jobs started by the API: dataset builds and model training, each in a child process.

A child process keeps the heavy work (dataset building, torch training) off the inference loop's
CPU time and out of the API process (which never imports torch). One job of a kind runs at a time;
further ones queue (at most ``max_queued``). Each job has an id (32 hex characters), a status
(queued, running, succeeded, failed), its parameters, the tail of its output and, on success, the
JSON object the child printed as its last line. Jobs live in memory: a restart forgets them (the
datasets and models they produced are in the lake and the registry).

``python -m api.jobs build-dataset '<json spec>'`` is the dataset child: it calls
``flows.datasets.build_dataset`` and prints the result as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tickcast.logs import get_logger

log = get_logger("api.jobs")


class JobQueueFull(RuntimeError):
    pass


def settings_env(settings) -> dict[str, str]:
    """The API's own settings as environment variables for a child process (the child's
    ``get_settings()`` then sees the same lake, data dir, registry and broker as the API)."""
    env = {
        "TICKCAST_LAKE_ROOT": str(settings.lake_root),
        "TICKCAST_LAKE_STORAGE_OPTIONS": json.dumps(dict(settings.lake_storage_options)),
        "TICKCAST_DATA_DIR": str(settings.data_dir),
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "TICKCAST_MODEL_NAME": settings.model_name,
        "TICKCAST_SYMBOLS": ",".join(settings.symbols),
    }
    if settings.kafka_bootstrap:
        env["KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    if settings.schema_registry_url:
        env["SCHEMA_REGISTRY_URL"] = settings.schema_registry_url
    return env


@dataclass
class Job:
    id: str
    kind: str
    argv: list[str]
    params: dict[str, Any]
    status: str = "queued"
    created_ts: float = field(default_factory=time.time)
    started_ts: float | None = None
    finished_ts: float | None = None
    returncode: int | None = None
    result: Any = None
    error: str | None = None
    output: deque = field(default_factory=lambda: deque(maxlen=60))

    def view(self) -> dict:
        return {"id": self.id, "kind": self.kind, "status": self.status, "params": self.params,
                "created_ts": self.created_ts, "started_ts": self.started_ts, "finished_ts": self.finished_ts,
                "returncode": self.returncode, "result": self.result, "error": self.error,
                "log_tail": list(self.output)[-20:]}


class JobRunner:
    def __init__(self, *, max_queued: int = 8, timeout_s: float = 6 * 3600, cwd: str | None = None,
                 env: dict[str, str] | None = None):
        self.env = dict(env or {})
        self.jobs: dict[str, Job] = {}
        self.queues: dict[str, deque[Job]] = {}
        self.running: dict[str, Job | None] = {}
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.cwd = cwd
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopping = False

    def submit(self, kind: str, argv: list[str], params: dict[str, Any]) -> Job:
        with self._lock:
            q = self.queues.setdefault(kind, deque())
            if len(q) >= self.max_queued:
                raise JobQueueFull(f"{len(q)} {kind} jobs already queued; try again later")
            job = Job(uuid.uuid4().hex, kind, argv, params)
            self.jobs[job.id] = job
            q.append(job)
            if self.running.get(kind) is None:
                self._start_next(kind)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def _start_next(self, kind: str) -> None:  # holds the lock
        q = self.queues.get(kind)
        if not q or self._stopping:
            self.running[kind] = None
            return
        job = q.popleft()
        self.running[kind] = job
        threading.Thread(target=self._run, args=(job,), name=f"job-{kind}", daemon=True).start()

    def _run(self, job: Job) -> None:
        job.status = "running"
        job.started_ts = time.time()
        log.info("job started", extra={"job_id": job.id, "kind": job.kind})
        proc = timer = None
        try:
            # errors="replace": a child's stray non-UTF-8 byte must not end the supervision of the child
            proc = subprocess.Popen(job.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", cwd=self.cwd,
                                    env={**os.environ, **self.env, "PYTHONUNBUFFERED": "1"})
            self._procs[job.id] = proc
            if self._stopping:  # stop() ran between the start and the registration above
                proc.terminate()
            timer = threading.Timer(self.timeout_s, proc.kill)
            timer.start()
            tail: deque[str] = deque(maxlen=400)  # untruncated, for the result object
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line[:200_000])
                job.output.append(line.rstrip()[:500])
            proc.wait()
            timer.cancel()
            job.returncode = proc.returncode
            if proc.returncode == 0:
                job.status = "succeeded"
                job.result = trailing_json(list(tail))
            else:
                job.status = "failed"
                job.error = f"exit code {proc.returncode}: " + (job.output[-1] if job.output else "no output")
        except Exception as exc:
            job.status = "failed"
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            if timer is not None:
                timer.cancel()
            if proc is not None and proc.poll() is None:  # never leave a child running unsupervised
                proc.kill()
                proc.wait()
            job.finished_ts = time.time()
            self._procs.pop(job.id, None)
            log.info("job finished", extra={"job_id": job.id, "kind": job.kind, "status": job.status})
            with self._lock:
                self._start_next(job.kind)

    def stop(self) -> None:
        self._stopping = True
        for proc in list(self._procs.values()):
            if proc.poll() is None:
                proc.terminate()


def trailing_json(lines: list[str]):
    """The JSON object a child printed last: one line, or an indented block from a line "{" to "}"."""
    for ln in reversed(lines):
        if ln.startswith("{") and ln.rstrip().endswith("}"):
            try:
                return json.loads(ln)
            except json.JSONDecodeError:
                break
        if ln.strip():
            break
    ends = [i for i, ln in enumerate(lines) if ln.rstrip() == "}"]
    if ends:
        end = ends[-1]
        for start in range(end, -1, -1):
            if lines[start].rstrip() == "{":
                try:
                    return json.loads("\n".join(lines[start:end + 1]))
                except json.JSONDecodeError:
                    return None
    return None


def _build_dataset_main(spec_json: str) -> int:
    from flows import datasets

    spec = json.loads(spec_json)
    result = datasets.build_dataset(spec)
    if hasattr(result, "__dict__") and not isinstance(result, dict):
        result = {k: v for k, v in vars(result).items() if not k.startswith("_")}
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through the API's job runner
    if len(sys.argv) == 3 and sys.argv[1] == "build-dataset":
        raise SystemExit(_build_dataset_main(sys.argv[2]))
    print("usage: python -m api.jobs build-dataset '<json spec>'", file=sys.stderr)
    raise SystemExit(2)
