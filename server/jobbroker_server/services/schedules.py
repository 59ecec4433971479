"""What producers and operators do to schedules: register, read, pause, resume, delete."""

from __future__ import annotations

from dataclasses import replace

from jobbroker_server.clock import Clock
from jobbroker_server.domain.schedules import MAX_SCHEDULES, Schedule
from jobbroker_server.services.cron import Cron
from jobbroker_server.store import Store


class Schedules:
    def __init__(
        self, store: Store, clock: Clock, cron: Cron, max_schedules: int = MAX_SCHEDULES
    ) -> None:
        self._store = store
        self._clock = clock
        self._cron = cron
        self._max = max_schedules

    async def put(self, schedule: Schedule) -> tuple[Schedule, bool]:
        """Register by name, idempotently: the schedule, and whether it changed."""
        now = self._clock.now()
        first = replace(schedule, next_run_at=schedule.timing.after(now))
        stored, changed = await self._store.put_schedule(first, now, self._max)
        if changed:
            self._cron.poke()
        return stored, changed

    async def get(self, name: str) -> Schedule:
        return await self._store.get_schedule(name)

    async def list(self, after: str | None, limit: int) -> list[Schedule]:
        return await self._store.list_schedules(after, limit)

    async def pause(self, name: str) -> Schedule:
        return await self._store.set_schedule_paused(name, True, self._clock.now())

    async def resume(self, name: str) -> Schedule:
        resumed = await self._store.set_schedule_paused(name, False, self._clock.now())
        self._cron.poke()
        return resumed

    async def delete(self, name: str) -> None:
        await self._store.delete_schedule(name)
