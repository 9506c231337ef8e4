"""Shared fixtures: the real embedded broker (one per test session) and the shared real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_REAL = Path(os.environ.get("TICKCAST_SHARED_REAL", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-compatible broker (tansu) on a free loopback port, every topic created."""
    from tickcast.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="session")
def bootstrap(broker) -> str:
    return broker.bootstrap


@pytest.fixture(scope="session")
def shared_real() -> Path:
    """../shared/data/real, or a skip with the reason on a fresh clone."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"shared real data not present at {SHARED_REAL} (fresh clone): "
                    "the repo's own fixtures cover the core cases")
    return SHARED_REAL
