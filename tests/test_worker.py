"""The Worker runs registered handlers against a real broker."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import jobbroker._window as window_module
from jobbroker import Client, JobCancelledError, JobFailedError, JobState, Worker
from jobbroker._window import Window
from jobbroker_server.testing import BrokerThread
from tests import sample_tasks as t
from tests.processes import BROKER, Process
from tests.waiting import wait_for

TASKS = [t.add, t.shout, t.flaky, t.bad_input, t.later, t.sleepy, t.patient, t.touch, t.exhausted]


def _run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=lambda: asyncio.run(worker.run_async()), daemon=True)
    thread.start()
    return thread


@pytest.fixture
def worker(broker: BrokerThread) -> Iterator[Worker]:
    running = Worker(TASKS, target=broker.target, concurrency=4)
    thread = _run_in_thread(running)
    yield running
    running.stop()
    thread.join(15)
    assert not thread.is_alive()


def test_sync_and_async_handlers_with_typed_results(client: Client, worker: Worker) -> None:
    total = client.submit(t.add, [1, 2, 3])
    loud = client.submit(t.shout, "hi")
    assert total.result(timeout=10) == 6
    assert loud.result(timeout=10) == "HI"


def test_raising_retries_until_success(client: Client, worker: Worker) -> None:
    handle = client.submit(t.flaky, None)
    assert handle.result(timeout=10) == 2
    history = client.get_job(handle.id).history
    assert [a.outcome.value for a in history if a.outcome] == ["failed", "succeeded"]
    first = history[0].error
    assert first is not None and first.type.endswith("ConnectionError")
    assert "upstream reset" in first.message and "Traceback" in first.traceback


def test_permanent_error_goes_straight_to_the_dlq(client: Client, worker: Worker) -> None:
    handle = client.submit(t.bad_input, None)
    with pytest.raises(JobFailedError, match="malformed record"):
        handle.result(timeout=10)
    assert client.get_job(handle.id).attempts == 1


def test_stop_iteration_fails_its_job_and_no_other(client: Client, worker: Worker) -> None:
    """A sync handler's StopIteration fails its own job; the outcomes that
    finished beside it still arrive."""
    empty = client.submit(t.exhausted, [])
    others = [client.submit(t.add, [n, 1]) for n in range(8)]
    with pytest.raises(JobFailedError, match="StopIteration"):
        empty.result(timeout=10)
    assert [h.result(timeout=10) for h in others] == [n + 1 for n in range(8)]
    [attempt] = client.get_job(empty.id).history
    assert attempt.error is not None and attempt.error.type.endswith("RuntimeError")


def test_retry_after_waits_the_given_delay(client: Client, worker: Worker) -> None:
    handle = client.submit(t.later, None)
    assert handle.result(timeout=10) == "done"
    first, second = client.get_job(handle.id).history
    assert first.finished_at is not None and second.started_at is not None
    assert second.started_at - first.finished_at >= timedelta(seconds=0.3)


def test_unknown_task_is_reported_not_swallowed(client: Client, worker: Worker) -> None:
    handle = client.submit("no.such.task", None, queue="sample")
    with pytest.raises(JobFailedError) as caught:
        handle.result(timeout=10)
    error = client.get_job(handle.id).last_error
    assert error is not None and error.type == "UnknownTask"
    assert "no.such.task" in error.message and caught.value is not None


@pytest.mark.parametrize("which", ["async", "sync"])
def test_cancel_running_job_interrupts_the_handler(
    client: Client, worker: Worker, which: str
) -> None:
    task = t.sleepy if which == "async" else t.patient
    handle = client.submit(task, 30.0)
    wait_for(lambda: handle.status() is JobState.RUNNING, what="the job to start")
    client.cancel(handle.id)
    with pytest.raises(JobCancelledError):
        handle.result(timeout=10)
    job = client.get_job(handle.id)
    assert job.state is JobState.CANCELLED and job.attempts == 1


def test_a_finished_job_leaves_no_reference_cycle(client: Client, worker: Worker) -> None:
    """A finished job's objects are freed by reference counting. A cycle per
    job (a lease whose cancel hook held its own _Running did) leaves them to
    the cyclic collector, whose passes then cost the worker per job."""
    assert client.submit(t.add, [0]).result(timeout=10) == 0
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        handles = [client.submit(t.add, [n]) for n in range(20)]
        assert [h.result(timeout=10) for h in handles] == list(range(20))
        wait_for(lambda: not worker._running)
        gc.collect()
        kinds = {f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not kinds & {"jobbroker.lease.AsyncLease", "jobbroker.worker._Running"}


def test_broker_worker_command_runs_a_module_and_stops_on_sigterm(
    broker: BrokerThread, client: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    proc = Process([*BROKER, "worker", "tests.sample_tasks", "--target", broker.target])
    try:
        handle = client.submit(t.touch, str(marker))
        wait_for(marker.exists, timeout=20, what="the worker to run the job")
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.output
        # It finished the job it held before exiting.
        assert handle.result(timeout=5) == "touched"
        assert time.monotonic() - started < 20
    finally:
        proc.kill()


def test_the_window_grows_while_jobs_are_short_and_shrinks_when_they_are_long() -> None:
    window = Window(concurrency=2)
    assert (window.floor, window.size, window.cap) == (8, 8, 16)
    # 8 jobs of 10 ms keep two slots busy 0.04 s; twice as many, 0.08 s: doubled.
    sizes = [window.finished(0.010) for _ in range(8 + 16 + 16)]
    assert [s for s in sizes if s is not None] == [16]  # a look per window's worth
    # 16 of 20 ms, 0.16 s: under twice HOLD_SECONDS, kept.
    assert {window.finished(0.020) for _ in range(16)} == {None}
    # Of 40 ms, 0.32 s: halved to the floor, and no lower.
    assert [s for s in (window.finished(0.040) for _ in range(16 + 8 + 8)) if s] == [8]
    # Of 20 ms from the floor: twice the window would hold 0.16 s, so no growth.
    assert {window.finished(0.020) for _ in range(24)} == {None}


def test_a_fixed_prefetch_never_changes() -> None:
    window = Window(concurrency=2, fixed=6)
    assert {window.finished(0.0001) for _ in range(100)} | {window.size} == {None, 6}


def test_a_worker_with_short_jobs_holds_more_of_them(client: Client, broker: BrokerThread) -> None:
    """Two slots: the window starts at 8 leased jobs and grows to 16 once short
    jobs have run; with both slots busy, the worker holds up to 16."""
    worker = Worker([t.add, t.sleepy], target=broker.target, concurrency=2)
    thread = _run_in_thread(worker)
    slow = []
    try:
        quick = [client.submit(t.add, [n]) for n in range(100)]
        assert [h.result(timeout=10) for h in quick] == list(range(100))
        slow = [client.submit(t.sleepy, 30.0) for _ in range(2)]
        waiting = [client.submit(t.add, [n]) for n in range(60)]

        def leased() -> int:
            held = [JobState.LEASED, JobState.RUNNING]
            return len(client.list_jobs(queue="sample", states=held).jobs)

        # The broker fills a window a quarter at a time: 12 to 16 leased, where
        # the first window would have held 8.
        held = wait_for(lambda: n if (n := leased()) >= 12 else 0, what="12 jobs leased")
        assert held <= 16
        while slow:
            client.cancel(slow.pop().id)
        assert [h.result(timeout=10) for h in waiting] == list(range(60))
    finally:
        while slow:
            client.cancel(slow.pop().id)
        worker.stop()
        thread.join(15)
    assert not thread.is_alive()


def _windows(broker: BrokerThread) -> list[int]:
    """Each open stream's window as the broker holds it (no public view)."""
    return [session.prefetch for session in broker.app._dispatcher._sessions]


def test_a_stopping_worker_does_not_reopen_its_window(
    client: Client, broker: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping closes the window (0); a job that finishes after that would
    otherwise grow it again: every job counts as short here."""
    monkeypatch.setattr(window_module, "HOLD_SECONDS", 10.0)
    t.entered.clear()
    t.gate.clear()
    worker = Worker([t.add, t.gated], target=broker.target, concurrency=1)
    thread = _run_in_thread(worker)
    try:
        assert [client.submit(t.add, [n]).result(timeout=10) for n in range(3)] == [0, 1, 2]
        gated = client.submit(t.gated, None)
        assert t.entered.wait(10)
        worker.stop()
        wait_for(lambda: _windows(broker) == [0], what="the window closed")
        more = [client.submit(t.add, [n]) for n in range(20)]
        t.gate.set()  # the fourth job ends: the look that would double the window
        assert gated.result(timeout=10) == "through"
        thread.join(15)
        assert not thread.is_alive()
        assert {client.get_job(h.id).attempts for h in more} == {0}
    finally:
        t.gate.set()
        worker.stop()
        thread.join(15)


def test_a_window_resized_while_a_stream_opens_reaches_the_broker(
    broker: BrokerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs held across a reconnect go on finishing while the new stream
    opens, before the worker has it to send a resize on."""
    opened = Worker._announce_stream

    async def announce(self: Worker) -> None:
        for _ in range(self._window.size):  # a window's worth of short jobs end now
            self._resize(0.0)
        await opened(self)

    monkeypatch.setattr(Worker, "_announce_stream", announce)
    worker = Worker([t.add], target=broker.target, concurrency=1)
    thread = _run_in_thread(worker)
    try:
        wait_for(lambda: _windows(broker) == [8], what="the grown window at the broker")
    finally:
        worker.stop()
        thread.join(15)
    assert not thread.is_alive()
