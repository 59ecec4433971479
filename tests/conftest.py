"""Fixtures: a real broker on a loopback port over a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from jobbroker_server.config import Settings
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.testing import BrokerThread

from jobbroker import Client

# Fast timers so tests wait for conditions in milliseconds, not seconds.
FAST = Settings(
    port=0,
    metrics_port=0,
    lease_duration=timedelta(seconds=2),
    reap_interval=timedelta(milliseconds=100),
    poll_interval=timedelta(milliseconds=200),
    shutdown_grace=timedelta(seconds=2),
    retry=RetryPolicy(
        max_attempts=3,
        backoff_base=timedelta(milliseconds=50),
        backoff_factor=2.0,
        backoff_cap=timedelta(seconds=1),
        jitter=0.1,
    ),
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(FAST, database=str(tmp_path / "broker.db"))


@pytest.fixture
def broker(settings: Settings) -> Iterator[BrokerThread]:
    with BrokerThread(settings) as running:
        yield running


@pytest.fixture
def client(broker: BrokerThread) -> Iterator[Client]:
    with Client(broker.target, timeout=10) as c:
        yield c
