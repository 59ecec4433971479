"""Who is waiting on which job: WaitJob subscribes, state changes publish.

In-process only: a change made by another replica reaches a waiter through its
slow poll instead.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from jobbroker_server.domain.errors import ResourceExhausted
from jobbroker_server.domain.states import JobState


class JobWatch:
    def __init__(self, max_waiters: int = 10_000) -> None:
        self._waiters: defaultdict[str, set[asyncio.Queue[JobState]]] = defaultdict(set)
        self._max = max_waiters
        self._count = 0

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Queue[JobState]]:
        if self._count >= self._max:
            raise ResourceExhausted(
                f"this broker serves at most {self._max} WaitJob calls at once "
                "(--max-watch-streams); wait on fewer jobs, or poll GetJob"
            )
        queue: asyncio.Queue[JobState] = asyncio.Queue()
        self._waiters[job_id].add(queue)
        self._count += 1
        try:
            yield queue
        finally:
            self._count -= 1
            waiters = self._waiters[job_id]
            waiters.discard(queue)
            if not waiters:
                del self._waiters[job_id]

    def publish(self, changes: Iterable[tuple[str, JobState]]) -> None:
        if not self._waiters:
            return
        for job_id, state in changes:
            for queue in self._waiters.get(job_id, ()):
                queue.put_nowait(state)
