"""One attempt of one job: run the handler, watch for cancel, soft timeout and lost
lease, and decide what to report."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

from ._threads import HandlerThreads
from .context import JobContext, bind
from .errors import JobBrokerError, PermanentError, RetryAfter
from .lease import AsyncLease
from .task import Task
from .types import ErrorInfo

Report = Callable[[AsyncLease], Awaitable[None]]
"""What to tell the broker about the attempt, given the lease (which may have moved
to a new stream by the time it is sent)."""


async def run_job(
    task: Task[Any, Any],
    lease: AsyncLease,
    context: JobContext,
    threads: HandlerThreads,
    interrupt: asyncio.Future[str],
) -> Report | None:
    """Run the attempt; None when there is nothing to report (the lease was lost).

    `interrupt` is resolved with "cancelled" or "lost" to stop the attempt early.
    """
    try:
        payload = lease.payload()
    except ValueError as error:
        return _fail(error, retryable=False)
    handler = _start(task, payload, context, threads)
    stop = await _supervise(handler, lease, context, interrupt)
    if stop is None:
        return _from_handler(handler)
    context.stop()
    handler.cancel()
    if stop == "lost":
        return None
    if stop == "cancelled":
        message = f"the broker cancelled the job ({lease.cancel_reason})"
        info = ErrorInfo(type="Cancelled", message=message)
        return lambda lease: lease.fail(info, cancelled=True)
    limit = lease.job.soft_timeout.total_seconds() if lease.job.soft_timeout else 0.0
    info = ErrorInfo(type="SoftTimeout", message=f"the handler ran longer than {limit:g}s")
    return _fail(info)


def _start(
    task: Task[Any, Any], payload: Any, context: JobContext, threads: HandlerThreads
) -> asyncio.Future[Any]:
    """Async handlers run as a task on the loop, sync ones on the handler threads;
    both see `current_job()` through a copied context. A thread cannot be stopped:
    when an attempt is given up, its handler's future is cancelled and the
    outcome dropped."""
    ctx = contextvars.copy_context()
    ctx.run(bind, context)
    if task.is_async:
        return asyncio.create_task(task.fn(payload), context=ctx)
    return threads.run(ctx.run, task.fn, payload)


async def _supervise(
    handler: asyncio.Future[Any],
    lease: AsyncLease,
    context: JobContext,
    interrupt: asyncio.Future[str],
) -> str | None:
    """Wait for the handler; the reason to stop it early if something came first.

    Callbacks on one future, not a task per thing watched: this runs per job."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[str | None] = loop.create_future()

    def settle(reason: str | None) -> None:
        if not first.done():
            first.set_result(reason)

    handler.add_done_callback(lambda _: settle(None))
    interrupt.add_done_callback(lambda done: settle(done.result()))
    soft = lease.job.soft_timeout
    timer = loop.call_later(soft.total_seconds(), settle, "soft_timeout") if soft else None
    try:
        reason = await first
    except asyncio.CancelledError:  # the worker gave up on the job (shutdown)
        context.stop()
        handler.cancel()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    return None if handler.done() else reason


def _from_handler(handler: asyncio.Future[Any]) -> Report:
    if handler.cancelled():
        return _fail(ErrorInfo(type="Cancelled", message="the handler was cancelled"))
    error = handler.exception()
    if error is None:
        return _complete(handler.result())
    if isinstance(error, PermanentError):
        return _fail(error, retryable=False)
    if isinstance(error, RetryAfter):
        delay = error.delay
        return lambda lease: lease.fail(error, retry_after=delay)
    return _fail(error)


def _fail(error: BaseException | ErrorInfo, *, retryable: bool = True) -> Report:
    return lambda lease: lease.fail(error, retryable=retryable)


def _complete(value: Any) -> Report:
    async def report(lease: AsyncLease) -> None:
        try:
            await lease.complete(value)
        except JobBrokerError:
            raise
        except (TypeError, ValueError) as error:  # the result does not encode as JSON
            await lease.fail(error, retryable=False)

    return report
