"""Celery's way in: `task.delay(...)` and `task.apply_async(...)` submit
through the client the app configures once, to a real broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

import jobbroker
from jobbroker import Client, JobState, task
from jobbroker_server.testing import BrokerThread

pytestmark = pytest.mark.timeout(60)


@task(queue="mail")
def send_email(to: str) -> str:
    return f"sent to {to}"


@pytest.fixture
def configured(broker: BrokerThread) -> Iterator[Client]:
    made = jobbroker.configure(target=broker.target)
    yield made
    made.close()


def test_delay_submits_through_the_configured_client_and_runs(
    configured: Client, client: Client
) -> None:
    handle = send_email.delay("ada@example.com")
    assert client.get_job(handle.id).task == send_email.name
    with client.lease_stream(["mail"]) as stream:
        lease = next(iter(stream))
        assert lease.job.id == handle.id
        lease.complete(send_email(lease.payload()))
    assert handle.result(timeout=10) == "sent to ada@example.com"


def test_apply_async_takes_celerys_countdown_and_eta_and_submits_options(
    configured: Client, client: Client
) -> None:
    later = send_email.apply_async("bob@example.com", countdown=60, priority=5, queue="slow")
    job = client.get_job(later.id)
    assert (job.state, job.queue, job.priority) == (JobState.SCHEDULED, "slow", 5)
    assert job.scheduled_at - job.created_at >= timedelta(seconds=59)
    at = datetime.now(UTC) + timedelta(hours=1)
    dated = send_email.apply_async("eve@example.com", eta=at, idempotency_key="eve-1")
    again = send_email.apply_async("eve@example.com", eta=at, idempotency_key="eve-1")
    assert again.id == dated.id and again.duplicate
    assert abs((client.get_job(dated.id).scheduled_at - at).total_seconds()) < 0.01


def test_the_default_client_comes_from_the_broker_variables(
    broker: BrokerThread, monkeypatch: pytest.MonkeyPatch, client: Client
) -> None:
    monkeypatch.setenv("BROKER_TARGET", broker.target)
    made = jobbroker.configure()
    try:
        handle = send_email.delay("cy@example.com")
        assert client.get_job(handle.id).queue == "mail"
    finally:
        made.close()
