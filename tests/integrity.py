"""An integrity check of a broker's store, by SQL against its database.

It reads the SQLite file or the PostgreSQL schema a broker runs on, while the
broker runs or after it was killed, in one snapshot (a read transaction on
SQLite's WAL, REPEATABLE READ on PostgreSQL), and names every row that breaks
an invariant the store keeps in every transaction:

- every job is in a state of ``domain/states.py``, every attempt has a known outcome;
- a held job (leased or running) holds a lease (holder, expiry) and exactly
  one attempt in outcome running, the one of its current fencing token; a
  running one has started, a leased one has not;
- no other attempt is left running: not on a job that is not held, not
  under an older token;
- no attempt belongs to a job that is gone (an orphan);
- a job that is not held holds no lease, and a job has ``finished_at``
  exactly when it is terminal; an attempt has ``finished_at`` exactly when it ended;
- every lease left an attempt row: a job's newest attempt is of its fencing
  token (tokens grow by a random step, so they are not counted), and
  ``attempts`` (released ones do not count, a replay starts again from 0) is
  between 0 and the number of attempts that were not released;
- a succeeded job's current attempt succeeded.

``missing`` and ``assert_none_missing`` check that acknowledged jobs are stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from jobbroker_server.domain.models import AttemptOutcome
from jobbroker_server.domain.states import TERMINAL, JobState
from jobbroker_server.store.postgres import engine_url
from jobbroker_server.store.tables import jobs

T = TypeVar("T")

SAMPLE = 5  # offending ids shown per broken invariant

_STATES = sorted(s.value for s in JobState)
_TERMINAL = sorted(s.value for s in TERMINAL)
_OUTCOMES = sorted(o.value for o in AttemptOutcome)
_HELD = "('leased', 'running')"

# What each job's attempts add up to, for the checks of a job row.
_PER_JOB = """
    SELECT job_id, COUNT(*) AS n, MIN(fencing_token) AS lo, MAX(fencing_token) AS hi,
        SUM(CASE WHEN outcome <> 'released' THEN 1 ELSE 0 END) AS counted,
        SUM(CASE WHEN outcome = 'running' THEN 1 ELSE 0 END) AS running,
        MAX(CASE WHEN outcome = 'running' THEN fencing_token END) AS running_token,
        MAX(CASE WHEN outcome = 'succeeded' THEN fencing_token END) AS succeeded_token
    FROM attempts GROUP BY job_id
"""
# Each invariant of a job: its name and when a row of ``jobs j`` (its
# attempts' sums as ``a``) breaks it. All are checked in one scan.
_JOB_CHECKS: tuple[tuple[str, str], ...] = (
    ("job in an unknown state", "j.state NOT IN :states"),
    (
        "held job without exactly one running attempt, of its fencing token",
        f"j.state IN {_HELD} AND NOT (COALESCE(a.running, 0) = 1"
        " AND a.running_token = j.fencing_token)",
    ),
    (
        "attempt left running on a job that is not held, or under an older token",
        f"COALESCE(a.running, 0) > 0 AND (j.state NOT IN {_HELD} OR a.running > 1"
        " OR a.running_token <> j.fencing_token)",
    ),
    (
        "held job without a lease (holder or expiry)",
        f"j.state IN {_HELD} AND (j.lease_expires_at IS NULL OR j.leased_by IS NULL)",
    ),
    (
        "running job that has not started, or leased job that has",
        "(j.state = 'running' AND j.started_at IS NULL)"
        " OR (j.state = 'leased' AND j.started_at IS NOT NULL)",
    ),
    (
        "job that is not held but holds a lease",
        f"j.state NOT IN {_HELD} AND (j.lease_expires_at IS NOT NULL"
        " OR j.leased_by IS NOT NULL OR j.deadline_at IS NOT NULL)",
    ),
    (
        "finished_at set on a job that is not terminal, or missing on one that is",
        "(j.state IN :terminal AND j.finished_at IS NULL)"
        " OR (j.state NOT IN :terminal AND j.finished_at IS NOT NULL)",
    ),
    (
        "counters out of range (attempts < 0 or fencing_token < attempts)",
        "j.attempts < 0 OR j.fencing_token < j.attempts",
    ),
    (
        "attempt rows that do not end at the job's fencing token (or a token of none)",
        "(j.fencing_token = 0 AND COALESCE(a.n, 0) <> 0)"
        " OR (j.fencing_token > 0 AND (a.hi IS NULL OR a.hi <> j.fencing_token))"
        " OR a.lo < 1 OR COALESCE(a.n, 0) > j.fencing_token",
    ),
    (
        "attempts counts more than the attempts that were not released",
        "j.attempts > COALESCE(a.counted, 0)",
    ),
    (
        "succeeded job whose current attempt did not succeed",
        "j.state = 'succeeded' AND (a.succeeded_token IS NULL"
        " OR a.succeeded_token <> j.fencing_token)",
    ),
)
# Each invariant of an attempt row, by itself: its name and a SELECT of the
# ids of the jobs whose attempts break it.
_ATTEMPT_CHECKS: tuple[tuple[str, str], ...] = (
    (
        "attempt with an unknown outcome",
        "SELECT job_id FROM attempts WHERE outcome NOT IN :outcomes",
    ),
    (
        "orphan attempt (its job is gone)",
        "SELECT a.job_id FROM attempts a LEFT JOIN jobs j ON j.id = a.job_id WHERE j.id IS NULL",
    ),
    (
        "attempt whose finished_at disagrees with its outcome",
        "SELECT job_id FROM attempts WHERE (outcome = 'running' AND finished_at IS NOT NULL)"
        " OR (outcome <> 'running' AND finished_at IS NULL)",
    ),
)

_PARAMS = {"states": _STATES, "outcomes": _OUTCOMES, "terminal": _TERMINAL}
_ROWS = 100  # broken job rows read back at most


def _statement(sql: str, limit: int) -> tuple[sa.TextClause, dict[str, list[str]]]:
    params = {key: value for key, value in _PARAMS.items() if f":{key}" in sql}
    stmt = sa.text(f"{sql} LIMIT {limit}")
    return stmt.bindparams(*(sa.bindparam(key, expanding=True) for key in params)), params


_JOBS = _statement(
    "SELECT j.id, "
    + ", ".join(f"({when}) AS c{i}" for i, (_, when) in enumerate(_JOB_CHECKS))
    + f" FROM jobs j LEFT JOIN ({_PER_JOB}) a ON a.job_id = j.id WHERE "
    + " OR ".join(f"({when})" for _, when in _JOB_CHECKS),
    _ROWS,
)
_ATTEMPTS = tuple((name, *_statement(sql, SAMPLE)) for name, sql in _ATTEMPT_CHECKS)


def _violations(conn: Connection, reaped_within: timedelta | None) -> list[str]:
    broken: dict[str, list[str]] = {}
    stmt, params = _JOBS
    for row in conn.execute(stmt, params):
        for (name, _), hit in zip(_JOB_CHECKS, row[1:], strict=True):
            if hit:
                broken.setdefault(name, []).append(row[0])
    for name, stmt, params in _ATTEMPTS:
        if ids := list(conn.execute(stmt, params).scalars()):
            broken[name] = ids
    found = [f"{name}: {ids[:SAMPLE]}" for name, ids in broken.items()]
    if reaped_within is not None:
        found.extend(_overdue(conn, reaped_within))
    return found


def _overdue(conn: Connection, reaped_within: timedelta) -> list[str]:
    """Running jobs whose lease expired longer ago than the reaper may take."""
    cutoff = datetime.now(UTC) - reaped_within
    stmt = (
        sa.select(jobs.c.id)
        .where(jobs.c.state == "running", jobs.c.lease_expires_at < cutoff)
        .limit(SAMPLE)
    )
    ids = list(conn.execute(stmt).scalars())
    if not ids:
        return []
    return [f"running job whose lease expired over {reaped_within} ago, not reaped: {ids}"]


def _begin_sqlite(engine: sa.Engine) -> None:
    """A real BEGIN, so every check reads one snapshot of the WAL (pysqlite's
    own transaction handling issues none before a SELECT)."""

    @sa.event.listens_for(engine, "connect")
    def _autocommit(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")


@contextmanager
def _sqlite(path: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})
    _begin_sqlite(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def read(database: str, op: Callable[[Connection], T]) -> T:
    """Run ``op`` on a sync Connection to the broker's database, in one snapshot.

    PostgreSQL has no sync driver here: the op runs through asyncpg's
    ``run_sync``, as the broker's own operations do.
    """
    if not database.startswith(("postgresql://", "postgres://")):
        path = database.removeprefix("sqlite:///").removeprefix("sqlite://")
        with _sqlite(path) as engine, engine.begin() as conn:
            return op(conn)

    async def run() -> T:
        url, server_settings = engine_url(database)
        engine = create_async_engine(
            url,
            isolation_level="REPEATABLE READ",
            connect_args={"server_settings": server_settings},
            poolclass=sa.pool.NullPool,
        )
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(op)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def violations(database: str, reaped_within: timedelta | None = None) -> list[str]:
    """Every broken invariant, with up to SAMPLE ids each; empty when the store is sound.

    With ``reaped_within``, a running job whose lease expired longer ago than
    that counts too: the reaper is stuck (a liveness check, not a transaction's).
    """
    return read(database, lambda conn: _violations(conn, reaped_within))


def assert_intact(database: str, reaped_within: timedelta | None = None) -> None:
    broken = violations(database, reaped_within)
    assert not broken, "store integrity broken:\n  " + "\n  ".join(broken)


def _states(conn: Connection, ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        stmt = sa.select(jobs.c.id, jobs.c.state).where(jobs.c.id.in_(chunk))
        found.update((job_id, state) for job_id, state in conn.execute(stmt))
    return found


def states_of(database: str, ids: Collection[str]) -> dict[str, str]:
    """The stored state of each of ``ids`` that is stored."""
    return read(database, lambda conn: _states(conn, sorted(ids)))


def missing(database: str, acknowledged: Collection[str]) -> set[str]:
    """The acknowledged job ids that are not in the store."""
    return set(acknowledged) - set(states_of(database, acknowledged))


def assert_none_missing(database: str, acknowledged: Collection[str]) -> None:
    lost = missing(database, acknowledged)
    assert not lost, f"{len(lost)} acknowledged jobs are not stored: {sorted(lost)[:SAMPLE]}"
