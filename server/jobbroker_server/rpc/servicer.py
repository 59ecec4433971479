"""The Broker service: each method converts, calls one service, converts back.

Every method is given the caller its API key names (``handlers``): a key
limited to queues submits, reads and leases only within them, and a job of
another queue is NOT_FOUND to it, as if it did not exist.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import grpc

from jobbroker.v1 import broker_pb2, job_pb2
from jobbroker_server.clock import Clock
from jobbroker_server.domain import limits, workflows
from jobbroker_server.domain.errors import (
    BrokerError,
    Internal,
    InvalidArgument,
    KeyReused,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from jobbroker_server.domain.keys import Caller
from jobbroker_server.domain.models import Job, JobFilter, JobPage, NewJob, SubmitResult
from jobbroker_server.domain.states import JobState
from jobbroker_server.rpc import convert, queues
from jobbroker_server.rpc.errors import error_pb
from jobbroker_server.rpc.lease_stream import LeaseStreams
from jobbroker_server.rpc.queues import QueueMethods
from jobbroker_server.rpc.schedules import ScheduleMethods
from jobbroker_server.services.explain import Explainer
from jobbroker_server.services.jobs import Jobs
from jobbroker_server.services.keys import ApiKeys
from jobbroker_server.services.queues import Queues
from jobbroker_server.services.schedules import Schedules
from jobbroker_server.services.tail import EventTails

log = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_SELECTED = 10_000  # job ids one DLQ call may name


def _submit_pb(
    result: SubmitResult, reply: broker_pb2.SubmitResponse | None = None
) -> broker_pb2.SubmitResponse:
    """The reply to one submit, filled in place when `reply` is given."""
    if reply is None:
        reply = broker_pb2.SubmitResponse()
    reply.job_id = result.job_id
    reply.state = convert.STATE_TO_PB[result.state]
    if result.duplicate:
        reply.duplicate = True
    return reply


# A SubmitGrouped message being answered: each job's refusal, or None where the
# job went to the store; the stored jobs' results to come; and those jobs.
_Pending = tuple[list[BrokerError | None], asyncio.Future[list[SubmitResult]] | None, list[NewJob]]


async def _stream_answer(
    jobs: Jobs,
    refusals: list[BrokerError | None],
    stored: asyncio.Future[list[SubmitResult]] | None,
    valid: list[NewJob],
) -> broker_pb2.SubmitBatchResponse:
    """A result per job, in order; a failed store refuses every job it was given."""
    results: list[SubmitResult | BrokerError] = []
    failed: BrokerError | None = None
    if stored is not None:
        try:
            results = await _each_stored(jobs, stored, valid)
        except BrokerError as error:
            failed = error
        except Exception:
            log.exception("storing submitted jobs failed")
            failed = Internal("the broker failed to store these jobs; its log has the details")
    answer = broker_pb2.SubmitBatchResponse()
    stored_results = iter(results)
    for refusal in refusals:
        reply = answer.results.add()
        outcome = refusal or failed or next(stored_results)
        if isinstance(outcome, BrokerError):
            reply.error.CopyFrom(error_pb(outcome))
        else:
            _submit_pb(outcome, reply)
    return answer


async def _each_stored(
    jobs: Jobs, stored: asyncio.Future[list[SubmitResult]], valid: list[NewJob]
) -> list[SubmitResult | BrokerError]:
    """The message's results; when the store refused one of its jobs (a key
    sent again with another job), each job's own, so that it refuses no other."""
    try:
        return list(await stored)
    except KeyReused:
        return await jobs.submit_each(valid)


def _page_size(requested: int) -> int:
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def _page(page: JobPage) -> broker_pb2.ListJobsResponse:
    token = page.jobs[-1].id if page.more and page.jobs else ""
    return broker_pb2.ListJobsResponse(
        jobs=[convert.job_pb(j) for j in page.jobs], next_page_token=token
    )


class BrokerServicer(ScheduleMethods, QueueMethods):
    def __init__(
        self,
        jobs: Jobs,
        streams: LeaseStreams,
        keys: ApiKeys,
        clock: Clock,
        limits: convert.Limits,
        max_batch: int,
        tails: EventTails,
        explainer: Explainer,
        schedules: Schedules,
        queues: Queues,
    ) -> None:
        self._jobs = jobs
        self._schedules = schedules
        self._queues = queues
        self._tails = tails
        self._explainer = explainer
        self._keys = keys
        self._streams = streams
        self._clock = clock
        self._limits = limits
        self._max_batch = max_batch

    def _new_job(self, spec: job_pb2.JobSpec, caller: Caller, now: datetime) -> NewJob:
        if spec.HasField("needs"):
            raise InvalidArgument("needs names jobs of a workflow: submit it with SubmitWorkflow")
        limit = queues.limits_for(self._limits, self._queues.defaults(spec.queue))
        job = convert.new_job(spec, limit, now)
        caller.check_queue(job.queue)
        job.submitted_by = caller.actor
        return job

    async def Submit(
        self, request: broker_pb2.SubmitRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.SubmitResponse:
        if not request.HasField("job"):
            raise InvalidArgument("job must be set")
        job = self._new_job(request.job, caller, self._clock.now())
        [result] = await self._jobs.submit_many([job])
        return _submit_pb(result)

    async def SubmitBatch(
        self, request: broker_pb2.SubmitBatchRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.SubmitBatchResponse:
        if not request.jobs:
            raise InvalidArgument("jobs must not be empty")
        if too_many := self._too_many(request.jobs, "batch"):
            raise too_many
        now = self._clock.now()
        new_jobs = []
        for i, spec in enumerate(request.jobs):
            try:
                new_jobs.append(self._new_job(spec, caller, now))
            except (InvalidArgument, ResourceExhausted, PermissionDenied) as error:
                raise type(error)(f"jobs[{i}]: {error}") from None
        results = await self._jobs.submit_many(new_jobs)
        answer = broker_pb2.SubmitBatchResponse()
        for result in results:
            _submit_pb(result, answer.results.add())
        return answer

    async def SubmitWorkflow(
        self, request: broker_pb2.SubmitWorkflowRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.SubmitBatchResponse:
        """A workflow's jobs, stored whole with what each waits on."""
        workflow_id = limits.name(request.workflow_id, "workflow_id")
        if not request.jobs:
            raise InvalidArgument("jobs must not be empty")
        links = sum(len(spec.needs.parents) for spec in request.jobs)
        workflows.check_workflow(links, len(request.jobs))
        now = self._clock.now()
        new_jobs: list[NewJob] = []
        ids: list[str] = []
        for i, spec in enumerate(request.jobs):
            try:
                limit = queues.limits_for(self._limits, self._queues.defaults(spec.queue))
                job = convert.workflow_job(spec, ids, limit, now)
                caller.check_queue(job.queue)
            except (InvalidArgument, ResourceExhausted, PermissionDenied) as error:
                raise type(error)(f"jobs[{i}]: {error}") from None
            job.submitted_by = caller.actor
            job.workflow_id = workflow_id
            new_jobs.append(job)
            ids.append(job.id)
        results = await self._jobs.submit_many(new_jobs)
        answer = broker_pb2.SubmitBatchResponse()
        for result in results:
            _submit_pb(result, answer.results.add())
        return answer

    async def CancelWorkflow(
        self, request: broker_pb2.CancelWorkflowRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.CancelWorkflowResponse:
        workflow_id = limits.name(request.workflow_id, "workflow_id")
        caller.named_queue(None, "cancel a workflow")
        cancelled = await self._jobs.cancel_workflow(workflow_id, caller.actor)
        return broker_pb2.CancelWorkflowResponse(cancelled=cancelled)

    async def SubmitGrouped(
        self,
        request_iterator: AsyncIterator[broker_pb2.SubmitBatchRequest],
        context: Ctx,
        caller: Caller,
    ) -> AsyncIterator[broker_pb2.SubmitBatchResponse]:
        """Each message's jobs are validated as it arrives and stored with whatever
        else is being submitted (so messages share transactions); each message is
        answered in turn, a refused job with its error while the stream goes on.
        No task per message: the reader queues each one's pending answer, and
        this loop sends them."""
        answers: asyncio.Queue[_Pending | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    answers.put_nowait(self._submit_soon(request.jobs, caller))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (pending := await answers.get()) is not None:
                yield await _stream_answer(self._jobs, *pending)
            await reader
        finally:
            reader.cancel()

    def _too_many(self, specs: Sequence[job_pb2.JobSpec], what: str) -> ResourceExhausted | None:
        if len(specs) <= self._max_batch:
            return None
        return ResourceExhausted(
            f"a {what} holds at most {self._max_batch} jobs (got {len(specs)})"
        )

    def _submit_soon(self, specs: Sequence[job_pb2.JobSpec], caller: Caller) -> _Pending:
        """Each job's refusal (None for a valid one), and the valid ones' results to come."""
        if too_many := self._too_many(specs, "message"):
            return [too_many] * len(specs), None, []
        now = self._clock.now()
        refusals: list[BrokerError | None] = []
        valid: list[NewJob] = []
        for spec in specs:
            try:
                valid.append(self._new_job(spec, caller, now))
            except BrokerError as error:
                refusals.append(error)
            else:
                refusals.append(None)
        return refusals, self._jobs.submit_soon(valid) if valid else None, valid

    async def GetJob(
        self, request: broker_pb2.GetJobRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.GetJobResponse:
        job = _visible(caller, await self._jobs.get(convert.job_id(request.job_id)))
        return broker_pb2.GetJobResponse(job=convert.job_pb(job))

    async def WaitJob(
        self, request: broker_pb2.WaitJobRequest, context: Ctx, caller: Caller
    ) -> AsyncIterator[broker_pb2.WaitJobResponse]:
        async for job in self._jobs.wait(convert.job_id(request.job_id)):
            yield broker_pb2.WaitJobResponse(job=convert.job_pb(_visible(caller, job)))

    async def ListJobEvents(
        self, request: broker_pb2.ListJobEventsRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ListJobEventsResponse:
        job_id = convert.job_id(request.job_id)
        await self._check_visible(caller, job_id)
        size = min(request.page_size or MAX_PAGE, MAX_PAGE)
        found = await self._jobs.events(job_id, _seq(request.after_seq), size + 1)
        return broker_pb2.ListJobEventsResponse(
            events=[convert.event_pb(e) for e in found[:size]], more=len(found) > size
        )

    async def WatchJob(
        self, request: broker_pb2.WatchJobRequest, context: Ctx, caller: Caller
    ) -> AsyncIterator[job_pb2.JobEvent]:
        job_id = convert.job_id(request.job_id)
        await self._check_visible(caller, job_id)
        async for event in self._jobs.watch(job_id, _seq(request.after_seq)):
            yield convert.event_pb(event)

    async def TailEvents(
        self, request: broker_pb2.TailEventsRequest, context: Ctx, caller: Caller
    ) -> AsyncIterator[job_pb2.JobEvent]:
        queue = _optional_name(request.queue, "queue")
        caller.named_queue(queue, "follow")
        task = _optional_name(request.task, "task")
        async for event in self._tails.follow(_seq(request.after_seq), queue, task):
            yield convert.event_pb(event)

    async def ExplainJob(
        self, request: broker_pb2.ExplainJobRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ExplainJobResponse:
        job_id = convert.job_id(request.job_id)
        await self._check_visible(caller, job_id)
        return convert.explanation_pb(await self._explainer.explain(job_id))

    async def _check_visible(self, caller: Caller, job_id: str) -> None:
        """NOT_FOUND to a key whose queues do not include the job's (a job's
        queue never changes: one look is enough)."""
        if caller.queues is not None:
            _visible(caller, await self._jobs.get(job_id))

    async def CancelJob(
        self, request: broker_pb2.CancelJobRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.CancelJobResponse:
        job_id = convert.job_id(request.job_id)
        await self._check_visible(caller, job_id)
        job = await self._jobs.cancel(job_id, caller.actor)
        return broker_pb2.CancelJobResponse(job=convert.job_pb(job))

    async def ListJobs(
        self, request: broker_pb2.ListJobsRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ListJobsResponse:
        size = _page_size(request.page_size)
        states = []
        for pb in request.states:
            if pb not in convert.STATE_FROM_PB:
                raise InvalidArgument(f"unknown job state {pb}")
            states.append(convert.STATE_FROM_PB[pb])
        queue = _optional_name(request.queue, "queue")
        workflow_id = _optional_name(request.workflow_id, "workflow_id")
        visible = None
        if workflow_id is not None and queue is None and caller.queues is not None:
            visible = tuple(sorted(caller.queues))  # a workflow's jobs in the key's queues
        else:
            caller.named_queue(queue, "list")
        where = JobFilter(
            queue=queue,
            queues=visible,
            states=tuple(states),
            task=_optional_name(request.task, "task"),
            workflow_id=workflow_id,
            after_id=_optional_name(request.page_token, "page_token"),
            limit=size,
        )
        return _page(await self._jobs.find(where))

    async def ListDeadJobs(
        self, request: broker_pb2.ListDeadJobsRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ListJobsResponse:
        size = _page_size(request.page_size)
        queue = _optional_name(request.queue, "queue")
        caller.named_queue(queue, "list")
        where = JobFilter(
            queue=queue,
            states=(JobState.DEAD,),
            after_id=_optional_name(request.page_token, "page_token"),
            limit=size,
        )
        return _page(await self._jobs.find(where))

    async def ReplayDeadJobs(
        self, request: broker_pb2.ReplayDeadJobsRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ReplayDeadJobsResponse:
        ids = _selection(request.job_ids, request.all, "replay")
        queue = _optional_name(request.queue, "queue")
        caller.named_queue(queue, "replay")
        return broker_pb2.ReplayDeadJobsResponse(
            job_ids=await self._jobs.replay_dead(queue, ids, caller.actor)
        )

    async def PurgeDeadJobs(
        self, request: broker_pb2.PurgeDeadJobsRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.PurgeDeadJobsResponse:
        ids = _selection(request.job_ids, request.all, "purge")
        queue = _optional_name(request.queue, "queue")
        caller.named_queue(queue, "purge")
        return broker_pb2.PurgeDeadJobsResponse(
            purged=await self._jobs.purge_dead(queue, ids, caller.actor)
        )

    async def LeaseStream(
        self,
        request_iterator: AsyncIterator[broker_pb2.WorkerMessage],
        context: Ctx,
        caller: Caller,
    ) -> AsyncIterator[broker_pb2.BrokerMessage]:
        # grpc.aio serves a stream only from an async generator function.
        async for message in self._streams.serve(request_iterator, context, caller):
            yield message

    async def CreateApiKey(
        self, request: broker_pb2.CreateApiKeyRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.CreateApiKeyResponse:
        _manages_keys(caller)
        key, text = await self._keys.create(
            request.name, convert.role(request.role), list(request.queues)
        )
        return broker_pb2.CreateApiKeyResponse(key=convert.api_key_pb(key), secret=text)

    async def ListApiKeys(
        self, request: broker_pb2.ListApiKeysRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ListApiKeysResponse:
        _manages_keys(caller)
        found = await self._keys.list(request.include_revoked)
        return broker_pb2.ListApiKeysResponse(keys=[convert.api_key_pb(k) for k in found])

    async def RevokeApiKey(
        self, request: broker_pb2.RevokeApiKeyRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.RevokeApiKeyResponse:
        _manages_keys(caller)
        key = await self._keys.revoke(limits.name(request.key, "key"))
        return broker_pb2.RevokeApiKeyResponse(key=convert.api_key_pb(key))


def _visible(caller: Caller, job: Job) -> Job:
    """The job, or NOT_FOUND to a key whose queues do not include it."""
    if not caller.may_use(job.queue):
        raise NotFound(f"no job with id {job.id!r}")
    return job


def _manages_keys(caller: Caller) -> None:
    if caller.queues is not None:  # it could make itself a key for every queue
        raise PermissionDenied(
            f"API key {caller.name!r} is limited to queues; only an admin key for every "
            "queue manages keys"
        )


def _selection(job_ids: Sequence[str], everything: bool, verb: str) -> list[str]:
    if bool(job_ids) == everything:
        raise InvalidArgument(f"{verb} takes job ids or all=true, exactly one of them")
    if len(job_ids) > MAX_SELECTED:
        raise InvalidArgument(
            f"{verb} takes at most {MAX_SELECTED} job ids (got {len(job_ids)}); "
            "select by queue with all=true instead"
        )
    return [convert.job_id(job_id, "job_ids[]") for job_id in job_ids]


def _seq(value: int) -> int:
    """A sequence number from the wire (a uint64), within what the store holds."""
    return min(value, 2**63 - 1)


def _optional_name(value: str, what: str) -> str | None:
    """A filter field: empty means unset, anything else must be a valid name."""
    return limits.name(value, what) if value else None
