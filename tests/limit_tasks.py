"""The tasks the flow-limit tests run in real ``broker worker`` processes."""

from __future__ import annotations

import time
from typing import Any

from jobbroker import task

KEYED = "limits-keyed"
RATED = "limits-rated"


@task(queue=KEYED, concurrency_key=lambda p: p["key"], concurrency_limit=2)
def keyed(payload: dict[str, Any]) -> None:
    """A job of one customer at a time per slot: its key is computed from its payload."""
    time.sleep(payload.get("sleep", 0.0))


@task(queue=RATED)
def rated(payload: int) -> None:
    """Started under its queue's rate."""
