"""Group commit: concurrent callers of one store operation share a transaction.

While one call runs, callers queue; the next call takes all of them at once.
A lone caller pays nothing extra but a task for its flush, and under load the
cost of a transaction is spread over every caller in it. Callers in one
transaction commit or fail together; each still gets only its own results.

Each flush is a task of its own, not part of the first caller's: a caller
cancelled mid-flush stops waiting, but the flush runs to its end and the other
callers in its group get their answers.

A flush of several callers that fails is tried again once per caller, alone:
one caller's bad items then fail only that caller, never the others that
happened to share its transaction. Errors that say the store itself is out
(``shared_errors``) are not tried again: they would fail every caller alike.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

# Callers whose items share one flush, in their order; a caller marked alone
# is flushed by itself.
_Caller = tuple[Sequence[In], asyncio.Future[list[Out]], bool]
_Group = list[_Caller[In, Out]]


class GroupCommit(Generic[In, Out]):
    def __init__(
        self,
        flush: Callable[[list[In]], Coroutine[Any, Any, list[Out]]],
        max_items: int = 5000,
        shared_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._flush = flush
        self._max = max_items
        self._shared_errors = shared_errors
        self._waiting: _Group[In, Out] = []
        self._running: asyncio.Future[list[Out]] | None = None

    async def __call__(self, items: Sequence[In]) -> list[Out]:
        return await self.enqueue(items) if items else []

    def enqueue(self, items: Sequence[In]) -> asyncio.Future[list[Out]]:
        """The caller's results, once the flush that takes its items commits."""
        future: asyncio.Future[list[Out]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future, False))
        if self._running is None:
            self._flush_next()
        return future

    def _flush_next(self) -> None:
        waiting = self._waiting
        taken, count = 1, len(waiting[0][0])
        if not waiting[0][2]:  # an alone caller goes by itself
            while taken < len(waiting) and not waiting[taken][2] and count < self._max:
                count += len(waiting[taken][0])
                taken += 1
        group, self._waiting = self._waiting[:taken], self._waiting[taken:]
        merged = [item for items, _, _ in group for item in items]
        self._running = asyncio.ensure_future(self._flush(merged))
        self._running.add_done_callback(functools.partial(self._flushed, group))

    def _flushed(self, group: _Group[In, Out], flush: asyncio.Future[list[Out]]) -> None:
        try:
            error = None if flush.cancelled() else flush.exception()
            if error is not None and len(group) > 1 and not isinstance(error, self._shared_errors):
                alone = [(items, future, True) for items, future, _ in group if not future.done()]
                self._waiting[:0] = alone  # each again, by itself, before the newer ones
                return
            start = 0
            for items, future, _ in group:
                mine, start = slice(start, start + len(items)), start + len(items)
                if future.done():  # the caller stopped waiting
                    continue
                if flush.cancelled():
                    future.cancel()
                elif error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(flush.result()[mine])
        finally:
            self._running = None
            if self._waiting:
                self._flush_next()
