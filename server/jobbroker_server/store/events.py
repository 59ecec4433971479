"""The job event log: the transitions an operation makes (progress reports
among them), appended in that operation's transaction, in one statement.

A deleted job takes its story with it: transitions to no state (a purge,
retention) are not logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.transitions import JobEvent, Transition
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import job_events, jobs

_APPEND = Prepared(
    job_events.insert().values(
        job_id=sa.bindparam("b_job"),
        queue=sa.bindparam("b_queue"),
        at=sa.bindparam("now", type_=job_events.c.at.type),
        reason=sa.bindparam("b_reason"),
        source=sa.bindparam("b_source"),
        target=sa.bindparam("b_target"),
        attempt=sa.bindparam("b_attempt"),
        actor=sa.bindparam("b_actor"),
        detail=sa.bindparam("b_detail", type_=job_events.c.detail.type),
    )
)


def _row(
    job_id: str,
    queue: str,
    reason: str,
    source: str | None,
    target: str,
    attempt: int,
    actor: str,
    detail: Mapping[str, Any],
    now: datetime,
) -> dict[str, Any]:
    return {
        "b_job": job_id,
        "b_queue": queue,
        "now": now,
        "b_reason": reason,
        "b_source": source,
        "b_target": target,
        "b_attempt": attempt,
        "b_actor": actor,
        "b_detail": dict(detail),
    }


def record(conn: Connection, transitions: Sequence[Transition], now: datetime) -> None:
    rows = [
        _row(
            t.job_id,
            t.queue,
            t.reason.value,
            t.source.value if t.source else None,
            t.target.value,
            t.attempt,
            t.actor,
            t.detail,
            now,
        )
        for t in transitions
        if t.target is not None
    ]
    if rows:
        _APPEND.run_many(conn, rows)


def story(conn: Connection, job_id: str, after: int, limit: int) -> list[JobEvent]:
    """Up to ``limit`` of a job's events after sequence number ``after``, in order."""
    found = conn.execute(
        sa.select(job_events)
        .where(job_events.c.job_id == job_id, job_events.c.seq > after)
        .order_by(job_events.c.seq)
        .limit(limit)
    )
    return _events(found)


def tail(
    conn: Connection, after: int, queue: str | None, task: str | None, limit: int
) -> list[JobEvent]:
    """Up to ``limit`` events of every job (of ``queue``, of ``task``) that
    follow the event numbered ``after``, in the order they committed.

    On SQLite, with its one writer, that is the order of their numbers. On
    PostgreSQL a transaction that took a lower number can commit after one
    that took a higher: read by number, a follower would pass over it. There
    events are read in the order of their transactions' ids, and only those
    of transactions older than every one still running: no event can later
    appear before the last one read. (A long transaction anywhere in the
    database holds the tail back until it ends.)"""
    stmt = sa.select(job_events)
    if conn.dialect.name == "postgresql":
        stmt = _committed_after(conn, stmt, after)
    else:
        stmt = stmt.where(job_events.c.seq > after).order_by(job_events.c.seq)
    if queue:
        stmt = stmt.where(job_events.c.queue == queue)
    if task:
        of_task = sa.select(jobs.c.id).where(jobs.c.task == task)
        stmt = stmt.where(job_events.c.job_id.in_(of_task))
    return _events(conn.execute(stmt.limit(limit)))


_event_txid = sa.literal_column("job_events.txid", sa.BigInteger)
_all_done_below = sa.literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint", sa.BigInteger
)


def _committed_after(conn: Connection, stmt: sa.Select[Any], after: int) -> sa.Select[Any]:
    """``stmt`` limited to the events after event ``after`` in commit order."""
    last = (
        sa.select(_event_txid)
        .select_from(job_events)
        .where(job_events.c.seq <= after)
        .order_by(job_events.c.seq.desc())
        .limit(1)
    )
    txid = conn.execute(last).scalar() or 0
    later = sa.or_(_event_txid > txid, sa.and_(_event_txid == txid, job_events.c.seq > after))
    return stmt.where(later, _event_txid < _all_done_below).order_by(_event_txid, job_events.c.seq)


def last_seq(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.max(job_events.c.seq))).scalar() or 0)


def _events(found: Iterable[Any]) -> list[JobEvent]:
    return [
        JobEvent(
            seq=row.seq,
            job_id=row.job_id,
            queue=row.queue,
            at=row.at,
            reason=row.reason,
            source=row.source,
            target=row.target,
            attempt=row.attempt,
            actor=row.actor,
            detail=row.detail,
        )
        for row in found
    ]
