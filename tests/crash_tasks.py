"""Tasks that the crash tests run in real ``broker worker`` processes."""

from __future__ import annotations

import os
import random
import threading
from datetime import timedelta
from pathlib import Path

from jobbroker import RetryPolicy, current_job, task

# A lost lease is retried soon and many times: these tests are about where
# jobs end up, not about the backoff.
QUICK_RETRY = RetryPolicy(
    max_attempts=20, backoff_base=timedelta(milliseconds=100), backoff_cap=timedelta(seconds=1)
)


@task(queue="crash", retry=QUICK_RETRY)
def record(payload: str) -> None:
    """Work for 10-20 ms, then append the job id to the run log named by the payload.

    One write with O_APPEND per run: lines from concurrent handlers and
    processes never interleave, and a run killed before the write leaves none.
    """
    threading.Event().wait(random.uniform(0.01, 0.02))
    fd = os.open(payload, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{current_job().id}\n".encode())
    finally:
        os.close(fd)


@task(queue="frozen", retry=QUICK_RETRY)
def linger(payload: str) -> dict[str, int]:
    """Mark that this process started the job, take a second, answer with the pid."""
    Path(payload, f"started-{os.getpid()}").touch()
    threading.Event().wait(1.0)
    return {"pid": os.getpid()}
