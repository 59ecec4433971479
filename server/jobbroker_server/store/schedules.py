"""The schedule operations: register (upsert by name), read, pause, delete,
and take one tick.

A tick is taken by a compare-and-set on the schedule row: the UPDATE that
moves ``next_run_at`` on names the tick it moves from, so of the replicas
that try, one changes the row and the others change nothing and make no
job. The job is stored in the same transaction, through ``ops.submit_many``,
with an idempotency key per schedule and tick as a second guard.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import NotFound, ResourceExhausted
from jobbroker_server.domain.flow import JobLimits, stored_rate
from jobbroker_server.domain.models import NewJob, Payload
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.schedules import CatchUp, JobTemplate, Schedule, Tick, Timing
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import Moved
from jobbroker_server.store import ops
from jobbroker_server.store.tables import jobs, schedules

_US = timedelta(microseconds=1)
_RUNNING = schedules.c.paused.is_(False)
# Each schedule with the state of the last job it made (if that still exists).
_WITH_STATE = sa.select(schedules, jobs.c.state.label("last_job_state")).select_from(
    schedules.outerjoin(jobs, jobs.c.id == schedules.c.last_job_id)
)


def _us(value: timedelta | None) -> int | None:
    return None if value is None else value // _US


def _delta(value: int | None) -> timedelta | None:
    return None if value is None else value * _US


def _options(t: JobTemplate) -> dict[str, Any]:
    r = t.retry
    return {
        "priority": t.priority,
        "retry": [
            r.max_attempts,
            _us(r.backoff_base),
            r.backoff_factor,
            _us(r.backoff_cap),
            r.jitter,
        ],
        "timeout_us": _us(t.timeout),
        "soft_timeout_us": _us(t.soft_timeout),
        "metadata": dict(t.metadata),
        "tags": list(t.tags),
        "limits": None if t.limits is None else _limits(t.limits),
    }


def _limits(limits: JobLimits) -> list[Any]:
    rate = limits.rate_limit
    return [
        limits.concurrency_key,
        limits.concurrency_limit,
        limits.rate_key,
        None if rate is None else rate.count,
        None if rate is None else rate.period.total_seconds(),
    ]


def _limits_from(value: list[Any] | None) -> JobLimits | None:
    """A template's limits (None in rows written before there were any)."""
    if value is None:
        return None
    concurrency_key, concurrency_limit, rate_key, count, period_s = value
    return JobLimits(concurrency_key, concurrency_limit, rate_key, stored_rate(count, period_s))


def _definition(s: Schedule) -> dict[str, Any]:
    """The columns a registration sets."""
    t = s.template
    return {
        "cron": s.timing.cron,
        "every_us": _us(s.timing.every),
        "timezone": s.timing.zone,
        "queue": t.queue,
        "task": t.task,
        "payload": t.payload.data,
        "content_type": t.payload.content_type,
        "options": _options(t),
        "catch_up": s.catch_up.value,
    }


def _schedule(row: Any) -> Schedule:
    o = row.options
    attempts, base, factor, cap, jitter = o["retry"]
    template = JobTemplate(
        queue=row.queue,
        task=row.task,
        payload=Payload(row.payload, row.content_type),
        priority=o["priority"],
        retry=RetryPolicy(attempts, base * _US, factor, cap * _US, jitter),
        timeout=_delta(o["timeout_us"]),
        soft_timeout=_delta(o["soft_timeout_us"]),
        metadata=o["metadata"],
        tags=tuple(o["tags"]),
        limits=_limits_from(o.get("limits")),
    )
    state = getattr(row, "last_job_state", None)
    return Schedule(
        name=row.name,
        timing=Timing(row.cron, _delta(row.every_us), row.timezone),
        template=template,
        catch_up=CatchUp(row.catch_up),
        paused=row.paused,
        next_run_at=row.next_run_at,
        last_run_at=row.last_run_at,
        last_job_id=row.last_job_id,
        last_job_state=None if state is None else JobState(state),
    )


def put_schedule(
    conn: Connection, schedule: Schedule, now: datetime, max_schedules: int
) -> tuple[Schedule, bool]:
    """Register ``schedule`` (its ``next_run_at`` the first tick from now):
    store a new one, or change the definition of the one of that name,
    keeping its paused state, its runs and, while its timing is the same,
    its next tick. Returns the schedule and whether anything changed."""
    found = find_schedule(conn, schedule.name)
    if found is None:
        count = conn.execute(sa.select(sa.func.count()).select_from(schedules)).scalar_one()
        if count >= max_schedules:
            raise ResourceExhausted(
                f"the broker holds {count} schedules, its limit; delete some first"
            )
        conn.execute(
            schedules.insert().values(
                name=schedule.name,
                paused=schedule.paused,
                next_run_at=schedule.next_run_at,
                created_at=now,
                updated_at=now,
                **_definition(schedule),
            )
        )
        return schedule, True
    if found.same_definition(schedule):
        return found, False
    values = {**_definition(schedule), "updated_at": now}
    if found.timing != schedule.timing:
        values["next_run_at"] = schedule.next_run_at
    conn.execute(schedules.update().where(schedules.c.name == schedule.name).values(values))
    return get_schedule(conn, schedule.name), True


def find_schedule(conn: Connection, name: str) -> Schedule | None:
    row = conn.execute(_WITH_STATE.where(schedules.c.name == name)).first()
    return None if row is None else _schedule(row)


def get_schedule(conn: Connection, name: str) -> Schedule:
    found = find_schedule(conn, name)
    if found is None:
        raise NotFound(f"no schedule named {name!r}")
    return found


def list_schedules(conn: Connection, after: str | None, limit: int) -> list[Schedule]:
    """Up to ``limit`` schedules in name order, after ``after``."""
    stmt = _WITH_STATE.order_by(schedules.c.name).limit(limit)
    if after is not None:
        stmt = stmt.where(schedules.c.name > after)
    return [_schedule(row) for row in conn.execute(stmt)]


def set_paused(conn: Connection, name: str, paused: bool, now: datetime) -> Schedule:
    """Pause or resume. A resumed schedule keeps its next tick: one that passed
    while paused is a missed tick, which its catch-up policy decides on."""
    changed = conn.execute(
        schedules.update().where(schedules.c.name == name).values(paused=paused, updated_at=now)
    )
    if changed.rowcount == 0:
        raise NotFound(f"no schedule named {name!r}")
    return get_schedule(conn, name)


def delete_schedule(conn: Connection, name: str) -> None:
    """The jobs it made stay."""
    if conn.execute(schedules.delete().where(schedules.c.name == name)).rowcount == 0:
        raise NotFound(f"no schedule named {name!r}")


def due_schedules(conn: Connection, now: datetime, limit: int) -> list[Schedule]:
    """Running schedules whose next tick is at or before ``now``, earliest first."""
    stmt = (
        sa.select(schedules)
        .where(_RUNNING, schedules.c.next_run_at <= now)
        .order_by(schedules.c.next_run_at)
        .limit(limit)
    )
    return [_schedule(row) for row in conn.execute(stmt)]


def next_tick_at(conn: Connection) -> datetime | None:
    """The earliest next tick of a running schedule."""
    stmt = sa.select(sa.func.min(schedules.c.next_run_at)).where(_RUNNING)
    found: datetime | None = conn.execute(stmt).scalar()
    return found


def take_tick(
    conn: Connection,
    insert_new: ops.InsertNew,
    name: str,
    due: datetime,
    tick: Tick,
    job: NewJob | None,
    now: datetime,
    dedup_window: timedelta,
) -> Moved[str | None]:
    """Move the schedule's next tick on from ``due`` and store ``job`` (the
    job of ``tick.run``; None for a tick skipped), if ``due`` is still its
    next tick. The id of the job stored, or None: skipped, or taken already
    (by another replica, or a pause, change or delete came first)."""
    values: dict[str, Any] = {"next_run_at": tick.next_run_at}
    if job is not None:
        values.update(last_run_at=tick.run, last_job_id=job.id)
    taken = conn.execute(
        schedules.update()
        .where(schedules.c.name == name, schedules.c.next_run_at == due, _RUNNING)
        .values(values)
    )
    if taken.rowcount == 0 or job is None:
        return Moved(None, [])
    # A tick's key names its schedule and tick: a job an earlier registration
    # made for the tick is its job, whatever payload that one had.
    moved = ops.submit_many(conn, insert_new, [job], now, dedup_window, strict=False)
    [result] = moved.result
    if result.duplicate:  # the key's job was made before, by an earlier registration
        conn.execute(
            schedules.update().where(schedules.c.name == name).values(last_job_id=result.job_id)
        )
    return Moved(result.job_id, moved.transitions)
