"""SQLite (WAL): the embedded default that needs no other service.

One connection runs every operation whole, in one transaction: at once on
the event loop when the connection is idle, else on the writer thread, which
runs the operations queued meanwhile together in the next transaction, each
under a savepoint of its own, and answers their callers after the one
commit, with one wake-up of the event loop. SQLite serialises writers anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from jobbroker_server.store import rows
from jobbroker_server.store.lock import FileLock
from jobbroker_server.store.prepared import Prepared, dbapi_of
from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import jobs, json_dumps, json_loads

log = logging.getLogger(__name__)

# How long a transaction waits for another process's write lock.
BUSY_TIMEOUT_MS = 10_000

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
    # Checkpoints run on a thread of their own (_Writer), never inside a commit.
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_immediate(conn: Connection) -> None:
    # Straight to the driver: through SQLAlchemy, this statement cost as much
    # as the INSERT of a submit.
    dbapi_of(conn).execute("BEGIN IMMEDIATE")


class _Inserter:
    """INSERT … ON CONFLICT DO NOTHING through the driver's executemany. With
    no conflict target it skips a row whose idempotency key or unique key
    (ix_jobs_unique) is taken.

    SQLAlchemy's insertmanyvalues spent several times SQLite's own time on a
    batch of submits, binding each value; a Prepared statement binds each row
    through the columns' own processors instead. executemany cannot return
    rows: when its row count says some were skipped, a SELECT of the batch's
    (fresh) ids tells which were stored.
    """

    def __init__(self) -> None:
        statement = sqlite_insert(jobs).values(rows.NEW_JOB_VALUES).on_conflict_do_nothing()
        self._insert = Prepared(statement)

    def __call__(self, conn: Connection, new_rows: list[dict[str, Any]]) -> set[str]:
        inserted = self._insert.run_many(conn, new_rows)
        ids = [row["id"] for row in new_rows]
        if inserted == len(new_rows):
            return set(ids)
        return set(conn.execute(sa.select(jobs.c.id).where(jobs.c.id.in_(ids))).scalars())


# Operations in one transaction at most: a long queue is served in several, so
# no caller waits behind an unbounded one.
MAX_GROUP = 64

# How often the checkpoint thread copies the WAL into the database file.
CHECKPOINT_EVERY = 0.25
# A WAL past this many pages is restarted, and one left larger than
# WAL_KEEP_BYTES is truncated: under steady writes a passive checkpoint never
# catches up with the last commit, so nothing else would ever rewind the WAL.
WAL_RESTART_PAGES = 16_384  # 64 MiB of 4 KiB pages
WAL_KEEP_BYTES = 64 * 1024 * 1024


@dataclass(slots=True)
class _Call:
    op: Callable[..., Any]
    args: Any
    kwargs: Any
    future: asyncio.Future[Any]
    outcome: Any = None
    error: BaseException | None = None


def _answer(calls: list[_Call]) -> None:
    """On the event loop: hand each caller its outcome."""
    for call in calls:
        if call.future.done():
            continue
        if call.error is not None:
            call.future.set_exception(call.error)
        else:
            call.future.set_result(call.outcome)


class _Writer:
    """The connection, the thread that runs queued operations on it, and the
    thread that checkpoints the WAL.

    An operation that finds the connection idle runs at once on the caller's
    thread, the event loop's: a sequential submit then pays no hop to the
    thread and back, which cost more than the transaction (W1: 1,110 ->
    1,440 submits/s). Operations that arrive while one runs queue for the
    thread, which runs them together in one transaction.

    SQLite's automatic checkpoint would run inside the commit that crosses
    its threshold and sync the database file there, on the event loop; a
    PASSIVE checkpoint from a connection of its own blocks no writer.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._conn = engine.connect()
        self._thread = threading.Thread(target=self._serve, name="jobbroker-sqlite", daemon=True)
        self._thread.start()
        self._stopping = threading.Event()
        self._checkpoints = threading.Thread(
            target=self._checkpoint, name="jobbroker-sqlite-checkpoint", daemon=True
        )
        self._checkpoints.start()

    def run(self, op: Callable[..., Any], args: Any, kwargs: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        call = _Call(op, args, kwargs, loop.create_future())
        if self._closed:
            call.future.set_exception(RuntimeError("the SQLite store is closed"))
            return call.future
        if self._queue.empty() and self._lock.acquire(blocking=False):
            try:
                ran = self._run_now(call)
            finally:
                self._lock.release()
            if ran:
                _answer([call])
                return call.future
        self._queue.put(call)
        return call.future

    def _run_now(self, call: _Call) -> bool:
        """Run the call on this thread unless another process holds the write
        lock: the writer thread waits for that, not the event loop."""
        dbapi = dbapi_of(self._conn)
        dbapi.execute("PRAGMA busy_timeout=0")
        try:
            self._transact(self._conn, [call])
        finally:
            dbapi.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if isinstance(call.error, sqlite3.OperationalError) and "locked" in str(call.error):
            call.error = None  # BEGIN IMMEDIATE was refused: nothing ran
            return False
        return True

    def stop(self) -> None:
        """Finish what is queued, close the connections, end the threads."""
        self._stopping.set()
        self._checkpoints.join()
        self._queue.put(None)
        self._thread.join()

    def _checkpoint(self) -> None:
        conn = self._engine.raw_connection()
        cursor = conn.cursor()
        # PASSIVE never waits; RESTART must not either: it holds our writers.
        cursor.execute("PRAGMA busy_timeout=0")
        restarted_at = 0  # the WAL's pages at the last RESTART
        failing = False  # logged once when checkpoints start failing, once when they recover
        try:
            while not self._stopping.wait(CHECKPOINT_EVERY):
                try:
                    _, pages, _ = cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if pages > WAL_RESTART_PAGES and pages != restarted_at:
                        restarted_at = self._restart(cursor)
                except sqlite3.Error as error:
                    if not failing:
                        log.warning("WAL checkpoints fail (%s); trying again", error)
                    failing = True
                else:
                    if failing:
                        log.warning("WAL checkpoints work again")
                    failing = False
        finally:
            cursor.close()
            conn.close()

    def _restart(self, cursor: Any) -> int:
        """Copy what the passive runs left and make the next commit write the
        WAL from its start. That needs a moment with no writer, which steady
        writes never leave: our operations wait for it, a few milliseconds per
        WAL_RESTART_PAGES. Another process reading or writing the file makes
        it give up at once (busy) until the WAL has grown again."""
        with self._lock:
            busy, pages, _ = cursor.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        if busy:
            log.info("WAL restart put off: another process is using the database")
        return int(pages)

    def _serve(self) -> None:
        conn = self._conn
        try:
            while (first := self._queue.get()) is not None:
                group = [first]
                stopping = False
                while len(group) < MAX_GROUP and not self._queue.empty():
                    more = self._queue.get_nowait()
                    if more is None:
                        stopping = True
                        break
                    group.append(more)
                with self._lock:
                    self._transact(conn, group)
                by_loop: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
                for call in group:
                    by_loop.setdefault(call.future.get_loop(), []).append(call)
                for loop, calls in by_loop.items():
                    with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                        loop.call_soon_threadsafe(_answer, calls)
                if stopping:
                    break
        finally:
            with self._lock:  # not while an operation runs on the event loop
                self._closed = True
                conn.close()
            self._engine.dispose()

    @staticmethod
    def _transact(conn: Connection, group: list[_Call]) -> None:
        try:
            with conn.begin():
                if len(group) == 1:
                    call = group[0]
                    call.outcome = call.op(conn, *call.args, **call.kwargs)
                    return
                for call in group:
                    try:
                        with conn.begin_nested():  # a failing one undoes only itself
                            call.outcome = call.op(conn, *call.args, **call.kwargs)
                    except Exception as error:
                        call.error = error
        except Exception as error:  # the commit failed, or the lone operation did
            for call in group:
                if call.error is None:
                    call.error = error


class SqliteStore(SqlStore):
    def __init__(self, path: str, rng: random.Random | None = None) -> None:
        """Open the file at ``path``, locked for this store's lifetime (see
        ``lock``): a second store on it raises StoreLocked."""
        super().__init__(rng)
        self._engine = sa.create_engine(
            f"sqlite:///{path}",
            poolclass=sa.pool.NullPool,
            connect_args={"check_same_thread": False},
            json_serializer=json_dumps,
            json_deserializer=json_loads,
        )
        sa.event.listen(self._engine, "connect", _pragmas)
        sa.event.listen(self._engine, "begin", _begin_immediate)
        self._writer: _Writer | None = None
        self._inserter = _Inserter()
        in_memory = path in ("", ":memory:")
        self._file_lock = None if in_memory else FileLock.acquire(path)

    def _transact(
        self, op: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Awaitable[T]:
        if self._writer is None:
            self._writer = _Writer(self._engine)
        return self._writer.run(op, args, kwargs)

    async def listen(self, on_ready: Callable[[str], None]) -> None:
        """One broker process owns a SQLite file: its own submits wake it."""

    def _insert_new(self, conn: Connection, new_rows: list[dict[str, Any]]) -> set[str]:
        return self._inserter(conn, new_rows)

    async def _dispose(self) -> None:
        if self._writer is not None:
            await asyncio.to_thread(self._writer.stop)
            self._writer = None
        else:
            self._engine.dispose()
        if self._file_lock is not None:
            self._file_lock.release()  # after the last connection closed
            self._file_lock = None
