"""What Client and AsyncClient share: request building, validation, call retry."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc

from jobbroker.v1 import broker_pb2, job_pb2

from ._convert import (
    duration_to_pb,
    event_from_pb,
    job_from_pb,
    retry_to_pb,
    role_to_pb,
    set_payload,
    state_to_pb,
    timestamp_to_pb,
)
from ._limits import set_limits
from ._uuid7 import uuid7
from .errors import (
    BrokerUnavailableError,
    DeadlineExceededError,
    InvalidArgumentError,
    JobBrokerError,
    from_rpc_error,
)
from .task import Task
from .types import JobEvent, JobRequest, JobState, Page, RetryPolicy, Role

T = TypeVar("T")

_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def to_timedelta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


def to_seconds(value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based), with full jitter."""
    return random.uniform(0.5, 1.0) * min(_BACKOFF_BASE * 2.0**attempt, _BACKOFF_CAP)


RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE})
# A submit that timed out may have been stored; its key makes the retry safe.
SUBMIT_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class StreamRetry:
    """When to open a broken response stream (WaitJob, WatchJob, TailEvents)
    again: on UNAVAILABLE, with backoff, until the caller's deadline, or
    without one for `patience` seconds of failures in a row."""

    def __init__(self, deadline: float | None, patience: float) -> None:
        self._deadline = deadline
        self._patience = patience
        self._attempt = 0
        self._until: float | None = None

    def heard(self) -> None:
        """The stream delivered: the next failure starts afresh."""
        self._attempt = 0
        self._until = None

    def pause(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before opening it again; None to give up with `error`."""
        if error.code() not in RETRIED:
            return None
        return self.again()

    def again(self) -> float | None:
        """Seconds to wait before opening the stream again; None once out of time."""
        if self._until is None:
            self._until = self._deadline or time.monotonic() + self._patience
        pause = backoff(self._attempt)
        self._attempt += 1
        return pause if time.monotonic() + pause < self._until else None


def _refusal(error: Exception) -> JobBrokerError:
    """The mapped error of a failed attempt: a call's status, or the broker's
    answer to one submit of a stream (already a JobBrokerError)."""
    if isinstance(error, JobBrokerError):
        return error
    assert isinstance(error, grpc.RpcError)
    return from_rpc_error(error)


def _pause(
    error: JobBrokerError, attempt: int, deadline: float, codes: frozenset[grpc.StatusCode]
) -> float | None:
    """How long to wait before trying again; None to give up with `error`."""
    if error.code not in codes:
        return None
    pause = backoff(attempt)
    return pause if time.monotonic() + pause < deadline else None


def call(
    fn: Callable[[float], T], seconds: float, codes: frozenset[grpc.StatusCode] = RETRIED
) -> T:
    """Run a unary call, `fn(seconds left)`, within `seconds` in all;
    UNAVAILABLE (the broker, or its database, is away for a moment) is retried
    with backoff until then. Errors come out mapped.

    The calls retried are safe to repeat: reads, and submits, which always
    carry an idempotency key (and so are retried after a deadline too).
    """
    deadline = time.monotonic() + seconds
    attempt = 0
    while True:
        try:
            return fn(max(deadline - time.monotonic(), 0.0))
        except (grpc.RpcError, JobBrokerError) as failed:
            error = _refusal(failed)
            pause = _pause(error, attempt, deadline, codes)
            if pause is None:
                if error is failed:
                    raise
                raise error from failed
        time.sleep(pause)
        attempt += 1


async def acall(
    fn: Callable[[float], Awaitable[T]],
    seconds: float,
    codes: frozenset[grpc.StatusCode] = RETRIED,
) -> T:
    """`call` for grpc.aio."""
    deadline = time.monotonic() + seconds
    attempt = 0
    while True:
        try:
            return await fn(max(deadline - time.monotonic(), 0.0))
        except (grpc.RpcError, JobBrokerError) as failed:
            error = _refusal(failed)
            pause = _pause(error, attempt, deadline, codes)
            if pause is None:
                if error is failed:
                    raise
                raise error from failed
        await asyncio.sleep(pause)
        attempt += 1


# --- submit ---


def _pick(explicit: T | None, default: T | None) -> T | None:
    """A submit option: what the caller gave, else the Task's default."""
    return explicit if explicit is not None else default


def _merged_retry(request: JobRequest, task: Task[Any, Any] | None) -> RetryPolicy | None:
    retry = _pick(request.retry, task.retry if task else None)
    max_attempts = _pick(request.max_attempts, task.max_attempts if task else None)
    if max_attempts is None:
        return retry
    if max_attempts < 1:
        raise InvalidArgumentError("max_attempts must be at least 1")
    return replace(retry or RetryPolicy(), max_attempts=max_attempts)


def _check_schedule(delay: timedelta | None, run_at: datetime | None) -> None:
    if delay is not None and run_at is not None:
        raise InvalidArgumentError("give delay or run_at, not both")
    if delay is not None and delay < timedelta(0):
        raise InvalidArgumentError("delay must not be negative")
    if run_at is not None and run_at.utcoffset() is None:
        raise InvalidArgumentError("run_at must be an aware datetime")


def build_spec(request: JobRequest, spec: job_pb2.JobSpec | None = None) -> job_pb2.JobSpec:
    """Validate one job and fill `spec` (a new JobSpec if none is given); a
    Task's options are the defaults. A batch fills its request's own specs:
    building one apart and copying it in was half the cost of a plain job's spec.

    Without an idempotency key, a fresh one is made here, once per submit, so
    that retrying the call after UNAVAILABLE can never store a second job.
    """
    task = request.task if isinstance(request.task, Task) else None
    name = task.name if task else str(request.task)
    queue = _pick(request.queue, task.queue if task else "default")
    if not name:
        raise InvalidArgumentError("task name must not be empty")
    if not queue:
        raise InvalidArgumentError("queue must not be empty")
    delay = to_timedelta(request.delay) if request.delay is not None else None
    _check_schedule(delay, request.run_at)
    if spec is None:
        spec = job_pb2.JobSpec()
    spec.queue = queue
    spec.task = name
    spec.priority = _pick(request.priority, task.priority if task else 0) or 0
    # Time-ordered, so the broker's unique index on keys grows at one end.
    spec.idempotency_key = request.idempotency_key or uuid7()
    if request.unique_key:
        spec.unique_key = request.unique_key
    set_payload(spec.payload, request.payload)
    if request.metadata:
        spec.metadata.update(request.metadata)
    if request.tags:
        spec.tags.extend(request.tags)
    if delay is not None:
        spec.delay.CopyFrom(duration_to_pb(delay))
    if request.run_at is not None:
        spec.run_at.CopyFrom(timestamp_to_pb(request.run_at))
    retry = _merged_retry(request, task)
    if retry is not None:
        spec.retry.CopyFrom(retry_to_pb(retry))
    timeout = _pick(request.timeout, task.timeout if task else None)
    if timeout is not None:
        spec.timeout.CopyFrom(duration_to_pb(timeout))
    soft_timeout = _pick(request.soft_timeout, task.soft_timeout if task else None)
    if soft_timeout is not None:
        spec.soft_timeout.CopyFrom(duration_to_pb(soft_timeout))
    set_limits(spec, request, task)
    return spec


def check_flow_alone(payload: Any, options: Mapping[str, Any]) -> None:
    """A workflow carries its payloads and options in its signatures."""
    if payload is not None or options:
        raise InvalidArgumentError(
            "submit(flow) takes the workflow alone: give payloads and options to each "
            "signature (task.s(payload, queue=...))"
        )


def batch_request(jobs: Sequence[JobRequest]) -> broker_pb2.SubmitBatchRequest:
    request = broker_pb2.SubmitBatchRequest()
    add = request.jobs.add
    for job in jobs:
        build_spec(job, add())
    return request


# --- other requests ---


def list_jobs_request(
    queue: str | None,
    states: Iterable[JobState] | None,
    task: str | None,
    page_size: int,
    page_token: str | None,
    workflow_id: str | None = None,
) -> broker_pb2.ListJobsRequest:
    return broker_pb2.ListJobsRequest(
        queue=queue or "",
        states=[state_to_pb(JobState(s)) for s in states or ()],
        task=task or "",
        page_size=page_size,
        page_token=page_token or "",
        workflow_id=workflow_id or "",
    )


def dlq_list_request(
    queue: str | None, page_size: int, page_token: str | None
) -> broker_pb2.ListDeadJobsRequest:
    return broker_pb2.ListDeadJobsRequest(
        queue=queue or "", page_size=page_size, page_token=page_token or ""
    )


def check_bulk(job_ids: Iterable[str], all_: bool) -> list[str]:
    """DLQ replay/purge: the named jobs, or `all=True` (of one queue, or every queue)."""
    ids = list(job_ids)
    if ids and all_:
        raise InvalidArgumentError("give job_ids or all=True, not both")
    if not ids and not all_:
        raise InvalidArgumentError("give job_ids, or all=True to act on every dead job")
    return ids


# Not retried: after a reply lost on the way, a retry could not tell whether
# the first call took effect (a second key made, or "no such key" for the
# one just revoked).
NOT_RETRIED: frozenset[grpc.StatusCode] = frozenset()


def create_key_request(
    name: str, role: Role, queues: Sequence[str]
) -> broker_pb2.CreateApiKeyRequest:
    if isinstance(queues, str):
        raise InvalidArgumentError(f"queues takes a list of queue names, not the str {queues!r}")
    return broker_pb2.CreateApiKeyRequest(name=name, role=role_to_pb(role), queues=list(queues))


def page_from_pb(pb: broker_pb2.ListJobsResponse) -> Page:
    return Page(
        jobs=tuple(job_from_pb(j) for j in pb.jobs),
        next_page_token=pb.next_page_token or None,
    )


def deadline_after(timeout: timedelta | float | None) -> float | None:
    seconds = to_seconds(timeout)
    return None if seconds is None else time.monotonic() + seconds


def remaining(deadline: float | None) -> float | None:
    """Seconds left until a monotonic deadline; DeadlineExceededError once it passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError("the wait timed out")
    return left


# --- the event log ---

EVENTS_PAGE = 1000  # the broker's largest page of ListJobEvents


def check_after(after: int) -> int:
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InvalidArgumentError(f"after must be an event's seq, or 0 (got {after!r})")
    return after


def events_request(job_id: str, after: int) -> broker_pb2.ListJobEventsRequest:
    return broker_pb2.ListJobEventsRequest(
        job_id=job_id, after_seq=check_after(after), page_size=EVENTS_PAGE
    )


def next_events_page(
    request: broker_pb2.ListJobEventsRequest,
    reply: broker_pb2.ListJobEventsResponse,
    into: list[JobEvent],
) -> bool:
    """Add a page's events to `into`; True when more follow, with `request`
    moved on past them."""
    into.extend(map(event_from_pb, reply.events))
    if not reply.more or not reply.events:
        return False
    request.after_seq = reply.events[-1].seq
    return True


class EventResume:
    """Where a broken event stream (WatchJob, TailEvents) is opened again:
    after the last event it delivered, so that the caller sees each event once.

    A watch ends when the broker ends it, after the event that left the job
    terminal; a tail never does, so one that ends anyway is opened again too.
    """

    def __init__(self, after: int, patience: float, *, ends: bool) -> None:
        self.after = check_after(after)
        self._ends = ends
        self._retry = StreamRetry(None, patience)

    def seen(self, pb: job_pb2.JobEvent) -> JobEvent:
        self._retry.heard()
        self.after = pb.seq
        return event_from_pb(pb)

    def ended(self) -> float | None:
        """The stream ended without an error: seconds to wait before opening
        it again, or None when it is over."""
        if self._ends:
            return None
        pause = self._retry.again()
        if pause is None:
            raise BrokerUnavailableError("the broker ended the event tail, and again on retry")
        return pause

    def broke(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before opening it again; None to give up with `error`."""
        return self._retry.pause(error)


def watch_request(job_id: str, after: int) -> broker_pb2.WatchJobRequest:
    return broker_pb2.WatchJobRequest(job_id=job_id, after_seq=after)


def tail_request(queue: str | None, task: str | None, after: int) -> broker_pb2.TailEventsRequest:
    return broker_pb2.TailEventsRequest(after_seq=after, queue=queue or "", task=task or "")
