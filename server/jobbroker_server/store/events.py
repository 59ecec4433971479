"""The job event log: the transitions an operation makes (progress reports
among them), appended in that operation's transaction, in one statement per
batch.

A deleted job takes its story with it: transitions to no state (a purge,
retention) are not logged.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import JSONB

from jobbroker_server.domain.transitions import JobEvent, LogPosition, Transition
from jobbroker_server.store.prepared import Prepared, dbapi_of
from jobbroker_server.store.tables import UTCDateTime, job_events, jobs, json_dumps


def _append_postgres() -> Prepared:
    """INSERT the events given as one JSON array of rows (``b_rows``), in its
    order, all at one instant (``now``): one bound value for the whole batch.
    Bound row by row (an executemany), the events cost more than the
    transitions they record."""
    elements = sa.func.jsonb_array_elements(sa.cast(sa.bindparam("b_rows"), JSONB))
    each = elements.table_valued("value", with_ordinality="n").render_derived(name="e")

    def field(i: int) -> sa.ColumnElement[Any]:
        return each.c.value.op("->>")(i)

    rows = sa.select(
        field(0),
        field(1),
        sa.bindparam("now", type_=job_events.c.at.type),
        field(2),
        field(3),
        field(4),
        sa.cast(field(5), sa.Integer),
        field(6),
        sa.cast(each.c.value.op("->")(7), job_events.c.detail.type),
    ).order_by(each.c.n)
    return Prepared(job_events.insert().from_select(list(_COLUMNS), rows))


_COLUMNS = ("job_id", "queue", "at", "reason", "source", "target", "attempt", "actor", "detail")
_APPEND_POSTGRES = _append_postgres()
# On SQLite, a multi-row VALUES on the driver's cursor: no JSON to take apart
# (json_extract parses each row once per column), no SQLAlchemy binding.
_ROWS_PER_INSERT = 200  # 1,800 parameters, well within SQLite's 32,766
_AT = UTCDateTime()


@functools.cache
def _sqlite_insert(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return f"INSERT INTO job_events ({', '.join(_COLUMNS)}) VALUES {values}"


def record(conn: Connection, transitions: Sequence[Transition], now: datetime) -> None:
    rows = [
        (
            t.job_id,
            t.queue,
            t.reason.value,
            t.source.value if t.source else None,
            t.target.value,
            t.attempt,
            t.actor,
            t.detail,
        )
        for t in transitions
        if t.target is not None
    ]
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _APPEND_POSTGRES.run(conn, {"b_rows": json.dumps(rows), "now": now})
        return
    at = _AT.process_bind_param(now, conn.dialect)
    cursor = dbapi_of(conn).cursor()
    try:
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            values: list[Any] = []
            for job_id, queue, reason, source, target, attempt, actor, detail in chunk:
                values += (job_id, queue, at, reason, source, target, attempt, actor)
                values.append(json_dumps(detail))
            cursor.execute(_sqlite_insert(len(chunk)), values)
    finally:
        cursor.close()


def story(conn: Connection, job_id: str, after: int, limit: int) -> list[JobEvent]:
    """Up to ``limit`` of a job's events after sequence number ``after``, in order."""
    found = conn.execute(
        sa.select(job_events)
        .where(job_events.c.job_id == job_id, job_events.c.seq > after)
        .order_by(job_events.c.seq)
        .limit(limit)
    )
    return _events(found)


_event_txid = sa.literal_column("job_events.txid", sa.BigInteger)
_all_done_below = sa.literal_column(
    "pg_snapshot_xmin(pg_current_snapshot())::text::bigint", sa.BigInteger
)


def tail_from(conn: Connection, after: int) -> LogPosition:
    """The position after event ``after``; for 0, the end of the log now."""
    if conn.dialect.name != "postgresql":
        if after <= 0:
            after = int(conn.execute(sa.select(sa.func.max(job_events.c.seq))).scalar() or 0)
        return LogPosition(0, after)
    if after <= 0:
        return _end(conn, int(conn.execute(sa.select(_all_done_below)).scalar() or 0))
    # The event's transaction; if its job is gone, the one of the event
    # before it (a tail resumed there may see an event again, or miss one).
    txid = conn.execute(
        sa.select(_event_txid)
        .select_from(job_events)
        .where(job_events.c.seq <= after)
        .order_by(job_events.c.seq.desc())
        .limit(1)
    ).scalar()
    return LogPosition(int(txid or 0), after)


def _end(conn: Connection, done_below: int) -> LogPosition:
    """The last event of the transactions that ended before ``done_below``."""
    last = conn.execute(
        sa.select(_event_txid, job_events.c.seq)
        .where(_event_txid < done_below)
        .order_by(_event_txid.desc(), job_events.c.seq.desc())
        .limit(1)
    ).first()
    return LogPosition(int(last[0]), int(last[1])) if last else LogPosition(0, 0)


def tail(
    conn: Connection, at: LogPosition, queue: str | None, task: str | None, limit: int
) -> tuple[list[JobEvent], LogPosition]:
    """Up to ``limit`` events of every job (of ``queue``, of ``task``) after
    position ``at``, in commit order, and the position after them. A filtered
    read that finds fewer than ``limit`` moves past the events it passed over,
    so a tail of a quiet queue does not read them again."""
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        done_below = int(conn.execute(sa.select(_all_done_below)).scalar() or 0)
        after = sa.tuple_(_event_txid, job_events.c.seq) > sa.tuple_(
            sa.literal(at.txid), sa.literal(at.seq)
        )
        stmt = (
            sa.select(job_events, _event_txid.label("txid"))
            .where(after, _event_txid < done_below)
            .order_by(_event_txid, job_events.c.seq)
        )
    else:
        stmt = sa.select(job_events).where(job_events.c.seq > at.seq).order_by(job_events.c.seq)
    if queue:
        stmt = stmt.where(job_events.c.queue == queue)
    if task:
        stmt = stmt.where(sa.exists().where(jobs.c.id == job_events.c.job_id, jobs.c.task == task))
    found = conn.execute(stmt.limit(limit)).all()
    if found:
        last = found[-1]
        at = LogPosition(int(last.txid) if postgres else 0, int(last.seq))
    if len(found) < limit and (queue or task):
        # Nothing more of these jobs up to the end: the end is where to go on.
        end = _end(conn, done_below) if postgres else tail_from(conn, 0)
        if (end.txid, end.seq) > (at.txid, at.seq):
            at = end
    return _events(found), at


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
