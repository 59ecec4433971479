"""Queue settings: pause and resume, and the defaults of each queue's jobs.

Submits read the defaults from a copy kept here, refreshed every poll
interval (a change made through another replica shows within one) and at
once for a change made through this one. A pause needs no copy: each lease
reads the paused queues in its own statement.
"""

from __future__ import annotations

from datetime import timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain.queues import QueueDefaults, QueueSettings
from jobbroker_server.services.background import every
from jobbroker_server.services.dispatcher import Dispatcher
from jobbroker_server.store import Store


class Queues:
    def __init__(
        self, store: Store, clock: Clock, dispatcher: Dispatcher, refresh: timedelta
    ) -> None:
        self._store = store
        self._clock = clock
        self._dispatcher = dispatcher
        self._refresh = refresh.total_seconds()
        self._known: dict[str, QueueSettings] = {}

    def defaults(self, queue: str) -> QueueDefaults | None:
        """The queue's job defaults as last read; None for a queue without."""
        found = self._known.get(queue)
        return found.defaults if found is not None else None

    async def refresh(self) -> list[QueueSettings]:
        listed = await self._store.list_queues()
        self._known = {q.name: q for q in listed}
        # Limited stays limited: a queue marked by a submit that committed
        # after this read is kept.
        self._dispatcher.limited |= {q.name for q in listed if q.limited}
        self._dispatcher.rated = {q.name for q in listed if q.defaults.rate is not None}
        return listed

    async def run(self) -> None:
        await every(self._refresh, "queue settings refresh", self.refresh)

    async def settings(self, queue: str) -> QueueSettings | None:
        """The queue's settings as the store has them now."""
        return next((q for q in await self.refresh() if q.name == queue), None)

    async def set_defaults(self, queue: str, defaults: QueueDefaults) -> QueueSettings:
        made = await self._store.set_queue_defaults(queue, defaults, self._clock.now())
        self._known[queue] = made
        if made.limited:
            self._dispatcher.limited.add(queue)
        if made.defaults.rate is not None:
            self._dispatcher.rated.add(queue)
        else:
            self._dispatcher.rated.discard(queue)
        self._dispatcher.wake([queue])  # a limit raised or removed lets more through
        return made

    async def pause(self, queue: str, actor: str) -> QueueSettings:
        return await self._paused(queue, True, actor)

    async def resume(self, queue: str, actor: str) -> QueueSettings:
        resumed = await self._paused(queue, False, actor)
        self._dispatcher.wake([queue])  # other replicas' streams look within a poll interval
        return resumed

    async def _paused(self, queue: str, paused: bool, actor: str) -> QueueSettings:
        made = await self._store.set_queue_paused(queue, paused, actor, self._clock.now())
        self._known[queue] = made
        return made
