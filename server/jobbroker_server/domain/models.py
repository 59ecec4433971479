"""The broker's records: what a job is, and what flows in and out of the store."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from jobbroker_server.domain.flow import JobLimits, LimitFacts
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.states import JobState

if TYPE_CHECKING:
    from jobbroker_server.domain.workflows import Needs

JSON_CONTENT_TYPE = "application/json"


class AttemptOutcome(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LEASE_EXPIRED = "lease_expired"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    RELEASED = "released"  # handed back by the worker; not counted as an attempt


class ReportStatus(enum.StrEnum):
    OK = "ok"
    LEASE_LOST = "lease_lost"
    NOT_FOUND = "not_found"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Payload:
    data: bytes = b""
    content_type: str = JSON_CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str = ""


@dataclass(slots=True)
class NewJob:
    """A validated submit, ready to store. Not frozen: one is built per
    submitted job, and a frozen dataclass's __init__ took three times as long
    (1.5 of the broker's ~20 us per job in batches)."""

    id: str
    queue: str
    task: str
    payload: Payload
    priority: int
    run_at: datetime | None  # None: runnable at once
    retry: RetryPolicy
    timeout: timedelta | None
    soft_timeout: timedelta | None
    idempotency_key: str | None
    metadata: dict[str, str] = field(default_factory=dict)  # stored as it is, JSON
    tags: tuple[str, ...] = ()
    submitted_by: str = "client"  # in its story: the API key's name, or "client"
    # Of a workflow's job: the workflow, and the jobs of its batch it waits on.
    workflow_id: str | None = None
    needs: Needs | None = None
    # At most one unfinished job holds a unique key (store/dedup.py).
    unique_key: str | None = None
    limits: JobLimits | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int
    worker_id: str
    fencing_token: int
    started_at: datetime
    finished_at: datetime | None
    outcome: AttemptOutcome
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    queue: str
    task: str
    payload: Payload
    priority: int
    state: JobState
    attempts: int
    retry: RetryPolicy
    timeout: timedelta | None
    soft_timeout: timedelta | None
    idempotency_key: str | None
    metadata: Mapping[str, str]
    tags: tuple[str, ...]
    created_at: datetime
    scheduled_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: Payload | None
    last_error: ErrorInfo | None
    progress: float
    progress_message: str
    fencing_token: int
    lease_expires_at: datetime | None
    history: tuple[Attempt, ...] = ()
    # While held: the worker holding it, its attempt's hard deadline (from the
    # handler's start), and whether a cancel was asked for.
    leased_by: str | None = None
    deadline_at: datetime | None = None
    cancel_requested: bool = False
    workflow_id: str | None = None
    unique_key: str | None = None
    limits: JobLimits | None = None


@dataclass(frozen=True, slots=True)
class SubmitResult:
    job_id: str
    state: JobState
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Lease:
    job: Job
    fencing_token: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """Room a worker stream has: lease up to ``limit`` jobs of ``queues`` to it."""

    queues: tuple[str, ...]
    limit: int
    worker_id: str
    max_bytes: int  # of payload, in all
    holder: str = ""  # the stream's API key id
    reports_starts: bool = True  # False: hard timeouts count from the lease
    limited: tuple[str, ...] = ()  # of queues, those leased through their flow limits


@dataclass(frozen=True, slots=True)
class LeaseRef:
    job_id: str
    fencing_token: int
    # The API key id of the stream that reports ("" when auth is off): only
    # the key that holds a lease may report it.
    holder: str = ""


@dataclass(frozen=True, slots=True)
class Completion:
    lease: LeaseRef
    result: Payload | None
    # How long the handler ran, when its start was not reported: the attempt
    # started that long before the completion.
    run_time: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    lease: LeaseRef
    error: ErrorInfo
    permanent: bool = False
    retry_after: timedelta | None = None
    cancelled: bool = False
    run_time: timedelta | None = None  # as in Completion; None when no handler ran


@dataclass(frozen=True, slots=True)
class Progress:
    lease: LeaseRef
    progress: float
    message: str


@dataclass(frozen=True, slots=True)
class ReportResult:
    job_id: str
    status: ReportStatus
    message: str = ""
    lease_expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class JobFacts:
    """A job and what explaining it needs from the store."""

    job: Job
    ahead: int  # pending jobs of its queue leased before it (pending only)
    leased_at: datetime | None  # its last lease
    # Waiting (or cancelled because a parent failed): the parents not done.
    waits_on: tuple[WaitsOn, ...] = ()
    # Held back by a flow limit, or pending in a queue whose rate is spent.
    limit: LimitFacts | None = None


@dataclass(frozen=True, slots=True)
class WaitsOn:
    """A parent a waiting job waits on."""

    job_id: str
    task: str
    state: JobState


@dataclass(frozen=True, slots=True)
class JobFilter:
    queue: str | None = None
    queues: tuple[str, ...] | None = None  # only these (None: any)
    states: tuple[JobState, ...] = ()
    task: str | None = None
    workflow_id: str | None = None
    after_id: str | None = None  # page token: ids sort by creation time
    limit: int = 100
    max_bytes: int = 16 * 1024 * 1024  # of payloads and results, in all


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[Job]
    more: bool  # a next page may hold jobs: ask after the last one
