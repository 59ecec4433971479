"""Group commit: concurrent callers of one store operation share a transaction.

While one call runs, callers queue; the next call takes all of them at once.
A lone caller pays nothing extra but one trip through the event loop, and under
load the cost of a transaction is spread over every caller in it. Callers in one
transaction commit or fail together; each still gets only its own results.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class GroupCommit(Generic[In, Out]):
    def __init__(
        self, flush: Callable[[list[In]], Awaitable[list[Out]]], max_items: int = 5000
    ) -> None:
        self._flush = flush
        self._max = max_items
        self._waiting: list[tuple[Sequence[In], asyncio.Future[list[Out]]]] = []
        self._running = False

    async def __call__(self, items: Sequence[In]) -> list[Out]:
        if not items:
            return []
        future: asyncio.Future[list[Out]] = asyncio.get_running_loop().create_future()
        self._waiting.append((items, future))
        if self._running:
            return await future
        # No transaction is running: this caller runs one now, for itself and
        # whoever queues meanwhile, and leaves any later groups to a task.
        self._running = True
        try:
            await self._flush_some()
        finally:
            if self._waiting:
                asyncio.get_running_loop().create_task(self._drain())
            else:
                self._running = False
        return future.result()

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await self._flush_some()
        finally:
            self._running = False

    async def _flush_some(self) -> None:
        taken, count = 0, 0
        while taken < len(self._waiting) and (taken == 0 or count < self._max):
            count += len(self._waiting[taken][0])
            taken += 1
        group, self._waiting = self._waiting[:taken], self._waiting[taken:]
        merged = [item for items, _ in group for item in items]
        try:
            results = await self._flush(merged)
        except Exception as error:
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        start = 0
        for items, future in group:
            if not future.done():
                future.set_result(results[start : start + len(items)])
            start += len(items)
