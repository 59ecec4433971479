"""Protobuf <-> public types, and payload encoding (JSON unless given bytes)."""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from jobbroker.v1 import broker_pb2, job_pb2

from .errors import InvalidArgumentError
from .types import (
    BYTES_CONTENT_TYPE,
    JSON_CONTENT_TYPE,
    ApiKey,
    Attempt,
    AttemptOutcome,
    CancelReason,
    ErrorInfo,
    Explanation,
    Job,
    JobEvent,
    JobState,
    RateLimit,
    RetryPolicy,
    Role,
    WaitsOn,
    is_json,
)

_STATE_TO_PB = {
    JobState.PENDING: job_pb2.JOB_STATE_PENDING,
    JobState.SCHEDULED: job_pb2.JOB_STATE_SCHEDULED,
    JobState.RUNNING: job_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: job_pb2.JOB_STATE_SUCCEEDED,
    JobState.DEAD: job_pb2.JOB_STATE_DEAD,
    JobState.CANCELLED: job_pb2.JOB_STATE_CANCELLED,
    JobState.LEASED: job_pb2.JOB_STATE_LEASED,
    JobState.WAITING: job_pb2.JOB_STATE_WAITING,
}
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}

_OUTCOME_FROM_PB = {
    job_pb2.ATTEMPT_OUTCOME_RUNNING: AttemptOutcome.RUNNING,
    job_pb2.ATTEMPT_OUTCOME_SUCCEEDED: AttemptOutcome.SUCCEEDED,
    job_pb2.ATTEMPT_OUTCOME_FAILED: AttemptOutcome.FAILED,
    job_pb2.ATTEMPT_OUTCOME_LEASE_EXPIRED: AttemptOutcome.LEASE_EXPIRED,
    job_pb2.ATTEMPT_OUTCOME_TIMED_OUT: AttemptOutcome.TIMED_OUT,
    job_pb2.ATTEMPT_OUTCOME_CANCELLED: AttemptOutcome.CANCELLED,
    job_pb2.ATTEMPT_OUTCOME_RELEASED: AttemptOutcome.RELEASED,
}

_ROLE_TO_PB = {
    Role.PRODUCER: broker_pb2.ROLE_PRODUCER,
    Role.WORKER: broker_pb2.ROLE_WORKER,
    Role.ADMIN: broker_pb2.ROLE_ADMIN,
}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}

_CANCEL_REASON_FROM_PB = {
    broker_pb2.CANCEL_REASON_CANCELLED: CancelReason.CANCELLED,
    broker_pb2.CANCEL_REASON_TIMED_OUT: CancelReason.TIMED_OUT,
    broker_pb2.CANCEL_REASON_LEASE_EXPIRED: CancelReason.LEASE_EXPIRED,
}


# --- payloads ---


def set_payload(field: job_pb2.Payload, value: Any) -> job_pb2.Payload:
    """Fill a message's own Payload field (building one apart and copying it
    in costs more): bytes as they are, anything else as JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        field.data = bytes(value)
        field.content_type = BYTES_CONTENT_TYPE
        return field
    # None (a handler that returns nothing) skips the JSON encoder.
    field.data = b"null" if value is None else json.dumps(value, separators=(",", ":")).encode()
    field.content_type = JSON_CONTENT_TYPE
    return field


def decode_payload(data: bytes, content_type: str) -> Any:
    """JSON content types decode to Python values; anything else stays bytes."""
    if is_json(content_type):
        return None if data == b"null" else json.loads(data)
    return data


# --- time ---


def duration_to_pb(value: timedelta) -> duration_pb2.Duration:
    pb = duration_pb2.Duration()
    pb.FromTimedelta(value)
    return pb


def timestamp_to_pb(value: datetime) -> timestamp_pb2.Timestamp:
    pb = timestamp_pb2.Timestamp()
    pb.FromDatetime(value.astimezone(UTC))
    return pb


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# Built from the fields: protobuf's ToDatetime/ToTimedelta cost several times
# more, and a leased job carries four of them.
def duration_from_pb(msg: Any, name: str) -> timedelta | None:
    if not msg.HasField(name):
        return None
    pb = getattr(msg, name)
    return timedelta(0, pb.seconds, int(pb.nanos / 1000))  # nanos share the sign of seconds


def timestamp_from_pb(msg: Any, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    pb = getattr(msg, name)
    return _EPOCH + timedelta(0, pb.seconds, pb.nanos // 1000)


# --- enums ---


def state_to_pb(state: JobState) -> job_pb2.JobState:
    return _STATE_TO_PB[state]


def state_from_pb(value: job_pb2.JobState) -> JobState:
    try:
        return _STATE_FROM_PB[value]
    except KeyError:
        raise ValueError(f"unknown job state {value}") from None


def role_to_pb(role: Role) -> broker_pb2.Role:
    try:
        return _ROLE_TO_PB[Role(role)]
    except ValueError:
        roles = ", ".join(Role)
        raise InvalidArgumentError(f"unknown role {role!r}: give one of {roles}") from None


def role_from_pb(value: broker_pb2.Role) -> Role:
    try:
        return _ROLE_FROM_PB[value]
    except KeyError:
        raise ValueError(f"unknown role {value}") from None


def cancel_reason_from_pb(value: broker_pb2.CancelReason) -> CancelReason:
    return _CANCEL_REASON_FROM_PB.get(value, CancelReason.UNKNOWN)


# --- messages ---


def retry_to_pb(policy: RetryPolicy) -> job_pb2.RetryPolicy:
    pb = job_pb2.RetryPolicy(
        max_attempts=policy.max_attempts or 0,
        backoff_factor=policy.backoff_factor or 0.0,
    )
    if policy.jitter is not None:
        pb.jitter = policy.jitter  # optional on the wire: 0 means no jitter
    if policy.backoff_base is not None:
        pb.backoff_base.CopyFrom(duration_to_pb(policy.backoff_base))
    if policy.backoff_cap is not None:
        pb.backoff_cap.CopyFrom(duration_to_pb(policy.backoff_cap))
    return pb


def retry_from_pb(pb: job_pb2.RetryPolicy) -> RetryPolicy:
    """Jobs mostly share a few policies: one RetryPolicy (immutable) per
    distinct message, looked up by its bytes."""
    return _retry_from_bytes(pb.SerializeToString(deterministic=True))


@functools.lru_cache(maxsize=256)
def _retry_from_bytes(data: bytes) -> RetryPolicy:
    pb = job_pb2.RetryPolicy.FromString(data)
    # proto3 scalars cannot say "unset": zero reads as the broker default.
    return RetryPolicy(
        max_attempts=pb.max_attempts or None,
        backoff_base=duration_from_pb(pb, "backoff_base"),
        backoff_factor=pb.backoff_factor or None,
        backoff_cap=duration_from_pb(pb, "backoff_cap"),
        jitter=pb.jitter if pb.HasField("jitter") else None,
    )


def rate_limit_to_pb(limit: RateLimit, into: job_pb2.RateLimit) -> None:
    """Fill a message's own RateLimit field."""
    into.count = limit.count
    into.period.FromTimedelta(limit.period)


def rate_limit_from_pb(msg: Any, name: str) -> RateLimit | None:
    if not msg.HasField(name):
        return None
    pb: job_pb2.RateLimit = getattr(msg, name)
    period = duration_from_pb(pb, "period")
    if pb.count < 1 or period is None or period <= timedelta(0):
        return None  # not a rate the broker would send: read it as none rather than fail
    return RateLimit(pb.count, period)


def error_to_pb(error: ErrorInfo) -> job_pb2.ErrorInfo:
    return job_pb2.ErrorInfo(type=error.type, message=error.message, traceback=error.traceback)


def error_from_pb(msg: Any, name: str) -> ErrorInfo | None:
    if not msg.HasField(name):
        return None
    pb: job_pb2.ErrorInfo = getattr(msg, name)
    return ErrorInfo(type=pb.type, message=pb.message, traceback=pb.traceback)


def attempt_from_pb(pb: job_pb2.Attempt) -> Attempt:
    return Attempt(
        number=pb.number,
        worker_id=pb.worker_id,
        started_at=timestamp_from_pb(pb, "started_at"),
        finished_at=timestamp_from_pb(pb, "finished_at"),
        outcome=_OUTCOME_FROM_PB.get(pb.outcome),
        error=error_from_pb(pb, "error"),
    )


def job_from_pb(pb: job_pb2.Job) -> Job:
    has_result = pb.HasField("result")
    return Job(
        id=pb.id,
        queue=pb.queue,
        task=pb.task,
        payload=pb.payload.data,
        content_type=pb.payload.content_type,
        priority=pb.priority,
        state=state_from_pb(pb.state),
        attempts=pb.attempts,
        retry=retry_from_pb(pb.retry),
        timeout=duration_from_pb(pb, "timeout"),
        soft_timeout=duration_from_pb(pb, "soft_timeout"),
        idempotency_key=pb.idempotency_key,
        metadata=dict(pb.metadata) if pb.metadata else {},  # an empty map is slow to copy
        tags=tuple(pb.tags),
        created_at=timestamp_from_pb(pb, "created_at"),
        scheduled_at=timestamp_from_pb(pb, "scheduled_at"),
        started_at=timestamp_from_pb(pb, "started_at"),
        finished_at=timestamp_from_pb(pb, "finished_at"),
        result=pb.result.data if has_result else None,
        result_content_type=pb.result.content_type if has_result else "",
        last_error=error_from_pb(pb, "last_error"),
        history=tuple(map(attempt_from_pb, pb.history)),
        progress=pb.progress,
        progress_message=pb.progress_message,
        cancel_requested=pb.cancel_requested,
        workflow_id=pb.workflow_id,
        unique_key=pb.unique_key,
        concurrency_key=pb.concurrency_key,
        concurrency_limit=pb.concurrency_limit,
        rate_key=pb.rate_key,
        rate_limit=rate_limit_from_pb(pb, "rate_limit"),
    )


def event_from_pb(pb: job_pb2.JobEvent) -> JobEvent:
    return JobEvent(
        seq=pb.seq,
        job_id=pb.job_id,
        queue=pb.queue,
        at=timestamp_from_pb(pb, "at") or _EPOCH,  # always set by the broker
        reason=pb.reason,
        from_state=_STATE_FROM_PB.get(pb.from_state),  # unspecified for a submit
        to_state=state_from_pb(pb.to_state),
        attempt=pb.attempt,
        actor=pb.actor,
        detail=dict(pb.detail),
    )


def explanation_from_pb(pb: broker_pb2.ExplainJobResponse) -> Explanation:
    return Explanation(
        state=state_from_pb(pb.state),
        summary=pb.summary,
        reason=pb.reason,
        attempt=pb.attempt,
        run_at=timestamp_from_pb(pb, "run_at"),
        jobs_ahead=pb.jobs_ahead,
        workers_serving=pb.workers_serving,
        worker_id=pb.worker_id,
        since=timestamp_from_pb(pb, "since"),
        last_heartbeat=timestamp_from_pb(pb, "last_heartbeat"),
        lease_expires_at=timestamp_from_pb(pb, "lease_expires_at"),
        deadline=timestamp_from_pb(pb, "deadline"),
        cancel_requested=pb.cancel_requested,
        finished_at=timestamp_from_pb(pb, "finished_at"),
        last_error=error_from_pb(pb, "last_error"),
        waits_on=tuple(WaitsOn(p.job_id, p.task, state_from_pb(p.state)) for p in pb.waits_on),
        limit=pb.limit,
        limit_key=pb.limit_key,
        next_token_at=timestamp_from_pb(pb, "next_token_at"),
        slot_holders=tuple(pb.slot_holders),
    )


def api_key_from_pb(pb: broker_pb2.ApiKey) -> ApiKey:
    return ApiKey(
        id=pb.id,
        name=pb.name,
        role=role_from_pb(pb.role),
        queues=tuple(pb.queues),
        # Always set by the broker; the epoch stands for a reply that lacks it.
        created_at=timestamp_from_pb(pb, "created_at") or _EPOCH,
        revoked_at=timestamp_from_pb(pb, "revoked_at"),
    )
