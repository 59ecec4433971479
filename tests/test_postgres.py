"""What only a shared PostgreSQL brings: a submit on one replica wakes the
workers of another at once (LISTEN/NOTIFY), not at the next poll."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest

from jobbroker import Client
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.conftest import FAST

SLOW_POLL = timedelta(seconds=30)  # longer than the test may take: only NOTIFY can wake


@pytest.fixture
def replicas(postgres_schema: str) -> Iterator[tuple[BrokerThread, BrokerThread]]:
    settings: Settings = replace(FAST, database=postgres_schema, poll_interval=SLOW_POLL)
    with BrokerThread(settings) as a, BrokerThread(settings) as b:
        yield a, b


@pytest.mark.postgres
@pytest.mark.timeout(30)
def test_submit_on_one_replica_wakes_a_worker_on_another(
    replicas: tuple[BrokerThread, BrokerThread],
) -> None:
    a, b = replicas
    with (
        Client(a.target) as worker_side,
        Client(b.target) as producer,
        worker_side.lease_stream(["notify"], prefetch=1) as stream,
    ):
        leases = iter(stream)
        started = time.monotonic()
        handle = producer.submit("t", None, queue="notify")
        lease = next(leases)
        waited = time.monotonic() - started
        lease.complete()
    assert lease.job.id == handle.id
    assert waited < 5, f"woken after {waited:.1f}s: by the poll, not by NOTIFY"
