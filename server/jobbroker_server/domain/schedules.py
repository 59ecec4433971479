"""Schedules: a job template the broker submits at each tick of a cron
expression or of a fixed interval.

A cron expression is parsed and stepped by cronsim in the schedule's IANA
zone, so "0 3 * * *" in Europe/Berlin runs at 03:00 Berlin time on both sides
of a DST change (as Debian's cron does: a time the change skips runs just
after it, one it repeats runs once); ticks are stored as aware UTC. An
interval ticks at whole multiples of itself since the Unix epoch, so every
replica, and every registration of the same schedule, computes the same ticks.

Catch-up: a tick is missed when a later tick is also due by the time the
broker gets to it (the broker was down, or the schedule paused). ``skip``
drops missed ticks and waits for the next future one; ``latest`` runs the
most recent missed tick once, then goes on as scheduled.
"""

from __future__ import annotations

import enum
import functools
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import cronsim

from jobbroker_server.clock import EPOCH
from jobbroker_server.domain import limits
from jobbroker_server.domain.errors import InvalidArgument
from jobbroker_server.domain.flow import JobLimits
from jobbroker_server.domain.ids import new_job_id
from jobbroker_server.domain.models import NewJob, Payload
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.states import JobState

MAX_SCHEDULES = 10_000  # stored at once: each one is stepped by every replica
# Short enough that a tick's idempotency key, "schedule:<name>:<tick>", fits MAX_NAME.
MAX_SCHEDULE_NAME = 128
MAX_CRON = 200
MAX_ZONE = 64
MIN_EVERY = timedelta(seconds=1)
MAX_EVERY = timedelta(days=366)
# What each job a schedule makes carries in its metadata.
SCHEDULE_KEY = "jobbroker.schedule"
TICK_KEY = "jobbroker.tick"
_LONGEST_TICK = "0000-00-00T00:00:00.000000Z"


class CatchUp(enum.StrEnum):
    SKIP = "skip"
    LATEST = "latest"


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


@dataclass(frozen=True, slots=True)
class Timing:
    """When a schedule ticks: a cron expression in ``zone``, or every ``every``."""

    cron: str | None
    every: timedelta | None
    zone: str = "UTC"

    def after(self, at: datetime) -> datetime | None:
        """The first tick strictly after ``at``; None if the expression never
        matches again (cronsim looks 50 years ahead)."""
        if self.every is not None:
            return EPOCH + ((at - EPOCH) // self.every + 1) * self.every
        assert self.cron is not None
        return _first(cronsim.CronSim(self.cron, at.astimezone(_zone(self.zone))))

    def at_or_before(self, at: datetime) -> datetime | None:
        """The last tick at or before ``at``."""
        if self.every is not None:
            return EPOCH + ((at - EPOCH) // self.every) * self.every
        assert self.cron is not None
        # Ticks fall on whole seconds; stepping back starts one second past ``at``'s.
        start = at.replace(microsecond=0) + timedelta(seconds=1)
        return _first(cronsim.CronSim(self.cron, start.astimezone(_zone(self.zone)), reverse=True))


def _first(ticks: cronsim.CronSim) -> datetime | None:
    found = next(ticks, None)
    return None if found is None else found.astimezone(UTC)


def timing(cron: str | None, every: timedelta | None, zone: str, now: datetime) -> Timing:
    """A valid Timing, or InvalidArgument saying what is wrong with it."""
    if (cron is None) == (every is None):
        raise InvalidArgument("a schedule takes a cron expression or an interval, exactly one")
    limits.name(zone, "timezone")
    if len(zone) > MAX_ZONE:
        raise InvalidArgument(f"timezone is {len(zone)} characters; the limit is {MAX_ZONE}")
    try:
        _zone(zone)
    except (ValueError, KeyError, OSError):
        raise InvalidArgument(f"unknown time zone {zone!r}: give an IANA name") from None
    if every is not None:
        if not MIN_EVERY <= every <= MAX_EVERY:
            raise InvalidArgument(
                f"every must be from {MIN_EVERY.total_seconds():g}s to "
                f"{MAX_EVERY.days} days (got {every.total_seconds():g}s)"
            )
        return Timing(None, every, zone)
    assert cron is not None
    limits.text(cron, "cron", MAX_CRON)
    made = Timing(" ".join(cron.split()), None, zone)
    try:
        first = made.after(now)
    # cronsim raises CronSimError for what it refuses; a third-party parser may
    # raise other errors on hostile text, and none of them may end the call.
    except Exception as error:
        raise InvalidArgument(f"bad cron expression {cron!r}: {error}") from None
    if first is None:
        raise InvalidArgument(f"cron expression {cron!r} matches no time in the next 50 years")
    return made


@dataclass(frozen=True, slots=True)
class JobTemplate:
    """What each tick's job is: a submit's fields less its timing and key."""

    queue: str
    task: str
    payload: Payload
    priority: int
    retry: RetryPolicy
    timeout: timedelta | None
    soft_timeout: timedelta | None
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    limits: JobLimits | None = None


def template(job: NewJob, name: str) -> JobTemplate:
    """The template of a submit validated at the edge (``NewJob``), checked to
    leave room in its metadata for what a tick adds."""
    if job.run_at is not None:
        raise InvalidArgument("a schedule's job takes no run_at or delay: its ticks time it")
    if job.idempotency_key is not None:
        raise InvalidArgument("a schedule's job takes no idempotency_key: each tick has its own")
    if job.unique_key is not None:
        raise InvalidArgument("a schedule's job takes no unique_key")
    try:
        limits.metadata({**job.metadata, SCHEDULE_KEY: name, TICK_KEY: _LONGEST_TICK})
    except InvalidArgument as error:
        raise InvalidArgument(
            f"{error}, with the {SCHEDULE_KEY!r} and {TICK_KEY!r} entries each tick adds"
        ) from None
    return JobTemplate(
        job.queue,
        job.task,
        job.payload,
        job.priority,
        job.retry,
        job.timeout,
        job.soft_timeout,
        dict(job.metadata),
        job.tags,
        job.limits,
    )


def schedule_name(value: str) -> str:
    limits.name(value, "schedule name")
    if len(value) > MAX_SCHEDULE_NAME:
        raise InvalidArgument(
            f"schedule name is {len(value)} characters; the limit is {MAX_SCHEDULE_NAME}"
        )
    return value


@dataclass(frozen=True, slots=True)
class Schedule:
    name: str
    timing: Timing
    template: JobTemplate
    catch_up: CatchUp = CatchUp.SKIP
    paused: bool = False
    next_run_at: datetime | None = None  # None: the expression matches no more
    last_run_at: datetime | None = None  # the tick of the last job it made
    last_job_id: str | None = None
    last_job_state: JobState | None = None  # None too once retention deleted the job

    def same_definition(self, other: Schedule) -> bool:
        """Registering ``other`` again changes nothing."""
        return (self.timing, self.template, self.catch_up) == (
            other.timing,
            other.template,
            other.catch_up,
        )


@dataclass(frozen=True, slots=True)
class Tick:
    """What to do with a due schedule: the tick to run (None: none), and when next."""

    run: datetime | None
    next_run_at: datetime | None


def plan(schedule: Schedule, now: datetime) -> Tick:
    """The tick a due schedule runs now, after its catch-up policy."""
    due = schedule.next_run_at
    assert due is not None and due <= now
    latest = schedule.timing.at_or_before(now)
    if latest is None or latest <= due:  # on time: no later tick is due yet
        return Tick(due, schedule.timing.after(due))
    if schedule.catch_up is CatchUp.LATEST:
        return Tick(latest, schedule.timing.after(latest))
    return Tick(None, schedule.timing.after(now))


def tick_text(tick: datetime) -> str:
    return tick.astimezone(UTC).isoformat().replace("+00:00", "Z")


def tick_job(schedule: Schedule, tick: datetime) -> NewJob:
    """The job of one tick, keyed by schedule and tick: however many replicas
    try, the store keeps one."""
    t = schedule.template
    when = tick_text(tick)
    return NewJob(
        id=new_job_id(),
        queue=t.queue,
        task=t.task,
        payload=t.payload,
        priority=t.priority,
        run_at=None,
        retry=t.retry,
        timeout=t.timeout,
        soft_timeout=t.soft_timeout,
        idempotency_key=f"schedule:{schedule.name}:{when}",
        metadata={**t.metadata, SCHEDULE_KEY: schedule.name, TICK_KEY: when},
        tags=t.tags,
        submitted_by=f"schedule:{schedule.name}",
        limits=t.limits,
    )


@dataclass(frozen=True, slots=True)
class Fired:
    """A job a schedule made."""

    schedule: str
    tick: datetime
    job_id: str
