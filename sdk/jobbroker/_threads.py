"""The threads that run a worker's sync handlers.

`loop.run_in_executor` wakes the event loop once per finished call. Here the
threads put what they finished on one list and wake the loop only when it is
not already due to collect: under load one wake-up carries many outcomes.

Python cannot stop a thread. When the worker gives up an attempt whose sync
handler is still running (cancelled, soft timeout, lost lease), `give_up`
abandons that thread and starts another in its place, so the next job does not
wait for a handler nobody wants the outcome of. The abandoned thread ends when
its handler returns; its outcome is dropped. At most `max_abandoned` are
replaced while still running: past that, a given-up thread is not replaced
(logged as an error), the worker runs fewer sync handlers at once, and the
abandoned thread takes its place back in the pool when its handler returns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("jobbroker.worker")

_Work = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]

MAX_ABANDONED = 64
"""Abandoned threads still running beyond which a given-up one is not replaced:
a handler that never returns would otherwise cost a thread per attempt."""


class _Slot:
    """One thread's place in the pool: what it runs now, and whether it was abandoned."""

    __slots__ = ("abandoned", "future")

    def __init__(self) -> None:
        self.future: asyncio.Future[Any] | None = None
        self.abandoned = False


class HandlerThreads:
    def __init__(
        self, size: int, loop: asyncio.AbstractEventLoop, *, max_abandoned: int = MAX_ABANDONED
    ) -> None:
        self._loop = loop
        self._max_abandoned = max_abandoned
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._finished: list[tuple[asyncio.Future[Any], BaseException | None, Any]] = []
        self._collecting = False
        self._closed = False
        self._names = itertools.count()
        self._slots: list[_Slot] = []  # the threads that serve the queue
        self._abandoned = 0  # given up on, still in their handler
        self._short = 0  # given up on and not replaced: the pool is this many short
        for _ in range(size):
            self._spawn()

    @property
    def abandoned(self) -> int:
        """Threads given up on whose handler has not returned yet."""
        return self._abandoned

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`fn(*args)` on a thread; its outcome, on the loop."""
        future = self._loop.create_future()
        self._work.put((future, fn, args))
        return future

    def give_up(self, future: asyncio.Future[Any], what: str) -> bool:
        """Cancel a call `run` made (on the loop). True when its handler was
        already running: its thread is abandoned and, within `max_abandoned`,
        replaced by a new one; `what` names the job in the log."""
        with self._lock:
            future.cancel()
            slot = next((s for s in self._slots if s.future is future), None)
            if slot is None:
                return False  # not started: no thread will run it
            slot.abandoned = True
            slot.future = None
            self._slots.remove(slot)
            self._abandoned += 1
            abandoned = self._abandoned
            replace = not self._closed and abandoned <= self._max_abandoned
            if not replace:
                self._short += 1
        if replace:
            self._spawn()
            log.warning(
                "%s: the handler's thread could not be stopped; it was abandoned and "
                "another started (%d abandoned threads still running)",
                what,
                abandoned,
            )
        elif self._closed:
            log.warning("%s: the handler's thread could not be stopped; it was abandoned", what)
        else:
            log.error(
                "%s: the handler's thread could not be stopped; it was abandoned and, "
                "with %d abandoned threads still running, not replaced: %d sync handlers "
                "can run at once until one returns",
                what,
                abandoned,
                len(self._slots),
            )
        return True

    def shutdown(self) -> None:
        """Start nothing more (what is queued is cancelled); the threads end
        after the call they are in. They are daemons: a handler that never
        returns does not hold up the process's exit."""
        with self._lock:
            self._closed = True  # an abandoned thread ends when its handler returns
            serving = len(self._slots)
        for _ in range(serving):
            self._work.put(None)

    def _spawn(self) -> None:
        slot = _Slot()
        with self._lock:
            self._slots.append(slot)
        name = f"jobbroker-handler-{next(self._names)}"
        threading.Thread(target=self._serve, args=(slot,), name=name, daemon=True).start()

    def _serve(self, slot: _Slot) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args = work
            with self._lock:  # so that give_up sees whether it started
                if future.cancelled():
                    continue
                slot.future = future
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
                slot.future = None
                if slot.abandoned:
                    if not self._rejoin(slot):
                        break
                    continue  # its outcome is nobody's now
                self._finished.append((future, error, value))
                if self._collecting:
                    continue
                self._collecting = True
            try:
                self._loop.call_soon_threadsafe(self._collect)
            except RuntimeError:  # the loop is closed: nobody is waiting
                return
        if slot.abandoned:
            log.info("an abandoned handler thread returned, and ends")

    def _rejoin(self, slot: _Slot) -> bool:
        """An abandoned thread's handler returned (under the lock): it serves
        again if the pool is short of one, else it ends."""
        self._abandoned -= 1
        if self._short == 0 or self._closed:
            return False
        self._short -= 1
        slot.abandoned = False
        self._slots.append(slot)
        return True

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
