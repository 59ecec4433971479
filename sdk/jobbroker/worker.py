"""Worker: serves tasks over one LeaseStream, reconnecting when the broker goes away."""

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
from typing import Any, TypeVar, overload

from . import _calls
from ._async_stream import AsyncLeaseStream
from ._runner import Report, run_job
from ._threads import HandlerThreads
from ._window import Window
from .client import DEFAULT_TARGET, AsyncClient
from .context import JobContext
from .errors import BrokerUnavailableError, JobBrokerError, JobNotFoundError, LeaseLostError
from .lease import AsyncLease, release_message
from .task import AsyncTask, SyncTask, Task, TaskDecorator, TaskOptions, make_decorator
from .types import ErrorInfo, RetryPolicy

I = TypeVar("I")  # noqa: E741 - payload type, as in task.py
R = TypeVar("R")

log = logging.getLogger("jobbroker.worker")

RECONNECT_ATTEMPTS = 8
_RECONNECT_CAP = 15.0
_IDLE_TICK = 1.0  # how often the heartbeat loop looks when nothing is held


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
    """

    def __init__(
        self,
        tasks: Iterable[Task[Any, Any]] = (),
        *,
        target: str = DEFAULT_TARGET,
        queues: Sequence[str] | None = None,
        concurrency: int = 16,
        prefetch: int | None = None,
        worker_id: str | None = None,
        shutdown_grace: timedelta = timedelta(seconds=30),
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._tasks: dict[str, Task[Any, Any]] = {}
        for task in tasks:
            self.register(task)
        self._target = target
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
    ) -> Any:
        """`jobbroker.task`, also registering the task with this worker."""
        options = TaskOptions(None, queue, priority, max_attempts, retry, timeout, soft_timeout)
        return make_decorator(name, options, self.register)

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
        self._stopping = asyncio.Event()
        self._reconnected = asyncio.Condition()
        self._slots = asyncio.Semaphore(self._concurrency)
        self._loop = asyncio.get_running_loop()
        if self._stop_requested.is_set():
            self._stopping.set()
        threads = HandlerThreads(self._concurrency, self._loop)
        client = AsyncClient(self._target)
        try:
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
            )
            # Resizes go to it from now on: jobs held across a reconnect go on
            # finishing while it opens, and a flow message follows its subscribe.
            self._stream = stream
            try:
                await stream.open()
                failures = 0
                await self._announce_stream()
                await self._pump(stream, threads)
                return
            except BrokerUnavailableError as error:
                failures += 1
                if failures > RECONNECT_ATTEMPTS:
                    raise
                delay = random.uniform(0.5, 1.0) * min(0.5 * 2.0**failures, _RECONNECT_CAP)
                log.warning("lease stream broke (%s); reconnecting in %.1fs", error, delay)
                await stream.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set() and not self._running:
                    return
            finally:
                self._stream = None

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
                await stream.exchange(release_message(leftover))

    async def _heartbeats(self, stream: AsyncLeaseStream) -> None:
        """One heartbeat for every held lease, as often as the shortest interval asks."""
        while True:
            intervals = [
                r.lease.heartbeat_interval.total_seconds()
                for r in self._running.values()
                if r.lease.heartbeat_interval is not None
            ]
            await asyncio.sleep(min(intervals, default=_IDLE_TICK))
            held = [r for r in self._running.values() if r.lease.stream is stream]
            try:
                lost = await stream.heartbeat([r.lease for r in held])
            except BrokerUnavailableError:
                return
            except JobBrokerError as error:
                log.warning("heartbeat failed: %s", error)
                continue
            for running in held:
                if running.lease in lost and not running.reporting:
                    log.warning("lost the lease on job %s", running.lease.job.id)
                    _interrupt(running.interrupt, "lost")

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
            report = await run_job(task, lease, context, threads, running.interrupt)
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
        """Send an outcome, across reconnects; a lost lease means another attempt owns it."""
        for _ in range(RECONNECT_ATTEMPTS):
            generation = self._generation
            try:
                await report(lease)
                return
            except (LeaseLostError, JobNotFoundError) as error:
                log.info("job %s: outcome not recorded: %s", lease.job.id, error)
                return
            except BrokerUnavailableError:
                if not await self._await_reconnect(generation):
                    break
            except JobBrokerError as error:
                log.error("job %s: reporting failed: %s", lease.job.id, error)
                return
        log.error("job %s: gave up reporting; its lease will expire", lease.job.id)

    async def _await_reconnect(self, generation: int) -> bool:
        async with self._reconnected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._reconnected.wait_for(lambda: self._generation > generation),
                    _RECONNECT_CAP * 4,
                )
            return self._generation > generation

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
