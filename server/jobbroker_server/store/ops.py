"""The store's operations in SQLAlchemy Core, shared by every dialect.

Each function is one operation on a sync ``Connection`` inside a transaction
the caller opened: SQLite runs it whole on its one connection (see
``sqlite.py``), PostgreSQL through ``AsyncConnection.run_sync`` over asyncpg.
Jobs move only along the edges of ``domain.states``; a write that needs a
lease names the job, state running and the fencing token.
"""

from __future__ import annotations

import os
import random
from collections import namedtuple
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from jobbroker_server.domain import limits, states
from jobbroker_server.domain.errors import Internal, NotFound, StorageFull
from jobbroker_server.domain.flow import Key
from jobbroker_server.domain.models import (
    AttemptOutcome,
    Completion,
    ErrorInfo,
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
    ReportStatus,
    SubmitResult,
    WaitsOn,
)
from jobbroker_server.domain.retry import after_failure
from jobbroker_server.domain.states import HELD, JobState
from jobbroker_server.domain.transitions import BROKER, JobEvent, Moved, Reason, Transition
from jobbroker_server.store import dedup, dependencies, events, flow, rows
from jobbroker_server.store import queues as queue_settings
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import (
    UTCDateTime,
    attempts,
    broker_health,
    job_deps,
    job_events,
    jobs,
    queues,
)

RUNNING = JobState.RUNNING.value
LEASED = JobState.LEASED.value
_HELD_STATES = {LEASED, RUNNING}
_FINISHED = (JobState.SUCCEEDED, JobState.CANCELLED)  # what retention deletes


def _sources(dst: JobState) -> list[str]:
    return sorted(s.value for s in states.sources(dst))


T = TypeVar("T")


def _moved(conn: Connection, now: datetime, result: T, transitions: list[Transition]) -> Moved[T]:
    """Every operation that moves jobs returns through here: the jobs waiting
    on those it ended follow them, and all the transitions go into the job
    event log in its transaction, and back to the broker."""
    if transitions:
        transitions += dependencies.follow(conn, now, transitions)
        transitions += flow.follow(conn, transitions)
    events.record(conn, transitions, now)
    return Moved(result, transitions)


InsertNew = dedup.InsertNew


def submit_many(
    conn: Connection,
    insert_new: InsertNew,
    jobs_in: Sequence[NewJob],
    now: datetime,
    dedup_window: timedelta,
    *,
    strict: bool = True,
) -> Moved[list[SubmitResult]]:
    """Store the jobs; a job whose key names another is answered with that
    one (see ``dedup``). ``strict``: refuse an idempotency key sent again
    with another job (KeyReused)."""
    if not jobs_in:
        return Moved([], [])
    values = [rows.new_job_row(job, now) for job in jobs_in]
    keyed = {job.queue for job in jobs_in if job.limits is not None}
    if keyed:
        queue_settings.mark_limited(conn, sorted(keyed), now)
    # The unique constraint and index decide between racing submits of one key.
    stored = insert_new(conn, values)
    if len(stored) == len(values):
        if keyed:
            _set_limits(conn, values, jobs_in, stored)
        dependencies.link(conn, jobs_in, stored)
        made = [SubmitResult(v["id"], JobState(v["state"]), False) for v in values]
        moved = [_submitted(v, job.submitted_by) for v, job in zip(values, jobs_in, strict=True)]
        return _moved(conn, now, made, moved)
    if len({v["id"] for v in values}) < len(values):
        raise Internal("a job id is a duplicate in one submit")
    clashes = [v for v in values if v["id"] not in stored]
    owner = dedup.owners(conn, insert_new, clashes, now - dedup_window, strict=strict)
    results = []
    for v in values:
        job_id, state = owner.get(v["id"], (v["id"], v["state"]))
        results.append(SubmitResult(job_id, _STATE[state], job_id != v["id"]))
    new = {r.job_id for r in results if not r.duplicate}
    if keyed:
        _set_limits(conn, values, jobs_in, new)
    dependencies.link(conn, jobs_in, new)  # after the expired keys' jobs went in too
    moved = [
        _submitted(v, job.submitted_by)
        for v, job in zip(values, jobs_in, strict=True)
        if v["id"] in new
    ]
    return _moved(conn, now, results, moved)


def _set_limits(
    conn: Connection, values: list[dict[str, Any]], jobs_in: Sequence[NewJob], stored: set[str]
) -> None:
    """Write the flow limits of the jobs stored (the insert leaves them NULL)."""
    limited = [
        rows.limit_values(v["id"], job.limits)
        for v, job in zip(values, jobs_in, strict=True)
        if job.limits is not None and v["id"] in stored
    ]
    if limited:
        _SET_LIMITS.run_many(conn, limited)


_STATE = {state.value: state for state in JobState}  # faster than JobState(value)
_LIMIT_COLUMNS = ("concurrency_key", "concurrency_limit", "rate_key", "rate_count", "rate_period_s")
_SET_LIMITS = Prepared(
    jobs.update()
    .where(jobs.c.id == sa.bindparam("b_id"))
    .values({name: sa.bindparam(name) for name in _LIMIT_COLUMNS})
)


def _submitted(row: dict[str, Any], actor: str) -> Transition:
    state = _STATE[row["state"]]
    detail = {"run_at": row["scheduled_at"].isoformat()} if state is JobState.SCHEDULED else {}
    return Transition(row["id"], row["queue"], None, state, Reason.SUBMITTED, 0, actor, detail)


# --- workers ---


def _is(state: JobState) -> sa.ColumnElement[bool]:
    """``state = 'running'`` with the value in the SQL text. Compared with a
    bound parameter, the planner cannot know that a partial index (ready,
    scheduled, running jobs) applies until it sees the value: SQLite then
    prepares the statement again at every execution, which doubled the cost
    of a lease, and a generic PostgreSQL plan cannot use the index at all."""
    return jobs.c.state == sa.literal_column(f"'{state.value}'")


def _in(states: Sequence[JobState]) -> sa.ColumnElement[bool]:
    """``_is`` for any number of states: ``state IN ('succeeded', 'cancelled')``
    matches the partial index of finished jobs."""
    if len(states) == 1:
        return _is(states[0])
    return jobs.c.state.in_([sa.literal_column(f"'{state.value}'") for state in states])


def _ids(name: str = "ids") -> sa.BindParameter[Any]:
    return sa.bindparam(name, expanding=True)


def _instant(name: str = "now") -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=UTCDateTime())


def _not_before(value: sa.ColumnElement[Any], floor: sa.ColumnElement[Any]) -> Any:
    """``value``, or ``floor`` when it is earlier (NULL stays NULL)."""
    return sa.case((value < floor, floor), else_=value)


# The hot path's statements are built once: building a SQLAlchemy expression
# and its cache key per call cost more than SQLite took to run it.
# SKIP LOCKED: replicas leasing at once never pick the same job (SQLite, with
# one writer, renders no locking clause). The materialized CTE runs the
# LIMITed pick once, whatever plan the UPDATE gets.
# The paused queues, and the limited ones (leased by ``flow.pick``), read by
# each lease in its own statement: a pause holds on every replica from its
# commit on. Only the rows of the lease's own queues are read (by key),
# however many queues have settings.
PASSED_OVER = sa.select(queues.c.name).where(
    queues.c.name.in_(_ids("queues")), sa.or_(queues.c.paused, queues.c.limited)
)
_CANDIDATES = (
    sa.select(jobs.c.id, jobs.c.priority, sa.func.length(jobs.c.payload).label("size"))
    .where(
        _is(JobState.PENDING),
        jobs.c.queue.in_(_ids("queues")),
        jobs.c.queue.not_in(PASSED_OVER),
    )
    .order_by(jobs.c.priority.desc(), jobs.c.id)
    .limit(sa.bindparam("limit"))
    .with_for_update(skip_locked=True)
    .cte("candidates")
    .prefix_with("MATERIALIZED")
)
# Of those, the ones whose payloads, with all before them, fit ``max_bytes``
# (the first always does): a lease message stays within what a worker accepts.
_AHEAD = sa.select(
    _CANDIDATES.c.id,
    (
        sa.func.sum(_CANDIDATES.c.size).over(
            order_by=(_CANDIDATES.c.priority.desc(), _CANDIDATES.c.id)
        )
        - _CANDIDATES.c.size
    ).label("ahead"),
).subquery("ahead")
_PICKED = sa.select(_AHEAD.c.id).where(_AHEAD.c.ahead < sa.bindparam("max_bytes")).cte("picked")


class TokenStep(FunctionElement[int]):
    """A random step, 0 to 2**32 - 1, added to each new fencing token: tokens
    still only grow, but the next one cannot be guessed from the last."""

    type = sa.BigInteger()
    inherit_cache = True
    name = "token_step"


@compiles(TokenStep, "sqlite")
def _sqlite_token_step(element: TokenStep, compiler: SQLCompiler, **kw: Any) -> str:
    return "(random() & 4294967295)"


@compiles(TokenStep, "postgresql")
def _postgres_token_step(element: TokenStep, compiler: SQLCompiler, **kw: Any) -> str:
    return "floor(random() * 4294967296)::bigint"


# The columns a lease sets to values the call knows: it reads back only the
# others, and ``lease_many`` fills these in, a bind parameter with the value
# the call gave for it (decoding the whole row cost ~5 µs more per leased job,
# in batches of 32). The job is leased, not running: it starts, and its hard
# timeout with it, when its worker reports that the handler started.
_SET_BY_LEASE: dict[str, Any] = {
    "state": LEASED,
    "started_at": None,
    "finished_at": None,
    "result": None,
    "result_content_type": None,
    "progress": 0.0,
    "progress_message": "",
    "leased_by": sa.bindparam("worker_id"),
    "lease_key": sa.bindparam("holder"),
    "lease_expires_at": _instant("expires"),
    "deadline_at": None,
}
_READ_BACK = [c for c in jobs.c if c.key not in _SET_BY_LEASE]
_LeasedRow = namedtuple(  # type: ignore[misc]
    "_LeasedRow", [c.key for c in _READ_BACK] + list(_SET_BY_LEASE)
)
_LEASE = Prepared(
    jobs.update()
    .where(jobs.c.id == _PICKED.c.id)
    .values(
        attempts=jobs.c.attempts + 1,
        fencing_token=jobs.c.fencing_token + 1 + TokenStep(),
        **_SET_BY_LEASE,
    )
    .returning(*_READ_BACK)
)
# A lease of the jobs ``flow.pick`` chose (their rows locked by it).
_LEASE_PICKED = Prepared(
    jobs.update()
    .where(jobs.c.id.in_(_ids()))
    .values(
        attempts=jobs.c.attempts + 1,
        fencing_token=jobs.c.fencing_token + 1 + TokenStep(),
        **_SET_BY_LEASE,
    )
    .returning(*_READ_BACK)
)
_SET_DEADLINE = Prepared(
    jobs.update()
    .where(jobs.c.id == sa.bindparam("b_id"))
    .values(deadline_at=_instant("b_deadline"))
)
# The attempt row is made at the lease; its start time becomes the handler's.
_START_ATTEMPTS = Prepared(
    attempts.insert().from_select(
        ["job_id", "fencing_token", "number", "worker_id", "started_at", "outcome"],
        sa.select(
            jobs.c.id,
            jobs.c.fencing_token,
            jobs.c.attempts,
            sa.bindparam("worker_id", type_=sa.String()),
            _instant(),
            sa.literal(AttemptOutcome.RUNNING.value),
        ).where(jobs.c.id.in_(_ids())),
    )
)


def lease_many(
    conn: Connection,
    queues: Sequence[str],
    limit: int,
    worker_id: str,
    lease_for: timedelta,
    now: datetime,
    max_bytes: int = limits.MAX_LEASE_BYTES,
    holder: str = "",
    reports_starts: bool = True,
    limited: Sequence[str] = (),
    first_pick: bool = True,
) -> Moved[list[Lease]]:
    """Lease up to ``limit`` pending jobs of ``queues``; of those in
    ``limited`` (queues the broker knows to be limited), those their flow
    limits let through. ``first_pick``: no lease of limited queues came
    before in this transaction (``flow.pick`` may wait for its locks)."""
    if limit <= 0 or not queues:
        return Moved([], [])
    states.check(JobState.PENDING, JobState.LEASED)
    expires = now + lease_for
    params = {
        "queues": list(queues),
        "limit": limit,
        "now": now,
        "worker_id": worker_id,
        "holder": holder,
        "expires": expires,
        "max_bytes": max_bytes,
    }
    plain = [q for q in queues if q not in limited] if limited else queues
    # A stream of plain and limited queues gives half its batch to each side
    # first, then what is left to the plain ones: neither starves the other.
    # (A batch of one goes to either side by lot.)
    share, share_bytes = limit, max_bytes
    if limited and plain:
        share = limit // 2 if limit > 1 else int(random.random() < 0.5)
        share_bytes = max_bytes // 2
    first = {**params, "limit": share, "max_bytes": share_bytes}
    found = _LEASE.rows(conn, first) if plain and share else []
    held_back: list[Transition] = []
    if limited and len(found) < limit:
        taken = sum(len(row.payload) for row in found)
        if not found or taken < max_bytes:
            room = max_bytes - taken if found else max_bytes
            picked = flow.pick(conn, limited, limit - len(found), now, room, wait=first_pick)
            held_back = picked.moved
            if picked.ids:
                found += _LEASE_PICKED.rows(conn, {**params, "ids": picked.ids})
        taken = sum(len(row.payload) for row in found)
        more = plain and share < limit and len(found) < limit  # the plain share may have left some
        if more and (not found or taken < max_bytes):
            rest = {**params, "limit": limit - len(found), "max_bytes": max_bytes - taken}
            found += _LEASE.rows(conn, rest if found else params)
    if not found:
        return _moved(conn, now, [], held_back) if held_back else Moved([], [])
    known = tuple(
        params[v.key] if isinstance(v, sa.BindParameter) else v for v in _SET_BY_LEASE.values()
    )
    leased: list[Any] = [_LeasedRow._make((*row, *known)) for row in found]
    leased.sort(key=lambda row: (-row.priority, row.id))  # RETURNING has no order
    if not reports_starts:  # its hard timeout cannot wait for a Start that never comes
        timed = [
            {"b_id": row.id, "b_deadline": now + timedelta(seconds=_timeout_s(row))}
            for row in leased
            if row.timeout_s
        ]
        if timed:
            _SET_DEADLINE.run_many(conn, timed)
    ids = [row.id for row in leased]
    _START_ATTEMPTS.run(conn, {"ids": ids, "worker_id": worker_id, "now": now})
    pending, held = JobState.PENDING, JobState.LEASED
    moved = [
        Transition(
            row.id,
            row.queue,
            pending,
            held,
            Reason.LEASED,
            row.attempts,
            worker_id,
            token=row.fencing_token,
        )
        for row in leased
    ]
    made = [Lease(rows.job_from_row(row), row.fencing_token, expires) for row in leased]
    return _moved(conn, now, made, held_back + moved)


def _timeout_s(row: Any) -> float:
    return limits.finite_seconds(row.timeout_s, limits.MAX_TIMEOUT) or 0.0


def submit_and_lease(
    conn: Connection,
    insert_new: InsertNew,
    jobs_in: Sequence[NewJob],
    now: datetime,
    dedup_window: timedelta,
    asks: Sequence[LeaseAsk],
    lease_for: timedelta,
) -> Moved[tuple[list[SubmitResult], list[list[Lease]]]]:
    submitted = submit_many(conn, insert_new, jobs_in, now, dedup_window)
    moved = list(submitted.transitions)
    leased = []
    picked = False  # a lease of limited queues came before in this transaction
    for a in asks:
        taken = lease_many(
            conn,
            a.queues,
            a.limit,
            a.worker_id,
            lease_for,
            now,
            a.max_bytes,
            a.holder,
            a.reports_starts,
            a.limited,
            first_pick=not picked,
        )
        picked = picked or bool(a.limited)
        leased.append(taken.result)
        moved += taken.transitions
    return Moved((submitted.result, leased), moved)


def heartbeat_many(
    conn: Connection, leases: Sequence[LeaseRef], lease_for: timedelta, now: datetime
) -> list[ReportResult]:
    expires = now + lease_for
    verdicts, _ = _check_leases(conn, leases)
    current = [ref for ref, v in zip(leases, verdicts, strict=True) if v is None]
    if current:
        _HEARTBEAT.run(conn, {"ids": [r.job_id for r in current], "expires": expires})
    return [
        v or ReportResult(ref.job_id, ReportStatus.OK, lease_expires_at=expires)
        for ref, v in zip(leases, verdicts, strict=True)
    ]


def progress(
    conn: Connection, report: Progress, lease_for: timedelta, now: datetime
) -> Moved[ReportResult]:
    """Record how far the job is; like a heartbeat, it renews the lease."""
    expires = now + lease_for
    changed = conn.execute(
        jobs.update()
        .where(*_held(report.lease))
        .values(
            progress=report.progress,
            progress_message=report.message,
            lease_expires_at=expires,
        )
        .returning(jobs.c.queue, jobs.c.state, jobs.c.attempts, jobs.c.leased_by)
    ).first()
    if changed is None:
        return Moved(_lost(conn, report.lease), [])
    job_id = report.lease.job_id
    state = JobState(changed.state)
    detail: dict[str, str | float] = {"progress": report.progress}
    detail["message"] = report.message[:_DETAIL_CHARS]
    line = Transition(
        job_id,
        changed.queue,
        state,
        state,
        Reason.PROGRESS,
        changed.attempts,
        changed.leased_by,
        detail,
    )
    renewed = ReportResult(job_id, ReportStatus.OK, lease_expires_at=expires)
    return _moved(conn, now, renewed, [line])


def start_many(
    conn: Connection, leases: Sequence[LeaseRef], now: datetime
) -> Moved[list[ReportResult]]:
    """The handlers of these leased jobs started: they run from now, and their
    hard timeouts count from now. A job already running is left as it is."""
    verdicts, row_of = _check_leases(conn, leases)
    current = [ref for ref, v in zip(leases, verdicts, strict=True) if v is None]
    starting = [row_of[ref.job_id] for ref in current if row_of[ref.job_id].state == LEASED]
    if starting:
        _start(conn, [(row, now) for row in starting])
    results = [
        v or ReportResult(ref.job_id, ReportStatus.OK)
        for ref, v in zip(leases, verdicts, strict=True)
    ]
    return _moved(conn, now, results, [_started(row) for row in starting])


_START = Prepared(
    jobs.update()
    .where(jobs.c.id == sa.bindparam("b_id"), _is(JobState.LEASED))
    .values(
        state=RUNNING,
        started_at=_not_before(_instant("b_started"), jobs.c.scheduled_at),
        deadline_at=sa.bindparam("b_deadline", type_=UTCDateTime()),
    )
)
_ATTEMPT_STARTED = Prepared(
    attempts.update()
    .where(
        attempts.c.job_id == sa.bindparam("b_id"),
        attempts.c.outcome == AttemptOutcome.RUNNING.value,
    )
    .values(started_at=_not_before(_instant("b_started"), attempts.c.started_at))
)


def _start(conn: Connection, started: Sequence[tuple[Any, datetime]]) -> None:
    """Move leased rows to running, each from its handler's start."""
    values = [
        {
            "b_id": row.id,
            "b_started": at,
            "b_deadline": at + timedelta(seconds=_timeout_s(row)) if row.timeout_s else None,
        }
        for row, at in started
    ]
    _START.run_many(conn, values)
    _ATTEMPT_STARTED.run_many(conn, values)


def _started(row: Any) -> Transition:
    leased, running = JobState.LEASED, JobState.RUNNING
    return Transition(
        row.id, row.queue, leased, running, Reason.STARTED, row.attempts, row.leased_by
    )


def _implied_starts(
    conn: Connection, ended: Sequence[tuple[Any, timedelta | None]], now: datetime
) -> set[str]:
    """Leased jobs reported ended whose start was not: each started its
    ``run_time`` before ``now`` (its worker's word, kept within the timeout
    limit). All in one statement each; returns their ids."""
    starting = [(row, now - _ran(run_time)) for row, run_time in ended if row.state == LEASED]
    if starting:
        _start(conn, starting)
    return {row.id for row, _ in starting}


def complete_many(
    conn: Connection, completions: Sequence[Completion], now: datetime
) -> Moved[list[ReportResult]]:
    done = states.check(JobState.RUNNING, JobState.SUCCEEDED)
    refs = [c.lease for c in completions]
    verdicts, row_of = _check_leases(conn, refs)
    current = [c for c, v in zip(completions, verdicts, strict=True) if v is None]
    # A job that ends while leased started its run_time before: its start is
    # written with its end, in the same statements. Starts are kept to the
    # millisecond, so that the no-op jobs of a batch, which start and end
    # within one, are still written set-wise.
    started_at = {
        c.lease.job_id: _to_ms(now - _ran(c.run_time))
        for c in current
        if row_of[c.lease.job_id].state == LEASED
    }
    moved = [_started(row_of[job_id]) for job_id in started_at]
    alike: dict[tuple[tuple[bytes, str] | None, datetime | None], list[str]] = {}
    for c in current:
        result = (c.result.data, c.result.content_type) if c.result else None
        alike.setdefault((result, started_at.get(c.lease.job_id)), []).append(c.lease.job_id)
    # The jobs that share a result (null, for no-op jobs) and a start in one
    # set-wise statement; the results of one job each in one executemany.
    single = []
    for (result, started), ids in alike.items():
        data, content_type = result or (None, None)
        if len(ids) == 1 and result is not None:
            single.append(_completed(ids[0], data, content_type, started, now))
            continue
        _COMPLETE_SHARED.run(
            conn,
            {
                "ids": ids,
                "b_result": data,
                "b_type": content_type,
                "b_started": started,
                "now": now,
            },
        )
    if single:
        _COMPLETE_ONE.run_many(conn, single)
    ended = [c.lease for c in current if c.lease.job_id not in started_at]
    if ended:
        _end_attempts(conn, ended, AttemptOutcome.SUCCEEDED, now)
    by_start: dict[datetime, list[str]] = {}
    for job_id, at in started_at.items():
        by_start.setdefault(at, []).append(job_id)
    succeeded = AttemptOutcome.SUCCEEDED.value
    for at, ids in by_start.items():
        _END_STARTED_ATTEMPTS.run(
            conn, {"ids": ids, "b_started": at, "outcome": succeeded, "now": now}
        )
    moved += [_ended(row_of[c.lease.job_id], done, Reason.SUCCEEDED, running=True) for c in current]
    results = [
        v or ReportResult(ref.job_id, ReportStatus.OK)
        for ref, v in zip(refs, verdicts, strict=True)
    ]
    return _moved(conn, now, results, moved)


def _completed(
    job_id: str,
    data: bytes | None,
    content_type: str | None,
    started: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "b_id": job_id,
        "b_result": data,
        "b_type": content_type,
        "b_started": started,
        "now": now,
    }


def _to_ms(at: datetime) -> datetime:
    return at.replace(microsecond=at.microsecond // 1000 * 1000)


def _ran(run_time: timedelta | None) -> timedelta:
    """A handler's run time by its worker's word, kept within the timeout limit."""
    ran = run_time.total_seconds() if run_time else 0.0
    return timedelta(seconds=limits.finite_seconds(ran, limits.MAX_TIMEOUT) or 0.0)


def _ended(
    row: Any, target: JobState, reason: Reason, *, running: bool = False, **detail: str
) -> Transition:
    """A held attempt's end, reported by its worker; ``running`` when its start
    was recorded in the same operation."""
    source = JobState.RUNNING if running else JobState(row.state)
    return Transition(
        row.id,
        row.queue,
        source,
        target,
        reason,
        row.attempts,
        row.leased_by,
        detail,
        concurrency_key=row.concurrency_key,
    )


def fail_many(
    conn: Connection, rng: random.Random, failures: Sequence[Failure], now: datetime
) -> Moved[list[ReportResult]]:
    refs = [f.lease for f in failures]
    results: list[ReportResult] = []
    moved: list[Transition] = []
    verdicts, row_of = _check_leases(conn, refs, whole_rows=True)
    ran = [
        (row_of[f.lease.job_id], f.run_time)
        for f, verdict in zip(failures, verdicts, strict=True)
        if verdict is None and f.run_time is not None  # None: no handler ran
    ]
    started = _implied_starts(conn, ran, now)
    for f, verdict in zip(failures, verdicts, strict=True):
        if verdict is not None:
            results.append(verdict)
            continue
        row = row_of[f.lease.job_id]
        if row.id in started:
            moved.append(_started(row))
        outcome = AttemptOutcome.CANCELLED if f.cancelled else AttemptOutcome.FAILED
        state, run_at = _end_running(
            conn, rng, row, outcome, f.error, now, f.permanent, f.retry_after
        )
        moved.append(_failed(row, state, f.error, run_at, row.id in started))
        results.append(ReportResult(f.lease.job_id, ReportStatus.OK))
    return _moved(conn, now, results, moved)


def _failed(
    row: Any, state: JobState, error: ErrorInfo, run_at: datetime | None, running: bool
) -> Transition:
    if state is JobState.CANCELLED:
        reason = Reason.CANCELLED
    else:
        reason = Reason.DEAD_LETTERED if state is JobState.DEAD else Reason.FAILED
    return _ended(row, state, reason, running=running, **_error_detail(error, run_at))


def _error_detail(error: ErrorInfo, run_at: datetime | None) -> dict[str, str]:
    detail = {"error_type": error.type, "error": error.message[:_DETAIL_CHARS]}
    if run_at is not None:
        detail["run_at"] = run_at.isoformat()
    return detail


_DETAIL_CHARS = 500  # of an error message, in its event: the job keeps it whole


def release_many(
    conn: Connection, leases: Sequence[LeaseRef], now: datetime
) -> Moved[list[ReportResult]]:
    """Hand jobs back to pending, the attempt not counted; a job whose cancel
    was asked for while it was held ends cancelled instead."""
    back = states.check(JobState.RUNNING, JobState.PENDING)
    verdicts, row_of = _check_leases(conn, leases)
    current = [ref for ref, v in zip(leases, verdicts, strict=True) if v is None]
    returned = [r for r in current if not row_of[r.job_id].cancel_requested]
    cancelled = [r for r in current if row_of[r.job_id].cancel_requested]
    moved = []
    if returned:
        _RELEASE.run(conn, {"ids": [r.job_id for r in returned], "now": now})
        _end_attempts(conn, returned, AttemptOutcome.RELEASED, now)
        moved += [_ended(row_of[r.job_id], back, Reason.RELEASED) for r in returned]
    if cancelled:
        dst = states.check(JobState.RUNNING, JobState.CANCELLED)
        _CANCEL_HELD.run(conn, {"ids": [r.job_id for r in cancelled], "now": now})
        _end_attempts(conn, cancelled, AttemptOutcome.CANCELLED, now)
        moved += [_ended(row_of[r.job_id], dst, Reason.CANCELLED) for r in cancelled]
    results = [
        v or ReportResult(ref.job_id, ReportStatus.OK)
        for ref, v in zip(leases, verdicts, strict=True)
    ]
    return _moved(conn, now, results, moved)


def _end_running(
    conn: Connection,
    rng: random.Random,
    row: sa.Row[Any],
    outcome: AttemptOutcome,
    error: ErrorInfo | None,
    now: datetime,
    permanent: bool = False,
    retry_after: timedelta | None = None,
) -> tuple[JobState, datetime | None]:
    """End a held attempt that did not succeed; retry, dead-letter or
    cancel. Returns the job's state, and when it runs again if it does."""
    if outcome is AttemptOutcome.CANCELLED or row.cancel_requested:
        dst, run_at = JobState.CANCELLED, None
    else:
        wait = after_failure(
            attempts=row.attempts,
            policy=rows.retry_policy(row),
            permanent=permanent,
            retry_after=retry_after,
            rng=rng,
        )
        if wait is None:
            dst, run_at = JobState.DEAD, None
        else:
            dst = JobState.SCHEDULED if wait > timedelta(0) else JobState.PENDING
            run_at = now + wait
    states.check(JobState.RUNNING, dst)
    ref = LeaseRef(row.id, row.fencing_token, row.lease_key)
    values: dict[str, Any] = {"state": dst.value, "last_error": rows.error_to_json(error)}
    if run_at is None:
        values["finished_at"] = now
    else:
        values["scheduled_at"] = run_at
    conn.execute(jobs.update().where(*_held(ref)).values(**values, **_LEASE_CLEARED))
    _end_attempt(conn, ref, outcome, error, now)
    return dst, run_at


def reap_expired(conn: Connection, rng: random.Random, now: datetime) -> Moved[int]:
    expired = jobs.c.lease_expires_at < now
    overdue = jobs.c.deadline_at < now
    pick = (
        sa.select(jobs, overdue.label("overdue"))
        .where(_in(HELD), sa.or_(expired, overdue))
        .limit(500)
        .with_for_update(skip_locked=True)
    )
    moved = []
    found = conn.execute(pick).all()
    uncounted = _uncounted(conn) if found else set()
    for row in found:
        if row.overdue:
            outcome, reason = AttemptOutcome.TIMED_OUT, Reason.TIMED_OUT
            error = ErrorInfo("TimeoutError", f"attempt exceeded its {row.timeout_s}s timeout")
        else:
            outcome, reason = AttemptOutcome.LEASE_EXPIRED, Reason.LEASE_EXPIRED
            error = ErrorInfo("LeaseExpired", "lease expired: the worker stopped heartbeating")
        if reason is Reason.LEASE_EXPIRED and row.queue in uncounted and not row.cancel_requested:
            state, run_at = _lost_uncounted(conn, row, error, now), None
        else:
            state, run_at = _end_running(conn, rng, row, outcome, error, now)
        detail = _error_detail(error, run_at)
        moved.append(
            Transition(
                row.id,
                row.queue,
                JobState(row.state),
                state,
                reason,
                row.attempts,
                BROKER,
                detail,
                token=row.fencing_token,
                concurrency_key=row.concurrency_key,
            )
        )
    return _moved(conn, now, len(moved), moved)


def _uncounted(conn: Connection) -> set[str]:
    """The queues whose lost workers' attempts do not count (``QueueDefaults``)."""
    found = conn.execute(sa.select(queues.c.name).where(~queues.c.lost_worker_counts))
    return set(found.scalars())


def _lost_uncounted(conn: Connection, row: Any, error: ErrorInfo, now: datetime) -> JobState:
    """A lost worker's attempt that its queue does not count: ended as
    lease_expired, and the job pending again at once, its attempts as before."""
    ref = LeaseRef(row.id, row.fencing_token, row.lease_key)
    conn.execute(
        jobs.update()
        .where(*_held(ref))
        .values(
            state=JobState.PENDING.value,
            attempts=jobs.c.attempts - 1,
            scheduled_at=now,
            started_at=None,
            last_error=rows.error_to_json(error),
            **_LEASE_CLEARED,
        )
    )
    _end_attempt(conn, ref, AttemptOutcome.LEASE_EXPIRED, error, now)
    return JobState.PENDING


def promote_scheduled(conn: Connection, now: datetime) -> Moved[int]:
    dst = states.check(JobState.SCHEDULED, JobState.PENDING)
    changed = conn.execute(
        jobs.update()
        .where(_is(JobState.SCHEDULED), jobs.c.scheduled_at <= now)
        .values(state=dst.value)
        .returning(jobs.c.id, jobs.c.queue, jobs.c.attempts)
    ).all()
    scheduled = JobState.SCHEDULED
    moved = [
        Transition(r.id, r.queue, scheduled, dst, Reason.PROMOTED, r.attempts) for r in changed
    ]
    return _moved(conn, now, len(moved), moved)


def next_scheduled_at(conn: Connection) -> datetime | None:
    stmt = sa.select(sa.func.min(jobs.c.scheduled_at)).where(_is(JobState.SCHEDULED))
    due: datetime | None = (conn.execute(stmt)).scalar()
    reopen = flow.next_reopen_at(conn)
    return min(due, reopen) if due is not None and reopen is not None else due or reopen


def reopen_limits(conn: Connection, now: datetime) -> Moved[set[str]]:
    moved, woken = flow.reopen(conn, now)
    return _moved(conn, now, woken, moved)


def sweep_concurrency(conn: Connection, now: datetime, after: Key | None) -> Moved[Key | None]:
    moved, cursor = flow.sweep_concurrency(conn, after)
    return _moved(conn, now, cursor, moved)


def sweep_rates(conn: Connection, now: datetime, after: Key | None) -> Key | None:
    return flow.sweep_rates(conn, now, after)


# --- operators ---


def cancel(conn: Connection, job_id: str, now: datetime, actor: str = "client") -> Moved[Job]:
    """Cancel a waiting job at once; for a held one, ask (once) that its
    attempt end cancelled: the broker tells its worker to stop."""
    dst = JobState.CANCELLED
    found = (
        sa.select(
            jobs.c.state,
            jobs.c.queue,
            jobs.c.attempts,
            jobs.c.cancel_requested,
            jobs.c.fencing_token,
        )
        .where(jobs.c.id == job_id)
        .with_for_update()
    )
    row = (conn.execute(found)).first()
    if row is None:
        raise NotFound(f"no job with id {job_id!r}")
    state = JobState(row.state)
    moved = []
    if state.held:
        # Each request is told to the worker again: the one before may have
        # found its stream reconnecting, or on another replica.
        if not row.cancel_requested:
            conn.execute(
                jobs.update().where(jobs.c.id == job_id, _in(HELD)).values(cancel_requested=True)
            )
        asked = Reason.CANCEL_REQUESTED
        moved.append(
            Transition(
                job_id, row.queue, state, state, asked, row.attempts, actor, token=row.fencing_token
            )
        )
    else:
        states.check(state, dst)
        conn.execute(
            jobs.update()
            .where(jobs.c.id == job_id, jobs.c.state.in_(_sources(dst)))
            .values(state=dst.value, finished_at=now, held_by=None)
        )
        moved.append(
            Transition(job_id, row.queue, state, dst, Reason.CANCELLED, row.attempts, actor)
        )
    return _moved(conn, now, _job(conn, job_id, history=True), moved)


_UNENDED = [s.value for s in JobState if not s.terminal]


def _chunks(ids: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def cancel_workflow(conn: Connection, workflow_id: str, now: datetime, actor: str) -> Moved[int]:
    """Cancel every job of a workflow that has not ended: at once where none
    holds it, by asking its worker where one does. Returns how many."""
    found = conn.execute(
        sa.select(jobs.c.id, jobs.c.queue, jobs.c.state, jobs.c.attempts, jobs.c.fencing_token)
        .where(jobs.c.workflow_id == workflow_id, jobs.c.state.in_(_UNENDED))
        .order_by(jobs.c.id)
        .with_for_update()
    ).all()
    if (
        not found
        and conn.execute(
            sa.select(jobs.c.id).where(jobs.c.workflow_id == workflow_id).limit(1)
        ).first()
        is None
    ):
        raise NotFound(f"no workflow with id {workflow_id!r}")
    held = [r.id for r in found if r.state in _HELD_STATES]
    free = [r.id for r in found if r.state not in _HELD_STATES]
    for chunk in _chunks(free):
        conn.execute(
            jobs.update()
            .where(jobs.c.id.in_(chunk), jobs.c.state.in_(_UNENDED))
            .values(state=JobState.CANCELLED.value, finished_at=now, held_by=None)
        )
    for chunk in _chunks(held):
        conn.execute(
            jobs.update().where(jobs.c.id.in_(chunk), _in(HELD)).values(cancel_requested=True)
        )
    dependencies.abandon(conn, workflow_id)
    moved = []
    for r in found:
        state = JobState(r.state)
        if state.held:
            why, target = Reason.CANCEL_REQUESTED, state
        else:
            why, target = Reason.CANCELLED, JobState.CANCELLED
        moved.append(
            Transition(r.id, r.queue, state, target, why, r.attempts, actor, token=r.fencing_token)
        )
    return _moved(conn, now, len(found), moved)


def get_job(conn: Connection, job_id: str, *, history: bool = True) -> Job:
    return _job(conn, job_id, history=history)


def job_events_of(conn: Connection, job_id: str, after: int, limit: int) -> list[JobEvent]:
    """Up to ``limit`` of a job's events after sequence number ``after``;
    NotFound for no such job."""
    if conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
        raise NotFound(f"no job with id {job_id!r}")
    return events.story(conn, job_id, after, limit)


# Most jobs ``explain_job`` counts ahead of a pending one.
MAX_AHEAD = 10_000


def explain_job(conn: Connection, job_id: str, now: datetime) -> JobFacts:
    """What explain needs besides the job: how many of its queue's pending
    jobs are leased before it (up to MAX_AHEAD), and when it was last leased."""
    job = _job(conn, job_id, history=False)
    ahead = 0
    if job.state is JobState.PENDING:
        before = sa.or_(
            jobs.c.priority > job.priority,
            sa.and_(jobs.c.priority == job.priority, jobs.c.id < job.id),
        )
        first = (
            sa.select(jobs.c.id)
            .where(_is(JobState.PENDING), jobs.c.queue == job.queue, before)
            .limit(MAX_AHEAD)
            .subquery()
        )
        ahead = conn.execute(sa.select(sa.func.count()).select_from(first)).scalar() or 0
    leased_at = conn.execute(
        sa.select(sa.func.max(job_events.c.at)).where(
            job_events.c.job_id == job_id, job_events.c.reason == Reason.LEASED.value
        )
    ).scalar()
    waits_on: tuple[WaitsOn, ...] = ()
    if job.state is JobState.WAITING or job.state is JobState.CANCELLED:
        waits_on = dependencies.waits_on(conn, job_id, blocked_only=job.state.terminal)
    limit = None
    if job.state is JobState.WAITING or job.state is JobState.PENDING:
        limit = flow.explain(conn, job, now)
    return JobFacts(job, ahead, leased_at, waits_on, limit)


def list_jobs(conn: Connection, where: JobFilter) -> JobPage:
    """A page of jobs in id order: up to ``where.limit``, and no more than fit
    ``where.max_bytes`` of payloads and results (but always one), so that no
    listing outgrows what a client accepts, nor the broker's memory."""
    size = (
        sa.func.length(jobs.c.payload)
        + sa.func.coalesce(sa.func.length(jobs.c.result), 0)
        + sa.func.length(sa.cast(jobs.c.metadata, sa.Text))
        + sa.func.coalesce(sa.func.length(sa.cast(jobs.c.last_error, sa.Text)), 0)
    )
    stmt = sa.select(jobs.c.id, size.label("size")).order_by(jobs.c.id).limit(where.limit)
    if where.queue:
        stmt = stmt.where(jobs.c.queue == where.queue)
    if where.queues is not None:
        stmt = stmt.where(jobs.c.queue.in_(where.queues))
    if where.states:
        stmt = stmt.where(_in(where.states))
    if where.task:
        stmt = stmt.where(jobs.c.task == where.task)
    if where.workflow_id:
        stmt = stmt.where(jobs.c.workflow_id == where.workflow_id)
    if where.after_id:
        stmt = stmt.where(jobs.c.id > where.after_id)
    ids: list[str] = []
    total = 0
    found = conn.execute(stmt).all()
    for job_id, job_size in found:
        if ids and total + job_size > where.max_bytes:
            break
        ids.append(job_id)
        total += job_size
    picked = conn.execute(sa.select(jobs).where(jobs.c.id.in_(ids)).order_by(jobs.c.id))
    listed = [rows.job_from_row(row) for row in picked]
    return JobPage(listed, more=len(ids) < len(found) or len(found) == where.limit)


def replay_dead(
    conn: Connection,
    queue: str | None,
    job_ids: Sequence[str],
    now: datetime,
    actor: str = "client",
) -> Moved[list[str]]:
    """Dead jobs pending again, all or none: a job whose unique key another
    job holds by now (or that shares its key with another one replayed)
    refuses the replay (UniqueKeyTaken), as does a child it would resume."""
    dst = states.check(JobState.DEAD, JobState.PENDING)
    ids = _dead_ids(conn, queue, job_ids)
    moved = []
    if ids:
        update = (
            jobs.update()
            .where(jobs.c.id.in_(ids), _is(JobState.DEAD))
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
            .returning(jobs.c.id, jobs.c.queue)
        )
        replayed = dedup.move_back(conn, ids, lambda: conn.execute(update).all(), "replayed")
        dead = JobState.DEAD
        moved = [Transition(r.id, r.queue, dead, dst, Reason.REPLAYED, 0, actor) for r in replayed]
    return _moved(conn, now, ids, moved)


def purge_dead(
    conn: Connection,
    queue: str | None,
    job_ids: Sequence[str],
    now: datetime,
    actor: str = "client",
) -> Moved[int]:
    found = _dead_rows(conn, queue, job_ids)
    _delete(conn, [r.id for r in found])
    dead = JobState.DEAD
    moved = [Transition(r.id, r.queue, dead, None, Reason.PURGED, r.attempts, actor) for r in found]
    return _moved(conn, now, len(moved), moved)


def delete_finished(conn: Connection, before: datetime, limit: int) -> Moved[int]:
    """Delete jobs finished before ``before``, but not one a dead parent
    cancelled: replaying that parent resumes it."""
    found = conn.execute(
        sa.select(jobs.c.id, jobs.c.queue, jobs.c.state, jobs.c.attempts)
        .where(_in(_FINISHED), jobs.c.finished_at < before, ~dependencies.BLOCKED_CHILD)
        .limit(limit)
    ).all()
    _delete(conn, [r.id for r in found])
    moved = [
        Transition(r.id, r.queue, JobState(r.state), None, Reason.EXPIRED, r.attempts)
        for r in found
    ]
    return _moved(conn, before, len(moved), moved)


# What a queue's depth counts: jobs waiting, running or dead-lettered. Finished
# ones are counted as they finish (the jobs_succeeded counter): counting them
# here would read the whole history retention keeps, every few seconds.
DEPTH_STATES = (
    JobState.WAITING,
    JobState.PENDING,
    JobState.SCHEDULED,
    JobState.LEASED,
    JobState.RUNNING,
    JobState.DEAD,
)
_NEXT_QUEUE = sa.select(sa.func.min(jobs.c.queue)).where(jobs.c.queue > sa.bindparam("after"))
_DEPTH = {
    state: sa.select(sa.func.count()).where(jobs.c.queue == sa.bindparam("queue"), _is(state))
    for state in DEPTH_STATES
}


_REST = {
    state: sa.select(sa.func.count()).where(jobs.c.queue > sa.bindparam("after"), _is(state))
    for state in DEPTH_STATES
}


def queue_depths(conn: Connection, max_queues: int) -> dict[tuple[str | None, JobState], int]:
    """Each queue is found by seeking the (queue, state, id) index from the one
    before, and each of its depths is a range of that index: the cost grows with
    the queues and the jobs in those states, not with the finished jobs. Past
    ``max_queues`` queues, one count per state covers all the rest."""
    depths: dict[tuple[str | None, JobState], int] = {}
    queue = conn.execute(_NEXT_QUEUE, {"after": ""}).scalar()
    seen, last = 0, ""
    while queue is not None:
        if seen == max_queues:
            for state, count in _REST.items():
                if n := conn.execute(count, {"after": last}).scalar():
                    depths[(None, state)] = n
            break
        for state, count in _DEPTH.items():
            if n := conn.execute(count, {"queue": queue}).scalar():
                depths[(queue, state)] = n
        seen, last = seen + 1, queue
        queue = conn.execute(_NEXT_QUEUE, {"after": queue}).scalar()
    return depths


_LEASE_COLUMNS = (
    jobs.c.id,
    jobs.c.state,
    jobs.c.timeout_s,
    jobs.c.fencing_token,
    jobs.c.lease_key,
    jobs.c.queue,
    jobs.c.attempts,
    jobs.c.leased_by,
    jobs.c.cancel_requested,
    jobs.c.concurrency_key,
)
_LOCK_LEASES = Prepared(sa.select(*_LEASE_COLUMNS).where(jobs.c.id.in_(_ids())).with_for_update())
_LOCK_ROWS = Prepared(sa.select(jobs).where(jobs.c.id.in_(_ids())).with_for_update())


def _check_leases(
    conn: Connection, refs: Sequence[LeaseRef], *, whole_rows: bool = False
) -> tuple[list[ReportResult | None], dict[str, Any]]:
    """One verdict per ref, in order: None when the lease is current (the write
    may go ahead), else the refusal; and the rows read, by job id (their lease
    columns, or whole rows when the caller needs them). The rows are locked for
    the rest of the transaction."""
    lock = _LOCK_ROWS if whole_rows else _LOCK_LEASES
    found = lock.rows(conn, {"ids": list({r.job_id for r in refs})})
    row_of = {row.id: row for row in found}
    verdicts: list[ReportResult | None] = []
    seen: set[str] = set()
    for ref in refs:
        row = row_of.get(ref.job_id)
        if row is None:
            message = f"no job with id {ref.job_id!r}"
            verdicts.append(ReportResult(ref.job_id, ReportStatus.NOT_FOUND, message))
        elif (
            row.state not in _HELD_STATES
            or row.fencing_token != ref.fencing_token
            or row.lease_key != ref.holder
            or ref.job_id in seen
        ):
            verdicts.append(_lost_verdict(ref, row.state))
        else:
            seen.add(ref.job_id)
            verdicts.append(None)
    return verdicts, row_of


# A job has one running attempt at a time: the one its lease holds.
# A worker's word for when its handler started is kept within the attempt:
# never before its lease (the attempt row's start until then).
_END_STARTED_ATTEMPTS = Prepared(
    attempts.update()
    .where(
        attempts.c.job_id.in_(_ids()),
        attempts.c.outcome == AttemptOutcome.RUNNING.value,
    )
    .values(
        started_at=_not_before(_instant("b_started"), attempts.c.started_at),
        finished_at=_instant(),
        outcome=sa.bindparam("outcome"),
        error=None,
    )
)
_END_ATTEMPTS = Prepared(
    attempts.update()
    .where(
        attempts.c.job_id.in_(_ids()),
        attempts.c.outcome == AttemptOutcome.RUNNING.value,
    )
    .values(finished_at=_instant(), outcome=sa.bindparam("outcome"), error=None)
)


def _end_attempts(
    conn: Connection, refs: Sequence[LeaseRef], outcome: AttemptOutcome, now: datetime
) -> None:
    ids = [r.job_id for r in refs]
    _END_ATTEMPTS.run(conn, {"ids": ids, "outcome": outcome.value, "now": now})


_LEASE_CLEARED: dict[str, Any] = {"lease_expires_at": None, "deadline_at": None, "leased_by": None}

# Set-wise writes to jobs whose leases ``_check_leases`` found current earlier
# in the transaction, with the rows locked since (FOR UPDATE; SQLite has one
# writer): the fencing tokens were checked there, and a list of (id, token)
# pairs here would cost more to bind than the write itself.
_HELD_ALL = (jobs.c.id.in_(_ids()), _in(HELD))
_HEARTBEAT = Prepared(jobs.update().where(*_HELD_ALL).values(lease_expires_at=_instant("expires")))
_FINISHED_VALUES: dict[str, Any] = {
    "state": JobState.SUCCEEDED.value,
    "finished_at": _instant(),
    "progress": 1.0,
    "result": sa.bindparam("b_result", type_=sa.LargeBinary()),
    "result_content_type": sa.bindparam("b_type", type_=sa.String()),
    **_LEASE_CLEARED,
}
# A job that starts as it ends is given its start (never before it became
# runnable); None keeps the start it has.
_STARTED_WITH_END = sa.func.coalesce(
    _not_before(sa.bindparam("b_started", type_=UTCDateTime()), jobs.c.scheduled_at),
    jobs.c.started_at,
)
_COMPLETE_SHARED = Prepared(
    jobs.update().where(*_HELD_ALL).values(**_FINISHED_VALUES, started_at=_STARTED_WITH_END)
)
_COMPLETE_ONE = Prepared(
    jobs.update()
    .where(jobs.c.id == sa.bindparam("b_id"), _in(HELD))
    .values(**_FINISHED_VALUES, started_at=_STARTED_WITH_END)
)
_RELEASE = Prepared(
    jobs.update()
    .where(*_HELD_ALL)
    .values(
        state=JobState.PENDING.value,
        attempts=jobs.c.attempts - 1,
        scheduled_at=_instant(),
        started_at=None,
        **_LEASE_CLEARED,
    )
)

_CANCEL_HELD = Prepared(
    jobs.update()
    .where(*_HELD_ALL)
    .values(state=JobState.CANCELLED.value, finished_at=_instant(), **_LEASE_CLEARED)
)


def _held(ref: LeaseRef) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE clause of a write that needs the current lease."""
    return (
        jobs.c.id == ref.job_id,
        _in(HELD),
        jobs.c.fencing_token == ref.fencing_token,
        jobs.c.lease_key == ref.holder,
    )


def _lost_verdict(ref: LeaseRef, state: str) -> ReportResult:
    """The refusal of a report whose lease is not current. It names neither
    the current token nor its holder: the report may come from a stranger."""
    if state in _HELD_STATES:
        why = "another attempt, or another key's stream, holds its lease"
    else:
        why = f"it is {state}"
    return ReportResult(ref.job_id, ReportStatus.LEASE_LOST, f"lease lost: job {ref.job_id}: {why}")


def _lost(conn: Connection, ref: LeaseRef) -> ReportResult:
    row = (conn.execute(sa.select(jobs.c.state).where(jobs.c.id == ref.job_id))).first()
    if row is None:
        return ReportResult(ref.job_id, ReportStatus.NOT_FOUND, f"no job with id {ref.job_id!r}")
    return _lost_verdict(ref, row.state)


def _end_attempt(
    conn: Connection,
    ref: LeaseRef,
    outcome: AttemptOutcome,
    error: ErrorInfo | None,
    now: datetime,
) -> None:
    conn.execute(
        attempts.update()
        .where(attempts.c.job_id == ref.job_id, attempts.c.fencing_token == ref.fencing_token)
        .values(finished_at=now, outcome=outcome.value, error=rows.error_to_json(error))
    )


def _job(conn: Connection, job_id: str, *, history: bool) -> Job:
    row = (conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
    if row is None:
        raise NotFound(f"no job with id {job_id!r}")
    tried = []
    if history:
        found = conn.execute(
            sa.select(attempts)
            .where(attempts.c.job_id == job_id)
            .order_by(attempts.c.fencing_token)
        )
        tried = [rows.attempt_from_row(a) for a in found]
    return rows.job_from_row(row, tried)


def _dead_ids(conn: Connection, queue: str | None, job_ids: Sequence[str]) -> list[str]:
    return [row.id for row in _dead_rows(conn, queue, job_ids)]


def _dead_rows(conn: Connection, queue: str | None, job_ids: Sequence[str]) -> list[Any]:
    stmt = (
        sa.select(jobs.c.id, jobs.c.queue, jobs.c.attempts)
        .where(_is(JobState.DEAD))
        .order_by(jobs.c.id)
    )
    if queue:
        stmt = stmt.where(jobs.c.queue == queue)
    if job_ids:
        stmt = stmt.where(jobs.c.id.in_(list(job_ids)))
    return list(conn.execute(stmt).all())


def _delete(conn: Connection, ids: list[str]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        conn.execute(attempts.delete().where(attempts.c.job_id.in_(chunk)))
        conn.execute(job_deps.delete().where(job_deps.c.child_id.in_(chunk)))
        conn.execute(job_events.delete().where(job_events.c.job_id.in_(chunk)))
        conn.execute(jobs.delete().where(jobs.c.id.in_(chunk)))


_HAS_READY = Prepared(
    sa.select(jobs.c.id)
    .where(_is(JobState.PENDING), jobs.c.queue == sa.bindparam("queue"))
    .limit(1)
)


def ready_queues(conn: Connection, queues: Sequence[str]) -> set[str]:
    return {queue for queue in queues if _HAS_READY.rows(conn, {"queue": queue})}


# Less room than this on a SQLite database's disk counts as full: its WAL
# reuses the space it has, so small writes (the probe's) would go on
# succeeding while a burst of submits fails.
MIN_FREE_BYTES = 4 * 1024 * 1024
# A broker's row older than this is one that stopped: its first probe deletes them.
_STALE_PROBE = timedelta(days=1)


def probe_write(conn: Connection, broker: str, now: datetime) -> None:
    """The health probe's write: rewrite ``broker``'s row (created at its first probe)."""
    if conn.dialect.name == "sqlite":
        _check_room(conn)
    row = broker_health.c.broker == broker
    if conn.execute(broker_health.update().where(row).values(probed_at=now)).rowcount == 0:
        conn.execute(broker_health.delete().where(broker_health.c.probed_at < now - _STALE_PROBE))
        conn.execute(broker_health.insert().values(broker=broker, probed_at=now))


def _check_room(conn: Connection) -> None:
    """Raise StorageFull when the SQLite file's disk has less than MIN_FREE_BYTES free."""
    for _seq, name, path in conn.exec_driver_sql("PRAGMA database_list"):
        if name != "main" or not path:
            continue
        disk = os.statvfs(os.path.dirname(path))
        free = disk.f_bavail * disk.f_frsize
        if free < MIN_FREE_BYTES:
            raise StorageFull(f"the database's disk is full ({free} bytes free)")
