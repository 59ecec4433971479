"""The threads that run a worker's sync handlers.

`loop.run_in_executor` wakes the event loop once per finished call. Here the
threads put what they finished on one list and wake the loop only when it is
not already due to collect: under load one wake-up carries many outcomes.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_Work = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class HandlerThreads:
    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        self._collecting = False
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"jobbroker-handler-{n}", daemon=True)
            for n in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`fn(*args)` on a thread; its outcome, on the loop."""
        future = self._loop.create_future()
        self._work.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Start nothing more (what is queued is cancelled); the threads end
        after the call they are in. They are daemons: a handler that never
        returns does not hold up the process's exit."""
        self._closed = True
        for _ in self._threads:
            self._work.put(None)

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args = work
            if future.cancelled():
                continue
            error: BaseException | None = None
            value = None
            if self._closed:
                error = asyncio.CancelledError()
            else:
                try:
                    value = fn(*args)
                except StopIteration as raised:  # a future cannot carry it (asyncio's rule)
                    error = RuntimeError(f"the handler raised StopIteration: {raised!r}")
                except BaseException as raised:  # the caller's future carries it
                    error = raised
            with self._lock:
                self._finished.append((future, error, value))
                if self._collecting:
                    continue
                self._collecting = True
            try:
                self._loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # the loop is closed: nobody is waiting
                return

    def _collect(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._collecting = False
        for future, error, value in finished:
            if future.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
