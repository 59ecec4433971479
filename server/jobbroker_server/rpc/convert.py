"""Wire messages to domain records and back; submit validation at the edge."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from jobbroker.v1 import broker_pb2, job_pb2
from jobbroker_server.clock import EPOCH
from jobbroker_server.domain.errors import InvalidArgument, ResourceExhausted
from jobbroker_server.domain.ids import new_job_id
from jobbroker_server.domain.models import (
    Attempt,
    AttemptOutcome,
    Completion,
    ErrorInfo,
    Failure,
    Job,
    LeaseRef,
    NewJob,
    Payload,
    Progress,
    ReportResult,
    ReportStatus,
)
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.states import JobState

MAX_NAME = 200

STATE_TO_PB = {
    JobState.PENDING: job_pb2.JOB_STATE_PENDING,
    JobState.SCHEDULED: job_pb2.JOB_STATE_SCHEDULED,
    JobState.RUNNING: job_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: job_pb2.JOB_STATE_SUCCEEDED,
    JobState.DEAD: job_pb2.JOB_STATE_DEAD,
    JobState.CANCELLED: job_pb2.JOB_STATE_CANCELLED,
}
STATE_FROM_PB = {pb: state for state, pb in STATE_TO_PB.items()}

OUTCOME_TO_PB = {
    AttemptOutcome.RUNNING: job_pb2.ATTEMPT_OUTCOME_RUNNING,
    AttemptOutcome.SUCCEEDED: job_pb2.ATTEMPT_OUTCOME_SUCCEEDED,
    AttemptOutcome.FAILED: job_pb2.ATTEMPT_OUTCOME_FAILED,
    AttemptOutcome.LEASE_EXPIRED: job_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED,
    AttemptOutcome.TIMED_OUT: job_pb2.ATTEMPT_OUTCOME_TIMED_OUT,
    AttemptOutcome.CANCELLED: job_pb2.ATTEMPT_OUTCOME_CANCELLED,
    AttemptOutcome.RELEASED: job_pb2.ATTEMPT_OUTCOME_RELEASED,
}

REPORT_TO_PB = {
    ReportStatus.OK: broker_pb2.REPORT_STATUS_OK,
    ReportStatus.LEASE_LOST: broker_pb2.REPORT_STATUS_LEASE_LOST,
    ReportStatus.NOT_FOUND: broker_pb2.REPORT_STATUS_NOT_FOUND,
    ReportStatus.INVALID: broker_pb2.REPORT_STATUS_INVALID,
}


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int
    retry: RetryPolicy  # defaults for what a submit leaves unset


def _name(value: str, what: str) -> str:
    if not value.strip():
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(value)} characters; the limit is {MAX_NAME}")
    return value


def _duration(msg: duration_pb2.Duration, what: str) -> timedelta:
    value = msg.ToTimedelta()
    if value < timedelta(0):
        raise InvalidArgument(f"{what} must not be negative (got {value.total_seconds()}s)")
    return value


def _optional_duration(
    parent: job_pb2.JobSpec | job_pb2.RetryPolicy, field: str, what: str
) -> timedelta | None:
    if not parent.HasField(field):
        return None
    return _duration(getattr(parent, field), what)


def _retry(spec: job_pb2.JobSpec, defaults: RetryPolicy) -> RetryPolicy:
    if not spec.HasField("retry"):
        return defaults
    r = spec.retry
    jitter = r.jitter if r.HasField("jitter") else defaults.jitter
    if not 0.0 <= jitter <= 1.0:
        raise InvalidArgument(f"retry.jitter must be between 0 and 1 (got {jitter})")
    if r.backoff_factor and r.backoff_factor < 1.0:
        raise InvalidArgument(f"retry.backoff_factor must be at least 1 (got {r.backoff_factor})")
    base = _optional_duration(r, "backoff_base", "retry.backoff_base")
    cap = _optional_duration(r, "backoff_cap", "retry.backoff_cap")
    return RetryPolicy(
        max_attempts=r.max_attempts or defaults.max_attempts,
        backoff_base=defaults.backoff_base if base is None else base,
        backoff_factor=r.backoff_factor or defaults.backoff_factor,
        backoff_cap=defaults.backoff_cap if cap is None else cap,
        jitter=jitter,
    )


def new_job(spec: job_pb2.JobSpec, limits: Limits, now: datetime) -> NewJob:
    """Validate one submitted spec; raise InvalidArgument or ResourceExhausted."""
    queue = _name(spec.queue, "queue")
    task = _name(spec.task, "task")
    size = len(spec.payload.data)
    if size > limits.max_payload_bytes:
        raise ResourceExhausted(
            f"payload is {size} bytes; this broker accepts at most {limits.max_payload_bytes} "
            "(--max-payload-bytes); store large data elsewhere and submit a reference"
        )
    if spec.HasField("run_at") and spec.HasField("delay"):
        raise InvalidArgument("give run_at or delay, not both")
    run_at = None
    try:
        if spec.HasField("run_at"):
            run_at = spec.run_at.ToDatetime(tzinfo=UTC)
        elif spec.HasField("delay"):
            run_at = now + _duration(spec.delay, "delay")
    except (OverflowError, ValueError):
        raise InvalidArgument("run_at must fall between the years 1 and 9999") from None
    key = spec.idempotency_key or None
    if key is not None and len(key) > MAX_NAME:
        raise InvalidArgument(f"idempotency_key is {len(key)} characters; the limit is {MAX_NAME}")
    return NewJob(
        id=new_job_id(),
        queue=queue,
        task=task,
        payload=Payload(spec.payload.data, spec.payload.content_type or "application/json"),
        priority=spec.priority,
        run_at=run_at,
        retry=_retry(spec, limits.retry),
        timeout=_positive(_optional_duration(spec, "timeout", "timeout"), "timeout"),
        soft_timeout=_positive(
            _optional_duration(spec, "soft_timeout", "soft_timeout"), "soft_timeout"
        ),
        idempotency_key=key,
        metadata=dict(spec.metadata) if spec.metadata else {},  # an empty map is slow to copy
        tags=tuple(spec.tags),
    )


def _positive(value: timedelta | None, what: str) -> timedelta | None:
    if value is not None and value <= timedelta(0):
        raise InvalidArgument(f"{what} must be positive")
    return value


def job_id(value: str) -> str:
    if not value:
        raise InvalidArgument("job_id must not be empty")
    return value


# --- domain -> wire ---

_ZERO = timedelta(0)


# Straight from the timedelta's fields: Timestamp.FromDatetime goes through a
# time tuple and costs four times as much, several times per leased job.


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    return set_timestamp(timestamp_pb2.Timestamp(), value)


def set_timestamp(field: timestamp_pb2.Timestamp, value: datetime) -> timestamp_pb2.Timestamp:
    """Fill a message's own Timestamp field: building one apart and copying it
    in costs twice as much."""
    since = value - EPOCH
    field.seconds = since.days * 86_400 + since.seconds
    field.nanos = since.microseconds * 1000
    return field


def duration(value: timedelta) -> duration_pb2.Duration:
    if value < _ZERO:  # seconds and nanos must share a sign
        d = duration_pb2.Duration()
        d.FromTimedelta(value)
        return d
    return duration_pb2.Duration(
        seconds=value.days * 86_400 + value.seconds, nanos=value.microseconds * 1000
    )


@functools.lru_cache(maxsize=256)
def _retry_pb(r: RetryPolicy) -> job_pb2.RetryPolicy:
    """Jobs mostly share a few policies; never changed, only copied from."""
    return job_pb2.RetryPolicy(
        max_attempts=r.max_attempts,
        backoff_base=duration(r.backoff_base),
        backoff_factor=r.backoff_factor,
        backoff_cap=duration(r.backoff_cap),
        jitter=r.jitter,
    )


def error_pb(error: ErrorInfo) -> job_pb2.ErrorInfo:
    return job_pb2.ErrorInfo(type=error.type, message=error.message, traceback=error.traceback)


def _attempt_pb(a: Attempt) -> job_pb2.Attempt:
    msg = job_pb2.Attempt(
        number=a.number,
        worker_id=a.worker_id,
        started_at=timestamp(a.started_at),
        outcome=OUTCOME_TO_PB[a.outcome],
    )
    if a.finished_at is not None:
        msg.finished_at.CopyFrom(timestamp(a.finished_at))
    if a.error is not None:
        msg.error.CopyFrom(error_pb(a.error))
    return msg


def job_pb(job: Job, msg: job_pb2.Job | None = None) -> job_pb2.Job:
    """The job's message, or ``msg`` filled in place (a LeasedJob's own ``job``
    field: building the message apart and copying it in cost a third more)."""
    msg = job_pb2.Job() if msg is None else msg
    msg.id = job.id
    msg.queue = job.queue
    msg.task = job.task
    msg.payload.data = job.payload.data
    msg.payload.content_type = job.payload.content_type
    msg.priority = job.priority
    msg.state = STATE_TO_PB[job.state]
    msg.attempts = job.attempts
    msg.retry.CopyFrom(_retry_pb(job.retry))
    if job.idempotency_key:
        msg.idempotency_key = job.idempotency_key
    if job.metadata:
        msg.metadata.update(job.metadata)
    if job.tags:
        msg.tags.extend(job.tags)
    set_timestamp(msg.created_at, job.created_at)
    set_timestamp(msg.scheduled_at, job.scheduled_at)
    if job.history:
        msg.history.extend(_attempt_pb(a) for a in job.history)
    msg.progress = job.progress
    msg.progress_message = job.progress_message
    if job.timeout is not None:
        msg.timeout.CopyFrom(duration(job.timeout))
    if job.soft_timeout is not None:
        msg.soft_timeout.CopyFrom(duration(job.soft_timeout))
    if job.started_at is not None:
        set_timestamp(msg.started_at, job.started_at)
    if job.finished_at is not None:
        set_timestamp(msg.finished_at, job.finished_at)
    if job.result is not None:
        msg.result.data = job.result.data
        msg.result.content_type = job.result.content_type
    if job.last_error is not None:
        msg.last_error.CopyFrom(error_pb(job.last_error))
    return msg


def report_pb(result: ReportResult) -> broker_pb2.ReportResult:
    msg = broker_pb2.ReportResult(
        job_id=result.job_id, status=REPORT_TO_PB[result.status], message=result.message
    )
    if result.lease_expires_at is not None:
        msg.lease_expires_at.CopyFrom(timestamp(result.lease_expires_at))
    return msg


# --- worker reports: wire -> domain ---


def lease_ref(msg: broker_pb2.LeaseRef) -> LeaseRef:
    return LeaseRef(msg.job_id, msg.fencing_token)


def completion(msg: broker_pb2.Completion) -> Completion:
    result = None
    if msg.HasField("result"):
        result = Payload(msg.result.data, msg.result.content_type or "application/json")
    return Completion(lease_ref(msg.lease), result)


def failure(msg: broker_pb2.Failure) -> Failure:
    retry_after = msg.retry_after.ToTimedelta() if msg.HasField("retry_after") else None
    if retry_after is not None and retry_after < timedelta(0):
        retry_after = timedelta(0)
    return Failure(
        lease=lease_ref(msg.lease),
        error=ErrorInfo(msg.error.type, msg.error.message, msg.error.traceback),
        permanent=msg.permanent,
        retry_after=retry_after,
        cancelled=msg.cancelled,
    )


def progress(msg: broker_pb2.Progress) -> Progress:
    return Progress(lease_ref(msg.lease), msg.progress, msg.message)
