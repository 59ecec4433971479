"""The schedule methods of the Broker service, and their messages.

A schedule's job is validated as a submitted job is (``convert.new_job``),
at registration: a tick never meets a template the broker would refuse.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Any

import grpc

from jobbroker.v1 import broker_pb2, job_pb2
from jobbroker_server.clock import Clock
from jobbroker_server.domain import limits
from jobbroker_server.domain import schedules as domain
from jobbroker_server.domain.errors import InvalidArgument, NotFound
from jobbroker_server.domain.keys import Caller
from jobbroker_server.domain.schedules import CatchUp, JobTemplate, Schedule
from jobbroker_server.rpc import convert
from jobbroker_server.services.schedules import Schedules

Ctx = grpc.aio.ServicerContext[Any, Any]

DEFAULT_PAGE = 100
MAX_PAGE = 1000

_CATCH_UP_FROM_PB = {
    broker_pb2.CATCH_UP_UNSPECIFIED: CatchUp.SKIP,
    broker_pb2.CATCH_UP_SKIP: CatchUp.SKIP,
    broker_pb2.CATCH_UP_LATEST: CatchUp.LATEST,
}
_CATCH_UP_TO_PB = {
    CatchUp.SKIP: broker_pb2.CATCH_UP_SKIP,
    CatchUp.LATEST: broker_pb2.CATCH_UP_LATEST,
}


def schedule(msg: broker_pb2.Schedule, limit: convert.Limits, now: datetime) -> Schedule:
    """Validate a registration; raise InvalidArgument or ResourceExhausted."""
    name = domain.schedule_name(msg.name)
    every = None
    if msg.HasField("every"):
        # Bounded before converting: a Duration holds more than timedelta does.
        if abs(msg.every.seconds) > domain.MAX_EVERY.total_seconds() + 1:
            raise InvalidArgument(limits.too_long("every", msg.every.seconds, domain.MAX_EVERY))
        every = msg.every.ToTimedelta()
    cron = msg.cron if msg.HasField("cron") else None
    timing = domain.timing(cron, every, msg.timezone or "UTC", now)
    if not msg.HasField("job"):
        raise InvalidArgument("job must be set: the task, queue and payload each tick submits")
    if msg.catch_up not in _CATCH_UP_FROM_PB:
        raise InvalidArgument("catch_up must be skip or latest")
    try:
        template = domain.template(convert.new_job(msg.job, limit, now), name)
    except InvalidArgument as error:
        raise InvalidArgument(f"job: {error}") from None
    return Schedule(name, timing, template, _CATCH_UP_FROM_PB[msg.catch_up], msg.paused)


def _spec_pb(t: JobTemplate, msg: job_pb2.JobSpec) -> None:
    msg.queue = t.queue
    msg.task = t.task
    msg.payload.data = t.payload.data
    msg.payload.content_type = t.payload.content_type
    msg.priority = t.priority
    r = t.retry
    msg.retry.max_attempts = r.max_attempts
    msg.retry.backoff_base.CopyFrom(convert.duration(r.backoff_base))
    msg.retry.backoff_factor = r.backoff_factor
    msg.retry.backoff_cap.CopyFrom(convert.duration(r.backoff_cap))
    msg.retry.jitter = r.jitter
    if t.timeout is not None:
        msg.timeout.CopyFrom(convert.duration(t.timeout))
    if t.soft_timeout is not None:
        msg.soft_timeout.CopyFrom(convert.duration(t.soft_timeout))
    msg.metadata.update(t.metadata)
    msg.tags.extend(t.tags)
    if t.limits is not None:
        convert.set_limits(msg, t.limits)


def schedule_pb(s: Schedule) -> broker_pb2.Schedule:
    msg = broker_pb2.Schedule(
        name=s.name,
        timezone=s.timing.zone,
        catch_up=_CATCH_UP_TO_PB[s.catch_up],
        paused=s.paused,
        last_job_id=s.last_job_id or "",
    )
    if s.timing.cron is not None:
        msg.cron = s.timing.cron
    if s.timing.every is not None:
        msg.every.CopyFrom(convert.duration(s.timing.every))
    _spec_pb(s.template, msg.job)
    if s.next_run_at is not None:
        convert.set_timestamp(msg.next_run_at, s.next_run_at)
    if s.last_run_at is not None:
        convert.set_timestamp(msg.last_run_at, s.last_run_at)
    if s.last_job_state is not None:
        msg.last_job_state = convert.STATE_TO_PB[s.last_job_state]
    return msg


class ScheduleMethods:
    """The Broker service's schedule methods, mixed into its servicer."""

    _schedules: Schedules
    _clock: Clock
    _limits: convert.Limits

    async def CreateSchedule(
        self, request: broker_pb2.CreateScheduleRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.CreateScheduleResponse:
        if not request.HasField("schedule"):
            raise InvalidArgument("schedule must be set")
        made = schedule(request.schedule, self._limits, self._clock.now())
        caller.check_queue(made.template.queue)
        await self._may_replace(caller, made.name)
        stored, changed = await self._schedules.put(made)
        return broker_pb2.CreateScheduleResponse(schedule=schedule_pb(stored), changed=changed)

    async def ListSchedules(
        self, request: broker_pb2.ListSchedulesRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ListSchedulesResponse:
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        after = limits.name(request.page_token, "page_token") if request.page_token else None
        found = await self._schedules.list(after, size + 1)
        answer = broker_pb2.ListSchedulesResponse()
        room = limits.MAX_LEASE_BYTES  # of payload per page, as a lease message
        for s in found[:size]:
            if caller.may_use(s.template.queue):
                answer.schedules.append(schedule_pb(s))
            room -= len(s.template.payload.data)
            if room <= 0:
                answer.next_page_token = s.name
                return answer
        if len(found) > size:
            answer.next_page_token = found[size - 1].name
        return answer

    async def GetSchedule(
        self, request: broker_pb2.GetScheduleRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ScheduleResponse:
        found = await self._visible(caller, domain.schedule_name(request.name))
        return broker_pb2.ScheduleResponse(schedule=schedule_pb(found))

    async def PauseSchedule(
        self, request: broker_pb2.PauseScheduleRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ScheduleResponse:
        name = domain.schedule_name(request.name)
        await self._visible(caller, name)
        return broker_pb2.ScheduleResponse(schedule=schedule_pb(await self._schedules.pause(name)))

    async def ResumeSchedule(
        self, request: broker_pb2.ResumeScheduleRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.ScheduleResponse:
        name = domain.schedule_name(request.name)
        await self._visible(caller, name)
        resumed = await self._schedules.resume(name)
        return broker_pb2.ScheduleResponse(schedule=schedule_pb(resumed))

    async def DeleteSchedule(
        self, request: broker_pb2.DeleteScheduleRequest, context: Ctx, caller: Caller
    ) -> broker_pb2.DeleteScheduleResponse:
        name = domain.schedule_name(request.name)
        await self._visible(caller, name)
        await self._schedules.delete(name)
        return broker_pb2.DeleteScheduleResponse()

    async def _visible(self, caller: Caller, name: str) -> Schedule:
        """The schedule, NOT_FOUND to a key whose queues do not include its queue."""
        found = await self._schedules.get(name)
        if not caller.may_use(found.template.queue):
            raise NotFound(f"no schedule named {name!r}")
        return found

    async def _may_replace(self, caller: Caller, name: str) -> None:
        """A key limited to queues may not take over another queue's schedule."""
        if caller.queues is None:
            return
        with contextlib.suppress(NotFound):
            caller.check_queue((await self._schedules.get(name)).template.queue)
