"""The job event log: the transitions an operation makes (progress reports
among them), appended in that operation's transaction, in one statement.

A deleted job takes its story with it: transitions to no state (a purge,
retention) are not logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import JSONB

from jobbroker_server.domain.transitions import JobEvent, Transition
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import job_events, jobs


def _append(dialect: str) -> Prepared:
    """INSERT the events given as one JSON array of rows (``b_rows``), in its
    order, all at one instant (``now``): one bound value for the whole batch.
    Bound row by row (an executemany), the events cost more than the
    transitions they record."""
    if dialect == "postgresql":
        elements = sa.func.jsonb_array_elements(sa.cast(sa.bindparam("b_rows"), JSONB))
        each = elements.table_valued("value", with_ordinality="n").render_derived(name="e")
        order = each.c.n

        def field(i: int) -> sa.ColumnElement[Any]:
            return each.c.value.op("->>")(i)

        detail: sa.ColumnElement[Any] = sa.cast(each.c.value.op("->")(7), job_events.c.detail.type)
        attempt: sa.ColumnElement[Any] = sa.cast(field(5), sa.Integer)
    else:
        each = sa.func.json_each(sa.bindparam("b_rows", type_=sa.String())).table_valued(
            "key", "value"
        )
        order = each.c.key

        def field(i: int) -> sa.ColumnElement[Any]:
            return sa.func.json_extract(each.c.value, f"$[{i}]")

        detail = field(7)  # an object comes out as its JSON text, as the column keeps it
        attempt = field(5)
    rows = sa.select(
        field(0),
        field(1),
        sa.bindparam("now", type_=job_events.c.at.type),
        field(2),
        field(3),
        field(4),
        attempt,
        field(6),
        detail,
    ).order_by(order)
    columns = ["job_id", "queue", "at", "reason", "source", "target", "attempt", "actor", "detail"]
    return Prepared(job_events.insert().from_select(columns, rows))


_APPEND = {dialect: _append(dialect) for dialect in ("sqlite", "postgresql")}


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
    if rows:
        _APPEND[conn.dialect.name].run(conn, {"b_rows": json.dumps(rows), "now": now})


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
