"""Submits from many threads or tasks share one stream per client, several to a
message: each caller still gets its own job, and one refused job refuses no other."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import pytest

from jobbroker import AsyncClient, Client
from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.listing import all_jobs

THREADS = 16
EACH = 40


def test_threads_sharing_a_client_each_get_their_own_job(client: Client) -> None:
    start = threading.Barrier(THREADS)

    def submit_all(thread: int) -> list[tuple[str, dict[str, int]]]:
        start.wait(timeout=10)
        made = []
        for n in range(EACH):
            payload = {"thread": thread, "n": n}
            made.append((client.submit("t", payload, queue="shared").id, payload))
        return made

    with ThreadPoolExecutor(THREADS) as pool:
        made = [pair for pairs in pool.map(submit_all, range(THREADS)) for pair in pairs]
    stored = {job_id: job.json() for job_id, job in all_jobs(client, "shared").items()}
    assert len(stored) == THREADS * EACH
    assert stored == dict(made)  # every caller's id is the job it sent


def test_tasks_sharing_an_async_client_each_get_their_own_job(
    broker: BrokerThread, client: Client
) -> None:
    """Some callers stop waiting while their submits are queued, others while
    they are sent; the rest still get their own results, and so do later ones."""
    calls = 16 * THREADS

    async def run() -> tuple[list[tuple[str, dict[str, int]]], int]:
        async with AsyncClient(broker.target, timeout=10) as shared:

            async def submit(n: int) -> tuple[str, dict[str, int]]:
                payload = {"n": n}
                return (await shared.submit("t", payload, queue="tasks")).id, payload

            tasks = [asyncio.create_task(submit(n)) for n in range(calls)]
            await asyncio.sleep(0)  # each has queued its submit; none is sent
            for task in tasks[::8]:
                task.cancel()
            for _ in range(3):
                await asyncio.sleep(0)
            for task in tasks[4::8]:
                task.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            made = [d for d in done if isinstance(d, tuple)]
            made += [await submit(n) for n in range(calls, calls + 3)]
            return made, sum(isinstance(d, asyncio.CancelledError) for d in done)

    made, cancelled = asyncio.run(run())
    assert cancelled >= calls // 8
    assert len(made) == calls - cancelled + 3
    stored = {job_id: job.json() for job_id, job in all_jobs(client, "tasks").items()}
    assert dict(made).items() <= stored.items()  # a cancelled caller's job may be stored


@pytest.fixture
def small(settings: Settings) -> Iterator[BrokerThread]:
    with BrokerThread(replace(settings, max_payload_bytes=1000, max_batch=4)) as running:
        yield running


def test_one_message_answers_each_job_on_its_own(small: BrokerThread) -> None:
    def spec(task: str, **fields: Any) -> job_pb2.JobSpec:
        return job_pb2.JobSpec(queue="q", task=task, **fields)

    messages = [
        [
            spec("a"),
            job_pb2.JobSpec(queue="", task="no-queue"),
            spec("big", payload=job_pb2.Payload(data=b"x" * 1001)),
            spec("b", idempotency_key="k"),
        ],
        [spec("b", idempotency_key="k")],  # the same job again
        [],
        [spec("over")] * 5,
        [spec("c")],
    ]
    with grpc.insecure_channel(small.target) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        requests = (broker_pb2.SubmitBatchRequest(jobs=jobs) for jobs in messages)
        answers = [list(a.results) for a in stub.SubmitGrouped(requests, timeout=10)]
    assert [len(a) for a in answers] == [4, 1, 0, 5, 1]
    first, (again,), _, over, (last,) = answers
    assert [r.HasField("error") for r in first] == [False, True, True, False]
    assert first[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert first[1].error.message == "queue must not be empty"
    assert first[2].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert again.duplicate and again.job_id == first[3].job_id
    assert {r.error.code for r in over} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert over[0].error.message == "a message holds at most 4 jobs (got 5)"
    assert not last.HasField("error")
    with Client(small.target) as client:
        stored = {job.id: job.task for job in client.list_jobs(queue="q").jobs}
    assert stored == {first[0].job_id: "a", first[3].job_id: "b", last.job_id: "c"}


def test_closing_an_async_client_ends_its_submits_at_once(broker: BrokerThread) -> None:
    """Submits queued or in flight when the client closes fail at once with a
    clear error instead of waiting out their timeout, and so do later ones."""

    async def run() -> tuple[list[Any], BaseException | None]:
        shared = AsyncClient(broker.target, timeout=30)
        await shared.submit("t", None, queue="closing")
        tasks = [asyncio.create_task(shared.submit("t", n, queue="closing")) for n in range(200)]
        for _ in range(3):
            await asyncio.sleep(0)  # some are sent, some still queued
        await shared.close()
        async with asyncio.timeout(5):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await shared.submit("t", None, queue="closing")
        except Exception as error:
            return outcomes, error
        return outcomes, None

    outcomes, after = asyncio.run(run())
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert failed, "every submit finished before the close"
    assert {str(error) for error in failed} == {"the client was closed"}
    assert str(after) == "the client was closed"
