"""Health that tells the truth: SERVING only while the store takes writes.

A broker whose database is unreachable, full or read-only still answers gRPC,
so the health check must look deeper than "the process is up": about once a
second the probe writes its row in the store (``Store.probe_write``), and the
first failure, or a write that takes longer than ``timeout``, reports the
broker not serving, until a write succeeds again. Reads may go on working
meanwhile; a load balancer should still send new work elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.store import Store
from jobbroker_server.store.open import describe

log = logging.getLogger(__name__)


def broker_name() -> str:
    """This broker's row in the store: host, pid and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class StoreHealth:
    """Probes that the store can be written; calls ``on_change(serving)`` once
    per change of state (the app sets gRPC health from it), logging one line."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        on_change: Callable[[bool], Awaitable[None]],
        *,
        interval: timedelta = timedelta(seconds=1),
        timeout: timedelta = timedelta(seconds=2),
        broker: str | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_change = on_change
        self._interval = interval.total_seconds()
        self._timeout = timeout.total_seconds()
        self._broker = broker or broker_name()
        self.serving = True  # the store was just opened and migrated
        self._write: asyncio.Future[None] | None = None
        self._write_began = 0.0

    async def run_once(self) -> bool:
        """Probe once; return whether the store took the write."""
        problem = await self._probe()
        if (problem is None) != self.serving:
            self.serving = problem is None
            if problem is None:
                log.warning("the store takes writes again: health is SERVING")
            else:
                log.warning("the store cannot be written (%s): health is NOT_SERVING", problem)
            await self._on_change(self.serving)
        return self.serving

    async def run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self._interval)

    async def _probe(self) -> str | None:
        """None if a write committed in time, else what went wrong. A write that
        outlives its timeout is left to finish (the store never cuts one off),
        and no other starts until it has: a hung database gets one probe."""
        if self._write is not None and not self._write.done():
            return f"a write has not finished after {time.monotonic() - self._write_began:.0f}s"
        self._write = asyncio.ensure_future(
            self._store.probe_write(self._broker, self._clock.now())
        )
        self._write.add_done_callback(_retrieve)
        self._write_began = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 a cancel that meets
            # the write's end inside wait_for is lost, and the task cannot stop.
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(self._write)
        except TimeoutError:
            return f"a write took longer than {self._timeout:g}s"
        except Exception as error:
            return _reason(error)
        return None


def _reason(error: BaseException) -> str:
    """Our words for the fault, and the driver's when the store gave both."""
    text = str(error) or type(error).__name__
    cause = error.__context__ if error.__suppress_context__ else error.__cause__
    return f"{text} ({describe(cause)})" if cause is not None else describe(error)


def _retrieve(write: asyncio.Future[None]) -> None:
    """A write that timed out still ends; its error is already told, or stale."""
    if not write.cancelled():
        write.exception()
