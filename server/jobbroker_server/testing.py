"""A broker running in a background thread, for tests and embedding.

The broker gets its own event loop, so synchronous code (the sync Client, a
test) can talk to it over a real loopback port while it runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, TypeVar

from jobbroker_server.app import BrokerApp
from jobbroker_server.clock import Clock
from jobbroker_server.config import Settings

T = TypeVar("T")


class BrokerThread:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = replace(settings, host="127.0.0.1")
        self.app = BrokerApp(self.settings, clock)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the broker's loop and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def start(self) -> BrokerThread:
        self._thread.start()
        self.run(self.app.start())
        return self

    def stop(self) -> None:
        try:
            self.run(self.app.stop())
            self.run(_cancel_leftovers())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _cancel_leftovers() -> None:
    """End what the stopped server left on the loop (handlers of closed calls)."""
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
