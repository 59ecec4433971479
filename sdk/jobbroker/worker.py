"""Worker: serves tasks over one LeaseStream, reconnecting when the broker goes away.

A stream that ends, with any status but one refusing its API key, is opened
again after a jittered backoff (see `reconnect_delay`), for as long as the
worker runs. The jobs it holds go on running meanwhile; the new stream's
subscribe names them, and an outcome that could not be sent is sent again on
it, with the job's token.

A key the broker does not take (UNAUTHENTICATED: wrong, or revoked, which ends
its open streams so) or that may not lease these queues (PERMISSION_DENIED)
would be refused again on every reconnect: the worker gives up the jobs it
holds (their leases expire and they run again) and `run()` raises the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar, Unpack, overload

from . import _calls
from ._async_stream import AsyncLeaseStream
from ._limits import KeyOf
from ._runner import Report, run_job
from ._threads import HandlerThreads
from ._window import Window
from .client import AsyncClient
from .connection import DEFAULT_TARGET, ConnectionOptions, ConnectionSettings, resolve
from .context import JobContext
from .errors import (
    AuthenticationError,
    JobBrokerError,
    JobNotFoundError,
    LeaseLostError,
    PermissionDeniedError,
)
from .lease import AsyncLease, release_message
from .schedules import register
from .task import AsyncTask, SyncTask, Task, TaskDecorator, TaskOptions, make_decorator
from .types import ErrorInfo, RateLimit, RetryPolicy, ScheduleSpec

I = TypeVar("I")  # noqa: E741 - payload type, as in task.py
R = TypeVar("R")

log = logging.getLogger("jobbroker.worker")

# The first reconnect waits 0.5-1 s, each next one twice that, at most 15-30 s.
RECONNECT_FIRST = 0.5
RECONNECT_CAP = 30.0
# A stream that stayed up this long, or that the broker answered on, was
# healthy: after its end, the backoff starts again from the first delay.
_STEADY = 10.0
_IDLE_TICK = 1.0  # how often the heartbeat loop looks when nothing is held


def reconnect_delay(failures: int) -> float:
    """Seconds before reconnect number `failures` in a row (1-based), with jitter."""
    return random.uniform(0.5, 1.0) * min(RECONNECT_FIRST * 2.0**failures, RECONNECT_CAP)


def _describe(error: JobBrokerError) -> str:
    return f"{error.code.name}: {error.message}" if error.code is not None else error.message


def _refused(error: JobBrokerError) -> bool:
    """The broker answered the report and refused it (its Ack said why); any
    other failure means the report may not have reached it."""
    return error.code is None and error.reason is not None


@dataclass(eq=False)
class _Running:
    lease: AsyncLease
    interrupt: asyncio.Future[str]  # resolved with "cancelled" or "lost"
    task: asyncio.Task[None] | None = None
    started: bool = False
    reporting: bool = False  # its outcome is on the way: a lost heartbeat is no news


def _interrupt(interrupt: asyncio.Future[str], reason: str) -> None:
    if not interrupt.done():
        interrupt.set_result(reason)


class Worker:
    """Runs registered tasks: `Worker([send_email]).run()`.

    At most `concurrency` handlers run at once: async ones on the event loop,
    sync ones in a thread pool of that size. The worker holds leased jobs ahead
    of its handlers, so the next ones are already here when a handler finishes;
    waiting jobs are heartbeated like running ones. By default it holds 4 x
    concurrency, growing to 8 x while those jobs are short (see `_window`);
    `prefetch` fixes the number instead.

    A job held is `leased` at the broker until its handler starts; the worker
    then reports its start (`START_DELAY` later, in `_runner`; a job done
    sooner says how long it ran instead) and it is `running`, its hard timeout
    counting from its handler's start. A sync handler given up on (cancelled,
    past its soft timeout, lease lost) cannot be stopped: its thread is
    abandoned and another takes its place, both logged, and the attempt's
    failure says so. Past `MAX_ABANDONED` abandoned threads still running, no
    more are replaced, and fewer sync handlers run at once until one returns
    (see `_threads`).

    `target` is a "host:port" or ConnectionOptions; the connection keywords
    (api_key=, tls=, ...) are ConnectionOptions' fields, as in Client.

    `schedules` (from `jobbroker.schedule(...)`) are registered when the worker
    starts, idempotently by name; one the broker refuses stops the start. With
    API keys, registering takes a producer's rights: give such a worker an
    admin key, or register the schedules in a deploy step instead.
    """

    def __init__(
        self,
        tasks: Iterable[Task[Any, Any]] = (),
        *,
        target: str | ConnectionOptions = DEFAULT_TARGET,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        prefetch: int | None = None,
        worker_id: str | None = None,
        shutdown_grace: timedelta = timedelta(seconds=30),
        schedules: Sequence[ScheduleSpec] = (),
        **connection: Unpack[ConnectionSettings],
    ) -> None:
        self._options = resolve(target, connection)
        self._schedules = list(schedules)
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._tasks: dict[str, Task[Any, Any]] = {}
        for task in tasks:
            self.register(task)
        self._queues = list(queues) if queues is not None else None
        self._concurrency = concurrency
        if prefetch is not None and prefetch < concurrency:
            raise ValueError("prefetch must be at least concurrency")
        self._window = Window(concurrency, prefetch)
        self._stream: AsyncLeaseStream | None = None  # the one open or opening now
        self._slots = asyncio.Semaphore(concurrency)
        self.worker_id = worker_id or _calls.default_worker_id()
        self._grace = shutdown_grace
        self._running: dict[str, _Running] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = threading.Event()
        # Made again by each run: asyncio primitives belong to one event loop.
        self._stopping = asyncio.Event()
        self._reconnected = asyncio.Condition()
        self._generation = 0
        self._stopped_at: float | None = None  # when a stop was first seen while away

    def register(self, task: Task[Any, Any]) -> Task[Any, Any]:
        known = self._tasks.get(task.name)
        if known is not None and known is not task:
            raise ValueError(f"another task is already registered as {task.name!r}")
        self._tasks[task.name] = task
        return task

    @overload
    def task(  # type: ignore[overload-overlap]  # an async def matches both; the first wins
        self, fn: Callable[[I], Coroutine[Any, Any, R]], /
    ) -> AsyncTask[I, R]: ...
    @overload
    def task(self, fn: Callable[[I], R], /) -> SyncTask[I, R]: ...
    @overload
    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
        soft_timeout: timedelta | None = None,
        priority: int = 0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        concurrency_key: KeyOf | None = None,
        concurrency_limit: int | None = None,
        rate_key: KeyOf | None = None,
        rate_limit: RateLimit | str | None = None,
    ) -> TaskDecorator: ...
    def task(
        self,
        name: str | Callable[[Any], Any] | None = None,
        *,
        queue: str = "default",
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        timeout: timedelta | None = None,
        soft_timeout: timedelta | None = None,
        priority: int = 0,
        retry_on: tuple[type[BaseException], ...] | None = None,
        concurrency_key: KeyOf | None = None,
        concurrency_limit: int | None = None,
        rate_key: KeyOf | None = None,
        rate_limit: RateLimit | str | None = None,
    ) -> Any:
        """`jobbroker.task`, also registering the task with this worker."""
        options = TaskOptions(
            None,
            queue,
            priority,
            max_attempts,
            retry,
            timeout,
            soft_timeout,
            retry_on,
            concurrency_key,
            concurrency_limit,
            rate_key,
            rate_limit,
        )
        return make_decorator(name, options, self.register)

    @property
    def options(self) -> ConnectionOptions:
        """How this worker reaches its broker."""
        return self._options

    @property
    def queues(self) -> list[str]:
        if self._queues is not None:
            return self._queues
        return sorted({task.queue for task in self._tasks.values()})

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM or `stop()`, then shut down gracefully."""
        asyncio.run(self._run_until_signal())

    def stop(self) -> None:
        """Stop leasing, finish in-flight jobs within the grace period, release the rest.

        Safe to call from any thread or a signal handler.
        """
        self._stop_requested.set()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    async def run_async(self) -> None:
        if not self.queues:
            raise ValueError("the worker has no queues: register a task or pass queues=")
        if not all(queue.strip() for queue in self.queues):
            raise ValueError(f"queue names must not be empty (got {self.queues!r})")
        self._stopped_at = None
        self._stopping = asyncio.Event()
        self._reconnected = asyncio.Condition()
        self._slots = asyncio.Semaphore(self._concurrency)
        self._loop = asyncio.get_running_loop()
        if self._stop_requested.is_set():
            self._stopping.set()
        threads = HandlerThreads(self._concurrency, self._loop)
        client = AsyncClient(self._options)
        try:
            await register(client, self._schedules)
            await self._serve(client, threads)
        finally:
            threads.shutdown()
            await client.close()
            self._loop = None

    async def _run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
                installed.append(sig)
        try:
            await self.run_async()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    # --- connection ---

    async def _serve(self, client: AsyncClient, threads: HandlerThreads) -> None:
        failures = 0
        while True:
            stream = client.lease_stream(
                self.queues,
                prefetch=self._window.size,
                worker_id=self.worker_id,
                held=[running.lease for running in self._running.values()],
                reports_starts=True,  # its hard timeouts count from each handler's start
            )
            # Resizes go to it from now on: jobs held across a reconnect go on
            # finishing while it opens, and a flow message follows its subscribe.
            self._stream = stream
            opened = time.monotonic()
            try:
                await stream.open()
                await self._announce_stream()
                await self._pump(stream, threads)
                return
            except (AuthenticationError, PermissionDeniedError) as error:
                log.error(
                    "the broker refused the worker's API key (%s); stopping", _describe(error)
                )
                await stream.close()
                await self._abandon()
                raise
            except JobBrokerError as error:
                # Whatever else ended it (the broker gone, its database down,
                # a refusal), the next stream may fare better: never give up.
                healthy = stream._answered or time.monotonic() - opened >= _STEADY
                failures = 1 if healthy else failures + 1
                delay = reconnect_delay(failures)
                log.warning(
                    "lease stream broke (%s); reconnecting in %.1fs", _describe(error), delay
                )
                await stream.close()
                if await self._away(delay):
                    return
            finally:
                self._stream = None

    async def _away(self, delay: float) -> bool:
        """Wait `delay` before reconnecting; True when the worker should end
        instead: it is stopping and holds no job, or its grace ran out while
        the broker was away (those jobs' leases expire and they run again)."""
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            if not self._stopping.is_set():
                return False
        else:
            await asyncio.sleep(min(delay, 1.0))
        if not self._running:
            return True
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        if time.monotonic() - self._stopped_at < self._grace.total_seconds():
            return False  # reconnect to report what finishes
        log.warning("stopping without the broker: %d jobs not reported", len(self._running))
        await self._abandon()
        return True

    async def _abandon(self) -> None:
        """End the jobs held without reporting them: their leases expire and
        they run again."""
        unreported = [r.task for r in self._running.values() if r.task is not None]
        for task in unreported:
            task.cancel()
        await asyncio.gather(*unreported, return_exceptions=True)

    async def _announce_stream(self) -> None:
        async with self._reconnected:
            self._generation += 1
            self._reconnected.notify_all()

    async def _pump(self, stream: AsyncLeaseStream, threads: HandlerThreads) -> None:
        heartbeats = asyncio.create_task(self._heartbeats(stream))
        consume = asyncio.create_task(self._consume(stream, threads))
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({consume, stop}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done():
                consume.result()  # the stream broke: BrokerUnavailableError
                return
            consume.cancel()
            await self._shutdown(stream)
        finally:
            for task in (heartbeats, consume, stop):
                task.cancel()
            await stream.close()

    async def _consume(self, stream: AsyncLeaseStream, threads: HandlerThreads) -> None:
        loop = asyncio.get_running_loop()
        async for lease in stream:
            lease._hold()  # not started until its handler is
            running = _Running(lease, loop.create_future())
            # The hook holds the future, not `running`: a lease that referred
            # back to its own _Running made a cycle per job, which only the
            # cyclic collector could free.
            lease.on_cancel(functools.partial(_interrupt, running.interrupt, "cancelled"))
            running.task = asyncio.create_task(self._execute(running, threads))
            self._running[lease.job.id] = running
            running.task.add_done_callback(functools.partial(self._finished, lease.job.id))

    def _finished(self, job_id: str, _: object) -> None:
        self._running.pop(job_id, None)

    async def _shutdown(self, stream: AsyncLeaseStream) -> None:
        with contextlib.suppress(JobBrokerError):
            await stream.set_prefetch(0)
        for waiting in self._running.values():  # not started: hand back at once
            if not waiting.started and waiting.task is not None:
                waiting.task.cancel()
        in_flight = [r.task for r in self._running.values() if r.task is not None]
        if in_flight:
            _, late = await asyncio.wait(in_flight, timeout=self._grace.total_seconds())
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        leftover = stream.held
        if leftover:
            log.info("releasing %d unfinished jobs", len(leftover))
            with contextlib.suppress(JobBrokerError):
                await stream._exchange(release_message(leftover))

    async def _heartbeats(self, stream: AsyncLeaseStream) -> None:
        """One heartbeat for every held lease, as often as the shortest interval asks."""
        while True:
            intervals = [
                r.lease.heartbeat_interval.total_seconds()
                for r in self._running.values()
                if r.lease.heartbeat_interval is not None
            ]
            await asyncio.sleep(min(intervals, default=_IDLE_TICK))
            held = [r for r in self._running.values() if r.lease._stream is stream]
            try:
                lost = await stream.heartbeat([r.lease for r in held])
            except JobBrokerError as error:
                if stream.ended or error.code is not None:
                    return  # the stream is over; the next one heartbeats
                log.warning("heartbeat failed: %s", error)
                continue
            for running in held:
                if running.lease in lost:
                    self._lost(running)

    def _lost(self, running: _Running) -> None:
        """The broker no longer honours this lease: stop its handler, report nothing."""
        if not running.reporting:
            log.warning("lost the lease on job %s", running.lease.job.id)
            _interrupt(running.interrupt, "lost")

    def _start_lost(self, job_id: str, fencing_token: int) -> None:
        """A Start found its lease gone: as a heartbeat that did."""
        running = self._running.get(job_id)
        if running is not None and running.lease.fencing_token == fencing_token:
            self._lost(running)

    # --- jobs ---

    async def _execute(self, running: _Running, threads: HandlerThreads) -> None:
        lease = running.lease
        task = self._tasks.get(lease.job.task)
        if task is None:
            running.reporting = True
            await self._report(lease, self._unknown_task(lease))
            return
        async with self._slots:
            running.started = True
            context = JobContext(lease, self._post)
            began = time.monotonic()
            # The hook names the lease, not `running`: no cycle through the lease.
            on_lost = functools.partial(self._start_lost, lease.job.id, lease.fencing_token)
            report = await run_job(task, lease, context, threads, running.interrupt, on_lost)
            self._resize(time.monotonic() - began)
        if report is not None:
            running.reporting = True
            await self._report(lease, report)

    def _resize(self, seconds: float) -> None:
        """Tell the broker the window's new size, when it changes."""
        size = self._window.finished(seconds)
        stream = self._stream
        if size is None or stream is None or self._stopping.is_set():
            return
        self._spawn(functools.partial(stream.set_prefetch, size))

    def _unknown_task(self, lease: AsyncLease) -> Report:
        known = ", ".join(sorted(self._tasks)) or "none"
        info = ErrorInfo(
            type="UnknownTask",
            message=f"worker {self.worker_id} has no task {lease.job.task!r} (it knows: {known})",
        )
        return lambda held: held.fail(info, retryable=False)

    async def _report(self, lease: AsyncLease, report: Report) -> None:
        """Send an outcome until the broker answers it, on each new stream
        after a reconnect; a lost lease means another attempt owns it."""
        attempt = 0
        while True:
            generation = self._generation
            stream = lease._stream
            try:
                await report(lease)
                return
            except (LeaseLostError, JobNotFoundError) as error:
                log.info("job %s: outcome not recorded: %s", lease.job.id, error)
                return
            except JobBrokerError as error:
                if _refused(error):
                    log.error("job %s: reporting failed: %s", lease.job.id, error)
                    return
                if error.code is None and not stream.ended:
                    # No Ack in time on a stream still up: send it again there.
                    log.warning("job %s: %s; sending it again", lease.job.id, error)
                    await asyncio.sleep(_calls.backoff(attempt))
                    attempt += 1
                    continue
                await self._await_reconnect(generation)

    async def _await_reconnect(self, generation: int) -> None:
        async with self._reconnected:
            await self._reconnected.wait_for(lambda: self._generation > generation)

    def _post(self, report: Callable[[], Awaitable[None]]) -> None:
        """Fire-and-forget a report from a handler, from any thread."""
        if self._loop is None:
            return

        self._loop.call_soon_threadsafe(self._spawn, report)

    def _spawn(self, report: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.create_task(self._quietly(report))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quietly(report: Callable[[], Awaitable[None]]) -> None:
        try:
            await report()
        except JobBrokerError as error:
            log.debug("background report failed: %s", error)
