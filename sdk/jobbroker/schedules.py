"""Schedules in code: `jobbroker.schedule(...)` declares one, and what both
clients share to register and read them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Unpack

from jobbroker.v1 import broker_pb2

from ._calls import build_spec, to_timedelta
from ._convert import (
    duration_from_pb,
    duration_to_pb,
    retry_from_pb,
    state_from_pb,
    timestamp_from_pb,
)
from .errors import InvalidArgumentError
from .task import Task
from .types import JobRequest, Schedule, ScheduleOptions, ScheduleSpec

if TYPE_CHECKING:
    from .client import AsyncClient

CatchUp = Literal["skip", "latest"]

_CATCH_UP_TO_PB = {"skip": broker_pb2.CATCH_UP_SKIP, "latest": broker_pb2.CATCH_UP_LATEST}
_CATCH_UP_FROM_PB: dict[int, CatchUp] = {
    broker_pb2.CATCH_UP_UNSPECIFIED: "skip",
    broker_pb2.CATCH_UP_SKIP: "skip",
    broker_pb2.CATCH_UP_LATEST: "latest",
}


def schedule(
    name: str,
    task: str | Task[Any, Any],
    payload: Any = None,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    timezone: str = "UTC",
    catch_up: CatchUp = "skip",
    paused: bool = False,
    **options: Unpack[ScheduleOptions],
) -> ScheduleSpec:
    """Declare a schedule for `Worker(schedules=[...])` to register at start:
    `cron` ("0 3 * * *", in `timezone`) or `every` (a timedelta or seconds),
    exactly one. The options are `create_schedule`'s."""
    spec = ScheduleSpec(name, task, payload, cron, every, timezone, catch_up, paused, options)
    create_request(spec)  # refuse a bad declaration where it is written
    return spec


def create_request(spec: ScheduleSpec) -> broker_pb2.CreateScheduleRequest:
    if (spec.cron is None) == (spec.every is None):
        raise InvalidArgumentError("a schedule takes cron= or every=, exactly one")
    if spec.catch_up not in _CATCH_UP_TO_PB:
        raise InvalidArgumentError(f"catch_up must be 'skip' or 'latest' (got {spec.catch_up!r})")
    job = build_spec(JobRequest(spec.task, spec.payload, **spec.options))
    job.ClearField("idempotency_key")  # each tick has its own
    msg = broker_pb2.Schedule(
        name=spec.name,
        timezone=spec.timezone,
        job=job,
        catch_up=_CATCH_UP_TO_PB[spec.catch_up],
        paused=spec.paused,
    )
    if spec.cron is not None:
        msg.cron = spec.cron
    if spec.every is not None:
        msg.every.CopyFrom(duration_to_pb(_interval(spec.every)))
    return broker_pb2.CreateScheduleRequest(schedule=msg)


def _interval(every: timedelta | float) -> timedelta:
    try:
        return to_timedelta(every)
    except (OverflowError, ValueError):  # NaN, infinities, past what timedelta holds
        raise InvalidArgumentError(f"every must be a number of seconds (got {every!r})") from None


def from_pb(pb: broker_pb2.Schedule) -> Schedule:
    job = pb.job
    return Schedule(
        name=pb.name,
        cron=pb.cron if pb.HasField("cron") else None,
        every=duration_from_pb(pb, "every"),
        timezone=pb.timezone,
        task=job.task,
        queue=job.queue,
        payload=job.payload.data,
        content_type=job.payload.content_type,
        catch_up=_CATCH_UP_FROM_PB.get(pb.catch_up, "skip"),
        paused=pb.paused,
        next_run_at=timestamp_from_pb(pb, "next_run_at"),
        last_run_at=timestamp_from_pb(pb, "last_run_at"),
        last_job_id=pb.last_job_id or None,
        last_job_state=state_from_pb(pb.last_job_state) if pb.last_job_state else None,
        priority=job.priority,
        retry=retry_from_pb(job.retry),
        timeout=duration_from_pb(job, "timeout"),
        soft_timeout=duration_from_pb(job, "soft_timeout"),
        metadata=dict(job.metadata),
        tags=tuple(job.tags),
    )


def page_request(token: str) -> broker_pb2.ListSchedulesRequest:
    return broker_pb2.ListSchedulesRequest(page_size=1000, page_token=token)


async def register(client: AsyncClient, specs: Sequence[ScheduleSpec]) -> None:
    """Register each declared schedule: idempotent by name, so every worker
    start may do it."""
    for s in specs:
        await client.create_schedule(
            s.name,
            s.task,
            s.payload,
            cron=s.cron,
            every=s.every,
            timezone=s.timezone,
            catch_up=s.catch_up,
            paused=s.paused,
            **s.options,
        )
