"""Submitted workflows: the request a flow becomes, and handles on its jobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from . import _calls
from ._convert import set_payload
from ._uuid7 import uuid7
from .canvas import Flow, Shape, compile_flow, leaves
from .errors import JobCancelledError, JobFailedError
from .handle import outcome
from .types import Job, JobRequest, JobState
from .v1 import broker_pb2

if TYPE_CHECKING:
    from .client import AsyncClient, Client

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class WorkflowStep:
    """One job of a workflow, in the order it was submitted."""

    job_id: str
    task: str
    state: JobState


def workflow_request(flow: Flow[Any, Any]) -> tuple[broker_pb2.SubmitWorkflowRequest, Shape]:
    """The SubmitWorkflow request for `flow`, and where its result comes from
    (indices of its jobs). Each job gets an idempotency key of its own, so a
    retried submit stores the workflow once."""
    steps, out = compile_flow(flow)
    request = broker_pb2.SubmitWorkflowRequest(workflow_id=uuid7())
    for step in steps:
        sig = step.signature
        # A task's key function is given the step's own payload, whatever the
        # step's input is made of.
        spec = _calls.build_spec(
            JobRequest(sig.task, sig.payload, **sig.options), request.jobs.add()
        )
        if sig.takes == "piped" and not step.parents:  # a first step that expects a result
            set_payload(spec.payload, {"result": None, "payload": sig.payload})
        if step.parents:
            spec.needs.parents.extend(step.parents)
            spec.needs.input = step.shape
            spec.needs.with_payload = sig.takes == "piped"
            spec.needs.tolerate_failures = step.tolerant
    return request, out


def _cause(cancelled: Job, dead: Sequence[Job]) -> JobFailedError | JobCancelledError:
    """What a cancelled last step raises: the error of the step whose failure
    cancelled it, or (nothing dead) the cancel itself."""
    return JobFailedError(dead[0]) if dead else JobCancelledError(cancelled)


def _assemble(shape: Shape, results: dict[int, Any]) -> Any:
    if isinstance(shape, int):
        return results[shape]
    return [_assemble(item, results) for item in shape]


def _steps(jobs: Sequence[Job], order: dict[str, int]) -> list[WorkflowStep]:
    ranked = sorted(jobs, key=lambda j: order.get(j.id, len(order)))
    return [WorkflowStep(j.id, j.task, j.state) for j in ranked]


class WorkflowHandle(Generic[R]):
    """A submitted workflow: its id, its jobs (in the order submitted), and
    the jobs its result comes from."""

    def __init__(self, client: Client, workflow_id: str, job_ids: list[str], out: Shape) -> None:
        self._client = client
        self.id = workflow_id
        self.job_ids = job_ids
        self._out = out

    def status(self) -> list[WorkflowStep]:
        """Each job of the workflow with its state, in the order submitted."""
        jobs: list[Job] = []
        token: str | None = None
        while True:
            page = self._client.list_jobs(workflow_id=self.id, page_size=1000, page_token=token)
            jobs += page.jobs
            if not (token := page.next_page_token):
                break
        return _steps(jobs, {job_id: i for i, job_id in enumerate(self.job_ids)})

    def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the workflow's last step (or steps: a group's list) and
        return its result. A step that ended dead raises its JobFailedError,
        also when the broker cancelled the rest because of it; a cancelled
        workflow raises JobCancelledError. DeadlineExceededError when
        `timeout` passes first."""
        deadline = _calls.deadline_after(timeout)
        results: dict[int, Any] = {}
        for index in leaves(self._out):
            job = None
            for job in self._client.wait_job(self.job_ids[index], _calls.remaining(deadline)):
                if job.state.terminal:
                    break
            assert job is not None
            if job.state is JobState.CANCELLED:
                self._raise_cause(job)
            results[index] = outcome(job)
        return cast(R, _assemble(self._out, results))

    def _raise_cause(self, cancelled: Job) -> None:
        dead = self._client.list_jobs(workflow_id=self.id, states=[JobState.DEAD], page_size=1)
        raise _cause(cancelled, dead.jobs)

    def cancel(self) -> int:
        """Cancel every job of the workflow that has not ended; how many."""
        return self._client.cancel_workflow(self.id)

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id} ({len(self.job_ids)} jobs)>"


class AsyncWorkflowHandle(Generic[R]):
    """`WorkflowHandle` for the AsyncClient."""

    def __init__(
        self, client: AsyncClient, workflow_id: str, job_ids: list[str], out: Shape
    ) -> None:
        self._client = client
        self.id = workflow_id
        self.job_ids = job_ids
        self._out = out

    async def status(self) -> list[WorkflowStep]:
        jobs: list[Job] = []
        token: str | None = None
        while True:
            page = await self._client.list_jobs(
                workflow_id=self.id, page_size=1000, page_token=token
            )
            jobs += page.jobs
            if not (token := page.next_page_token):
                break
        return _steps(jobs, {job_id: i for i, job_id in enumerate(self.job_ids)})

    async def result(
        self,
        timeout: float | timedelta | None = None,  # noqa: ASYNC109 - same API as WorkflowHandle
    ) -> R:
        deadline = _calls.deadline_after(timeout)
        results: dict[int, Any] = {}
        for index in leaves(self._out):
            job = None
            async for job in self._client.wait_job(self.job_ids[index], _calls.remaining(deadline)):
                if job.state.terminal:
                    break
            assert job is not None
            if job.state is JobState.CANCELLED:
                dead = await self._client.list_jobs(
                    workflow_id=self.id, states=[JobState.DEAD], page_size=1
                )
                raise _cause(job, dead.jobs)
            results[index] = outcome(job)
        return cast(R, _assemble(self._out, results))

    async def cancel(self) -> int:
        return await self._client.cancel_workflow(self.id)

    def __repr__(self) -> str:
        return f"<AsyncWorkflowHandle {self.id} ({len(self.job_ids)} jobs)>"
