"""Wire messages to domain records and back; submit validation at the edge."""

from __future__ import annotations

import functools
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from jobbroker.v1 import broker_pb2, job_pb2
from jobbroker_server.clock import EPOCH
from jobbroker_server.domain import flow, limits, workflows
from jobbroker_server.domain.errors import InvalidArgument
from jobbroker_server.domain.ids import new_job_id
from jobbroker_server.domain.keys import ApiKey, Role
from jobbroker_server.domain.models import (
    JSON_CONTENT_TYPE,
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
from jobbroker_server.domain.transitions import JobEvent
from jobbroker_server.services.explain import Explanation

STATE_TO_PB = {
    JobState.PENDING: job_pb2.JOB_STATE_PENDING,
    JobState.SCHEDULED: job_pb2.JOB_STATE_SCHEDULED,
    JobState.RUNNING: job_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: job_pb2.JOB_STATE_SUCCEEDED,
    JobState.DEAD: job_pb2.JOB_STATE_DEAD,
    JobState.CANCELLED: job_pb2.JOB_STATE_CANCELLED,
    JobState.LEASED: job_pb2.JOB_STATE_LEASED,
    JobState.WAITING: job_pb2.JOB_STATE_WAITING,
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
    # Defaults for what a submit leaves unset: the broker's, or its queue's.
    retry: RetryPolicy
    timeout: timedelta | None = None
    soft_timeout: timedelta | None = None


def _duration(
    msg: duration_pb2.Duration, what: str, limit: timedelta, *, positive: bool = False
) -> timedelta:
    # A Duration's seconds range past what timedelta holds (and 0 < nanos with
    # negative seconds is malformed): bound the seconds before converting.
    if abs(msg.seconds) > limit.total_seconds() + 1:
        raise InvalidArgument(limits.too_long(what, msg.seconds, limit))
    return limits.duration(msg.ToTimedelta(), what, limit, positive=positive)


def optional_duration(
    parent: job_pb2.JobSpec | job_pb2.RetryPolicy | broker_pb2.QueueDefaults,
    field: str,
    limit: timedelta,
    *,
    positive: bool = False,
) -> timedelta | None:
    if not parent.HasField(field):
        return None
    what = f"retry.{field}" if isinstance(parent, job_pb2.RetryPolicy) else field
    return _duration(getattr(parent, field), what, limit, positive=positive)


def _retry(spec: job_pb2.JobSpec, defaults: RetryPolicy) -> RetryPolicy:
    if not spec.HasField("retry"):
        return defaults
    r = spec.retry
    jitter = r.jitter if r.HasField("jitter") else defaults.jitter
    base = optional_duration(r, "backoff_base", limits.MAX_BACKOFF)
    cap = optional_duration(r, "backoff_cap", limits.MAX_BACKOFF)
    attempts = r.max_attempts and limits.max_attempts(r.max_attempts)
    factor = r.backoff_factor and limits.backoff_factor(r.backoff_factor)
    return RetryPolicy(
        max_attempts=attempts or defaults.max_attempts,
        backoff_base=defaults.backoff_base if base is None else base,
        backoff_factor=factor or defaults.backoff_factor,
        backoff_cap=defaults.backoff_cap if cap is None else cap,
        jitter=limits.fraction(jitter, "retry.jitter"),
    )


def _run_at(spec: job_pb2.JobSpec, now: datetime) -> datetime | None:
    if spec.HasField("delay"):
        if spec.HasField("run_at"):
            raise InvalidArgument("give run_at or delay, not both")
        return now + _duration(spec.delay, "delay", limits.MAX_DELAY)
    if not spec.HasField("run_at"):
        return None
    latest = now + limits.MAX_DELAY
    seconds = spec.run_at.seconds
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS or seconds > (latest - EPOCH).total_seconds():
        raise InvalidArgument(
            f"run_at must fall between the year 1 and {latest:%Y-%m-%d} "
            f"(at most {limits.MAX_DELAY.days} days ahead)"
        )
    try:
        return spec.run_at.ToDatetime(tzinfo=UTC)
    except (OverflowError, ValueError):  # nanos out of range
        raise InvalidArgument("run_at is not a valid timestamp") from None


_MIN_SECONDS = int((datetime(1, 1, 2, tzinfo=UTC) - EPOCH).total_seconds())
_MAX_SECONDS = int((datetime(9999, 1, 1, tzinfo=UTC) - EPOCH).total_seconds())


def new_job(spec: job_pb2.JobSpec, limit: Limits, now: datetime) -> NewJob:
    """Validate one submitted spec; raise InvalidArgument or ResourceExhausted."""
    limits.payload_size(len(spec.payload.data), limit.max_payload_bytes)
    key = spec.idempotency_key or None
    unique = spec.unique_key or None
    return NewJob(
        id=new_job_id(),
        queue=limits.name(spec.queue, "queue"),
        task=limits.name(spec.task, "task"),
        payload=Payload(spec.payload.data, _content_type(spec.payload.content_type)),
        priority=spec.priority,
        run_at=_run_at(spec, now),
        retry=_retry(spec, limit.retry),
        timeout=optional_duration(spec, "timeout", limits.MAX_TIMEOUT, positive=True)
        or limit.timeout,
        soft_timeout=optional_duration(spec, "soft_timeout", limits.MAX_TIMEOUT, positive=True)
        or limit.soft_timeout,
        idempotency_key=None if key is None else limits.name(key, "idempotency_key"),
        # An empty map is slow to copy, and most jobs have none.
        metadata=limits.metadata(spec.metadata) if spec.metadata else {},
        tags=limits.tags(spec.tags) if spec.tags else (),
        unique_key=None if unique is None else limits.name(unique, "unique_key"),
        limits=_job_limits(spec) if spec.concurrency_key or spec.rate_key else None,
    )


def _job_limits(spec: job_pb2.JobSpec) -> flow.JobLimits:
    """The flow limits of a spec with a key; a limit without its key is
    ignored, as a key with no limit takes its queue's."""
    rate = None
    if spec.rate_key and spec.HasField("rate_limit"):
        rate = rate_limit_from_pb(spec.rate_limit, "rate_limit")
    concurrency = None
    if spec.concurrency_key and spec.concurrency_limit:
        concurrency = flow.concurrency_limit(spec.concurrency_limit, "concurrency_limit")
    return flow.JobLimits(
        concurrency_key=_key(spec.concurrency_key, "concurrency_key"),
        concurrency_limit=concurrency,
        rate_key=_key(spec.rate_key, "rate_key"),
        rate_limit=rate,
    )


def _key(value: str, what: str) -> str | None:
    return limits.name(value, what) if value else None


def rate_limit_from_pb(msg: job_pb2.RateLimit, what: str) -> flow.RateLimit:
    period = _duration(msg.period, f"{what}.period", flow.MAX_RATE_PERIOD, positive=True)
    return flow.rate_limit(msg.count, period.total_seconds(), what)


def rate_limit_pb(rate: flow.RateLimit) -> job_pb2.RateLimit:
    return job_pb2.RateLimit(count=rate.count, period=duration(rate.period))


def workflow_job(
    spec: job_pb2.JobSpec, earlier: Sequence[str], limit: Limits, now: datetime
) -> NewJob:
    """One job of a workflow: ``new_job``, and what it waits on among the
    ``earlier`` jobs of its workflow (their ids)."""
    job = new_job(spec, limit, now)
    if not spec.HasField("needs"):
        return job
    n = spec.needs
    job.needs = workflows.needs(n.parents, earlier, n.input, n.with_payload, n.tolerate_failures)
    return job


def _content_type(value: str) -> str:
    if not value:
        return JSON_CONTENT_TYPE
    return limits.text(value, "content_type", limits.MAX_CONTENT_TYPE)


def job_id(value: str, what: str = "job_id") -> str:
    return limits.name(value, what)


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
    msg.cancel_requested = job.cancel_requested
    if job.workflow_id:
        msg.workflow_id = job.workflow_id
    if job.unique_key:
        msg.unique_key = job.unique_key
    if job.limits is not None:
        set_limits(msg, job.limits)
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


def set_limits(msg: job_pb2.Job | job_pb2.JobSpec, limits: flow.JobLimits) -> None:
    """A job's keys and limits, into its message or its spec."""
    msg.concurrency_key = limits.concurrency_key or ""
    msg.concurrency_limit = limits.concurrency_limit or 0
    msg.rate_key = limits.rate_key or ""
    if limits.rate_limit is not None:
        msg.rate_limit.CopyFrom(rate_limit_pb(limits.rate_limit))


def report_pb(result: ReportResult) -> broker_pb2.ReportResult:
    msg = broker_pb2.ReportResult(
        job_id=result.job_id, status=REPORT_TO_PB[result.status], message=result.message
    )
    if result.lease_expires_at is not None:
        msg.lease_expires_at.CopyFrom(timestamp(result.lease_expires_at))
    return msg


# --- worker reports: wire -> domain ---


def lease_ref(msg: broker_pb2.LeaseRef, holder: str) -> LeaseRef:
    """A lease a stream reports, under the API key id it presented (``holder``)."""
    job_id = msg.job_id
    # Checked for what the store cannot hold, not for being a name: one bad id
    # in a group commit's batch would fail every worker's reports in it.
    if len(job_id) > limits.MAX_NAME or "\0" in job_id:
        raise InvalidArgument("a lease's job_id is not a job id")
    if msg.fencing_token > _MAX_TOKEN:  # a uint64 on the wire; no store holds more
        raise InvalidArgument(f"fencing_token {msg.fencing_token} is past any lease's")
    return LeaseRef(job_id, msg.fencing_token, holder)


_MAX_TOKEN = 2**63 - 1  # the store's BIGINT


def reports(items: Sized, what: str) -> None:
    """One message carries at most MAX_REFS_PER_MESSAGE reports."""
    if len(items) > limits.MAX_REFS_PER_MESSAGE:
        raise InvalidArgument(
            f"{what} holds at most {limits.MAX_REFS_PER_MESSAGE} reports (got {len(items)})"
        )


def lease_refs(refs: Sequence[broker_pb2.LeaseRef], what: str, holder: str) -> list[LeaseRef]:
    reports(refs, what)
    return [lease_ref(ref, holder) for ref in refs]


def completion(
    msg: broker_pb2.Completion, max_result_bytes: int, holder: str
) -> Completion | Failure:
    """The completion, or for a result over the limit, the attempt's failure
    that dead-letters its job and says why."""
    ref = lease_ref(msg.lease, holder)
    ran = run_time(msg)
    if not msg.HasField("result"):
        return Completion(ref, None, ran)
    size = len(msg.result.data)
    if size > max_result_bytes:
        message = (
            f"the result is {size} bytes; this broker stores at most {max_result_bytes} "
            "(--max-payload-bytes): store large results elsewhere and return a reference"
        )
        return Failure(ref, ErrorInfo("ResultTooLarge", message), permanent=True, run_time=ran)
    content_type = limits.clipped(msg.result.content_type, limits.MAX_CONTENT_TYPE)
    return Completion(ref, Payload(msg.result.data, content_type or JSON_CONTENT_TYPE), ran)


def run_time(msg: broker_pb2.Completion | broker_pb2.Failure) -> timedelta | None:
    """How long the handler ran, by its worker's word: bounded to the longest
    timeout, never negative; None when unset."""
    if not msg.HasField("run_time"):
        return None
    top = int(limits.MAX_TIMEOUT.total_seconds())
    seconds = min(max(msg.run_time.seconds, 0), top)
    return timedelta(seconds=seconds, microseconds=max(msg.run_time.nanos, 0) // 1000)


def failure(msg: broker_pb2.Failure, holder: str) -> Failure:
    retry_after = None
    if msg.HasField("retry_after"):
        seconds = min(max(msg.retry_after.seconds, 0), int(limits.MAX_BACKOFF.total_seconds()))
        retry_after = timedelta(seconds=seconds, microseconds=max(msg.retry_after.nanos, 0) // 1000)
    error = msg.error
    return Failure(
        lease=lease_ref(msg.lease, holder),
        error=ErrorInfo(
            limits.clipped(error.type, limits.MAX_NAME),
            limits.clipped(error.message, limits.MAX_ERROR_MESSAGE),
            limits.clipped(error.traceback, limits.MAX_TRACEBACK),
        ),
        permanent=msg.permanent,
        retry_after=retry_after,
        cancelled=msg.cancelled,
        run_time=run_time(msg),
    )


def progress(msg: broker_pb2.Progress, holder: str) -> Progress:
    fraction = limits.fraction(msg.progress, "progress")
    message = limits.clipped(msg.message, limits.MAX_PROGRESS_MESSAGE)
    return Progress(lease_ref(msg.lease, holder), fraction, message)


def event_pb(event: JobEvent) -> job_pb2.JobEvent:
    msg = job_pb2.JobEvent(
        seq=event.seq,
        job_id=event.job_id,
        queue=event.queue,
        reason=event.reason,
        attempt=event.attempt,
        actor=event.actor,
        detail={key: _detail_text(value) for key, value in event.detail.items()},
    )
    set_timestamp(msg.at, event.at)
    if event.source:
        msg.from_state = STATE_TO_PB[JobState(event.source)]
    msg.to_state = STATE_TO_PB[JobState(event.target)]
    return msg


def explanation_pb(e: Explanation) -> broker_pb2.ExplainJobResponse:
    msg = broker_pb2.ExplainJobResponse(
        state=STATE_TO_PB[e.state],
        summary=e.summary,
        reason=e.reason,
        attempt=e.attempt,
        jobs_ahead=e.jobs_ahead,
        workers_serving=e.workers_serving,
        worker_id=e.worker_id,
        cancel_requested=e.cancel_requested,
    )
    for name in (
        "run_at",
        "since",
        "last_heartbeat",
        "lease_expires_at",
        "deadline",
        "finished_at",
    ):
        at = getattr(e, name)
        if at is not None:
            set_timestamp(getattr(msg, name), at)
    if e.last_error is not None:
        msg.last_error.CopyFrom(error_pb(e.last_error))
    for parent in e.waits_on:
        msg.waits_on.add(job_id=parent.job_id, task=parent.task, state=STATE_TO_PB[parent.state])
    if e.limit is not None:
        msg.limit = e.limit.limit
        msg.limit_key = e.limit.key
        msg.slot_holders.extend(e.limit.holders)
        if e.limit.next_token_at is not None:
            set_timestamp(msg.next_token_at, e.limit.next_token_at)
    return msg


def _detail_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


ROLE_TO_PB = {
    Role.PRODUCER: broker_pb2.ROLE_PRODUCER,
    Role.WORKER: broker_pb2.ROLE_WORKER,
    Role.ADMIN: broker_pb2.ROLE_ADMIN,
}
_ROLE_FROM_PB: dict[int, Role] = {pb: role for role, pb in ROLE_TO_PB.items()}


def role(pb: int) -> Role:
    if pb not in _ROLE_FROM_PB:
        raise InvalidArgument("role must be producer, worker or admin")
    return _ROLE_FROM_PB[pb]


def api_key_pb(key: ApiKey) -> broker_pb2.ApiKey:
    msg = broker_pb2.ApiKey(
        id=key.id, name=key.name, role=ROLE_TO_PB[key.role], queues=list(key.queues)
    )
    set_timestamp(msg.created_at, key.created_at)
    if key.revoked_at is not None:
        set_timestamp(msg.revoked_at, key.revoked_at)
    return msg
