"""Unique jobs while active, an idempotency key sent with another job, and a
task's retry_on, through the SDK on a real broker and worker (both backends)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta

import pytest

from jobbroker import (
    AsyncClient,
    AsyncJobHandle,
    Client,
    JobFailedError,
    JobRequest,
    JobState,
    PermanentError,
    RetryAfter,
    Worker,
    chain,
    current_job,
    task,
)
from jobbroker.errors import FailedPreconditionError, InvalidArgumentError
from jobbroker_server.testing import BrokerThread
from tests.conftest import FAST
from tests.listing import all_jobs
from tests.processes import BROKER
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

SUBMITTERS = 32
LATER = timedelta(hours=1)  # a job scheduled this far ahead holds its key meanwhile
GATE = threading.Event()


@task(queue="unique", max_attempts=1)
def gated(n: int) -> int:
    """Runs until the test opens the gate."""
    GATE.wait(30)
    return n


@task(queue="unique", max_attempts=1)
def doomed(n: int) -> int:
    raise PermanentError(f"cannot take {n}")


@task(queue="retry-on", max_attempts=3, retry_on=(ConnectionError, TimeoutError))
def picky(kind: str) -> int:
    """Fails its first attempt with the kind of error it is given."""
    attempt = current_job().attempt
    if kind == "value":
        raise ValueError(f"bad value on attempt {attempt}")
    if attempt == 1 and kind == "connection":
        raise ConnectionError("upstream reset")
    if attempt == 1 and kind == "later":
        raise RetryAfter(0.05)
    return attempt


@pytest.fixture
def worker(broker: BrokerThread) -> Iterator[Worker]:
    GATE.clear()
    running = Worker([gated, doomed, picky], target=broker.target, concurrency=4)
    thread = threading.Thread(target=lambda: asyncio.run(running.run_async()), daemon=True)
    thread.start()
    yield running
    GATE.set()
    running.stop()
    thread.join(15)
    assert not thread.is_alive()


def test_concurrent_submits_of_one_unique_key_make_one_job(
    broker: BrokerThread, client: Client
) -> None:
    """32 threads, half on a client of their own, half sharing one: one job,
    every other submit answered with its id as a duplicate."""
    start = threading.Barrier(SUBMITTERS)

    def submit(n: int) -> tuple[str, bool]:
        with Client(broker.target, timeout=10) as own:
            start.wait(timeout=10)
            by = own if n % 2 else client
            handle = by.submit("t", {"n": n}, queue="race", unique_key="only-one")
            return handle.id, handle.duplicate

    with ThreadPoolExecutor(SUBMITTERS) as pool:
        answers = list(pool.map(submit, range(SUBMITTERS)))
    [job_id] = {job_id for job_id, _ in answers}
    assert sorted(duplicate for _, duplicate in answers) == [False] + [True] * (SUBMITTERS - 1)
    assert list(all_jobs(client, "race")) == [job_id]
    client.cancel(job_id)  # finished: the key is free
    after = client.submit("t", None, queue="race", unique_key="only-one")
    assert not after.duplicate and after.id != job_id
    assert len(all_jobs(client, "race")) == 2


@pytest.mark.postgres
def test_replicas_racing_on_one_unique_key_make_one_job(postgres_schema: str) -> None:
    """Two brokers on one PostgreSQL, 32 submitters spread over them, each on a
    client of its own: their transactions race on the partial unique index."""
    settings = replace(FAST, database=postgres_schema)
    with BrokerThread(settings) as one, BrokerThread(settings) as other:
        start = threading.Barrier(SUBMITTERS)

        def submit(n: int) -> tuple[str, bool]:
            with Client((one, other)[n % 2].target, timeout=10) as own:
                start.wait(timeout=10)
                handle = own.submit("t", {"n": n}, queue="replicas", unique_key="across")
                return handle.id, handle.duplicate

        with ThreadPoolExecutor(SUBMITTERS) as pool:
            answers = list(pool.map(submit, range(SUBMITTERS)))
        [job_id] = {job_id for job_id, _ in answers}
        assert sorted(dup for _, dup in answers) == [False] + [True] * (SUBMITTERS - 1)
        with Client(one.target, timeout=10) as client, Client(other.target) as second:
            assert list(all_jobs(client, "replicas")) == [job_id]
            client.cancel(job_id)
            after = second.submit("t", None, queue="replicas", unique_key="across")
            assert not after.duplicate and after.id != job_id


def test_a_unique_job_is_returned_until_it_finishes(client: Client, worker: Worker) -> None:
    running = client.submit(gated, 1, unique_key="g")
    wait_for(lambda: running.status() is JobState.RUNNING, what="the job to start")
    again = client.submit(gated, 2, unique_key="g")
    batch = client.submit_many([JobRequest(gated, 3, unique_key="g"), JobRequest(gated, 4)])
    assert (again.id, again.duplicate) == (running.id, True)
    assert (batch[0].id, batch[0].duplicate, batch[1].duplicate) == (running.id, True, False)
    assert client.get_job(running.id).unique_key == "g"
    GATE.set()
    assert running.result(timeout=10) == 1
    after = client.submit(gated, 5, unique_key="g")
    assert not after.duplicate and after.result(timeout=10) == 5
    dead = client.submit(doomed, 1, unique_key="d")
    with pytest.raises(JobFailedError):
        dead.result(timeout=10)
    assert not client.submit(doomed, 2, unique_key="d", delay=LATER).duplicate


def test_a_replay_is_refused_while_another_job_holds_the_key(
    client: Client, worker: Worker
) -> None:
    dead = client.submit(doomed, 1, unique_key="r")
    with pytest.raises(JobFailedError):
        dead.result(timeout=10)
    holder = client.submit(doomed, 2, unique_key="r", delay=LATER)
    assert not holder.duplicate
    expected = (
        f"job {dead.id} cannot be replayed: its unique key 'r' is held by job {holder.id}, "
        "which has not finished"
    )
    with pytest.raises(FailedPreconditionError, match=re.escape(expected)) as refused:
        client.dlq_replay([dead.id])
    assert refused.value.reason == "UNIQUE_KEY_TAKEN"
    assert client.get_job(dead.id).state is JobState.DEAD
    client.cancel(holder.id)
    assert client.dlq_replay([dead.id]) == [dead.id]
    with pytest.raises(JobFailedError):
        dead.result(timeout=10)  # replayed, it failed again


def test_a_replay_that_would_resume_a_child_whose_key_is_taken_is_refused(
    client: Client, worker: Worker
) -> None:
    flow = client.submit(chain(doomed.s(1), gated.s(unique_key="child")))
    parent, child = flow.job_ids
    with pytest.raises(JobFailedError):
        flow.result(timeout=10)
    wait_for(lambda: client.get_job(child).state is JobState.CANCELLED, what="the child cancelled")
    holder = client.submit(gated, 9, unique_key="child", delay=LATER)
    assert not holder.duplicate
    expected = (
        f"job {child} cannot be resumed by this replay: its unique key 'child' is held by "
        f"job {holder.id}"
    )
    with pytest.raises(FailedPreconditionError, match=re.escape(expected)):
        client.dlq_replay([parent])
    assert client.get_job(parent).state is JobState.DEAD
    assert client.get_job(child).state is JobState.CANCELLED


def test_a_workflow_with_one_step_whose_key_is_held_is_refused_whole(client: Client) -> None:
    holder = client.submit(gated, 1, unique_key="step", delay=LATER)
    with pytest.raises(FailedPreconditionError, match="unique keys of unfinished ones"):
        client.submit(chain(gated.s(2, unique_key="step"), gated.s()))
    assert list(all_jobs(client, "unique")) == [holder.id]


def test_an_idempotency_key_sent_with_another_job_is_refused(client: Client) -> None:
    first = client.submit("t", {"a": 1, "b": 2}, queue="idem", idempotency_key="k")
    same = client.submit("t", {"b": 2, "a": 1}, queue="idem", idempotency_key="k")
    assert (same.id, same.duplicate) == (first.id, True)
    [listed] = client.submit_many([JobRequest("t", {"a": 1, "b": 2}, "idem", idempotency_key="k")])
    assert (listed.id, listed.duplicate) == (first.id, True)
    reused = f"idempotency key 'k' was used for job {first.id} with a different"
    with pytest.raises(
        FailedPreconditionError, match=re.escape(f"{reused} payload; use a new key")
    ):
        client.submit("t", {"a": 2}, queue="idem", idempotency_key="k")
    with pytest.raises(FailedPreconditionError, match=re.escape(f"{reused} task ('t')")) as refused:
        client.submit("t2", {"a": 1, "b": 2}, queue="idem", idempotency_key="k")
    assert refused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    with pytest.raises(FailedPreconditionError, match=re.escape(f"{reused} queue ('idem')")):
        client.submit_many([JobRequest("t", {"a": 1, "b": 2}, "other", idempotency_key="k")])
    assert list(all_jobs(client, "idem")) == [first.id] and not all_jobs(client, "other")


def test_a_reused_key_refuses_its_own_submit_and_no_other_sent_with_it(
    broker: BrokerThread, client: Client
) -> None:
    """Submits made together travel in one message of a client's stream; the
    store refusing one of them refuses it alone."""
    first = client.submit("t", 1, queue="together", idempotency_key="k")

    async def run() -> list[object]:
        async with AsyncClient(broker.target, timeout=10) as shared:
            sends = [shared.submit("t", n, queue="together") for n in range(2, 9)]
            sends.insert(3, shared.submit("t", 0, queue="together", idempotency_key="k"))
            return await asyncio.gather(*sends, return_exceptions=True)

    done = asyncio.run(run())
    refused = done.pop(3)
    assert isinstance(refused, FailedPreconditionError)
    assert f"was used for job {first.id} with a different payload" in str(refused)
    stored = {job.json() for job in all_jobs(client, "together").values()}
    assert stored == set(range(1, 9)) and all(isinstance(d, AsyncJobHandle) for d in done)


def test_broker_submit_takes_a_unique_key(broker: BrokerThread, client: Client) -> None:
    def submit() -> list[str]:
        argv = [*BROKER, "submit", "--target", broker.target, "t", "--queue", "cli"]
        done = subprocess.run(
            [*argv, "--unique-key", "nightly"], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    [made] = submit()
    assert submit() == [made, "(duplicate", "of", "an", "existing", "job)"]
    assert client.get_job(made).unique_key == "nightly"


def test_a_unique_key_is_checked_like_an_idempotency_key(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="unique_key"):
        client.submit("t", None, unique_key="k" * 201)


def test_retry_on_retries_the_exceptions_it_names_and_fails_the_others_at_once(
    client: Client, worker: Worker
) -> None:
    connection = client.submit(picky, "connection")
    later = client.submit(picky, "later")  # RetryAfter retries whatever retry_on says
    value = client.submit(picky, "value")
    assert connection.result(timeout=10) == 2 and later.result(timeout=10) == 2
    with pytest.raises(JobFailedError, match="bad value on attempt 1"):
        value.result(timeout=10)
    failed = client.get_job(value.id)
    assert (failed.state, failed.attempts) == (JobState.DEAD, 1)
    assert failed.last_error is not None and failed.last_error.type == "ValueError"
    assert failed.last_error.message == "bad value on attempt 1"
    retried = client.get_job(connection.id).history[0].error
    assert retried is not None and retried.type == "ConnectionError"


@pytest.mark.parametrize(
    "retry_on", [ValueError, [ValueError], (ValueError, "TimeoutError"), (ValueError(),)]
)
def test_retry_on_must_be_a_tuple_of_exception_classes(retry_on: object) -> None:
    with pytest.raises(TypeError, match=r"retry_on must be a tuple of exception classes"):
        task(retry_on=retry_on)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"retry_on must be a tuple of exception classes"):
        Worker([]).task(retry_on=retry_on)  # type: ignore[arg-type]
