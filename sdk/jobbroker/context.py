"""JobContext: what a running handler may know and do, via `current_job()`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar

from .errors import InvalidArgumentError
from .lease import AsyncLease
from .types import Job

Post = Callable[[Callable[[], Awaitable[None]]], None]
"""Runs a report on the worker's event loop without waiting; callable from any thread."""

_current: ContextVar[JobContext] = ContextVar("jobbroker_current_job")


class JobContext:
    """The job a handler runs. Its reports return at once and go out in the background."""

    def __init__(self, lease: AsyncLease, post: Post) -> None:
        self._lease = lease
        self._post = post
        self._stopped = False

    @property
    def job(self) -> Job:
        return self._lease.job

    @property
    def id(self) -> str:
        return self._lease.job.id

    @property
    def attempt(self) -> int:
        """1 for the first attempt, 2 for the first retry, ..."""
        return self._lease.job.attempts

    @property
    def cancelled(self) -> bool:
        """True once the handler should stop: cancelled, timed out, lease lost, shutdown.

        Async handlers are also cancelled; sync handlers should poll this.
        """
        return self._stopped or self._lease.cancelled

    def heartbeat(self) -> None:
        """Extend the lease now (the worker already heartbeats on its own)."""
        self._post(self._lease.heartbeat)

    def progress(self, fraction: float, message: str = "") -> None:
        """Record progress, a fraction within [0, 1], with an optional message."""
        if not 0.0 <= fraction <= 1.0:
            raise InvalidArgumentError(f"progress must be within [0, 1], got {fraction}")
        self._post(lambda: self._lease.progress(fraction, message))

    def stop(self) -> None:
        self._stopped = True


def current_job() -> JobContext:
    """The context of the job this handler runs; RuntimeError outside a handler."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_job() called outside a jobbroker task handler") from None


def bind(context: JobContext) -> None:
    _current.set(context)
