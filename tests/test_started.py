"""A job is leased until its handler starts: the Worker reports the start, and
the hard timeout counts from it; a sync handler given up on loses its thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from jobbroker import AsyncClient, Client, JobCancelledError, JobState, LeaseLostError, Worker, task
from jobbroker._async_stream import AsyncLeaseStream
from jobbroker._threads import HandlerThreads
from jobbroker.v1 import broker_pb2
from jobbroker_server.testing import BrokerThread
from tests.waiting import wait_for

QUEUE = "started"

gate = threading.Event()
began: list[datetime] = []  # when `gated` handlers began, by the wall clock
release = threading.Event()  # lets `stubborn` handlers return


@task(queue=QUEUE)
async def slow(payload: float) -> str:
    await asyncio.sleep(payload)
    return "slept"


@task(queue=QUEUE)
def noop(payload: int) -> int:
    return payload


@task(queue=QUEUE)
def gated(payload: None) -> str:
    began.append(datetime.now(UTC))
    gate.wait(20)
    return "through"


@task(queue=QUEUE)
def stubborn(payload: None) -> str:
    """A sync handler that ignores its cancellation."""
    release.wait(30)
    return "late"


@contextlib.contextmanager
def serving(
    broker: BrokerThread, *, concurrency: int, prefetch: int | None = None
) -> Iterator[Worker]:
    worker = Worker(
        [slow, noop, gated, stubborn],
        target=broker.target,
        concurrency=concurrency,
        prefetch=prefetch,
    )
    thread = threading.Thread(target=lambda: asyncio.run(worker.run_async()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.stop()
        thread.join(15)
    assert not thread.is_alive()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kind of each report the worker's streams send, in order."""
    kinds: list[str] = []
    original = AsyncLeaseStream._exchange_now

    async def counting(
        self: AsyncLeaseStream, message: broker_pb2.WorkerMessage
    ) -> list[broker_pb2.ReportResult]:
        kind = message.WhichOneof("kind") or ""
        kinds.extend([kind] * len(getattr(message, kind).leases) if kind == "start" else [kind])
        return await original(self, message)

    monkeypatch.setattr(AsyncLeaseStream, "_exchange_now", counting)
    return kinds


@pytest.mark.timeout(60)
def test_a_job_held_behind_a_slow_one_times_out_only_from_its_start(
    client: Client, broker: BrokerThread
) -> None:
    """One slot, a window of two: B waits, leased, behind A for two seconds.
    Its one-second timeout counts from its handler's start, not its lease."""
    with serving(broker, concurrency=1, prefetch=2):
        a = client.submit(slow, 2.0)
        b = client.submit(noop, 7, timeout=timedelta(seconds=1))
        wait_for(lambda: a.status() is JobState.RUNNING, what="A to run")
        wait_for(lambda: b.status() is JobState.LEASED, what="B in the window")
        assert a.status() is JobState.RUNNING  # B waited leased while A ran
        assert b.result(timeout=20) == 7
        assert a.result(timeout=20) == "slept"
    job = client.get_job(b.id)
    assert job.state is JobState.SUCCEEDED and job.attempts == 1
    first = client.get_job(a.id)
    assert job.started_at is not None and first.started_at is not None
    assert job.started_at - first.started_at > timedelta(seconds=1.5)


@pytest.mark.timeout(60)
def test_a_slow_job_goes_from_leased_to_running_soon_after_its_handler_starts(
    client: Client, broker: BrokerThread, sent: list[str]
) -> None:
    gate.clear()
    began.clear()
    handle = client.submit(gated, None)
    seen: list[tuple[JobState, datetime | None]] = []
    watching = threading.Thread(
        target=lambda: seen.extend(
            (j.state, j.started_at) for j in client.wait_job(handle.id, timeout=30)
        )
    )
    watching.start()
    try:
        wait_for(lambda: seen, what="the waiter to see the job pending")
        with serving(broker, concurrency=2):
            wait_for(lambda: began, what="the handler to start")
            wait_for(lambda: handle.status() is JobState.RUNNING, what="the job to run")
            gate.set()
            assert handle.result(timeout=10) == "through"
    finally:
        gate.set()
        watching.join(15)
    assert [state for state, _ in seen] == ["pending", "leased", "running", "succeeded"]
    assert seen[1][1] is None  # leased: not started
    job = client.get_job(handle.id)
    [attempt] = job.history
    assert job.started_at is not None and job.started_at == attempt.started_at == seen[2][1]
    # Its Start went out START_DELAY after the handler began.
    [handler_began] = began
    assert handler_began - timedelta(milliseconds=5) <= job.started_at
    assert job.started_at - handler_began < timedelta(seconds=0.5)
    assert sent.count("start") == 1


@pytest.mark.timeout(60)
def test_a_fast_job_sends_no_start_and_says_how_long_it_ran(
    client: Client, broker: BrokerThread, sent: list[str]
) -> None:
    with serving(broker, concurrency=4):
        handles = [client.submit(noop, n) for n in range(20)]
        assert [h.result(timeout=10) for h in handles] == list(range(20))
    assert "start" not in sent
    for handle in handles:
        job = client.get_job(handle.id)
        [attempt] = job.history
        assert job.started_at is not None and job.finished_at is not None
        assert job.started_at <= job.finished_at
        assert attempt.started_at == job.started_at


@pytest.mark.timeout(60)
def test_a_sync_handler_that_ignores_its_cancel_does_not_hold_up_the_next_job(
    client: Client, broker: BrokerThread, caplog: pytest.LogCaptureFixture
) -> None:
    release.clear()
    caplog.set_level(logging.WARNING, logger="jobbroker.worker")
    try:
        with serving(broker, concurrency=1) as worker:
            stuck = client.submit(stubborn, None)
            wait_for(lambda: stuck.status() is JobState.RUNNING, what="the stubborn job to run")
            client.cancel(stuck.id)
            with pytest.raises(JobCancelledError):
                stuck.result(timeout=10)
            started = time.monotonic()
            assert client.submit(noop, 5).result(timeout=10) == 5
            assert time.monotonic() - started < 5  # not after the stubborn handler's 30 s
            wait_for(lambda: not worker._running, what="the worker to hold nothing")
    finally:
        release.set()
    [attempt] = client.get_job(stuck.id).history
    assert attempt.error is not None
    assert "the handler's thread could not be stopped; it was abandoned" in attempt.error.message
    assert "could not be stopped" in caplog.text


@pytest.mark.timeout(30)
def test_past_the_bound_a_given_up_thread_is_not_replaced_until_one_returns() -> None:
    async def scenario() -> None:
        threads = HandlerThreads(1, asyncio.get_running_loop(), max_abandoned=1)
        entered = [threading.Event(), threading.Event()]
        leave = threading.Event()

        def hang(n: int) -> int:
            entered[n].set()
            leave.wait(20)
            return n

        try:
            first = threads.run(hang, 0)
            await asyncio.to_thread(entered[0].wait, 10)
            assert threads.give_up(first, "job one")  # abandoned, and replaced
            second = threads.run(hang, 1)
            await asyncio.to_thread(entered[1].wait, 10)  # on the new thread
            assert threads.give_up(second, "job two")  # abandoned, past the bound
            assert threads.abandoned == 2
            third = threads.run(lambda: "third")
            await asyncio.sleep(0.05)
            assert not third.done()  # no thread serves now
            leave.set()
            assert await asyncio.wait_for(third, 10) == "third"  # one came back
            assert not threads.give_up(third, "done")
        finally:
            leave.set()
            threads.shutdown()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_start_on_a_raw_lease_moves_the_job_to_running(client: Client) -> None:
    handle = client.submit("raw.job", 1, queue="raw")
    unstarted = client.submit("raw.job", 2, queue="raw")
    with client.lease_stream(["raw"], prefetch=1) as stream:
        leases = iter(stream)
        lease = next(leases)
        assert client.get_job(handle.id).state is JobState.LEASED
        lease.start()
        job = client.get_job(handle.id)
        assert job.state is JobState.RUNNING and job.started_at is not None
        lease.complete("ran")
        with pytest.raises(LeaseLostError):
            lease.start()
        # Never started: its completion says it ran since it was received.
        other = next(leases)
        assert other.job.id == unstarted.id
        other.complete("ran too")
    assert handle.result(timeout=5) == "ran"
    assert unstarted.result(timeout=5) == "ran too"
    job = client.get_job(unstarted.id)
    assert job.started_at is not None and job.finished_at is not None
    assert job.started_at <= job.finished_at


@pytest.mark.timeout(60)
def test_start_on_an_async_raw_lease_moves_the_job_to_running(broker: BrokerThread) -> None:
    async def scenario() -> Any:
        async with AsyncClient(broker.target, timeout=10) as client:
            handle = await client.submit("raw.job", None, queue="raw-async")
            async with (
                asyncio.timeout(20),
                client.lease_stream(["raw-async"], prefetch=1) as stream,
            ):
                lease = await anext(stream)
                assert (await client.get_job(handle.id)).state is JobState.LEASED
                await lease.start()
                assert (await client.get_job(handle.id)).state is JobState.RUNNING
                await lease.complete("ran")
            return await handle.result(timeout=5)

    assert asyncio.run(scenario()) == "ran"


@pytest.mark.timeout(60)
def test_a_stream_that_reports_no_starts_has_its_jobs_timed_out_from_the_lease(
    client: Client,
) -> None:
    """A worker that never sends Start (an older SDK, another language, a raw
    stream) cannot hold a hung job for ever: its timeout counts from the lease."""
    one_try = {"queue": "unstarted", "timeout": timedelta(seconds=1), "max_attempts": 1}
    hung = client.submit("raw.job", 1, **one_try)
    told = client.submit("raw.job", 2, **one_try)
    with client.lease_stream(["unstarted"], prefetch=1) as stream:
        next(iter(stream))  # leased, never started, heartbeated by nobody but the lease
        job = wait_for(
            lambda: j if (j := client.get_job(hung.id)).state is not JobState.LEASED else None,
            timeout=20,
            what="the hung job to time out",
        )
    assert job.state is JobState.DEAD and job.history[0].outcome.value == "timed_out"
    # A stream that says it reports starts: no deadline until the start.
    with client.lease_stream(["unstarted"], prefetch=1, reports_starts=True) as stream:
        lease = next(iter(stream))
        assert lease.job.id == told.id
        assert client.explain(told.id).deadline is None
        lease.start()
        running = client.explain(told.id)
        assert running.reason == "running" and running.deadline is not None
        lease.complete("ran")
    assert told.result(timeout=5) == "ran"
