"""No-op tasks for scripts/bench.py, importable by ``broker worker bench_tasks``."""

from __future__ import annotations

import time

from jobbroker import task

QUEUE = "bench"


@task(queue=QUEUE)
def noop(payload: None) -> None:
    """The benchmark's job: nothing at all."""


@task(queue=QUEUE)
def stamp(payload: float) -> float:
    """Return the wall clock at the handler's start; the payload is the submit time."""
    return time.time()


@task(queue=QUEUE)
def gather(results: list[None]) -> int:
    """A chord's body: how many results it was given."""
    return len(results)
