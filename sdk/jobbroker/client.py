"""Client (sync, grpc channel) and AsyncClient (grpc.aio channel): thin shells over _calls.

Both make their channel from a ConnectionOptions, and pass its call metadata
(the API key) on every call they start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar, Unpack, cast, overload

import grpc

from jobbroker.v1 import broker_pb2, broker_pb2_grpc, job_pb2

from . import _calls, schedules
from . import queues as queue_settings
from ._async_stream import AsyncLeaseStream
from ._convert import api_key_from_pb, explanation_from_pb, job_from_pb
from ._submit_pipe import AsyncSubmitPipe, SubmitPipe
from ._sync_stream import LeaseStream
from .canvas import Flow
from .connection import DEFAULT_TARGET, ConnectionOptions, ConnectionSettings, resolve
from .errors import from_rpc_error
from .handle import AsyncJobHandle, JobHandle
from .lease import AsyncLease, Lease
from .task import Task
from .types import (
    ApiKey,
    CreatedApiKey,
    CreatedSchedule,
    Explanation,
    Job,
    JobEvent,
    JobRequest,
    JobState,
    Page,
    QueueSettings,
    RateLimit,
    RetryPolicy,
    Role,
    Schedule,
    ScheduleOptions,
    ScheduleSpec,
    SubmitOptions,
)
from .workflow import AsyncWorkflowHandle, WorkflowHandle, workflow_request

I = TypeVar("I")  # noqa: E741 - payload type, as in task.py
R = TypeVar("R")


class Client:
    """A blocking client of one broker. Use it from threads freely; close it when done.

    `Client("host:port", api_key=..., tls=True, timeout=10)` or
    `Client(ConnectionOptions(...))`: the keywords are ConnectionOptions'
    fields, and override the options given.
    """

    def __init__(
        self,
        target: str | ConnectionOptions = DEFAULT_TARGET,
        **settings: Unpack[ConnectionSettings],
    ) -> None:
        self._options = resolve(target, settings)
        self._metadata = self._options.call_metadata
        self._channel = self._options.channel()
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._timeout = self._options.timeout.total_seconds()
        self._submits = SubmitPipe(self._stub, self._metadata)

    @property
    def options(self) -> ConnectionOptions:
        """How this client reaches its broker."""
        return self._options

    @overload
    def submit(self, task: Flow[None, R], /) -> WorkflowHandle[R]: ...
    @overload
    def submit(
        self, task: Task[I, R], payload: I, **options: Unpack[SubmitOptions]
    ) -> JobHandle[R]: ...
    @overload
    def submit(
        self, task: str, payload: Any = None, **options: Unpack[SubmitOptions]
    ) -> JobHandle[Any]: ...
    def submit(
        self,
        task: str | Task[Any, Any] | Flow[Any, Any],
        payload: Any = None,
        **options: Unpack[SubmitOptions],
    ) -> JobHandle[Any] | WorkflowHandle[Any]:
        """Store a job and return its handle once the broker committed it; or
        a workflow (`chain`, `group`, `chord`), all of it in one transaction,
        and return its handle."""
        if isinstance(task, Flow):
            _calls.check_flow_alone(payload, options)
            return self._submit_workflow(task)
        spec = _calls.build_spec(JobRequest(task, payload, **options))
        reply = _calls.call(
            lambda left: self._submits.submit(spec, left), self._timeout, _calls.SUBMIT_RETRIED
        )
        return JobHandle(self, reply.job_id, reply.duplicate)

    def _submit_workflow(self, flow: Flow[Any, Any]) -> WorkflowHandle[Any]:
        request, out = workflow_request(flow)
        reply = _calls.call(
            lambda left: self._stub.SubmitWorkflow(request, timeout=left, metadata=self._metadata),
            self._timeout,
            _calls.SUBMIT_RETRIED,
        )
        ids = [r.job_id for r in reply.results]
        return WorkflowHandle(self, request.workflow_id, ids, out)

    def cancel_workflow(self, workflow_id: str) -> int:
        """Cancel every job of the workflow that has not ended; how many."""
        request = broker_pb2.CancelWorkflowRequest(workflow_id=workflow_id)
        return self._unary(self._stub.CancelWorkflow, request).cancelled

    def submit_many(self, jobs: Sequence[JobRequest]) -> list[JobHandle[Any]]:
        """Store many jobs in one transaction: all or none."""
        request = _calls.batch_request(jobs)
        reply = _calls.call(
            lambda left: self._stub.SubmitBatch(request, timeout=left, metadata=self._metadata),
            self._timeout,
            _calls.SUBMIT_RETRIED,
        )
        return [JobHandle(self, r.job_id, r.duplicate) for r in reply.results]

    def get_job(self, job_id: str) -> Job:
        request = broker_pb2.GetJobRequest(job_id=job_id)
        return job_from_pb(self._unary(self._stub.GetJob, request).job)

    def cancel(self, job_id: str) -> Job:
        request = broker_pb2.CancelJobRequest(job_id=job_id)
        return job_from_pb(self._unary(self._stub.CancelJob, request).job)

    def list_jobs(
        self,
        queue: str | None = None,
        states: Iterable[JobState] | None = None,
        task: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
        workflow_id: str | None = None,
    ) -> Page:
        request = _calls.list_jobs_request(queue, states, task, page_size, page_token, workflow_id)
        return _calls.page_from_pb(self._unary(self._stub.ListJobs, request))

    def wait_job(self, job_id: str, timeout: timedelta | float | None = None) -> Iterator[Job]:
        """The job now, then each change of its state until it is terminal."""
        deadline = _calls.deadline_after(timeout)
        retry = _calls.StreamRetry(deadline, self._timeout)
        while True:
            call = self._stub.WaitJob(
                broker_pb2.WaitJobRequest(job_id=job_id),
                timeout=_calls.remaining(deadline),
                metadata=self._metadata,
            )
            try:
                for event in call:
                    retry.heard()
                    yield job_from_pb(event.job)
                return
            except grpc.RpcError as error:
                pause = retry.pause(error)
                if pause is None:
                    raise from_rpc_error(error) from error
            finally:
                cast(Callable[[], bool], call.cancel)()
            time.sleep(pause)

    def job_events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """The job's story from the event log, oldest first: its events after seq `after`."""
        request = _calls.events_request(job_id, after)
        events: list[JobEvent] = []
        while True:
            reply = self._unary(self._stub.ListJobEvents, request)
            if not _calls.next_events_page(request, reply, events):
                return events

    def watch(self, job_id: str, after: int = 0) -> Iterator[JobEvent]:
        """The job's events after seq `after`, then each one as it is written,
        progress included, until the event that left the job terminal.

        A broken connection is opened again after the last event seen, so
        each event comes once; so does a new watch given that event's seq.
        """
        resume = _calls.EventResume(after, self._timeout, ends=True)
        return self._follow(
            lambda seq: self._stub.WatchJob(
                _calls.watch_request(job_id, seq), metadata=self._metadata
            ),
            resume,
        )

    def tail_events(
        self, queue: str | None = None, task: str | None = None, after: int = 0
    ) -> Iterator[JobEvent]:
        """Every event the broker writes from now on (or after seq `after`),
        of one queue's or task's jobs when given; it does not end.

        A broken connection is opened again after the last event seen (from
        now again, if none was seen yet).
        """
        resume = _calls.EventResume(after, self._timeout, ends=False)
        return self._follow(
            lambda seq: self._stub.TailEvents(
                _calls.tail_request(queue, task, seq), metadata=self._metadata
            ),
            resume,
        )

    def explain(self, job_id: str) -> Explanation:
        """Why the job is where it is: a sentence, and the facts behind it."""
        request = broker_pb2.ExplainJobRequest(job_id=job_id)
        return explanation_from_pb(self._unary(self._stub.ExplainJob, request))

    def _follow(
        self,
        open_call: Callable[[int], grpc.CallIterator[job_pb2.JobEvent]],
        resume: _calls.EventResume,
    ) -> Iterator[JobEvent]:
        while True:
            call = open_call(resume.after)
            try:
                for pb in call:
                    yield resume.seen(pb)
                pause = resume.ended()
            except grpc.RpcError as error:
                pause = resume.broke(error)
                if pause is None:
                    raise from_rpc_error(error) from error
            finally:
                cast(Callable[[], bool], call.cancel)()
            if pause is None:
                return
            time.sleep(pause)

    def dlq_list(
        self, queue: str | None = None, page_size: int = 100, page_token: str | None = None
    ) -> Page:
        request = _calls.dlq_list_request(queue, page_size, page_token)
        return _calls.page_from_pb(self._unary(self._stub.ListDeadJobs, request))

    def dlq_replay(
        self, job_ids: Iterable[str] = (), *, queue: str | None = None, all: bool = False
    ) -> list[str]:
        """Put dead jobs back to pending; returns the ids replayed."""
        ids = _calls.check_bulk(job_ids, all)
        request = broker_pb2.ReplayDeadJobsRequest(queue=queue or "", job_ids=ids, all=all)
        return list(self._unary(self._stub.ReplayDeadJobs, request).job_ids)

    def dlq_purge(
        self, job_ids: Iterable[str] = (), *, queue: str | None = None, all: bool = False
    ) -> int:
        """Delete dead jobs; returns how many."""
        ids = _calls.check_bulk(job_ids, all)
        request = broker_pb2.PurgeDeadJobsRequest(queue=queue or "", job_ids=ids, all=all)
        return self._unary(self._stub.PurgeDeadJobs, request).purged

    def lease_stream(
        self,
        queues: Sequence[str],
        *,
        prefetch: int = 16,
        worker_id: str | None = None,
        held: Sequence[Lease] = (),
        reports_starts: bool = False,
    ) -> LeaseStream:
        """Open a LeaseStream; `held` hands leases of a broken stream over to this one.

        With `reports_starts=True` you call `lease.start()` as work on each
        lease begins, and a job's hard timeout counts from then; otherwise
        from its lease, so that a job whose start is never told still ends.
        """
        return LeaseStream(
            self._stub,
            queues,
            prefetch=prefetch,
            worker_id=worker_id or _calls.default_worker_id(),
            report_timeout=self._timeout,
            held=held,
            metadata=self._metadata,
            reports_starts=reports_starts,
        )

    def create_api_key(self, name: str, role: Role, queues: Sequence[str] = ()) -> CreatedApiKey:
        """Make a key (an admin key's call); its `secret` is shown this once.

        `queues` limits the key to those queues; empty, it may use every queue.
        """
        request = _calls.create_key_request(name, role, queues)
        reply = self._unary(self._stub.CreateApiKey, request, _calls.NOT_RETRIED)
        return CreatedApiKey(api_key_from_pb(reply.key), reply.secret)

    def list_api_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        request = broker_pb2.ListApiKeysRequest(include_revoked=include_revoked)
        return [api_key_from_pb(k) for k in self._unary(self._stub.ListApiKeys, request).keys]

    def revoke_api_key(self, key: str) -> ApiKey:
        """Revoke a key, by id or name: calls with it are refused, its open streams end."""
        request = broker_pb2.RevokeApiKeyRequest(key=key)
        reply = self._unary(self._stub.RevokeApiKey, request, _calls.NOT_RETRIED)
        return api_key_from_pb(reply.key)

    def create_schedule(
        self,
        name: str,
        task: str | Task[Any, Any],
        payload: Any = None,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        catch_up: Literal["skip", "latest"] = "skip",
        paused: bool = False,
        **options: Unpack[ScheduleOptions],
    ) -> CreatedSchedule:
        """Register a schedule by name: at each tick of `cron` (in `timezone`)
        or of `every` (a timedelta or seconds), the broker submits `task` with
        `payload` and these job options. Idempotent: registering the same
        definition again changes nothing; a changed one replaces it, keeping
        its paused state (`paused` applies to a new schedule) and its runs.
        `catch_up` is what missed ticks do: "skip" them, or run the "latest"."""
        spec = ScheduleSpec(name, task, payload, cron, every, timezone, catch_up, paused, options)
        reply = self._unary(self._stub.CreateSchedule, schedules.create_request(spec))
        return CreatedSchedule(schedules.from_pb(reply.schedule), reply.changed)

    def list_schedules(self) -> list[Schedule]:
        """Every schedule, in name order."""
        found: list[Schedule] = []
        token = ""
        while True:
            reply = self._unary(self._stub.ListSchedules, schedules.page_request(token))
            found.extend(map(schedules.from_pb, reply.schedules))
            if not (token := reply.next_page_token):
                return found

    def get_schedule(self, name: str) -> Schedule:
        request = broker_pb2.GetScheduleRequest(name=name)
        return schedules.from_pb(self._unary(self._stub.GetSchedule, request).schedule)

    def pause_schedule(self, name: str) -> Schedule:
        """No tick runs until it is resumed."""
        request = broker_pb2.PauseScheduleRequest(name=name)
        return schedules.from_pb(self._unary(self._stub.PauseSchedule, request).schedule)

    def resume_schedule(self, name: str) -> Schedule:
        """Ticks run again; one that passed while paused is a missed tick,
        which the schedule's catch-up policy skips or runs once."""
        request = broker_pb2.ResumeScheduleRequest(name=name)
        return schedules.from_pb(self._unary(self._stub.ResumeSchedule, request).schedule)

    def delete_schedule(self, name: str) -> None:
        """The jobs it made stay."""
        request = broker_pb2.DeleteScheduleRequest(name=name)
        self._unary(self._stub.DeleteSchedule, request, _calls.NOT_RETRIED)

    def list_queues(self) -> list[QueueSettings]:
        """The queues with settings of their own, by name."""
        reply = self._unary(self._stub.ListQueues, broker_pb2.ListQueuesRequest())
        return [queue_settings.from_pb(q) for q in reply.queues]

    def set_queue(
        self,
        name: str,
        *,
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
        soft_timeout: timedelta | None = None,
        lost_worker_counts: bool = True,
        rate: RateLimit | str | None = None,
        key_rate: RateLimit | str | None = None,
        key_concurrency: int | None = None,
    ) -> QueueSettings:
        """Replace the defaults of the queue's jobs (what a job and its task
        leave unset); an admin key. `rate` (a RateLimit, or "100/s") limits
        the starts of the whole queue; `key_rate` and `key_concurrency` are
        the limits of a rate or concurrency key whose job sets none."""
        request = queue_settings.set_request(
            name,
            max_attempts,
            retry,
            timeout,
            soft_timeout,
            lost_worker_counts,
            rate,
            key_rate,
            key_concurrency,
        )
        return queue_settings.from_pb(self._unary(self._stub.SetQueue, request).queue)

    def pause_queue(self, name: str) -> QueueSettings:
        """Lease nothing of the queue, on every replica, until it is resumed;
        submits are still taken, and leased jobs run to their end."""
        request = broker_pb2.PauseQueueRequest(name=name)
        return queue_settings.from_pb(self._unary(self._stub.PauseQueue, request).queue)

    def resume_queue(self, name: str) -> QueueSettings:
        request = broker_pb2.PauseQueueRequest(name=name)
        return queue_settings.from_pb(self._unary(self._stub.ResumeQueue, request).queue)

    def close(self) -> None:
        self._submits.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Any, R],
        request: Any,
        codes: frozenset[grpc.StatusCode] = _calls.RETRIED,
    ) -> R:
        return _calls.call(
            lambda left: method(request, timeout=left, metadata=self._metadata),
            self._timeout,
            codes,
        )


class AsyncClient:
    """The asyncio client; create and use it inside one event loop.

    It takes what Client takes: a target or ConnectionOptions, and keywords.
    """

    def __init__(
        self,
        target: str | ConnectionOptions = DEFAULT_TARGET,
        **settings: Unpack[ConnectionSettings],
    ) -> None:
        self._options = resolve(target, settings)
        self._metadata = self._options.call_metadata
        self._channel = self._options.aio_channel()
        self._stub = broker_pb2_grpc.BrokerStub(self._channel)
        self._timeout = self._options.timeout.total_seconds()
        self._submits = AsyncSubmitPipe(self._stub, self._metadata)

    @property
    def options(self) -> ConnectionOptions:
        """How this client reaches its broker."""
        return self._options

    @overload
    async def submit(self, task: Flow[None, R], /) -> AsyncWorkflowHandle[R]: ...
    @overload
    async def submit(
        self, task: Task[I, R], payload: I, **options: Unpack[SubmitOptions]
    ) -> AsyncJobHandle[R]: ...
    @overload
    async def submit(
        self, task: str, payload: Any = None, **options: Unpack[SubmitOptions]
    ) -> AsyncJobHandle[Any]: ...
    async def submit(
        self,
        task: str | Task[Any, Any] | Flow[Any, Any],
        payload: Any = None,
        **options: Unpack[SubmitOptions],
    ) -> AsyncJobHandle[Any] | AsyncWorkflowHandle[Any]:
        """Store a job and return its handle once the broker committed it; or
        a workflow, as `Client.submit` does."""
        if isinstance(task, Flow):
            _calls.check_flow_alone(payload, options)
            return await self._submit_workflow(task)
        spec = _calls.build_spec(JobRequest(task, payload, **options))
        reply = await _calls.acall(
            lambda left: self._submits.submit(spec, left), self._timeout, _calls.SUBMIT_RETRIED
        )
        return AsyncJobHandle(self, reply.job_id, reply.duplicate)

    async def _submit_workflow(self, flow: Flow[Any, Any]) -> AsyncWorkflowHandle[Any]:
        request, out = workflow_request(flow)
        reply = await _calls.acall(
            lambda left: self._stub.SubmitWorkflow(request, timeout=left, metadata=self._metadata),
            self._timeout,
            _calls.SUBMIT_RETRIED,
        )
        ids = [r.job_id for r in reply.results]
        return AsyncWorkflowHandle(self, request.workflow_id, ids, out)

    async def cancel_workflow(self, workflow_id: str) -> int:
        """Cancel every job of the workflow that has not ended; how many."""
        request = broker_pb2.CancelWorkflowRequest(workflow_id=workflow_id)
        return (await self._unary(self._stub.CancelWorkflow, request)).cancelled

    async def submit_many(self, jobs: Sequence[JobRequest]) -> list[AsyncJobHandle[Any]]:
        """Store many jobs in one transaction: all or none."""
        request = _calls.batch_request(jobs)
        reply = await _calls.acall(
            lambda left: self._stub.SubmitBatch(request, timeout=left, metadata=self._metadata),
            self._timeout,
            _calls.SUBMIT_RETRIED,
        )
        return [AsyncJobHandle(self, r.job_id, r.duplicate) for r in reply.results]

    async def get_job(self, job_id: str) -> Job:
        request = broker_pb2.GetJobRequest(job_id=job_id)
        return job_from_pb((await self._unary(self._stub.GetJob, request)).job)

    async def cancel(self, job_id: str) -> Job:
        request = broker_pb2.CancelJobRequest(job_id=job_id)
        return job_from_pb((await self._unary(self._stub.CancelJob, request)).job)

    async def list_jobs(
        self,
        queue: str | None = None,
        states: Iterable[JobState] | None = None,
        task: str | None = None,
        page_size: int = 100,
        page_token: str | None = None,
        workflow_id: str | None = None,
    ) -> Page:
        request = _calls.list_jobs_request(queue, states, task, page_size, page_token, workflow_id)
        return _calls.page_from_pb(await self._unary(self._stub.ListJobs, request))

    async def wait_job(
        self,
        job_id: str,
        timeout: timedelta | float | None = None,  # noqa: ASYNC109 - same API as Client
    ) -> AsyncIterator[Job]:
        """The job now, then each change of its state until it is terminal."""
        deadline = _calls.deadline_after(timeout)
        retry = _calls.StreamRetry(deadline, self._timeout)
        while True:
            call = self._stub.WaitJob(
                broker_pb2.WaitJobRequest(job_id=job_id),
                timeout=_calls.remaining(deadline),
                metadata=self._metadata,
            )
            try:
                async for event in call:
                    retry.heard()
                    yield job_from_pb(event.job)
                return
            except grpc.RpcError as error:
                pause = retry.pause(error)
                if pause is None:
                    raise from_rpc_error(error) from error
            finally:
                call.cancel()
            await asyncio.sleep(pause)

    async def job_events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        """The job's story from the event log, oldest first: its events after seq `after`."""
        request = _calls.events_request(job_id, after)
        events: list[JobEvent] = []
        while True:
            reply = await self._unary(self._stub.ListJobEvents, request)
            if not _calls.next_events_page(request, reply, events):
                return events

    def watch(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events after seq `after`, then each one as it is written,
        until the event that left the job terminal (see Client.watch)."""
        resume = _calls.EventResume(after, self._timeout, ends=True)
        return self._follow(
            lambda seq: self._stub.WatchJob(
                _calls.watch_request(job_id, seq), metadata=self._metadata
            ),
            resume,
        )

    def tail_events(
        self, queue: str | None = None, task: str | None = None, after: int = 0
    ) -> AsyncIterator[JobEvent]:
        """Every event the broker writes from now on (or after seq `after`),
        of one queue's or task's jobs when given; it does not end (see
        Client.tail_events)."""
        resume = _calls.EventResume(after, self._timeout, ends=False)
        return self._follow(
            lambda seq: self._stub.TailEvents(
                _calls.tail_request(queue, task, seq), metadata=self._metadata
            ),
            resume,
        )

    async def explain(self, job_id: str) -> Explanation:
        """Why the job is where it is: a sentence, and the facts behind it."""
        request = broker_pb2.ExplainJobRequest(job_id=job_id)
        return explanation_from_pb(await self._unary(self._stub.ExplainJob, request))

    async def _follow(
        self,
        open_call: Callable[[int], grpc.aio.UnaryStreamCall[Any, job_pb2.JobEvent]],
        resume: _calls.EventResume,
    ) -> AsyncIterator[JobEvent]:
        while True:
            call = open_call(resume.after)
            try:
                async for pb in call:
                    yield resume.seen(pb)
                pause = resume.ended()
            except grpc.RpcError as error:
                pause = resume.broke(error)
                if pause is None:
                    raise from_rpc_error(error) from error
            finally:
                call.cancel()
            if pause is None:
                return
            await asyncio.sleep(pause)

    async def dlq_list(
        self, queue: str | None = None, page_size: int = 100, page_token: str | None = None
    ) -> Page:
        request = _calls.dlq_list_request(queue, page_size, page_token)
        return _calls.page_from_pb(await self._unary(self._stub.ListDeadJobs, request))

    async def dlq_replay(
        self, job_ids: Iterable[str] = (), *, queue: str | None = None, all: bool = False
    ) -> list[str]:
        """Put dead jobs back to pending; returns the ids replayed."""
        ids = _calls.check_bulk(job_ids, all)
        request = broker_pb2.ReplayDeadJobsRequest(queue=queue or "", job_ids=ids, all=all)
        return list((await self._unary(self._stub.ReplayDeadJobs, request)).job_ids)

    async def dlq_purge(
        self, job_ids: Iterable[str] = (), *, queue: str | None = None, all: bool = False
    ) -> int:
        """Delete dead jobs; returns how many."""
        ids = _calls.check_bulk(job_ids, all)
        request = broker_pb2.PurgeDeadJobsRequest(queue=queue or "", job_ids=ids, all=all)
        return (await self._unary(self._stub.PurgeDeadJobs, request)).purged

    def lease_stream(
        self,
        queues: Sequence[str],
        *,
        prefetch: int = 16,
        worker_id: str | None = None,
        held: Sequence[AsyncLease] = (),
        reports_starts: bool = False,
    ) -> AsyncLeaseStream:
        """A LeaseStream, opened by `async with` or the first iteration.

        `held` hands the leases of a broken stream over to this one. With
        `reports_starts=True` you call `await lease.start()` as work on each
        lease begins, and a job's hard timeout counts from then; otherwise
        from its lease, so that a job whose start is never told still ends.
        """
        return AsyncLeaseStream(
            self._stub,
            queues,
            prefetch=prefetch,
            worker_id=worker_id or _calls.default_worker_id(),
            report_timeout=self._timeout,
            held=held,
            metadata=self._metadata,
            reports_starts=reports_starts,
        )

    async def create_api_key(
        self, name: str, role: Role, queues: Sequence[str] = ()
    ) -> CreatedApiKey:
        """Make a key (an admin key's call); its `secret` is shown this once.

        `queues` limits the key to those queues; empty, it may use every queue.
        """
        request = _calls.create_key_request(name, role, queues)
        reply = await self._unary(self._stub.CreateApiKey, request, _calls.NOT_RETRIED)
        return CreatedApiKey(api_key_from_pb(reply.key), reply.secret)

    async def list_api_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        request = broker_pb2.ListApiKeysRequest(include_revoked=include_revoked)
        reply = await self._unary(self._stub.ListApiKeys, request)
        return [api_key_from_pb(k) for k in reply.keys]

    async def revoke_api_key(self, key: str) -> ApiKey:
        """Revoke a key, by id or name: calls with it are refused, its open streams end."""
        request = broker_pb2.RevokeApiKeyRequest(key=key)
        reply = await self._unary(self._stub.RevokeApiKey, request, _calls.NOT_RETRIED)
        return api_key_from_pb(reply.key)

    async def create_schedule(
        self,
        name: str,
        task: str | Task[Any, Any],
        payload: Any = None,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        timezone: str = "UTC",
        catch_up: Literal["skip", "latest"] = "skip",
        paused: bool = False,
        **options: Unpack[ScheduleOptions],
    ) -> CreatedSchedule:
        """Register a schedule by name, idempotently (see Client.create_schedule)."""
        spec = ScheduleSpec(name, task, payload, cron, every, timezone, catch_up, paused, options)
        reply = await self._unary(self._stub.CreateSchedule, schedules.create_request(spec))
        return CreatedSchedule(schedules.from_pb(reply.schedule), reply.changed)

    async def list_schedules(self) -> list[Schedule]:
        """Every schedule, in name order."""
        found: list[Schedule] = []
        token = ""
        while True:
            reply = await self._unary(self._stub.ListSchedules, schedules.page_request(token))
            found.extend(map(schedules.from_pb, reply.schedules))
            if not (token := reply.next_page_token):
                return found

    async def get_schedule(self, name: str) -> Schedule:
        request = broker_pb2.GetScheduleRequest(name=name)
        return schedules.from_pb((await self._unary(self._stub.GetSchedule, request)).schedule)

    async def pause_schedule(self, name: str) -> Schedule:
        """No tick runs until it is resumed."""
        request = broker_pb2.PauseScheduleRequest(name=name)
        return schedules.from_pb((await self._unary(self._stub.PauseSchedule, request)).schedule)

    async def resume_schedule(self, name: str) -> Schedule:
        """Ticks run again; a missed one follows the catch-up policy (see Client)."""
        request = broker_pb2.ResumeScheduleRequest(name=name)
        reply = await self._unary(self._stub.ResumeSchedule, request)
        return schedules.from_pb(reply.schedule)

    async def delete_schedule(self, name: str) -> None:
        """The jobs it made stay."""
        request = broker_pb2.DeleteScheduleRequest(name=name)
        await self._unary(self._stub.DeleteSchedule, request, _calls.NOT_RETRIED)

    async def list_queues(self) -> list[QueueSettings]:
        """The queues with settings of their own, by name."""
        reply = await self._unary(self._stub.ListQueues, broker_pb2.ListQueuesRequest())
        return [queue_settings.from_pb(q) for q in reply.queues]

    async def set_queue(
        self,
        name: str,
        *,
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,  # noqa: ASYNC109 - the jobs' timeout, not this call's
        soft_timeout: timedelta | None = None,
        lost_worker_counts: bool = True,
        rate: RateLimit | str | None = None,
        key_rate: RateLimit | str | None = None,
        key_concurrency: int | None = None,
    ) -> QueueSettings:
        """Replace the defaults of the queue's jobs (see Client.set_queue)."""
        request = queue_settings.set_request(
            name,
            max_attempts,
            retry,
            timeout,
            soft_timeout,
            lost_worker_counts,
            rate,
            key_rate,
            key_concurrency,
        )
        return queue_settings.from_pb((await self._unary(self._stub.SetQueue, request)).queue)

    async def pause_queue(self, name: str) -> QueueSettings:
        """Lease nothing of the queue until it is resumed (see Client.pause_queue)."""
        request = broker_pb2.PauseQueueRequest(name=name)
        return queue_settings.from_pb((await self._unary(self._stub.PauseQueue, request)).queue)

    async def resume_queue(self, name: str) -> QueueSettings:
        request = broker_pb2.PauseQueueRequest(name=name)
        return queue_settings.from_pb((await self._unary(self._stub.ResumeQueue, request)).queue)

    async def close(self) -> None:
        await self._submits.close()
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Any, R],
        request: Any,
        codes: frozenset[grpc.StatusCode] = _calls.RETRIED,
    ) -> R:
        return await _calls.acall(
            lambda left: method(request, timeout=left, metadata=self._metadata),
            self._timeout,
            codes,
        )
