"""Followers of the whole event log (TailEvents): every transition the broker
writes, live, resumable by sequence number.

Each follower keeps its position in the log (``LogPosition``: commit order,
which on PostgreSQL is not the order of the numbers) and reads after it when
this broker applies transitions of its queue, and every poll interval for
what other replicas write.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta

from jobbroker_server.domain.errors import ResourceExhausted
from jobbroker_server.domain.transitions import JobEvent, Transition
from jobbroker_server.store import Store

PAGE = 500  # events per read
# Each follower reads the log on its own, on the store's connection (on
# SQLite, its one writer's): a few hundred operators are plenty.
MAX_TAILS = 256
# After a wake-up, wait this long for more before reading: a busy broker
# moves jobs thousands of times a second, and one read can serve them all.
_GATHER = 0.05


class EventTails:
    def __init__(self, store: Store, poll_interval: timedelta, max_tails: int = MAX_TAILS) -> None:
        self._store = store
        self._poll = poll_interval.total_seconds() * (1 if store.shared else 30)
        self._max = max_tails
        self._waiting: dict[asyncio.Event, str | None] = {}  # each waiting follower's queue
        self._count = 0

    def on_moved(self, moved: Sequence[Transition]) -> None:
        if not self._waiting:
            return
        queues = {t.queue for t in moved}
        for grew, queue in self._waiting.items():
            if queue is None or queue in queues:
                grew.set()

    async def follow(
        self, after: int, queue: str | None, task: str | None
    ) -> AsyncIterator[JobEvent]:
        """Events after event ``after`` (0: from now), of ``queue``'s or
        ``task``'s jobs when given, for as long as the caller reads."""
        if self._count >= self._max:
            raise ResourceExhausted(
                f"this broker serves at most {self._max} event tails at once; "
                "close some, or follow one job with WatchJob"
            )
        self._count += 1
        try:
            at = await self._store.tail_from(after)
            while True:
                found, at = await self._store.tail_events(at, queue, task, PAGE)
                for event in found:
                    yield event
                if len(found) < PAGE:
                    await self._wait(queue)
        finally:
            self._count -= 1

    async def _wait(self, queue: str | None) -> None:
        grew = asyncio.Event()
        self._waiting[grew] = queue
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await grew.wait()
        finally:
            del self._waiting[grew]
        await asyncio.sleep(_GATHER)
