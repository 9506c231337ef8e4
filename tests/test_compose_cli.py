"""The compose file users run, and the CLI's subcommands."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO
from tickcast.topics import TOPICS

COMPOSE = yaml.safe_load((REPO / "infra" / "redpanda-compose.yml").read_text())


def test_compose_services_images_and_ports():
    services = COMPOSE["services"]
    for name in ["redpanda", "console", "topic-init", "gateway", "features", "archive", "api", "ui", "mlflow",
                 "prometheus", "grafana"]:
        assert name in services, name
    assert services["redpanda"]["image"].startswith("docker.redpanda.com/redpandadata/redpanda:")
    assert "--mode=dev-container" in services["redpanda"]["command"]
    assert services["console"]["image"].startswith("docker.redpanda.com/redpandadata/console:")
    for name in ["gateway", "features", "archive", "api", "ui", "mlflow"]:
        assert services[name]["build"]["dockerfile"] == "infra/Dockerfile"
        assert (REPO / "infra" / "Dockerfile").is_file()
    assert "8000:8000" in services["api"]["ports"] and "5006:5006" in services["ui"]["ports"]
    assert "5000:5000" in services["mlflow"]["ports"]
    assert services["api"]["environment"]["KAFKA_BOOTSTRAP"] == "redpanda:9092"
    assert {"lake", "mlflow"} <= set(COMPOSE["volumes"])


def test_topic_init_creates_every_declared_topic():
    script = " ".join(COMPOSE["services"]["topic-init"]["command"])
    created = {m.group(1): int(m.group(2)) for m in re.finditer(r"rpk topic create (\S+) -p (\d+)", script)}
    assert created == {t.name: t.partitions for t in TOPICS}


def _help(*args):
    return subprocess.run([sys.executable, "-m", "tickcast.cli", *args, "--help"], capture_output=True,
                          text=True, cwd=REPO)


def _subcommands() -> list[str]:
    out = _help().stdout
    return re.findall(r"^│ (\w[\w-]*)\s", out, flags=re.M)


def test_top_level_help_lists_the_core_commands():
    names = _subcommands()
    assert {"broker", "topics", "up"} <= set(names), names


@pytest.mark.parametrize("name", _subcommands())
def test_each_subcommand_has_help(name):
    r = _help(name)
    assert r.returncode == 0, r.stderr
    assert "Usage:" in r.stdout


def test_grafana_dashboard_uses_metrics_the_code_exports():
    """Every tickcast_* metric a Grafana panel queries is defined by some component."""
    import json

    dash = json.loads((REPO / "infra" / "grafana" / "dashboards" / "tickcast.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            used |= set(re.findall(r"tickcast_[a-z_]+", t["expr"]))
    sources = "".join((REPO / p).read_text() for p in ("connectors/metrics.py", "flows/metrics.py", "api/metrics.py"))
    strip = lambda m: re.sub(r"_(total|bucket|sum|count)$", "", m)  # noqa: E731
    defined = {strip(m) for m in re.findall(r'"(tickcast_[a-z_]+)"', sources)}
    base = {strip(m) for m in used}
    assert base and base <= defined, sorted(base - defined)
    prom = yaml.safe_load((REPO / "infra" / "prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    ports = {s: COMPOSE["services"][s]["ports"][0].split(":")[0] for s in ("gateway", "features", "archive", "api")}
    assert sorted(targets) == sorted(f"{s}:{p}" for s, p in ports.items())
