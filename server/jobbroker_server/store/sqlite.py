"""SQLite (WAL): the embedded default that needs no other service.

Every operation runs whole on one writer thread holding one connection: a
transaction costs one hop between the event loop and that thread, not one per
statement as with an async driver, and SQLite serialises writers anyway.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import jobs

P = ParamSpec("P")
T = TypeVar("T")


def _pragmas(dbapi_conn: Any, _record: Any) -> None:
    # pysqlite's own transaction handling would skip BEGIN before some
    # statements; SQLAlchemy's events below issue it instead.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    # WAL with synchronous=NORMAL: a commit survives a crash of the process;
    # power loss may drop the last transactions (see the README's promise).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class SqliteStore(SqlStore):
    def __init__(self, path: str, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._engine = sa.create_engine(f"sqlite:///{path}", poolclass=sa.pool.NullPool)
        sa.event.listen(self._engine, "connect", _pragmas)
        sa.event.listen(self._engine, "begin", _begin_immediate)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="jobbroker-sqlite")
        self._conn: Connection | None = None

    def _in_thread(self, op: Callable[..., T], args: Any, kwargs: Any) -> T:
        if self._conn is None:
            self._conn = self._engine.connect()
        with self._conn.begin():
            return op(self._conn, *args, **kwargs)

    async def _transact(
        self, op: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._in_thread, op, args, kwargs)

    async def listen(self, on_ready: Callable[[str], None]) -> None:
        """One broker process owns a SQLite file: its own submits wake it."""

    def _insert_ignoring_conflicts(self) -> sa.Insert:
        return sqlite_insert(jobs).on_conflict_do_nothing(index_elements=["idempotency_key"])

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()

    async def _dispose(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close_connection)
        self._thread.shutdown(wait=True)
