"""One attempt of one job: run the handler, watch for cancel, soft timeout and lost
lease, and decide what to report.

The broker holds a job the worker has not started as leased; a Start report
moves it to running and starts its hard timeout. The attempt schedules one
`START_DELAY` after its handler starts; a job that ends sooner takes it back
and says how long its handler ran in its Completion or Failure instead, so
short jobs cost no extra message, and Starts due together go as one.
"""

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

START_DELAY = 0.05
"""Seconds from a handler's start to its Start report. Shorter, and jobs of a
few milliseconds would send one each, a message per job at full speed; longer,
and a slow job shows as leased, not running, for longer. The broker counts the
hard timeout from the Start's arrival: up to this much later than the handler began."""

ABANDONED = "the handler's thread could not be stopped; it was abandoned"
"""Said in the failure of an attempt whose sync handler went on running."""

Report = Callable[[AsyncLease], Awaitable[None]]
"""What to tell the broker about the attempt, given the lease (which may have moved
to a new stream by the time it is sent)."""


async def run_job(
    task: Task[Any, Any],
    lease: AsyncLease,
    context: JobContext,
    threads: HandlerThreads,
    interrupt: asyncio.Future[str],
    on_lost: Callable[[], None],
) -> Report | None:
    """Run the attempt; None when there is nothing to report (the lease was lost).

    `interrupt` is resolved with "cancelled" or "lost" to stop the attempt
    early; `on_lost` is called when the handler's Start finds the lease gone.
    """
    try:
        payload = lease.payload()
    except ValueError as error:
        return _fail(error, retryable=False)  # no handler ran: no run time
    handler = _start(task, payload, context, threads)
    lease._begin(START_DELAY, on_lost)
    try:
        stop = await _supervise(handler, lease, context, interrupt)
    finally:
        lease._end()
    if stop is None:
        return _from_handler(handler, task)
    context.stop()
    abandoned = _give_up(task, handler, threads, lease)
    if stop == "lost":
        return None
    if stop == "cancelled":
        message = f"the broker cancelled the job ({lease.cancel_reason})"
        info = ErrorInfo(type="Cancelled", message=_abandoned(message, abandoned))
        return lambda lease: lease.fail(info, cancelled=True)
    limit = lease.job.soft_timeout.total_seconds() if lease.job.soft_timeout else 0.0
    message = f"the handler ran longer than {limit:g}s"
    return _fail(ErrorInfo(type="SoftTimeout", message=_abandoned(message, abandoned)))


def _give_up(
    task: Task[Any, Any], handler: asyncio.Future[Any], threads: HandlerThreads, lease: AsyncLease
) -> bool:
    """Stop a handler the attempt no longer waits for; True when it was a sync
    one still running, whose thread is abandoned (see HandlerThreads.give_up)."""
    if task.is_async:
        handler.cancel()
        return False
    return threads.give_up(handler, f"job {lease.job.id} ({task.name})")


def _abandoned(message: str, abandoned: bool) -> str:
    return f"{message}; {ABANDONED}" if abandoned else message


def _start(
    task: Task[Any, Any], payload: Any, context: JobContext, threads: HandlerThreads
) -> asyncio.Future[Any]:
    """Async handlers run as a task on the loop, sync ones on the handler threads;
    both see `current_job()` through a copied context. A thread cannot be stopped:
    when an attempt is given up, its handler's future is cancelled, the outcome
    dropped and the thread abandoned (`_give_up`)."""
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


def _from_handler(handler: asyncio.Future[Any], task: Task[Any, Any]) -> Report:
    """The report of a handler that ended: its result, or its exception, which
    retries the job unless it is permanent, or not one its task's `retry_on`
    names."""
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
    retry_on = task.retry_on
    return _fail(error, retryable=retry_on is None or isinstance(error, retry_on))


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
