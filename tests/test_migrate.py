"""Schema versions: ``broker migrate`` brings a database to this version and
refuses one that is newer; ``broker serve`` does the same at start."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import sqlalchemy as sa

from jobbroker_server.domain.ids import new_job_id
from jobbroker_server.domain.models import NewJob, Payload
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.states import JobState
from jobbroker_server.store import migrations, open_store
from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import metadata
from tests.processes import BROKER

T = TypeVar("T")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BROKER, *args], capture_output=True, text=True, timeout=60)


def _bump_version(database: str, version: int) -> None:
    """Pretend a newer broker migrated this database."""
    from jobbroker_server.store.sql import SqlStore

    async def bump() -> None:
        store = open_store(database)
        assert isinstance(store, SqlStore)
        try:
            await store.migrate()
            await store._run(  # a test reaching in: no public way to write the future
                lambda conn: conn.execute(
                    sa.text("INSERT INTO schema_version (version, applied_at) VALUES (:v, :t)"),
                    {"v": version, "t": 0 if "sqlite" in conn.dialect.name else datetime.now(UTC)},
                )
            )
        finally:
            await store.close()

    asyncio.run(bump())


def test_migrate_creates_the_schema_once_and_is_idempotent(database: str) -> None:
    first = _run("migrate", "--database", database)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"schema is at version {migrations.LATEST}"
    again = _run("migrate", "--database", database)
    assert again.returncode == 0 and again.stdout == first.stdout

    async def tables() -> set[str]:
        store = open_store(database)
        try:
            from jobbroker_server.store.sql import SqlStore

            assert isinstance(store, SqlStore)
            names = await store._run(lambda conn: set(sa.inspect(conn).get_table_names()))
            versions = await store._run(migrations.current_version)
            assert versions == migrations.LATEST
            return names
        finally:
            await store.close()

    assert set(metadata.tables) <= asyncio.run(tables())


def test_a_newer_schema_is_refused_with_one_line(database: str) -> None:
    _bump_version(database, migrations.LATEST + 1)
    done = _run("migrate", "--database", database)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"newer than this broker's {migrations.LATEST}" in lines[0]
    served = _run("serve", "--port", "0", "--metrics-port", "0", "--database", database)
    assert served.returncode == 1
    assert "newer than this broker's" in served.stderr and "Traceback" not in served.stderr


def test_a_version_1_database_is_migrated_to_the_partial_indexes(database: str) -> None:
    """Steps 2 and 3 on a database that a broker of schema version 1 left, with a job in it."""

    def as_version_1(conn: sa.Connection) -> None:
        conn.execute(sa.text("DROP INDEX ix_jobs_finished"))
        conn.execute(sa.text("DROP INDEX ix_jobs_dead"))
        conn.execute(sa.text("CREATE INDEX ix_jobs_state_finished ON jobs (state, finished_at)"))
        conn.execute(sa.text("DELETE FROM schema_version WHERE version > 1"))

    def indexes(conn: sa.Connection) -> set[str]:
        return {str(index["name"]) for index in sa.inspect(conn).get_indexes("jobs")}

    async def in_store(step: Callable[[SqlStore], Awaitable[T]]) -> T:
        store = open_store(database)
        assert isinstance(store, SqlStore)
        try:
            return await step(store)
        finally:
            await store.close()

    assert _run("migrate", "--database", database).returncode == 0
    new = NewJob(new_job_id(), "old", "t", Payload(b"{}"), 0, None, RetryPolicy(), None, None, None)
    now = datetime.now(UTC)
    asyncio.run(in_store(lambda store: store.submit_many([new], now, timedelta(hours=1))))
    asyncio.run(in_store(lambda store: store._run(as_version_1)))  # a test reaching in
    assert asyncio.run(in_store(lambda store: store._run(migrations.current_version))) == 1

    done = _run("migrate", "--database", database)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"schema is at version {migrations.LATEST}"
    found = asyncio.run(in_store(lambda store: store._run(indexes)))
    assert {"ix_jobs_finished", "ix_jobs_dead"} <= found
    assert "ix_jobs_state_finished" not in found
    kept = asyncio.run(in_store(lambda store: store.get_job(new.id)))
    assert (kept.queue, kept.state) == ("old", JobState.PENDING)


def test_a_version_8_database_gains_workflows_schedules_and_queue_settings(
    database: str,
) -> None:
    """Steps 9 (jobs that wait on jobs), 10 (schedules) and 11 (queue
    settings) on a database that a broker of schema version 8 left, with a
    job in it."""

    def as_version_8(conn: sa.Connection) -> None:
        conn.execute(sa.text("DROP TABLE queues"))
        conn.execute(sa.text("DROP TABLE schedules"))
        conn.execute(sa.text("DROP TABLE job_deps"))
        conn.execute(sa.text("DROP INDEX ix_jobs_workflow"))
        for column in ("workflow_id", "waiting_on", "inputs"):
            conn.execute(sa.text(f"ALTER TABLE jobs DROP COLUMN {column}"))
        conn.execute(sa.text("DELETE FROM schema_version WHERE version > 8"))

    def found(conn: sa.Connection) -> tuple[set[str], list[int]]:
        indexes = {str(index["name"]) for index in sa.inspect(conn).get_indexes("schedules")}
        rows = conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version"))
        return indexes, [int(v) for (v,) in rows]

    async def in_store(step: Callable[[SqlStore], Awaitable[T]]) -> T:
        store = open_store(database)
        assert isinstance(store, SqlStore)
        try:
            return await step(store)
        finally:
            await store.close()

    assert _run("migrate", "--database", database).returncode == 0
    new = NewJob(new_job_id(), "old", "t", Payload(b"{}"), 0, None, RetryPolicy(), None, None, None)
    now = datetime.now(UTC)
    asyncio.run(in_store(lambda store: store.submit_many([new], now, timedelta(hours=1))))
    asyncio.run(in_store(lambda store: store._run(as_version_8)))  # a test reaching in
    done = _run("migrate", "--database", database)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"schema is at version {migrations.LATEST}"
    indexes, versions = asyncio.run(in_store(lambda store: store._run(found)))
    assert "ix_schedules_due" in indexes
    assert versions == [version for version, _ in migrations.STEPS]
    assert asyncio.run(in_store(lambda store: store.list_schedules(None, 10))) == []
    assert asyncio.run(in_store(lambda store: store.list_queues())) == []
    kept = asyncio.run(in_store(lambda store: store.get_job(new.id)))
    assert (kept.queue, kept.workflow_id) == ("old", None)


def test_a_version_10_database_gains_unique_keys(database: str) -> None:
    """Step 12 (unique keys: the column and its partial unique index) on a
    database that a broker of schema version 10 left, with a job in it; the
    migrated database holds each unique key once among unfinished jobs."""

    def as_version_10(conn: sa.Connection) -> None:
        conn.execute(sa.text("DROP INDEX ix_jobs_unique"))
        conn.execute(sa.text("ALTER TABLE jobs DROP COLUMN unique_key"))
        conn.execute(sa.text("DELETE FROM schema_version WHERE version > 10"))

    def indexes(conn: sa.Connection) -> set[str]:
        return {str(index["name"]) for index in sa.inspect(conn).get_indexes("jobs")}

    async def in_store(step: Callable[[SqlStore], Awaitable[T]]) -> T:
        store = open_store(database)
        assert isinstance(store, SqlStore)
        try:
            return await step(store)
        finally:
            await store.close()

    def new(unique: str | None = None) -> NewJob:
        return NewJob(
            new_job_id(),
            "old",
            "t",
            Payload(b"{}"),
            0,
            None,
            RetryPolicy(),
            None,
            None,
            None,
            unique_key=unique,
        )

    assert _run("migrate", "--database", database).returncode == 0
    old = new()
    now = datetime.now(UTC)
    asyncio.run(in_store(lambda store: store.submit_many([old], now, timedelta(hours=1))))
    asyncio.run(in_store(lambda store: store._run(as_version_10)))  # a test reaching in
    assert "ix_jobs_unique" not in asyncio.run(in_store(lambda store: store._run(indexes)))
    done = _run("migrate", "--database", database)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"schema is at version {migrations.LATEST}"
    asyncio.run(in_store(lambda store: store._run(migrations._v12_unique_keys)))  # again: a no-op
    assert "ix_jobs_unique" in asyncio.run(in_store(lambda store: store._run(indexes)))
    kept = asyncio.run(in_store(lambda store: store.get_job(old.id)))
    assert (kept.queue, kept.unique_key) == ("old", None)
    first, second = new("u"), new("u")
    made = asyncio.run(
        in_store(lambda store: store.submit_many([first, second], now, timedelta(hours=1)))
    )
    assert [(r.job_id, r.duplicate) for r in made.result] == [(first.id, False), (first.id, True)]
