"""The store contract in SQLAlchemy Core, shared by every dialect.

A dialect module supplies the engine, the transaction and the few statements
that differ (insert-or-ignore, row locking); everything else lives here once.
"""

from __future__ import annotations

import abc
import asyncio
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from jobbroker_server.domain import states
from jobbroker_server.domain.errors import FailedPrecondition, NotFound
from jobbroker_server.domain.models import (
    AttemptOutcome,
    Completion,
    ErrorInfo,
    Failure,
    Job,
    JobFilter,
    Lease,
    LeaseRef,
    NewJob,
    Progress,
    ReapedLease,
    ReportResult,
    ReportStatus,
    SubmitResult,
)
from jobbroker_server.domain.retry import after_failure
from jobbroker_server.domain.states import JobState
from jobbroker_server.store import rows
from jobbroker_server.store.base import Store
from jobbroker_server.store.tables import SCHEMA_VERSION, attempts, jobs, metadata, schema_version

RUNNING = JobState.RUNNING.value
_FINISHED = (JobState.SUCCEEDED.value, JobState.CANCELLED.value)


class SchemaTooNew(FailedPrecondition):
    reason = "SCHEMA_TOO_NEW"


SqlStoreT = TypeVar("SqlStoreT", bound="SqlStore")


def _sources(dst: JobState) -> list[str]:
    return sorted(s.value for s in states.sources(dst))


P = ParamSpec("P")
T = TypeVar("T")


def _whole(
    method: Callable[Concatenate[SqlStoreT, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[SqlStoreT, P], Coroutine[Any, Any, T]]:
    """Run a store operation to its end even if its caller is cancelled.

    A transaction cut off mid-way leaves the driver's connection to be torn
    down (and an acknowledged lease possibly undelivered); instead the caller
    stops waiting while the operation commits or rolls back, and close()
    waits for it.
    """

    async def run(self: SqlStoreT, /, *args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.ensure_future(method(self, *args, **kwargs))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    return run


class SqlStore(Store):
    def __init__(self, engine: AsyncEngine, rng: random.Random | None = None) -> None:
        self._engine = engine
        self._rng = rng or random.Random()
        self._inflight: set[asyncio.Future[Any]] = set()

    # --- what a dialect supplies ---

    @abc.abstractmethod
    def _tx(self) -> Any:
        """An async context manager yielding a connection inside one transaction."""

    @abc.abstractmethod
    def _insert_ignoring_conflicts(self) -> sa.Insert:
        """INSERT INTO jobs that skips rows whose idempotency key exists."""

    # --- schema ---

    async def migrate(self) -> None:
        async with self._tx() as conn:
            await conn.run_sync(lambda sync: metadata.create_all(sync, checkfirst=True))
            found = (await conn.execute(sa.select(sa.func.max(schema_version.c.version)))).scalar()
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the database schema is version {found}, newer than this broker's "
                    f"{SCHEMA_VERSION}; upgrade jobbroker"
                )
            if found is None:
                await conn.execute(
                    schema_version.insert().values(
                        version=SCHEMA_VERSION, applied_at=datetime.now(UTC)
                    )
                )

    async def close(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await self._engine.dispose()

    # --- producers ---

    @_whole
    async def submit_many(
        self, jobs_in: Sequence[NewJob], now: datetime, dedup_window: timedelta
    ) -> list[SubmitResult]:
        if not jobs_in:
            return []
        values = [rows.new_job_row(job, now) for job in jobs_in]
        keys = sorted({job.idempotency_key for job in jobs_in if job.idempotency_key})
        async with self._tx() as conn:
            if keys:
                # An expired key is moved aside so that the unique constraint
                # admits the new job; within the window the constraint decides.
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.idempotency_key.in_(keys), jobs.c.created_at < now - dedup_window)
                    .values(idempotency_key=None)
                )
                await conn.execute(self._insert_ignoring_conflicts(), values)
                found = await conn.execute(
                    sa.select(jobs.c.idempotency_key, jobs.c.id, jobs.c.state).where(
                        jobs.c.idempotency_key.in_(keys)
                    )
                )
                owners = {r.idempotency_key: (r.id, r.state) for r in found}
            else:
                await conn.execute(jobs.insert(), values)
                owners = {}
        results = []
        for job, row in zip(jobs_in, values, strict=True):
            key = job.idempotency_key
            if key and owners[key][0] != job.id:
                owner_id, owner_state = owners[key]
                results.append(SubmitResult(owner_id, JobState(owner_state), duplicate=True))
            else:
                results.append(SubmitResult(job.id, JobState(row["state"]), duplicate=False))
        return results

    # --- workers ---

    @_whole
    async def lease_many(
        self,
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_for: timedelta,
        now: datetime,
    ) -> list[Lease]:
        if limit <= 0 or not queues:
            return []
        states.check(JobState.PENDING, JobState.RUNNING)
        # SKIP LOCKED: replicas leasing at once never pick the same job
        # (SQLite, with one writer, renders no locking clause).
        pick = (
            sa.select(jobs)
            .where(jobs.c.state == JobState.PENDING.value, jobs.c.queue.in_(list(queues)))
            .order_by(jobs.c.priority.desc(), jobs.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        expires = now + lease_for
        async with self._tx() as conn:
            picked = (await conn.execute(pick)).all()
            if not picked:
                return []
            updates = []
            for row in picked:
                deadline = now + timedelta(seconds=row.timeout_s) if row.timeout_s else None
                updates.append(
                    {"b_id": row.id, "token": row.fencing_token + 1, "deadline": deadline}
                )
            await conn.execute(
                jobs.update()
                .where(jobs.c.id == sa.bindparam("b_id"))
                .values(
                    state=RUNNING,
                    attempts=jobs.c.attempts + 1,
                    fencing_token=sa.bindparam("token"),
                    deadline_at=sa.bindparam("deadline"),
                    started_at=now,
                    leased_by=worker_id,
                    lease_expires_at=expires,
                    progress=0.0,
                    progress_message="",
                ),
                updates,
            )
            await conn.execute(
                attempts.insert(),
                [
                    {
                        "job_id": row.id,
                        "fencing_token": row.fencing_token + 1,
                        "number": row.attempts + 1,
                        "worker_id": worker_id,
                        "started_at": now,
                        "finished_at": None,
                        "outcome": AttemptOutcome.RUNNING.value,
                        "error": None,
                    }
                    for row in picked
                ],
            )
        leases = []
        for row in picked:
            job = rows.job_from_row(row)
            token = row.fencing_token + 1
            leased = replace(
                job,
                state=JobState.RUNNING,
                attempts=job.attempts + 1,
                started_at=now,
                fencing_token=token,
                lease_expires_at=expires,
            )
            leases.append(Lease(leased, token, expires))
        return leases

    @_whole
    async def heartbeat_many(
        self, leases: Sequence[LeaseRef], lease_for: timedelta, now: datetime
    ) -> list[ReportResult]:
        expires = now + lease_for
        results = []
        async with self._tx() as conn:
            for ref in leases:
                changed = await conn.execute(
                    jobs.update().where(*_held(ref)).values(lease_expires_at=expires)
                )
                if changed.rowcount == 1:
                    results.append(
                        ReportResult(ref.job_id, ReportStatus.OK, lease_expires_at=expires)
                    )
                else:
                    results.append(await _lost(conn, ref))
        return results

    @_whole
    async def progress(self, report: Progress, now: datetime) -> ReportResult:
        async with self._tx() as conn:
            changed = await conn.execute(
                jobs.update()
                .where(*_held(report.lease))
                .values(progress=report.progress, progress_message=report.message)
            )
            if changed.rowcount == 1:
                return ReportResult(report.lease.job_id, ReportStatus.OK)
            return await _lost(conn, report.lease)

    @_whole
    async def complete_many(
        self, completions: Sequence[Completion], now: datetime
    ) -> list[ReportResult]:
        done = states.check(JobState.RUNNING, JobState.SUCCEEDED)
        results = []
        async with self._tx() as conn:
            for c in completions:
                changed = await conn.execute(
                    jobs.update()
                    .where(*_held(c.lease))
                    .values(
                        state=done.value,
                        finished_at=now,
                        result=c.result.data if c.result else None,
                        result_content_type=c.result.content_type if c.result else None,
                        progress=1.0,
                        **_LEASE_CLEARED,
                    )
                    .returning(jobs.c.queue)
                )
                queue = changed.scalar()
                if queue is not None:
                    await _end_attempt(conn, c.lease, AttemptOutcome.SUCCEEDED, None, now)
                    results.append(
                        ReportResult(c.lease.job_id, ReportStatus.OK, state=done, queue=queue)
                    )
                else:
                    results.append(await _lost(conn, c.lease))
        return results

    @_whole
    async def fail_many(self, failures: Sequence[Failure], now: datetime) -> list[ReportResult]:
        results = []
        async with self._tx() as conn:
            for f in failures:
                held = sa.select(jobs).where(*_held(f.lease)).with_for_update()
                row = (await conn.execute(held)).first()
                if row is None:
                    results.append(await _lost(conn, f.lease))
                    continue
                outcome = AttemptOutcome.CANCELLED if f.cancelled else AttemptOutcome.FAILED
                state = await self._end_running(
                    conn, row, outcome, f.error, now, f.permanent, f.retry_after
                )
                results.append(
                    ReportResult(f.lease.job_id, ReportStatus.OK, state=state, queue=row.queue)
                )
        return results

    @_whole
    async def release_many(self, leases: Sequence[LeaseRef], now: datetime) -> list[ReportResult]:
        back = states.check(JobState.RUNNING, JobState.PENDING)
        results = []
        async with self._tx() as conn:
            for ref in leases:
                changed = await conn.execute(
                    jobs.update()
                    .where(*_held(ref))
                    .values(
                        state=back.value,
                        attempts=jobs.c.attempts - 1,
                        scheduled_at=now,
                        started_at=None,
                        **_LEASE_CLEARED,
                    )
                )
                if changed.rowcount == 1:
                    await _end_attempt(conn, ref, AttemptOutcome.RELEASED, None, now)
                    results.append(ReportResult(ref.job_id, ReportStatus.OK, state=back))
                else:
                    results.append(await _lost(conn, ref))
        return results

    async def _end_running(
        self,
        conn: AsyncConnection,
        row: sa.Row[Any],
        outcome: AttemptOutcome,
        error: ErrorInfo | None,
        now: datetime,
        permanent: bool = False,
        retry_after: timedelta | None = None,
    ) -> JobState:
        """End a running attempt that did not succeed; retry, dead-letter or cancel."""
        if outcome is AttemptOutcome.CANCELLED or row.cancel_requested:
            dst, run_at = JobState.CANCELLED, None
        else:
            wait = after_failure(
                attempts=row.attempts,
                policy=rows.retry_policy(row),
                permanent=permanent,
                retry_after=retry_after,
                rng=self._rng,
            )
            if wait is None:
                dst, run_at = JobState.DEAD, None
            else:
                dst = JobState.SCHEDULED if wait > timedelta(0) else JobState.PENDING
                run_at = now + wait
        states.check(JobState.RUNNING, dst)
        ref = LeaseRef(row.id, row.fencing_token)
        values: dict[str, Any] = {"state": dst.value, "last_error": rows.error_to_json(error)}
        if run_at is None:
            values["finished_at"] = now
        else:
            values["scheduled_at"] = run_at
        await conn.execute(jobs.update().where(*_held(ref)).values(**values, **_LEASE_CLEARED))
        await _end_attempt(conn, ref, outcome, error, now)
        return dst

    @_whole
    async def reap_expired(self, now: datetime) -> list[ReapedLease]:
        expired = jobs.c.lease_expires_at < now
        overdue = jobs.c.deadline_at < now
        pick = (
            sa.select(jobs, overdue.label("overdue"))
            .where(jobs.c.state == RUNNING, sa.or_(expired, overdue))
            .limit(500)
            .with_for_update(skip_locked=True)
        )
        reaped = []
        async with self._tx() as conn:
            for row in (await conn.execute(pick)).all():
                if row.overdue:
                    outcome = AttemptOutcome.TIMED_OUT
                    error = ErrorInfo(
                        "TimeoutError", f"attempt exceeded its {row.timeout_s}s timeout"
                    )
                else:
                    outcome = AttemptOutcome.LEASE_EXPIRED
                    error = ErrorInfo(
                        "LeaseExpired", "lease expired: the worker stopped heartbeating"
                    )
                state = await self._end_running(conn, row, outcome, error, now)
                ref = LeaseRef(row.id, row.fencing_token)
                reaped.append(ReapedLease(ref, row.queue, outcome, state))
        return reaped

    @_whole
    async def promote_scheduled(self, now: datetime) -> list[tuple[str, str]]:
        dst = states.check(JobState.SCHEDULED, JobState.PENDING)
        async with self._tx() as conn:
            changed = await conn.execute(
                jobs.update()
                .where(jobs.c.state == JobState.SCHEDULED.value, jobs.c.scheduled_at <= now)
                .values(state=dst.value)
                .returning(jobs.c.id, jobs.c.queue)
            )
            return [(job_id, queue) for job_id, queue in changed]

    @_whole
    async def next_scheduled_at(self) -> datetime | None:
        stmt = sa.select(sa.func.min(jobs.c.scheduled_at)).where(
            jobs.c.state == JobState.SCHEDULED.value
        )
        async with self._tx() as conn:
            due: datetime | None = (await conn.execute(stmt)).scalar()
            return due

    # --- operators ---

    @_whole
    async def cancel(self, job_id: str, now: datetime) -> Job:
        dst = JobState.CANCELLED
        async with self._tx() as conn:
            found = sa.select(jobs.c.state).where(jobs.c.id == job_id).with_for_update()
            row = (await conn.execute(found)).first()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            state = JobState(row.state)
            if state is JobState.RUNNING:
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.state == RUNNING)
                    .values(cancel_requested=True)
                )
            else:
                states.check(state, dst)
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.state.in_(_sources(dst)))
                    .values(state=dst.value, finished_at=now)
                )
            return await _job(conn, job_id, history=True)

    @_whole
    async def get_job(self, job_id: str, *, history: bool = True) -> Job:
        async with self._tx() as conn:
            return await _job(conn, job_id, history=history)

    @_whole
    async def list_jobs(self, where: JobFilter) -> list[Job]:
        stmt = sa.select(jobs).order_by(jobs.c.id).limit(where.limit)
        if where.queue:
            stmt = stmt.where(jobs.c.queue == where.queue)
        if where.states:
            stmt = stmt.where(jobs.c.state.in_([s.value for s in where.states]))
        if where.task:
            stmt = stmt.where(jobs.c.task == where.task)
        if where.after_id:
            stmt = stmt.where(jobs.c.id > where.after_id)
        async with self._tx() as conn:
            return [rows.job_from_row(row) for row in await conn.execute(stmt)]

    @_whole
    async def replay_dead(
        self, queue: str | None, job_ids: Sequence[str], now: datetime
    ) -> list[str]:
        dst = states.check(JobState.DEAD, JobState.PENDING)
        async with self._tx() as conn:
            ids = await _dead_ids(conn, queue, job_ids)
            if ids:
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id.in_(ids), jobs.c.state == JobState.DEAD.value)
                    .values(
                        state=dst.value,
                        attempts=0,
                        scheduled_at=now,
                        started_at=None,
                        finished_at=None,
                        result=None,
                        result_content_type=None,
                        cancel_requested=False,
                    )
                )
            return ids

    @_whole
    async def purge_dead(self, queue: str | None, job_ids: Sequence[str]) -> int:
        async with self._tx() as conn:
            ids = await _dead_ids(conn, queue, job_ids)
            await _delete(conn, ids)
            return len(ids)

    @_whole
    async def delete_finished(self, before: datetime, limit: int) -> int:
        async with self._tx() as conn:
            ids = list(
                (
                    await conn.execute(
                        sa.select(jobs.c.id)
                        .where(jobs.c.state.in_(_FINISHED), jobs.c.finished_at < before)
                        .limit(limit)
                    )
                ).scalars()
            )
            await _delete(conn, ids)
            return len(ids)

    @_whole
    async def queue_depths(self) -> dict[tuple[str, JobState], int]:
        stmt = sa.select(jobs.c.queue, jobs.c.state, sa.func.count()).group_by(
            jobs.c.queue, jobs.c.state
        )
        async with self._tx() as conn:
            return {(q, JobState(s)): n for q, s, n in await conn.execute(stmt)}


_LEASE_CLEARED: dict[str, Any] = {"lease_expires_at": None, "deadline_at": None, "leased_by": None}


def _held(ref: LeaseRef) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE clause of a write that needs the current lease."""
    return (
        jobs.c.id == ref.job_id,
        jobs.c.state == RUNNING,
        jobs.c.fencing_token == ref.fencing_token,
    )


async def _lost(conn: AsyncConnection, ref: LeaseRef) -> ReportResult:
    row = (
        await conn.execute(
            sa.select(jobs.c.state, jobs.c.fencing_token).where(jobs.c.id == ref.job_id)
        )
    ).first()
    if row is None:
        return ReportResult(ref.job_id, ReportStatus.NOT_FOUND, f"no job with id {ref.job_id!r}")
    return ReportResult(
        ref.job_id,
        ReportStatus.LEASE_LOST,
        f"lease lost: job {ref.job_id} is {row.state} with fencing token {row.fencing_token}, "
        f"the report carried {ref.fencing_token}",
    )


async def _end_attempt(
    conn: AsyncConnection,
    ref: LeaseRef,
    outcome: AttemptOutcome,
    error: ErrorInfo | None,
    now: datetime,
) -> None:
    await conn.execute(
        attempts.update()
        .where(attempts.c.job_id == ref.job_id, attempts.c.fencing_token == ref.fencing_token)
        .values(finished_at=now, outcome=outcome.value, error=rows.error_to_json(error))
    )


async def _job(conn: AsyncConnection, job_id: str, *, history: bool) -> Job:
    row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
    if row is None:
        raise NotFound(f"no job with id {job_id!r}")
    tried = []
    if history:
        found = await conn.execute(
            sa.select(attempts)
            .where(attempts.c.job_id == job_id)
            .order_by(attempts.c.fencing_token)
        )
        tried = [rows.attempt_from_row(a) for a in found]
    return rows.job_from_row(row, tried)


async def _dead_ids(conn: AsyncConnection, queue: str | None, job_ids: Sequence[str]) -> list[str]:
    stmt = sa.select(jobs.c.id).where(jobs.c.state == JobState.DEAD.value).order_by(jobs.c.id)
    if queue:
        stmt = stmt.where(jobs.c.queue == queue)
    if job_ids:
        stmt = stmt.where(jobs.c.id.in_(list(job_ids)))
    return list((await conn.execute(stmt)).scalars())


async def _delete(conn: AsyncConnection, ids: list[str]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        await conn.execute(attempts.delete().where(attempts.c.job_id.in_(chunk)))
        await conn.execute(jobs.delete().where(jobs.c.id.in_(chunk)))
