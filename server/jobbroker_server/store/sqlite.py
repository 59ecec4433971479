"""SQLite (aiosqlite, WAL): the embedded default that needs no other service."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import jobs


def _pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL with synchronous=NORMAL: a commit survives a process crash; power
    # loss may drop the last transactions (see the README's guarantees).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class SqliteStore(SqlStore):
    """One connection and one writer: SQLite serialises writes anyway, and a
    lock in the process is cheaper than SQLITE_BUSY retries."""

    def __init__(self, path: str, rng: random.Random | None = None) -> None:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{path}", pool_size=1, max_overflow=0, pool_timeout=3600
        )
        sa.event.listen(engine.sync_engine, "connect", _pragmas)
        super().__init__(engine, rng)
        self._writer = asyncio.Lock()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        async with self._writer, self._engine.begin() as conn:
            yield conn

    def _insert_ignoring_conflicts(self) -> sa.Insert:
        return sqlite_insert(jobs).on_conflict_do_nothing(index_elements=["idempotency_key"])
