"""What the delivery promise rests on, short of killing processes (test_crash.py
does that): idempotent submits under races and dropped connections, timeouts,
cancellation, hand-back on shutdown, retention."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest

from jobbroker import (
    AttemptOutcome,
    Client,
    JobFailedError,
    JobNotFoundError,
    JobRequest,
    JobState,
    ResourceExhaustedError,
    RetryPolicy,
    Worker,
    task,
)
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.faults import CuttingProxy
from tests.waiting import wait_for


@pytest.mark.parametrize("shared", [False, True], ids=["own-clients", "one-shared-client"])
def test_concurrent_duplicate_submits_make_exactly_one_job(
    broker: BrokerThread, client: Client, shared: bool
) -> None:
    """From a client per submit, and from threads sharing one client, whose
    submits then travel together (one message can hold the key twice)."""

    def submit(_: int) -> tuple[str, bool]:
        with contextlib.nullcontext(client) if shared else Client(broker.target) as sender:
            handle = sender.submit("charge", {"order": 7}, queue="pay", idempotency_key="order-7")
            return handle.id, handle.duplicate

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(submit, range(32)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(not duplicate for _, duplicate in results) == 1
    assert len(client.list_jobs(queue="pay").jobs) == 1


def test_submit_retried_after_a_dropped_reply_makes_exactly_one_job(
    broker: BrokerThread, client: Client
) -> None:
    proxy = CuttingProxy(broker.target)
    try:
        with Client(proxy.target) as through:
            with pytest.raises(JobNotFoundError):
                through.get_job("warm-up")  # the connection is up and idle
            proxy.armed.set()
            handle = through.submit("invoice.send", {"n": 1}, queue="cut")
        assert proxy.cuts == 1  # the first reply was lost after the commit...
        assert handle.duplicate  # ...so the retry found the stored job
        assert [j.id for j in client.list_jobs(queue="cut").jobs] == [handle.id]
    finally:
        proxy.close()


def test_submit_many_is_all_or_nothing(client: Client) -> None:
    good = JobRequest("t", 1, queue="batch")
    too_big = JobRequest("t", "x" * 2_000_000, queue="batch")  # over the broker's 1 MiB
    with pytest.raises(ResourceExhaustedError, match=r"jobs\[1\]: payload is"):
        client.submit_many([good, too_big])
    assert client.list_jobs(queue="batch").jobs == ()
    handles = client.submit_many([good, JobRequest("t", 2, queue="batch")])
    assert [j.id for j in client.list_jobs(queue="batch").jobs] == [h.id for h in handles]


def test_cancel_pending_and_scheduled_at_once(client: Client) -> None:
    now = client.submit("t", None, queue="c")
    later = client.submit("t", None, queue="c", delay=timedelta(hours=1))
    assert client.cancel(now.id).state is JobState.CANCELLED
    assert client.cancel(later.id).state is JobState.CANCELLED
    assert {j.state for j in client.list_jobs(queue="c").jobs} == {JobState.CANCELLED}
    assert client.get_job(now.id).attempts == 0


@task(queue="limits", timeout=timedelta(seconds=0.5), max_attempts=1)
async def overrun(payload: None) -> str:
    await asyncio.sleep(30)  # heartbeats go on; the hard timeout still ends it
    return "never"


@task(queue="limits", soft_timeout=timedelta(seconds=0.3), max_attempts=1)
async def polite(payload: None) -> str:
    await asyncio.sleep(30)
    return "never"


@task(queue="limits")
async def lingering(payload: None) -> str:
    await asyncio.sleep(30)
    return "never"


def _run_worker(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(worker.run_async()), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def limits_worker(broker: BrokerThread) -> Iterator[Worker]:
    worker = Worker([overrun, polite], target=broker.target, concurrency=2)
    thread = _run_worker(worker)
    yield worker
    worker.stop()
    thread.join(15)


def test_hard_timeout_ends_the_attempt_even_while_heartbeating(
    client: Client, limits_worker: Worker
) -> None:
    handle = client.submit(overrun, None)
    with pytest.raises(JobFailedError):
        handle.result(timeout=15)
    [attempt] = client.get_job(handle.id).history
    assert attempt.outcome is AttemptOutcome.TIMED_OUT
    assert attempt.error is not None and "timeout" in attempt.error.message


def test_soft_timeout_cancels_the_handler_before_the_hard_limit(
    client: Client, limits_worker: Worker
) -> None:
    handle = client.submit(polite, None)
    with pytest.raises(JobFailedError):
        handle.result(timeout=15)
    [attempt] = client.get_job(handle.id).history
    assert attempt.outcome is AttemptOutcome.FAILED
    assert attempt.error is not None and attempt.error.type == "SoftTimeout"


def test_worker_shutdown_hands_back_unfinished_jobs_without_counting(
    broker: BrokerThread, client: Client
) -> None:
    worker = Worker(
        [lingering], target=broker.target, shutdown_grace=timedelta(seconds=0.3), concurrency=1
    )
    thread = _run_worker(worker)
    handle = client.submit(lingering, None)
    wait_for(lambda: handle.status() is JobState.RUNNING, what="the job to start")
    worker.stop()
    thread.join(15)
    assert not thread.is_alive()
    job = client.get_job(handle.id)
    assert job.state is JobState.PENDING and job.attempts == 0
    assert [a.outcome for a in job.history] == [AttemptOutcome.RELEASED]


@pytest.fixture
def short_retention(settings: Settings) -> Iterator[BrokerThread]:
    with BrokerThread(replace(settings, retention=timedelta(milliseconds=300))) as running:
        yield running


def test_retention_deletes_finished_jobs_and_keeps_dead_ones(
    short_retention: BrokerThread,
) -> None:
    with Client(short_retention.target) as client:
        done = client.submit("t", None, queue="r")
        dead = client.submit("t", None, queue="r", retry=RetryPolicy(max_attempts=1))
        with client.lease_stream(["r"], prefetch=2) as stream:
            leases = {lease.job.id: lease for lease in [next(iter(stream)), next(iter(stream))]}
            leases[done.id].complete()
            leases[dead.id].fail("no")

        def gone() -> bool:
            try:
                client.get_job(done.id)
            except JobNotFoundError:
                return True
            return False

        wait_for(gone, what="retention to delete the finished job")
        assert client.get_job(dead.id).state is JobState.DEAD
