"""Background services, each a ``run_once`` body that tests call directly and
a ``run`` loop that the app starts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain.flow import SweepCursor
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import Reason, Transition
from jobbroker_server.metrics import Metrics
from jobbroker_server.services.changes import Changes
from jobbroker_server.services.failures import log_failure
from jobbroker_server.store import Store

log = logging.getLogger(__name__)


async def every(interval: float, name: str, step: Callable[[], Awaitable[object]]) -> None:
    """Run ``step()`` forever, ``interval`` seconds apart, logging its errors."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log_failure(log, "%s failed; retrying in %.1fs", name, interval)
        await asyncio.sleep(interval)


class Reaper:
    """Ends attempts whose lease expired or whose hard timeout passed."""

    def __init__(self, store: Store, clock: Clock, changes: Changes, interval: timedelta) -> None:
        self._store = store
        self._clock = clock
        self._changes = changes
        self._interval = interval.total_seconds()
        self._swept: SweepCursor = (None, None)  # where the flow limits' sweep goes on

    async def run_once(self) -> list[Transition]:
        """End what expired; and let through the jobs held back by flow
        limits that nothing else will (a few keys a time)."""
        reaped = await self._store.reap_expired(self._clock.now())
        self._changes.apply(reaped.transitions)
        swept = await self._store.sweep_limits(self._clock.now(), self._swept)
        self._swept = swept.result
        self._changes.apply(swept.transitions)
        return reaped.transitions + swept.transitions

    async def run(self) -> None:
        await every(self._interval, "reaper", self.run_once)


class Scheduler:
    """Moves scheduled jobs (delayed, or retrying after a backoff) to pending
    when their time comes, and lets through the jobs (and wakes the streams)
    that a rate limit held back when its next budget is due, sleeping until
    the next one is."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        changes: Changes,
        max_sleep: timedelta,
        wake: Callable[[Iterable[str]], None],
    ) -> None:
        self._store = store
        self._clock = clock
        self._changes = changes
        changes.listen(self.on_moved)
        self._max_sleep = max_sleep.total_seconds()
        self._wake = wake
        self._poked = asyncio.Event()

    def on_moved(self, moved: Sequence[Transition]) -> None:
        """A job was scheduled (delayed, or a retry after a backoff), or held
        back by a limit: it may be due before the current sleep ends."""
        if any(t.target is JobState.SCHEDULED or t.reason is Reason.LIMITED for t in moved):
            self._poked.set()

    def poke(self) -> None:
        """A lease found a queue's rate spent: its next budget may be due
        before the current sleep ends."""
        self._poked.set()

    async def run_once(self) -> float:
        """Promote what is due; return how long to sleep until the next is."""
        promoted = await self._store.promote_scheduled(self._clock.now())
        self._changes.apply(promoted.transitions)
        reopened = await self._store.reopen_limits(self._clock.now())
        self._changes.apply(reopened.transitions)
        if reopened.result:
            self._wake(reopened.result)
        due = await self._store.next_scheduled_at()
        if due is None:
            return self._max_sleep
        wait = (due - self._clock.now()).total_seconds()
        return min(max(wait, 0.0), self._max_sleep)

    async def run(self) -> None:
        while True:
            self._poked.clear()
            try:
                sleep = await self.run_once()
            except Exception:
                log_failure(log, "scheduler failed; retrying")
                sleep = self._max_sleep
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._poked.wait()


class Retention:
    """Deletes succeeded and cancelled jobs older than the retention period;
    dead jobs stay until replayed or purged."""

    def __init__(
        self, store: Store, clock: Clock, changes: Changes, keep: timedelta, interval: timedelta
    ) -> None:
        self._store = store
        self._clock = clock
        self._changes = changes
        self._keep = keep
        self._interval = interval.total_seconds()

    async def run_once(self, batch: int = 5000) -> int:
        deleted = 0
        cutoff = self._clock.now() - self._keep
        while True:
            expired = await self._store.delete_finished(cutoff, batch)
            self._changes.apply(expired.transitions)
            n = expired.result
            deleted += n
            if n < batch:
                return deleted

    async def run(self) -> None:
        await every(self._interval, "retention", self.run_once)


class DepthSampler:
    """Refreshes the queue-depth gauge from the store."""

    def __init__(self, store: Store, metrics: Metrics, interval: timedelta) -> None:
        self._store = store
        self._metrics = metrics
        self._interval = interval.total_seconds()

    async def run_once(self) -> None:
        depths = await self._store.queue_depths(self._metrics.max_queues)
        self._metrics.set_depths(depths)

    async def run(self) -> None:
        await every(self._interval, "queue depth sampler", self.run_once)
