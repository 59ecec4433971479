"""Schema versions: ``broker migrate`` brings a database to this version and
refuses one that is newer; ``broker serve`` does the same at start."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime

import sqlalchemy as sa

from jobbroker_server.store import migrations, open_store
from jobbroker_server.store.tables import metadata
from tests.processes import BROKER


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
