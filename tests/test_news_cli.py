"""The news CLI module stays light, and ``tickcast newsfeed`` serves feeds until SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from tickcast.broker import free_port


def test_cli_module_imports_only_typer_and_stdlib():
    code = ("import sys, connectors.news.cli as m; heavy = {'feedparser', 'httpx', 'confluent_kafka', "
            "'vaderSentiment', 'fastavro', 'connectors.news.connector'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_newsfeed_command_serves_rss_and_atom(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tickcast.cli", "newsfeed", "--port", str(port), "--period", "30"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ})
    try:
        lines = [proc.stdout.readline().strip() for _ in range(3)]
        assert lines == [f"cryptonews=http://127.0.0.1:{port}/feeds/cryptonews.rss",
                         f"coindesk=http://127.0.0.1:{port}/feeds/coindesk.rss",
                         f"cointelegraph=http://127.0.0.1:{port}/feeds/cointelegraph.atom"]
        rss = httpx.get(f"http://127.0.0.1:{port}/feeds/cryptonews.rss")
        atom = httpx.get(f"http://127.0.0.1:{port}/feeds/cointelegraph.atom")
        assert rss.status_code == 200 and rss.text.count("<item>") >= 5 and "<rss" in rss.text
        assert atom.status_code == 200 and atom.text.count("<entry>") >= 5 and "Atom" in atom.text
        assert httpx.get(f"http://127.0.0.1:{port}/feeds/nope.rss").status_code == 404
        assert httpx.get(f"http://127.0.0.1:{port}/feeds/coindesk.rss?fault=bogus").status_code == 400
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
