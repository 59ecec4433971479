"""The store contract over the shared operations in ``ops``.

A dialect supplies how an operation runs inside one transaction (``_run``),
the engine, and the few statements that differ (insert-or-ignore).
"""

from __future__ import annotations

import abc
import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain import limits
from jobbroker_server.domain.flow import SweepCursor
from jobbroker_server.domain.keys import ApiKey
from jobbroker_server.domain.models import (
    Completion,
    Failure,
    Job,
    JobFacts,
    JobFilter,
    JobPage,
    Lease,
    LeaseAsk,
    LeaseRef,
    NewJob,
    Progress,
    ReportResult,
    SubmitResult,
)
from jobbroker_server.domain.queues import QueueDefaults, QueueSettings
from jobbroker_server.domain.schedules import Schedule, Tick
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import JobEvent, LogPosition, Moved
from jobbroker_server.store import events, faults, keys, migrations, ops, queues, schedules
from jobbroker_server.store.base import Store

P = ParamSpec("P")
T = TypeVar("T")


class SqlStore(Store):
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._inflight: set[asyncio.Future[Any]] = set()
        self._faults = faults.FaultLog()

    # --- what a dialect supplies ---

    @abc.abstractmethod
    def _transact(
        self, op: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]:
        """Run ``op(conn, ...)`` inside one transaction and return its result."""

    @abc.abstractmethod
    def _insert_new(self, conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
        """``ops.InsertNew``: store the rows whose idempotency and unique keys are free."""

    @abc.abstractmethod
    async def _dispose(self) -> None:
        """Close connections; nothing runs any more."""

    async def _run(
        self, op: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run an operation to its end even if the caller is cancelled.

        A transaction cut off mid-way would leave the driver's connection to be
        torn down (and an acknowledged lease possibly undelivered); instead the
        caller stops waiting while the operation commits or rolls back, and
        close() waits for it.

        A fault of the database (unreachable, disk full, read-only) comes out
        as StoreUnavailable or StorageFull, in our words; the driver's error
        goes to the log (see ``faults``).
        """
        return await self._guarded(self._transact(op, *args, **kwargs))

    async def _guarded(self, work: Awaitable[T]) -> T:
        """``_run`` for an operation a dialect runs its own way."""
        task = asyncio.ensure_future(work)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        try:
            return await asyncio.shield(task)
        except Exception as error:
            fault = faults.translate(error)
            if fault is None:
                raise
            self._faults.report(fault, error)
            raise fault from None

    async def close(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._dispose()

    # --- the contract ---

    def _dialect_schema(self, conn: Connection) -> None:
        """Objects only this dialect has (triggers); applied after every migrate."""

    async def migrate(self) -> int:
        return await self._run(migrations.migrate, self._dialect_schema)

    async def submit_many(
        self, jobs: Sequence[NewJob], now: datetime, dedup_window: timedelta
    ) -> Moved[list[SubmitResult]]:
        if not jobs:
            return Moved([], [])
        return await self._run(ops.submit_many, self._insert_new, jobs, now, dedup_window)

    async def lease_many(
        self,
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_for: timedelta,
        now: datetime,
        max_bytes: int = limits.MAX_LEASE_BYTES,
        holder: str = "",
        reports_starts: bool = True,
        limited: Sequence[str] = (),
    ) -> Moved[list[Lease]]:
        if limit <= 0 or not queues:
            return Moved([], [])
        return await self._run(
            ops.lease_many,
            queues,
            limit,
            worker_id,
            lease_for,
            now,
            max_bytes,
            holder,
            reports_starts,
            limited,
        )

    async def submit_and_lease(
        self,
        jobs: Sequence[NewJob],
        now: datetime,
        dedup_window: timedelta,
        asks: Sequence[LeaseAsk],
        lease_for: timedelta,
    ) -> Moved[tuple[list[SubmitResult], list[list[Lease]]]]:
        op = ops.submit_and_lease
        return await self._run(op, self._insert_new, jobs, now, dedup_window, asks, lease_for)

    async def heartbeat_many(
        self, leases: Sequence[LeaseRef], lease_for: timedelta, now: datetime
    ) -> list[ReportResult]:
        return await self._run(ops.heartbeat_many, leases, lease_for, now) if leases else []

    async def start_many(
        self, leases: Sequence[LeaseRef], now: datetime
    ) -> Moved[list[ReportResult]]:
        return await self._run(ops.start_many, leases, now) if leases else Moved([], [])

    async def progress(
        self, report: Progress, lease_for: timedelta, now: datetime
    ) -> Moved[ReportResult]:
        return await self._run(ops.progress, report, lease_for, now)

    async def complete_many(
        self, completions: Sequence[Completion], now: datetime
    ) -> Moved[list[ReportResult]]:
        if not completions:
            return Moved([], [])
        return await self._run(ops.complete_many, completions, now)

    async def fail_many(
        self, failures: Sequence[Failure], now: datetime
    ) -> Moved[list[ReportResult]]:
        if not failures:
            return Moved([], [])
        return await self._run(ops.fail_many, self._rng, failures, now)

    async def release_many(
        self, leases: Sequence[LeaseRef], now: datetime
    ) -> Moved[list[ReportResult]]:
        return await self._run(ops.release_many, leases, now) if leases else Moved([], [])

    async def cancel(self, job_id: str, now: datetime, actor: str = "client") -> Moved[Job]:
        return await self._run(ops.cancel, job_id, now, actor)

    async def cancel_workflow(self, workflow_id: str, now: datetime, actor: str) -> Moved[int]:
        return await self._run(ops.cancel_workflow, workflow_id, now, actor)

    async def reap_expired(self, now: datetime) -> Moved[int]:
        return await self._run(ops.reap_expired, self._rng, now)

    async def promote_scheduled(self, now: datetime) -> Moved[int]:
        return await self._run(ops.promote_scheduled, now)

    async def next_scheduled_at(self) -> datetime | None:
        return await self._run(ops.next_scheduled_at)

    async def reopen_limits(self, now: datetime) -> Moved[set[str]]:
        return await self._run(ops.reopen_limits, now)

    async def sweep_limits(self, now: datetime, after: SweepCursor) -> Moved[SweepCursor]:
        admitted = await self._run(ops.sweep_concurrency, now, after[0])
        rates = await self._run(ops.sweep_rates, now, after[1])
        return Moved((admitted.result, rates), admitted.transitions)

    async def get_job(self, job_id: str, *, history: bool = True) -> Job:
        return await self._run(ops.get_job, job_id, history=history)

    async def list_jobs(self, where: JobFilter) -> JobPage:
        return await self._run(ops.list_jobs, where)

    async def explain_job(self, job_id: str, now: datetime) -> JobFacts:
        return await self._run(ops.explain_job, job_id, now)

    async def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        return await self._run(ops.job_events_of, job_id, after, limit)

    async def tail_from(self, after: int) -> LogPosition:
        return await self._run(events.tail_from, after)

    async def tail_events(
        self, at: LogPosition, queue: str | None, task: str | None, limit: int
    ) -> tuple[list[JobEvent], LogPosition]:
        return await self._run(events.tail, at, queue, task, limit)

    async def replay_dead(
        self, queue: str | None, job_ids: Sequence[str], now: datetime, actor: str = "client"
    ) -> Moved[list[str]]:
        return await self._run(ops.replay_dead, queue, job_ids, now, actor)

    async def purge_dead(
        self, queue: str | None, job_ids: Sequence[str], now: datetime, actor: str = "client"
    ) -> Moved[int]:
        return await self._run(ops.purge_dead, queue, job_ids, now, actor)

    async def delete_finished(self, before: datetime, limit: int) -> Moved[int]:
        return await self._run(ops.delete_finished, before, limit)

    async def queue_depths(self, max_queues: int) -> dict[tuple[str | None, JobState], int]:
        return await self._run(ops.queue_depths, max_queues)

    async def ready_queues(self, queues: Sequence[str]) -> set[str]:
        return await self._run(ops.ready_queues, queues) if queues else set()

    async def probe_write(self, broker: str, now: datetime) -> None:
        await self._run(ops.probe_write, broker, now)

    async def create_key(self, key: ApiKey) -> None:
        try:
            await self._run(keys.create_key, key)
        except sa.exc.IntegrityError:  # another made one of that name meanwhile
            raise keys.taken(key.name) from None

    async def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        return await self._run(keys.list_keys, include_revoked)

    async def revoke_key(self, id_or_name: str, now: datetime) -> ApiKey:
        return await self._run(keys.revoke_key, id_or_name, now)

    async def put_schedule(
        self, schedule: Schedule, now: datetime, max_schedules: int
    ) -> tuple[Schedule, bool]:
        try:
            return await self._run(schedules.put_schedule, schedule, now, max_schedules)
        except sa.exc.IntegrityError:  # another registered that name meanwhile
            return await self._run(schedules.put_schedule, schedule, now, max_schedules)

    async def get_schedule(self, name: str) -> Schedule:
        return await self._run(schedules.get_schedule, name)

    async def list_schedules(self, after: str | None, limit: int) -> list[Schedule]:
        return await self._run(schedules.list_schedules, after, limit)

    async def set_schedule_paused(self, name: str, paused: bool, now: datetime) -> Schedule:
        return await self._run(schedules.set_paused, name, paused, now)

    async def delete_schedule(self, name: str) -> None:
        await self._run(schedules.delete_schedule, name)

    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]:
        return await self._run(schedules.due_schedules, now, limit)

    async def next_tick_at(self) -> datetime | None:
        return await self._run(schedules.next_tick_at)

    async def take_tick(
        self,
        name: str,
        due: datetime,
        tick: Tick,
        job: NewJob | None,
        now: datetime,
        dedup_window: timedelta,
    ) -> Moved[str | None]:
        op = schedules.take_tick
        return await self._run(op, self._insert_new, name, due, tick, job, now, dedup_window)

    async def list_queues(self) -> list[QueueSettings]:
        return await self._run(queues.list_queues)

    async def set_queue_defaults(
        self, name: str, defaults: QueueDefaults, now: datetime
    ) -> QueueSettings:
        return await self._run(queues.set_defaults, name, defaults, now)

    async def set_queue_paused(
        self, name: str, paused: bool, actor: str, now: datetime
    ) -> QueueSettings:
        return await self._run(queues.set_paused, name, paused, actor, now)
