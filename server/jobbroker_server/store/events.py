"""The job event log: the transitions an operation makes, and progress
reports, appended in that operation's transaction, in one statement.

A deleted job takes its story with it: transitions to no state (a purge,
retention) are not logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.transitions import JobEvent, Transition
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import job_events

PROGRESS = "progress"  # the reason of a progress report's event

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


def record(conn: Connection, transitions: Sequence[Transition], now: datetime) -> None:
    rows = [
        {
            "b_job": t.job_id,
            "b_queue": t.queue,
            "now": now,
            "b_reason": t.reason.value,
            "b_source": t.source.value if t.source else None,
            "b_target": t.target.value,
            "b_attempt": t.attempt,
            "b_actor": t.actor,
            "b_detail": dict(t.detail),
        }
        for t in transitions
        if t.target is not None
    ]
    if rows:
        _APPEND.run_many(conn, rows)


def record_progress(
    conn: Connection,
    job_id: str,
    queue: str,
    attempt: int,
    actor: str,
    detail: dict[str, Any],
    now: datetime,
) -> None:
    running = "running"
    row = {
        "b_job": job_id,
        "b_queue": queue,
        "now": now,
        "b_reason": PROGRESS,
        "b_source": running,
        "b_target": running,
        "b_attempt": attempt,
        "b_actor": actor,
        "b_detail": detail,
    }
    _APPEND.run_many(conn, [row])


def story(conn: Connection, job_id: str, after: int = 0) -> list[JobEvent]:
    """A job's events after sequence number ``after``, in order."""
    found = conn.execute(
        sa.select(job_events)
        .where(job_events.c.job_id == job_id, job_events.c.seq > after)
        .order_by(job_events.c.seq)
    )
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
