"""Rows of the shared schema to and from the domain's records."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from jobbroker_server.domain import limits
from jobbroker_server.domain.flow import JobLimits, stored_rate
from jobbroker_server.domain.models import Attempt, AttemptOutcome, ErrorInfo, Job, NewJob, Payload
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.states import JobState
from jobbroker_server.store.tables import jobs


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _delta(value: float | None, limit: timedelta = limits.MAX_TIMEOUT) -> timedelta | None:
    """A stored duration, within ``limit`` even if a row predates the limits."""
    if value is None:
        return None
    return timedelta(seconds=limits.finite_seconds(value, limit) or 0.0)


def error_to_json(error: ErrorInfo | None) -> dict[str, str] | None:
    if error is None:
        return None
    return {"type": error.type, "message": error.message, "traceback": error.traceback}


def error_from_json(value: Any) -> ErrorInfo | None:
    if not value:
        return None
    return ErrorInfo(value.get("type", ""), value.get("message", ""), value.get("traceback", ""))


# What every new job starts with, written once into each dialect's INSERT
# rather than bound per row: 13 of a row's 32 values, and 7 of the 19 that pass
# through a column's bind processor.
_NEW_JOB_FIXED: dict[str, Any] = {
    "attempts": sa.literal_column("0"),
    "started_at": sa.null(),
    "finished_at": sa.null(),
    "result": sa.null(),
    "result_content_type": sa.null(),
    "last_error": sa.null(),
    "progress": sa.literal_column("0.0"),
    "progress_message": sa.literal_column("''"),
    "fencing_token": sa.literal_column("0"),
    "leased_by": sa.null(),
    "lease_key": sa.literal_column("''"),
    "lease_expires_at": sa.null(),
    "deadline_at": sa.null(),
    "cancel_requested": sa.false(),
    # Flow limits: written after the insert for the jobs that have keys
    # (``limit_values``); binding five NULLs per row cost a plain batch 4 %.
    "concurrency_key": sa.null(),
    "concurrency_limit": sa.null(),
    "rate_key": sa.null(),
    "rate_count": sa.null(),
    "rate_period_s": sa.null(),
    "held_by": sa.null(),
}
# The VALUES of a new job's INSERT: the fixed ones, and the others bound by
# the names new_job_row gives them.
NEW_JOB_VALUES: dict[str, Any] = {
    c.key: _NEW_JOB_FIXED.get(c.key, sa.bindparam(c.key, type_=c.type)) for c in jobs.c
}


def new_job_row(job: NewJob, now: datetime) -> dict[str, Any]:
    """The values of a new job's row that vary, for NEW_JOB_VALUES."""
    run_at = job.run_at if job.run_at is not None and job.run_at > now else now
    needs = job.needs
    if needs is not None:
        state = JobState.WAITING
    else:
        state = JobState.SCHEDULED if run_at > now else JobState.PENDING
    return {
        "id": job.id,
        "queue": job.queue,
        "task": job.task,
        "payload": job.payload.data,
        "content_type": job.payload.content_type,
        "priority": job.priority,
        "state": state.value,
        "max_attempts": job.retry.max_attempts,
        "backoff_base_s": job.retry.backoff_base.total_seconds(),
        "backoff_factor": job.retry.backoff_factor,
        "backoff_cap_s": job.retry.backoff_cap.total_seconds(),
        "backoff_jitter": job.retry.jitter,
        "timeout_s": _seconds(job.timeout),
        "soft_timeout_s": _seconds(job.soft_timeout),
        "idempotency_key": job.idempotency_key,
        "unique_key": job.unique_key,
        "metadata": job.metadata,
        "tags": job.tags,
        "created_at": now,
        "scheduled_at": run_at,
        "workflow_id": job.workflow_id,
        "waiting_on": len(needs.parents) if needs else 0,
        "inputs": None
        if needs is None or needs.shape is None
        else {
            "shape": needs.shape,
            "payload": needs.with_payload,
            "tolerant": needs.tolerate_failures,
        },
    }


def limit_values(job_id: str, limits: JobLimits) -> dict[str, Any]:
    """A job's flow limit columns, for ``ops.SET_LIMITS``."""
    rate = limits.rate_limit
    return {
        "b_id": job_id,
        "concurrency_key": limits.concurrency_key,
        "concurrency_limit": limits.concurrency_limit,
        "rate_key": limits.rate_key,
        "rate_count": None if rate is None else rate.count,
        "rate_period_s": None if rate is None else rate.period.total_seconds(),
    }


def job_limits(row: Any) -> JobLimits | None:
    if row.concurrency_key is None and row.rate_key is None:
        return None
    rate = stored_rate(row.rate_count, row.rate_period_s)
    return JobLimits(row.concurrency_key, row.concurrency_limit, row.rate_key, rate)


def retry_policy(row: sa.Row[Any]) -> RetryPolicy:
    return _retry_policy(
        row.max_attempts,
        row.backoff_base_s,
        row.backoff_factor,
        row.backoff_cap_s,
        row.backoff_jitter,
    )


@functools.lru_cache(maxsize=256)
def _retry_policy(
    max_attempts: int, base_s: float, factor: float, cap_s: float, jitter: float
) -> RetryPolicy:
    """Jobs mostly share a few policies (the policy is immutable)."""
    return RetryPolicy(
        max_attempts=max_attempts,
        backoff_base=_delta(base_s, limits.MAX_BACKOFF) or timedelta(0),
        backoff_factor=factor,
        backoff_cap=_delta(cap_s, limits.MAX_BACKOFF) or timedelta(0),
        jitter=jitter,
    )


def job_from_row(row: sa.Row[Any], history: Sequence[Attempt] = ()) -> Job:
    result = None
    if row.result is not None:
        result = Payload(row.result, row.result_content_type or "")
    return Job(
        id=row.id,
        queue=row.queue,
        task=row.task,
        payload=Payload(row.payload, row.content_type),
        priority=row.priority,
        state=JobState(row.state),
        attempts=row.attempts,
        retry=retry_policy(row),
        timeout=_delta(row.timeout_s),
        soft_timeout=_delta(row.soft_timeout_s),
        idempotency_key=row.idempotency_key,
        metadata=dict(row.metadata),
        tags=tuple(row.tags),
        created_at=row.created_at,
        scheduled_at=row.scheduled_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        result=result,
        last_error=error_from_json(row.last_error),
        progress=row.progress,
        progress_message=row.progress_message,
        fencing_token=row.fencing_token,
        lease_expires_at=row.lease_expires_at,
        history=tuple(history),
        leased_by=row.leased_by,
        deadline_at=row.deadline_at,
        cancel_requested=row.cancel_requested,
        workflow_id=row.workflow_id,
        unique_key=row.unique_key,
        limits=job_limits(row),
    )


def attempt_from_row(row: sa.Row[Any]) -> Attempt:
    return Attempt(
        number=row.number,
        worker_id=row.worker_id,
        fencing_token=row.fencing_token,
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=AttemptOutcome(row.outcome),
        error=error_from_json(row.error),
    )
