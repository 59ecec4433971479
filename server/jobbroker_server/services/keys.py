"""API keys at run time: who each call is, and the end of a revoked key's calls.

The valid keys are held in memory, so checking a call's key costs a dict
lookup and one SHA-256, not a query. The cache is reloaded every ``refresh``,
since another replica, or ``broker keys`` on the database, may have changed
the keys; a change made through this broker applies at once. When a key stops
being valid, every call still open under it (a lease stream, a submit stream,
a wait) is ended with UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from datetime import timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain import keys
from jobbroker_server.domain.errors import ResourceExhausted, Unauthenticated
from jobbroker_server.domain.keys import ANYONE, ApiKey, Caller, Role
from jobbroker_server.services.background import every
from jobbroker_server.store import Store

log = logging.getLogger(__name__)

_HOW = "send it as the 'authorization' metadata 'Bearer <key>' (api_key=..., or BROKER_API_KEY)"


class ApiKeys:
    def __init__(self, store: Store, clock: Clock, *, required: bool, refresh: timedelta) -> None:
        self._store = store
        self._clock = clock
        self.required = required
        self._refresh = refresh.total_seconds()
        self._valid: dict[str, ApiKey] = {}
        self._open: dict[str, set[asyncio.Task[object]]] = {}  # key id -> its calls
        self._ending: set[asyncio.Task[object]] = set()  # calls ended by a revocation
        # A reload that read the keys before a change made here committed must
        # not undo it in the cache (a new key gone, a revoked one back).
        self._changing = asyncio.Lock()

    async def load(self) -> None:
        """Take the valid keys from the store; end the calls of those gone."""
        async with self._changing:
            valid = {key.id: key for key in await self._store.list_keys()}
            gone = self._valid.keys() - valid.keys()
            self._valid = valid
        for key_id in gone:
            self._end_calls(key_id)

    async def run(self) -> None:
        if self.required:
            await every(self._refresh, "reloading the API keys", self.load)

    def caller(self, authorization: str | None) -> Caller:
        """Who presents this ``authorization`` metadata; anyone when auth is off."""
        if not self.required:
            return ANYONE
        if not authorization:
            raise Unauthenticated(f"this broker takes calls with an API key only: {_HOW}")
        scheme, _, text = authorization.strip().partition(" ")
        parsed = keys.parse(text.strip()) if scheme.lower() == "bearer" else None
        if parsed is None:
            raise Unauthenticated(f"the authorization metadata is not an API key: {_HOW}")
        key = self._valid.get(parsed[0])
        if key is None or not keys.matches(key, parsed[1]):
            raise Unauthenticated(
                "the API key is not valid: it is unknown, revoked or mistyped "
                "(`broker keys ls` lists the valid ones)"
            )
        return keys.caller_of(key)

    @contextlib.contextmanager
    def open_call(self, caller: Caller) -> Iterator[None]:
        """Within this, the current task is a call under ``caller``'s key: it
        is cancelled if the key is revoked (``ended_by_revocation`` says so)."""
        task = asyncio.current_task()
        if not caller.key_id or task is None:
            yield
            return
        calls = self._open.setdefault(caller.key_id, set())
        calls.add(task)
        try:
            yield
        finally:
            calls.discard(task)
            if not calls:
                self._open.pop(caller.key_id, None)
            self._ending.discard(task)

    def ended_by_revocation(self) -> bool:
        return asyncio.current_task() in self._ending

    def _end_calls(self, key_id: str) -> None:
        for task in self._open.pop(key_id, ()):
            self._ending.add(task)
            task.cancel()

    async def create(self, name: str, role: Role, queues: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key, valid at once; and its text, which nothing keeps."""
        # Without auth the cache is not loaded: count in the store (a create is rare).
        valid = len(self._valid) if self.required else len(await self._store.list_keys())
        if valid >= keys.MAX_KEYS:
            raise ResourceExhausted(
                f"this broker holds at most {keys.MAX_KEYS} valid API keys; revoke unused ones"
            )
        checked_name, checked_queues = keys.key_spec(name, list(queues))
        key, text = keys.new_key(checked_name, role, checked_queues, self._clock.now())
        async with self._changing:
            await self._store.create_key(key)
            self._valid[key.id] = key
        log.info("API key %s (%r, %s) created", key.id, key.name, key.role)
        return key, text

    async def list(self, include_revoked: bool) -> list[ApiKey]:
        return await self._store.list_keys(include_revoked)

    async def revoke(self, id_or_name: str) -> ApiKey:
        async with self._changing:
            key = await self._store.revoke_key(id_or_name, self._clock.now())
            self._valid.pop(key.id, None)
        self._end_calls(key.id)
        log.info("API key %s (%r) revoked", key.id, key.name)
        return key
