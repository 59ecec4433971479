"""Who is waiting on which job: WaitJob and WatchJob subscribe, and every
transition of a watched job (a progress report among them) is published.

In-process only: a change made by another replica reaches a waiter through its
slow poll instead.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from jobbroker_server.domain.errors import ResourceExhausted
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import Transition


class JobWatch:
    def __init__(self, max_waiters: int = 10_000) -> None:
        self._waiters: defaultdict[str, set[asyncio.Queue[JobState]]] = defaultdict(set)
        self._max = max_waiters
        self._count = 0

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Queue[JobState]]:
        if self._count >= self._max:
            raise ResourceExhausted(
                f"this broker serves at most {self._max} WaitJob and WatchJob calls at once "
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

    def on_moved(self, moved: Sequence[Transition]) -> None:
        """Tell each waiter the state its job is in after the transition (the
        last a job is in, for a job gone)."""
        if not self._waiters:
            return
        for t in moved:
            for queue in self._waiters.get(t.job_id, ()):
                queue.put_nowait(t.target or t.source or JobState.CANCELLED)
