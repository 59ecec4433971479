"""Followers of the whole event log (TailEvents): every transition the broker
writes, live, resumable by sequence number.

Each follower reads the log after the last event it sent; it reads again when
this broker applies transitions, and every poll interval for what other
replicas write.
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
# After a wake-up, wait this long for more before reading: a busy broker
# moves jobs thousands of times a second, and one read can serve them all.
_GATHER = 0.05


class EventTails:
    def __init__(self, store: Store, poll_interval: timedelta, max_tails: int = 1000) -> None:
        self._store = store
        self._poll = poll_interval.total_seconds() * (1 if store.shared else 30)
        self._max = max_tails
        self._waiting: set[asyncio.Event] = set()
        self._count = 0

    def on_moved(self, moved: Sequence[Transition]) -> None:
        for grew in self._waiting:
            grew.set()

    async def follow(
        self, after: int, queue: str | None, task: str | None
    ) -> AsyncIterator[JobEvent]:
        """Events after ``after`` (0: from now), of ``queue``'s or ``task``'s
        jobs when given, for as long as the caller reads."""
        if self._count >= self._max:
            raise ResourceExhausted(
                f"this broker serves at most {self._max} event tails at once; "
                "close some, or follow one job with WatchJob"
            )
        self._count += 1
        try:
            if after <= 0:
                after = await self._store.last_event_seq()
            while True:
                found = await self._store.tail_events(after, queue, task, PAGE)
                for event in found:
                    yield event
                    after = event.seq
                if len(found) < PAGE:
                    await self._wait()
        finally:
            self._count -= 1

    async def _wait(self) -> None:
        grew = asyncio.Event()
        self._waiting.add(grew)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(grew.wait(), self._poll)
        finally:
            self._waiting.discard(grew)
        await asyncio.sleep(_GATHER)
