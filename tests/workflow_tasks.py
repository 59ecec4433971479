"""The seed's canvas examples as jobbroker tasks, for the workflow tests (and
for worker processes started with them)."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from pathlib import Path

from jobbroker import Outcome, PermanentError, Piped, RetryPolicy, current_job, task


@task(queue="etl")
def extract_data(source_id: int) -> list[int]:
    return [source_id * 10 + i for i in range(3)]


@task(queue="etl")
def transform_data(rows: list[int]) -> dict[str, int]:
    return {"count": len(rows), "total": sum(rows)}


@task(queue="etl")
def load_data(job: Piped[dict[str, int], str]) -> str:
    return f"loaded {job['result']['count']} rows ({job['result']['total']}) into {job['payload']}"


@task(queue="notify")
def send_email(to: str) -> str:
    return f"email to {to}"


@task(queue="notify")
def send_sms(to: str) -> str:
    return f"sms to {to}"


@task(queue="notify")
def update_analytics(event: str) -> int:
    return len(event)


@task(queue="items")
def process_item(item_id: int) -> int:
    return item_id * item_id


@task(queue="items")
def send_completion_notification(job: Piped[list[int], str]) -> str:
    return f"batch {job['payload']}: {len(job['result'])} items, sum {sum(job['result'])}"


@task(queue="items", max_attempts=1)
def fragile(n: int) -> int:
    """Fails for good on a negative number; a replay of it fails again unless
    the flag file says otherwise (see the tests)."""
    if n < 0 and not _mended():
        raise PermanentError(f"cannot take {n}")
    return abs(n)


MENDED: list[bool] = []


def _mended() -> bool:
    return bool(MENDED)


@task(queue="items")
def total(results: list[int]) -> int:
    return sum(results)


@task(queue="items")
def describe(outcomes: list[Outcome[int]]) -> list[Outcome[int]]:
    return outcomes


@task(
    queue="wf-crash", retry=RetryPolicy(max_attempts=20, backoff_base=timedelta(milliseconds=100))
)
def crash_step(job: Piped[int | None, str]) -> int:
    """Count one step on: log its start, take a second (long enough to be
    killed in), log its end. The payload names the log."""
    log = Path(job["payload"])
    _append(log, f"start {current_job().id}")
    threading.Event().wait(1.0)
    _append(log, f"done {current_job().id}")
    return (job["result"] or 0) + 1


def _append(log: Path, line: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)
