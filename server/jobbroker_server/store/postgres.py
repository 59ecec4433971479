"""PostgreSQL (asyncpg): many broker replicas on one database."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from jobbroker_server.store import faults, migrations, rows
from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import READY_CHANNEL, jobs, json_dumps, json_loads

P = ParamSpec("P")
T = TypeVar("T")


def engine_url(dsn: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL for a ``postgresql://`` DSN, and asyncpg server settings.

    A ``schema`` query parameter puts the broker's tables in that schema.
    """
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    settings = {"search_path": query.pop("schema")} if "schema" in query else {}
    url = urlunsplit(
        ("postgresql+asyncpg", parts.netloc, parts.path, urlencode(query), parts.fragment)
    )
    return url, settings


log = logging.getLogger(__name__)

# A connection attempt to a database that does not answer gives up after this
# long (asyncpg's own default is a minute), so callers hear UNAVAILABLE at once.
CONNECT_TIMEOUT = 5.0
# A statement on a connection whose peer vanished without a reset would wait
# for TCP to give up, many minutes; no store operation runs this long.
COMMAND_TIMEOUT = 60.0

# A job that becomes pending (submitted, retried, handed back, promoted,
# replayed) wakes the streams of every replica. PostgreSQL delivers NOTIFY at
# commit and folds duplicates within a transaction, so a batch of one queue
# costs one notification.
_READY_TRIGGER = (
    f"""
    CREATE OR REPLACE FUNCTION jobbroker_notify_ready() RETURNS trigger AS $$
    BEGIN
        PERFORM pg_notify('{READY_CHANNEL}', NEW.queue);
        RETURN NULL;
    END $$ LANGUAGE plpgsql
    """,
    """
    CREATE OR REPLACE TRIGGER jobs_ready AFTER INSERT OR UPDATE OF state ON jobs
    FOR EACH ROW WHEN (NEW.state = 'pending') EXECUTE FUNCTION jobbroker_notify_ready()
    """,
)


# Replicas starting together migrate one at a time (catalog updates race).
_MIGRATION_LOCK = 0x6A6F6262  # "jobb"


def _migrate_alone(conn: Connection, extra: Callable[[Connection], None]) -> int:
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    return migrations.migrate(conn, extra)


# With no conflict target, a row whose idempotency key or unique key
# (ix_jobs_unique, partial) is taken is skipped: a target names one only.
_INSERT_NEW = (
    pg_insert(jobs).values(rows.NEW_JOB_VALUES).on_conflict_do_nothing().returning(jobs.c.id)
)


class PostgresStore(SqlStore):
    shared = True  # replicas

    def __init__(self, dsn: str, rng: random.Random | None = None, pool_size: int = 10) -> None:
        super().__init__(rng)
        url, server_settings = engine_url(dsn)
        self._listen_dsn = urlunsplit(urlsplit(url)._replace(scheme="postgresql"))
        self._server_settings = server_settings
        self._listener: asyncpg.Connection | None = None
        self._relistening: asyncio.Future[None] | None = None
        self._on_ready: Callable[[str], None] = lambda queue: None
        # A connection broken by an outage is found by the ping on checkout
        # (or by its first failure, which recycles the whole pool) and
        # replaced by a new one: the pool recovers when the database is back.
        self._engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            # Flow limits count a key's jobs after taking its lock, and need
            # each statement to see what committed before it (store/flow.py).
            isolation_level="READ COMMITTED",
            connect_args={
                "server_settings": server_settings,
                "timeout": CONNECT_TIMEOUT,
                "command_timeout": COMMAND_TIMEOUT,
            },
            json_serializer=json_dumps,
            json_deserializer=json_loads,
        )
        self._url = url

    async def _transact(
        self, op: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        attempt = 1
        while True:
            try:
                async with self._engine.begin() as conn:
                    return await conn.run_sync(op, *args, **kwargs)
            except sa.exc.DBAPIError as error:
                if attempt == faults.RETRIES or not faults.worth_retrying(error):
                    raise
            attempt += 1
            log.info("PostgreSQL rolled a transaction back (a deadlock); running it again")

    def _insert_new(self, conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
        return set(conn.execute(_INSERT_NEW, rows).scalars())

    def _dialect_schema(self, conn: Connection) -> None:
        for statement in _READY_TRIGGER:
            conn.exec_driver_sql(statement)

    async def migrate(self) -> int:
        """On a connection of its own without COMMAND_TIMEOUT: building an
        index on a large table may take longer."""
        engine = create_async_engine(
            self._url,
            poolclass=sa.pool.NullPool,
            connect_args={"server_settings": self._server_settings, "timeout": CONNECT_TIMEOUT},
        )
        try:
            return await self._guarded(self._migrate_on(engine))
        finally:
            await engine.dispose()

    async def _migrate_on(self, engine: AsyncEngine) -> int:
        async with engine.begin() as conn:
            return await conn.run_sync(_migrate_alone, self._dialect_schema)

    async def listen(self, on_ready: Callable[[str], None]) -> None:
        """LISTEN on a connection of its own, outside the pool; if it drops,
        connect again (the dispatcher's poll covers the gap)."""
        self._on_ready = on_ready
        await self._connect_listener()

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self._listen_dsn, server_settings=self._server_settings)
        await conn.add_listener(
            READY_CHANNEL, lambda _conn, _pid, _channel, queue: self._on_ready(str(queue))
        )
        conn.add_termination_listener(lambda _conn: self._relisten())
        self._listener = conn

    def _relisten(self) -> None:
        if self._listener is None:
            return  # closing
        self._listener = None
        self._relistening = asyncio.ensure_future(self._reconnect_listener())

    async def _reconnect_listener(self) -> None:
        delay = 0.5
        while True:
            try:
                await self._connect_listener()
                return
            except (OSError, asyncpg.PostgresError) as error:
                log.warning("LISTEN connection lost (%s); again in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _dispose(self) -> None:
        if self._relistening is not None:
            self._relistening.cancel()
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        await self._engine.dispose()
