"""One broker per SQLite file: an exclusive lock on a file beside it.

SQLite would let a second broker open the same file, and the two would then
each believe they own its leases (the SQLite store hears no other process's
submits). ``flock`` on a sidecar ``<db>.lock`` refuses the second at once; the
kernel drops the lock when its holder exits, however it exits, so a stale lock
cannot outlive a crash. The sidecar, not the database file itself: SQLite's
own locks on the database are POSIX record locks, which NFS folds together
with ``flock``. The file keeps the holder's pid, host and start time so the
refusal can name them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from datetime import UTC, datetime

from jobbroker_server.domain.errors import FailedPrecondition


class StoreLocked(FailedPrecondition):
    reason = "STORE_LOCKED"


def lock_path(database: str) -> str:
    """The lock file of a database path; symlinks resolved, so two names of one
    file share one lock."""
    return os.path.realpath(database) + ".lock"


class FileLock:
    """Held from ``acquire`` until ``release`` (or the process ends)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, database: str) -> FileLock:
        """Lock ``database``; raise StoreLocked naming the holder, or OSError."""
        path = lock_path(database)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                errno.ENOENT, f"the directory {directory} does not exist", directory
            )
        # Opened without truncating: until we hold the lock, the text is the holder's.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except BaseException:
            os.close(fd)
            raise
        if held:
            holder = _read(fd) or "another process"
            os.close(fd)
            raise StoreLocked(
                f"database {database} is in use by {holder} (lock {path}); "
                "stop that broker first, or give this one another --database"
            )
        started = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(
            fd, f"broker pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0
        )
        return cls(path, fd)

    def release(self) -> None:
        """Unlock and close; the file stays (removing it would race a new holder)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 512, 0).decode(errors="replace").strip()
    return ""
