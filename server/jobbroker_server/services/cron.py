"""The cron service: submits each due schedule's job, on every replica at once.

No replica leads: each takes the ticks that are due, and the store's
compare-and-set on the schedule row (``Store.take_tick``) lets one of them
make each tick's job. The jobs go through the store's submit and their
transitions through ``Changes``, as any submit's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain.schedules import Fired, Schedule, plan, tick_job
from jobbroker_server.services.changes import Changes
from jobbroker_server.services.failures import log_failure
from jobbroker_server.store import Store

log = logging.getLogger(__name__)

BATCH = 100  # due schedules read, and their ticks taken concurrently, at a time


class Cron:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        changes: Changes,
        dedup_window: timedelta,
        max_sleep: timedelta,
    ) -> None:
        self._store = store
        self._clock = clock
        self._changes = changes
        self._dedup_window = dedup_window
        self._max_sleep = max_sleep.total_seconds()
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """A schedule was registered or resumed here: it may be due before
        the current sleep ends. (Other replicas see it within ``max_sleep``.)"""
        self._poked.set()

    async def run_once(self, now: datetime | None = None) -> list[Fired]:
        """Take every tick due at ``now`` (the clock's, unless given): the jobs made."""
        fired, _failed = await self._turn(now or self._clock.now())
        return fired

    async def _turn(self, now: datetime) -> tuple[list[Fired], bool]:
        """The jobs made, and whether a tick failed (it stays due: the next turn
        tries it again)."""
        fired: list[Fired] = []
        while True:
            due = await self._store.due_schedules(now, BATCH)
            taken = await asyncio.gather(*(self._take(s, now) for s in due), return_exceptions=True)
            fired.extend(f for f in taken if isinstance(f, Fired))
            failed = any(isinstance(f, Exception) for f in taken)
            if len(due) < BATCH or failed:
                return fired, failed

    async def _take(self, schedule: Schedule, now: datetime) -> Fired | None:
        """The job the schedule's due tick made; None if it made none (skipped,
        or taken by another replica)."""
        assert schedule.next_run_at is not None
        try:
            tick = plan(schedule, now)
            job = None if tick.run is None else tick_job(schedule, tick.run)
            moved = await self._store.take_tick(
                schedule.name, schedule.next_run_at, tick, job, now, self._dedup_window
            )
        except Exception:
            log_failure(log, "schedule %r failed to tick; retrying", schedule.name)
            raise
        self._changes.apply(moved.transitions)
        if moved.result is None or tick.run is None:
            return None
        return Fired(schedule.name, tick.run, moved.result)

    async def _sleep(self) -> float:
        """Seconds until the next tick is due, at most ``max_sleep``."""
        due = await self._store.next_tick_at()
        if due is None:
            return self._max_sleep
        wait = (due - self._clock.now()).total_seconds()
        return min(max(wait, 0.0), self._max_sleep)

    async def run(self) -> None:
        while True:
            self._poked.clear()
            try:
                _fired, failed = await self._turn(self._clock.now())
                sleep = self._max_sleep if failed else await self._sleep()
            except Exception:
                log_failure(log, "the cron service failed; retrying")
                sleep = self._max_sleep
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep):
                    await self._poked.wait()
