"""Pick the store for a database URL or path, and open it ready for use."""

from __future__ import annotations

import contextlib
import logging
from urllib.parse import urlsplit, urlunsplit

from jobbroker_server.domain.errors import BrokerError, StorageFull, StoreUnavailable
from jobbroker_server.store import faults
from jobbroker_server.store.base import Store


class CannotOpenStore(BrokerError):
    """The database named at start-up cannot be used; the message says why."""

    reason = "CANNOT_OPEN_STORE"


def _is_postgres(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def open_store(database: str) -> Store:
    """``postgresql://...`` opens PostgreSQL; anything else is a SQLite file
    path, locked against a second store for as long as this one is open."""
    if _is_postgres(database):
        from jobbroker_server.store.postgres import PostgresStore

        return PostgresStore(database)
    from jobbroker_server.store.sqlite import SqliteStore

    return SqliteStore(sqlite_path(database))


def sqlite_path(database: str) -> str:
    return database.removeprefix("sqlite:///").removeprefix("sqlite://")


def shown(database: str) -> str:
    """The database as logs and errors name it: a DSN's password hidden."""
    if not _is_postgres(database):
        return sqlite_path(database)
    parts = urlsplit(database)
    if parts.password is None:
        return database
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def open_migrated(database: str) -> tuple[Store, int]:
    """Open the store, lock it (SQLite) and bring its schema to this version;
    return it and the version. Any failure raises CannotOpenStore, one line
    that names the database, with nothing left open."""
    try:
        store = open_store(database)
    except Exception as error:
        raise CannotOpenStore(_why(database, error)) from error
    quiet = _Quiet()
    faults.log.addFilter(quiet)  # the one line below tells the fault
    try:
        return store, await store.migrate()
    except Exception as error:
        with contextlib.suppress(Exception):  # the first error is the one to tell
            await store.close()
        raise CannotOpenStore(_why(database, error)) from error
    finally:
        faults.log.removeFilter(quiet)


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _why(database: str, error: BaseException) -> str:
    name = shown(database)
    if isinstance(error, StoreUnavailable | StorageFull) and error.__context__ is not None:
        error = error.__context__  # a fault in the store's words: tell the driver's
    elif isinstance(error, BrokerError):  # a sentence of ours (locked, schema too new)
        text = str(error)
        return text if name in text else f"database {name}: {text}"
    return f"cannot open database {name}: {describe(error)}"


def describe(error: BaseException) -> str:
    """One line for a driver's or the system's error, without SQL text."""
    cause = getattr(error, "orig", None) or error  # SQLAlchemy wraps the driver's
    if isinstance(cause, OSError) and cause.strerror:
        text = cause.strerror
        if cause.filename and str(cause.filename) not in text:
            text = f"{text}: {cause.filename}"
    else:
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return text or type(cause).__name__
