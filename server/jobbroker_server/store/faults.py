"""Faults of the database, told apart from the errors of one request.

A driver's exception that means the database cannot be used right now (it is
unreachable, its disk is full, it is read-only) becomes a domain error whose
message is ours: a reply never carries SQL or a driver's text. The driver's
error is logged instead, one line per kind of fault at most every
``LOG_EVERY`` seconds, so an outage does not write a traceback per request.
Any other exception (a bad value, a constraint) is left as it is.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator

import sqlalchemy.exc

from jobbroker_server.domain.errors import BrokerError, StorageFull, StoreUnavailable

log = logging.getLogger(__name__)

LOG_EVERY = 10.0

UNREACHABLE = "the database cannot be reached; try again shortly"
BUSY = "the database is locked by another process; try again shortly"
POOL_BUSY = "every connection to the database is in use; try again shortly"
READ_ONLY = "the database is read-only: writes are refused until it can be written again"
DISK_FAILED = "the database's disk failed a read or write; try again shortly"
DISK_FULL = "the database's disk is full: writes are refused until space is freed"

# SQLite's result codes (the low byte is the primary code).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY = 5, 6, 8
_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 13, 14
_SQLITE_IOERR_SHMSIZE = _SQLITE_IOERR | (19 << 8)  # growing the WAL index: the disk is full

# PostgreSQL's SQLSTATEs: class 08 is a connection failure.
_PG_FAULTS = {
    "57P01": UNREACHABLE,  # the server is shutting down
    "57P02": UNREACHABLE,  # it crashed
    "57P03": UNREACHABLE,  # it is starting up
    "53300": POOL_BUSY,  # it takes no more connections
    "25006": READ_ONLY,  # a standby, say after a failover
}


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, the driver's error it wraps, and what caused that."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        pending += [orig if isinstance(orig, BaseException) else None, current.__cause__]


def _sqlite_fault(error: sqlite3.Error) -> BrokerError | None:
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        return None
    primary = code & 0xFF
    if primary == _SQLITE_FULL or code == _SQLITE_IOERR_SHMSIZE:
        return StorageFull(DISK_FULL)
    if primary == _SQLITE_IOERR:
        return StoreUnavailable(DISK_FAILED)
    if primary == _SQLITE_READONLY:
        return StoreUnavailable(READ_ONLY)
    if primary == _SQLITE_CANTOPEN:
        return StoreUnavailable("the database file cannot be opened; try again shortly")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreUnavailable(BUSY)
    return None


def _one_fault(error: BaseException) -> BrokerError | None:
    if isinstance(error, sqlite3.Error):
        return _sqlite_fault(error)
    sqlstate = getattr(error, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate.startswith("08"):
            return StoreUnavailable(UNREACHABLE)
        if sqlstate == "53100":
            return StorageFull(DISK_FULL)
        message = _PG_FAULTS.get(sqlstate)
        return StoreUnavailable(message) if message else None
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return StoreUnavailable(UNREACHABLE)
    if isinstance(error, sqlalchemy.exc.TimeoutError):  # waiting for a pooled connection
        return StoreUnavailable(POOL_BUSY)
    if isinstance(error, OSError):  # refused, reset, timed out, no such host
        return StoreUnavailable(UNREACHABLE)
    return None


# The transaction lost a deadlock, or a serialization conflict: PostgreSQL
# rolled it back whole, and running it again is what it asks for.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
RETRIES = 3


def worth_retrying(error: BaseException) -> bool:
    return any(getattr(c, "sqlstate", None) in _RETRY_SQLSTATES for c in _causes(error))


def translate(error: BaseException) -> BrokerError | None:
    """The domain error for a fault of the database; None for any other error."""
    if isinstance(error, BrokerError):
        return None
    for cause in _causes(error):
        fault = _one_fault(cause)
        if fault is not None:
            return fault
    return None


def driver_text(error: BaseException) -> str:
    """The innermost error's type and first line, without SQL or parameters."""
    inner = list(_causes(error))[-1]
    text = str(inner).strip().splitlines()
    first = text[0][:200] if text else ""
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


class FaultLog:
    """Logs a fault of the database once per kind (its reply's message) at
    most every ``every`` seconds, with how many went unlogged meanwhile."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self._every = every
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def report(self, fault: BrokerError, error: BaseException) -> None:
        kind = str(fault)
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._last[kind] = now
        unlogged = self._unlogged.pop(kind, 0)
        more = f" ({unlogged} more since the last such line)" if unlogged else ""
        log.warning("database fault, refused with %r: %s%s", kind, driver_text(error), more)
