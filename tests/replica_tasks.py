"""The task the replica tests run in real ``broker worker`` processes."""

from __future__ import annotations

import os
from datetime import timedelta

from jobbroker import RetryPolicy, current_job, task

QUEUE = "replicas"
# One line per run: a job id (36 characters), a space, the pid in 10, a newline.
LINE_BYTES = 48

# A lease lost with a replica is retried soon: the tests are about where jobs
# end up, not about the backoff.
QUICK_RETRY = RetryPolicy(
    max_attempts=20, backoff_base=timedelta(milliseconds=100), backoff_cap=timedelta(seconds=1)
)


@task(queue=QUEUE, retry=QUICK_RETRY)
def record(payload: str) -> None:
    """Append ``"<job id> <pid>"`` to the run log named by the payload.

    One write with O_APPEND per run, of a fixed size: lines from concurrent
    handlers and processes never interleave, a run killed before the write
    leaves none, and the file's size counts the runs.
    """
    line = f"{current_job().id} {os.getpid():>10}\n".encode()
    assert len(line) == LINE_BYTES, line
    fd = os.open(payload, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
