"""A job's life through the SDK against a real broker: submit, lease, report,
retry with backoff, dead-letter, replay, wait."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from jobbroker import (
    Client,
    JobFailedError,
    JobHandle,
    JobRequest,
    JobState,
    LeaseLostError,
    RetryPolicy,
)
from jobbroker_server.testing import BrokerThread

from .waiting import wait_for


def test_submit_lease_complete_result(client: Client) -> None:
    handle = client.submit("email.send", {"to": "ada@example.com"}, queue="mail")
    assert handle.status() is JobState.PENDING
    with client.lease_stream(["mail"], prefetch=4) as stream:
        lease = next(iter(stream))
        assert lease.job.id == handle.id
        assert lease.job.task == "email.send"
        assert lease.payload() == {"to": "ada@example.com"}
        lease.heartbeat()
        lease.complete({"sent": True})
    assert handle.result(timeout=5) == {"sent": True}
    job = client.get_job(handle.id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1
    assert [a.outcome.value for a in job.history] == ["succeeded"]


def test_raw_bytes_payload_and_result(client: Client) -> None:
    handle = client.submit("blob", b"\x00\xffraw", queue="bytes")
    with client.lease_stream(["bytes"]) as stream:
        lease = next(iter(stream))
        assert lease.payload() == b"\x00\xffraw"
        lease.complete(b"\x01")
    assert handle.result(timeout=5) == b"\x01"


def test_leased_job_carries_what_was_submitted_and_the_last_error(client: Client) -> None:
    retry = RetryPolicy(max_attempts=5, backoff_base=timedelta(0), jitter=0.0)
    handle = client.submit(
        "report.build",
        {"month": 11},
        queue="carry",
        priority=7,
        retry=retry,
        timeout=timedelta(seconds=30),
        soft_timeout=timedelta(seconds=20),
        idempotency_key="report-2026-11",
        metadata={"tenant": "acme", "trace": "t-1"},
        tags=["monthly", "pdf"],
    )
    with client.lease_stream(["carry"], prefetch=1) as stream:
        leases = iter(stream)
        first = next(leases)
        job = first.job
        assert (job.id, job.task, job.queue) == (handle.id, "report.build", "carry")
        assert job.priority == 7
        assert job.state is JobState.LEASED and job.attempts == 1
        assert (job.timeout, job.soft_timeout) == (timedelta(seconds=30), timedelta(seconds=20))
        assert job.idempotency_key == "report-2026-11"
        assert dict(job.metadata) == {"tenant": "acme", "trace": "t-1"}
        assert job.tags == ("monthly", "pdf")
        assert job.retry.max_attempts == 5 and job.last_error is None
        assert job.created_at is not None  # leased, not started: no started_at yet
        assert job.started_at is None and job.finished_at is None
        assert job == replace(client.get_job(handle.id), history=())  # as stored, field by field
        first.fail(ValueError("no data yet"))

        second = next(leases)
        assert second.job.attempts == 2 and second.job.result is None
        assert second.job.last_error is not None
        assert second.job.last_error.message == "no data yet"
        assert second.job.started_at is None
        assert second.job == replace(client.get_job(handle.id), history=())
        second.complete("done")
    assert handle.result(timeout=5) == "done"


def test_failures_retry_with_growing_delays_then_dead_letter_then_replay(
    client: Client,
) -> None:
    retry = RetryPolicy(
        max_attempts=3, backoff_base=timedelta(milliseconds=200), backoff_factor=2.0, jitter=0.0
    )
    handle = client.submit("flaky", {"n": 1}, queue="retry", retry=retry)
    with client.lease_stream(["retry"], prefetch=1) as stream:
        leases = iter(stream)
        for attempt in range(3):
            lease = next(leases)
            assert lease.job.attempts == attempt + 1
            lease.fail(RuntimeError(f"boom {attempt + 1}"))
        with pytest.raises(JobFailedError, match="boom 3"):
            handle.result(timeout=5)
        dead = client.get_job(handle.id)
        assert dead.state is JobState.DEAD
        starts = [a.started_at for a in dead.history]
        ends = [a.finished_at for a in dead.history]
        gaps = [(starts[i + 1] - ends[i]).total_seconds() for i in range(2)]  # type: ignore[operator]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps
        assert [a.error.message for a in dead.history if a.error] == ["boom 1", "boom 2", "boom 3"]
        assert "RuntimeError" in dead.history[0].error.type  # type: ignore[union-attr]
        assert [j.id for j in client.dlq_list(queue="retry").jobs] == [handle.id]

        assert client.dlq_replay([handle.id]) == [handle.id]
        lease = next(leases)
        assert lease.job.id == handle.id and lease.job.attempts == 1
        lease.complete("fine now")
    assert handle.result(timeout=5) == "fine now"
    assert client.dlq_list(queue="retry").jobs == ()


def test_priority_order_and_delay(client: Client) -> None:
    low = client.submit("t", 1, queue="prio", priority=0)
    high = client.submit("t", 2, queue="prio", priority=10)
    later = client.submit("t", 3, queue="prio", priority=100, delay=timedelta(seconds=0.6))
    assert later.status() is JobState.SCHEDULED
    with client.lease_stream(["prio"], prefetch=1) as stream:
        leases = iter(stream)
        order = []
        for _ in range(3):
            lease = next(leases)
            order.append(lease.job.id)
            lease.complete()
    assert order == [high.id, low.id, later.id]
    job = client.get_job(later.id)
    assert job.scheduled_at is not None and job.started_at is not None
    assert job.started_at >= job.scheduled_at  # not a moment before its time
    # run_at is fixed when the request arrives, created_at when it commits
    assert job.scheduled_at - job.created_at > timedelta(seconds=0.55)


def test_stale_fencing_token_is_refused_and_changes_nothing(
    client: Client, broker: BrokerThread
) -> None:
    handle = client.submit("slow", None, queue="fence")
    with client.lease_stream(["fence"], prefetch=1) as first:
        stale = next(iter(first))
        # Stop heartbeating: the reaper expires the lease and the job runs again.
        with client.lease_stream(["fence"], prefetch=1) as second:
            current = next(iter(second))
            assert current.job.id == handle.id
            assert current.fencing_token > stale.fencing_token
            with pytest.raises(LeaseLostError, match="lease lost"):
                stale.complete("late")
            assert client.get_job(handle.id).state is JobState.LEASED
            current.complete("on time")
    assert handle.result(timeout=5) == "on time"
    history = client.get_job(handle.id).history
    assert [a.outcome.value for a in history] == ["lease_expired", "succeeded"]


def test_wait_job_sees_every_transition(client: Client) -> None:
    retry = RetryPolicy(max_attempts=2, backoff_base=timedelta(milliseconds=100), jitter=0.0)
    handle = client.submit("twice", None, queue="watch", retry=retry)
    seen: list[JobState] = []
    watching = threading.Thread(
        target=lambda: seen.extend(j.state for j in client.wait_job(handle.id, timeout=10))
    )
    watching.start()
    wait_for(lambda: seen, what="the waiter to see the job pending")  # before the lease
    with client.lease_stream(["watch"], prefetch=1) as stream:
        leases = iter(stream)
        next(leases).fail("first try")
        next(leases).complete()
    watching.join(10)
    # Each report without a start says how long its handler ran: the broker
    # records the start (running) and the outcome together.
    assert seen == [
        "pending",
        "leased",
        "running",
        "scheduled",
        "pending",
        "leased",
        "running",
        "succeeded",
    ]


def test_a_batch_stores_each_job_with_its_own_options(client: Client) -> None:
    """submit_many fills each job of its request in place: nothing of one job
    may leak into the next."""
    plain = JobRequest("batch.plain", {"n": 1}, queue="opts")
    rich = JobRequest(
        "batch.rich",
        b"\x00raw",
        queue="opts",
        priority=3,
        delay=timedelta(hours=1),
        max_attempts=7,
        timeout=timedelta(seconds=9),
        idempotency_key="batch-rich",
        metadata={"tenant": "acme"},
        tags=["a", "b"],
    )
    handles = client.submit_many([plain, rich, plain])
    first, second, third = (client.get_job(h.id) for h in handles)
    assert second.task == "batch.rich" and second.payload == b"\x00raw"
    assert (second.priority, second.retry.max_attempts) == (3, 7)
    assert second.state is JobState.SCHEDULED and second.timeout == timedelta(seconds=9)
    assert second.idempotency_key == "batch-rich"
    assert (dict(second.metadata), second.tags) == ({"tenant": "acme"}, ("a", "b"))
    for job in (first, third):
        assert job.task == "batch.plain" and job.json() == {"n": 1}
        assert job.state is JobState.PENDING
        assert (job.priority, job.timeout, dict(job.metadata), job.tags) == (0, None, {}, ())
        assert job.idempotency_key not in (None, "batch-rich")
    assert first.idempotency_key != third.idempotency_key


def test_idle_stream_gets_at_most_its_prefetch_from_one_submit(
    client: Client, broker: BrokerThread
) -> None:
    """A submit fills an idle stream in its own transaction, up to the stream's
    room; the rest waits, and a completion makes room for the next."""
    streams = broker.app.metrics.registry
    with client.lease_stream(["room"], prefetch=2) as stream:
        wait_for(lambda: streams.get_sample_value("jobbroker_worker_streams") == 1)
        handles = client.submit_many([JobRequest("room.job", n, queue="room") for n in range(5)])
        leases = iter(stream)
        first, second = next(leases), next(leases)
        assert {first.payload(), second.payload()} == {0, 1}
        # Leased in the submit's transaction: had the stream's room been
        # ignored, all five would be running by now.
        assert _states(client, handles).count(JobState.PENDING) == 3
        first.complete()
        third = next(leases)
        assert third.payload() == 2
        assert _states(client, handles).count(JobState.LEASED) == 2


def _states(client: Client, handles: list[JobHandle[Any]]) -> list[JobState]:
    return [client.get_job(h.id).state for h in handles]


def test_keys_made_for_submits_are_ordered_uuid7(client: Client) -> None:
    """A submit without an idempotency key gets a UUIDv7 one: made one after
    another, they sort in order, so the broker's key index grows at one end."""
    handles = [client.submit("k.one", n, queue="keys") for n in range(3)]
    handles += client.submit_many([JobRequest("k.many", n, queue="keys") for n in range(3)])
    keys = [client.get_job(h.id).idempotency_key for h in handles]
    assert all(uuid.UUID(key).version == 7 for key in keys)
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
