"""Fixtures: a real broker on a loopback port over a real database.

Every test that takes ``database`` runs twice: on a fresh SQLite file and on a
fresh schema of the PostgreSQL named by JOBBROKER_TEST_POSTGRES_DSN. Without
that variable the PostgreSQL half is skipped, unless CI=true, where it fails.
"""

from __future__ import annotations

import asyncio
import functools
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from jobbroker import Client
from jobbroker_server.config import Settings
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.testing import BrokerThread

# Fast timers so tests wait for conditions in milliseconds, not seconds.
FAST = Settings(
    port=0,
    metrics_port=0,
    lease_duration=timedelta(seconds=2),
    reap_interval=timedelta(milliseconds=100),
    poll_interval=timedelta(milliseconds=200),
    shutdown_grace=timedelta(seconds=2),
    retention_interval=timedelta(milliseconds=100),
    retry=RetryPolicy(
        max_attempts=3,
        backoff_base=timedelta(milliseconds=50),
        backoff_factor=2.0,
        backoff_cap=timedelta(seconds=1),
        jitter=0.1,
    ),
)


DSN_ENV = "JOBBROKER_TEST_POSTGRES_DSN"


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@functools.cache
def _postgres_problem() -> str | None:
    dsn = os.environ.get(DSN_ENV)
    if not dsn:
        return f"PostgreSQL tests need {DSN_ENV}=postgresql://user@host:port/db"
    try:
        asyncio.run(_execute(dsn, "SELECT 1"))
    except Exception as exc:
        return f"PostgreSQL at {dsn} is unreachable: {exc}"
    return None


def postgres_dsn() -> str:
    """The test PostgreSQL's DSN; skips the test (fails it under CI=true) without one."""
    problem = _postgres_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI requires PostgreSQL: {problem}")
        pytest.skip(problem)
    return os.environ[DSN_ENV]


@pytest.fixture
def postgres_schema() -> Iterator[str]:
    """A fresh schema on the test PostgreSQL; its DSN names it."""
    dsn = postgres_dsn()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_execute(dsn, f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in dsn else "?"
    yield f"{dsn}{sep}schema={schema}"
    asyncio.run(_execute(dsn, f"DROP SCHEMA {schema} CASCADE"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "broker.db")
    return str(request.getfixturevalue("postgres_schema"))


@pytest.fixture
def settings(database: str) -> Settings:
    return replace(FAST, database=database)


@pytest.fixture
def broker(settings: Settings) -> Iterator[BrokerThread]:
    with BrokerThread(settings) as running:
        yield running


@pytest.fixture
def client(broker: BrokerThread) -> Iterator[Client]:
    with Client(broker.target, timeout=10) as c:
        yield c
