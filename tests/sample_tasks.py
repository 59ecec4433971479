"""Tasks that the worker tests run, in a module ``broker worker`` can import."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from jobbroker import PermanentError, RetryAfter, current_job, task


@task(queue="sample")
def add(payload: list[int]) -> int:
    return sum(payload)


@task(queue="sample")
async def shout(payload: str) -> str:
    await asyncio.sleep(0)
    return payload.upper()


@task(queue="sample", max_attempts=3)
def flaky(payload: None) -> int:
    """Fails on its first attempt, succeeds on the second."""
    if current_job().attempt < 2:
        raise ConnectionError("upstream reset")
    return current_job().attempt


@task(queue="sample", max_attempts=5)
def bad_input(payload: None) -> None:
    raise PermanentError("malformed record")


@task(queue="sample", max_attempts=1)
def exhausted(payload: list[int]) -> int:
    """Raises StopIteration, which no future can carry."""
    return next(iter(payload))


@task(queue="sample", max_attempts=5)
def later(payload: None) -> str:
    if current_job().attempt == 1:
        raise RetryAfter(0.3)
    return "done"


@task(queue="sample")
async def sleepy(payload: float) -> str:
    await asyncio.sleep(payload)
    return "woke"


@task(queue="sample")
def patient(payload: float) -> str:
    """A sync handler that watches its context for a cancellation."""
    done = threading.Event()
    while not current_job().cancelled and not done.wait(0.01):
        pass
    return "stopped" if current_job().cancelled else "woke"


@task(queue="sample")
def touch(payload: str) -> str:
    """Write a marker file, then take a while: for shutdown tests."""
    Path(payload).write_text(str(os.getpid()))
    threading.Event().wait(0.5)
    return "touched"


entered = threading.Event()
gate = threading.Event()


@task(queue="sample")
def gated(payload: None) -> str:
    """Signal `entered`, then wait for the test to open `gate`."""
    entered.set()
    gate.wait(20)
    return "through"
