"""Schema versions: each step brings the schema from the version before it.

``broker migrate`` (and ``broker serve`` at start) applies the steps a database
lacks, each in the same transaction as its version row; a database newer than
this broker is refused, never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import FailedPrecondition
from jobbroker_server.store.tables import (
    api_keys,
    broker_health,
    job_deps,
    job_events,
    jobs,
    metadata,
    queues,
    rate_buckets,
    schedules,
    schema_version,
)


class SchemaTooNew(FailedPrecondition):
    reason = "SCHEMA_TOO_NEW"


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, checkfirst=True)


def _index(name: str) -> sa.Index:
    return next(index for index in jobs.indexes if index.name == name)


def _v2_partial_finished_index(conn: Connection) -> None:
    """Retention's index on (state, finished_at) becomes one on finished_at
    of finished jobs only: leases and completions no longer rewrite it."""
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_jobs_state_finished"))
    _index("ix_jobs_finished").create(conn, checkfirst=True)


def _v3_dead_index(conn: Connection) -> None:
    """Dead jobs in id order, which the dropped (state, finished_at) index gave
    the dead-letter commands that name no queue."""
    _index("ix_jobs_dead").create(conn, checkfirst=True)


def _v4_broker_health(conn: Connection) -> None:
    """The row each broker's health probe rewrites."""
    broker_health.create(conn, checkfirst=True)


def _v5_api_keys(conn: Connection) -> None:
    """API keys, and the key that holds each lease."""
    api_keys.create(conn, checkfirst=True)
    if "lease_key" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(
            sa.text("ALTER TABLE jobs ADD COLUMN lease_key VARCHAR(32) NOT NULL DEFAULT ''")
        )


def _v6_job_events(conn: Connection) -> None:
    """Each job's story: a row per transition and progress report."""
    job_events.create(conn, checkfirst=True)


def _v7_leased_state(conn: Connection) -> None:
    """Jobs held in a worker's window are leased until their handler starts:
    the index of held jobs (for the reaper) covers both states. On SQLite the
    event log's numbers become AUTOINCREMENT, so that they only grow even when
    the newest event's job is deleted: the table is made again, its rows kept."""
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_jobs_running"))
    _index("ix_jobs_running").create(conn)
    if conn.dialect.name != "sqlite":
        return
    conn.execute(sa.text("ALTER TABLE job_events RENAME TO job_events_v6"))
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_job_events_job"))
    job_events.create(conn)
    conn.execute(sa.text("INSERT INTO job_events SELECT * FROM job_events_v6"))
    conn.execute(sa.text("DROP TABLE job_events_v6"))


def _v8_event_commit_order(conn: Connection) -> None:
    """On PostgreSQL each event records its transaction's id: a sequence hands
    out numbers in insert order, not commit order, and a tail of the whole log
    reads in the order transactions finished (see ``events.tail``)."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(
        sa.text(
            "ALTER TABLE job_events ADD COLUMN IF NOT EXISTS txid BIGINT NOT NULL"
            " DEFAULT (pg_current_xact_id()::text::bigint)"
        )
    )
    conn.execute(
        sa.text("CREATE INDEX IF NOT EXISTS ix_job_events_commit ON job_events (txid, seq)")
    )


def _v9_dependencies(conn: Connection) -> None:
    """Jobs that wait on other jobs: the links, each job's workflow and its
    count of parents not yet done."""
    found = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    added = {
        "workflow_id": "VARCHAR(200)",
        "waiting_on": "INTEGER NOT NULL DEFAULT 0",
        "inputs": "JSON",
    }
    for name, kind in added.items():
        if name not in found:
            conn.execute(sa.text(f"ALTER TABLE jobs ADD COLUMN {name} {kind}"))
    _index("ix_jobs_workflow").create(conn, checkfirst=True)
    job_deps.create(conn, checkfirst=True)


def _v10_schedules(conn: Connection) -> None:
    """Schedules: the job templates the cron service submits at each tick."""
    schedules.create(conn, checkfirst=True)


def _v11_queue_settings(conn: Connection) -> None:
    """Queues' own settings: paused or not, and their jobs' defaults."""
    queues.create(conn, checkfirst=True)


def _v12_unique_keys(conn: Connection) -> None:
    """Unique keys: the column, and the index that lets one unfinished job
    hold each."""
    if "unique_key" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}:
        conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN unique_key VARCHAR(200)"))
    _index("ix_jobs_unique").create(conn, checkfirst=True)


def _add_columns(conn: Connection, table: str, added: dict[str, str]) -> None:
    found = {c["name"] for c in sa.inspect(conn).get_columns(table)}
    for name, kind in added.items():
        if name not in found:
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"))


def _v13_flow_limits(conn: Connection) -> None:
    """Concurrency and rate limits: the keys and limits of jobs, those of
    queues, and the rate buckets."""
    _add_columns(
        conn,
        "jobs",
        {
            "concurrency_key": "VARCHAR(200)",
            "concurrency_limit": "INTEGER",
            "rate_key": "VARCHAR(200)",
            "rate_count": "INTEGER",
            "rate_period_s": "FLOAT",
            "held_by": "VARCHAR(16)",
        },
    )
    _add_columns(
        conn,
        "queues",
        {
            "rate_count": "INTEGER",
            "rate_period_s": "FLOAT",
            "key_rate_count": "INTEGER",
            "key_rate_period_s": "FLOAT",
            "key_concurrency": "INTEGER",
            "limited": "BOOLEAN NOT NULL DEFAULT FALSE",
        },
    )
    indexes = (
        "ix_jobs_concurrency_key",
        "ix_jobs_rate_key",
        "ix_jobs_held_concurrency",
        "ix_jobs_held_rate",
    )
    for name in indexes:
        _index(name).create(conn, checkfirst=True)
    rate_buckets.create(conn, checkfirst=True)


# (version, step); append new steps, never edit old ones.
STEPS: tuple[tuple[int, Callable[[Connection], None]], ...] = (
    (1, _v1_initial),
    (2, _v2_partial_finished_index),
    (3, _v3_dead_index),
    (4, _v4_broker_health),
    (5, _v5_api_keys),
    (6, _v6_job_events),
    (7, _v7_leased_state),
    (8, _v8_event_commit_order),
    (9, _v9_dependencies),
    (10, _v10_schedules),
    (11, _v11_queue_settings),
    (12, _v12_unique_keys),
    (13, _v13_flow_limits),
)
LATEST = STEPS[-1][0]


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table(schema_version.name):
        return 0
    found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(found or 0)


def migrate(conn: Connection, extra: Callable[[Connection], None] | None = None) -> int:
    """Apply the missing steps, then ``extra`` (a dialect's own objects, which
    must be safe to apply again); return the schema version now."""
    found = current_version(conn)
    if found > LATEST:
        raise SchemaTooNew(
            f"the database schema is version {found}, newer than this broker's {LATEST}; "
            "run a jobbroker release that knows it"
        )
    for version, step in STEPS:
        if version > found:
            step(conn)
            conn.execute(
                schema_version.insert().values(version=version, applied_at=datetime.now(UTC))
            )
    if extra is not None:
        extra(conn)
    return LATEST
