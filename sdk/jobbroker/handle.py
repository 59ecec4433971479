"""Handles on submitted jobs: status, outcome, story and cancel, typed by the task's result."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from ._convert import decode_payload
from .errors import BrokerUnavailableError, JobCancelledError, JobFailedError
from .types import Explanation, Job, JobEvent, JobState

if TYPE_CHECKING:
    from .client import AsyncClient, Client

R = TypeVar("R")


def outcome(job: Job) -> Any:
    """The decoded result of a terminal job, or the error its end stands for."""
    if job.state is JobState.SUCCEEDED:
        if job.result is None:
            return None
        return decode_payload(job.result, job.result_content_type)
    if job.state is JobState.DEAD:
        raise JobFailedError(job)
    if job.state is JobState.CANCELLED:
        raise JobCancelledError(job)
    raise ValueError(f"job {job.id} is {job.state}, not finished")


def _ended_early(job_id: str) -> BrokerUnavailableError:
    return BrokerUnavailableError(f"the wait for job {job_id} ended before the job did")


class JobHandle(Generic[R]):
    def __init__(self, client: Client, job_id: str, duplicate: bool = False) -> None:
        self._client = client
        self.id = job_id
        self.duplicate = duplicate
        """True when the idempotency key matched an existing job, or the unique
        key an unfinished one: `id` is that job's."""

    def status(self) -> JobState:
        return self._client.get_job(self.id).state

    def job(self) -> Job:
        return self._client.get_job(self.id)

    def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait until the job ends and return its result.

        Raises JobFailedError (dead), JobCancelledError, or DeadlineExceededError
        (a TimeoutError) when `timeout` passes first.
        """
        for job in self._client.wait_job(self.id, timeout=timeout):
            if job.state.terminal:
                return cast(R, outcome(job))
        raise _ended_early(self.id)

    def events(self, after: int = 0) -> list[JobEvent]:
        """The job's story so far (see Client.job_events)."""
        return self._client.job_events(self.id, after)

    def watch(self, after: int = 0) -> Iterator[JobEvent]:
        """The job's events, live, until it is terminal (see Client.watch)."""
        return self._client.watch(self.id, after)

    def explain(self) -> Explanation:
        """Why the job is where it is (see Client.explain)."""
        return self._client.explain(self.id)

    def cancel(self) -> Job:
        return self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"


class AsyncJobHandle(Generic[R]):
    def __init__(self, client: AsyncClient, job_id: str, duplicate: bool = False) -> None:
        self._client = client
        self.id = job_id
        self.duplicate = duplicate
        """True when the idempotency key matched an existing job, or the unique
        key an unfinished one: `id` is that job's."""

    async def status(self) -> JobState:
        return (await self._client.get_job(self.id)).state

    async def job(self) -> Job:
        return await self._client.get_job(self.id)

    async def result(
        self,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 - same API as JobHandle
    ) -> R:
        """Wait until the job ends and return its result (see JobHandle.result)."""
        async for job in self._client.wait_job(self.id, timeout=timeout):
            if job.state.terminal:
                return cast(R, outcome(job))
        raise _ended_early(self.id)

    async def events(self, after: int = 0) -> list[JobEvent]:
        """The job's story so far (see AsyncClient.job_events)."""
        return await self._client.job_events(self.id, after)

    def watch(self, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events, live, until it is terminal (see AsyncClient.watch)."""
        return self._client.watch(self.id, after)

    async def explain(self) -> Explanation:
        """Why the job is where it is (see AsyncClient.explain)."""
        return await self._client.explain(self.id)

    async def cancel(self) -> Job:
        return await self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"<AsyncJobHandle {self.id}>"
