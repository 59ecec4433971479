"""Time-sortable job ids (UUIDv7, RFC 9562), monotonic within one process."""

from __future__ import annotations

from jobbroker._uuid7 import uuid7


def new_job_id() -> str:
    """A UUIDv7 string; ids made later in this process sort after earlier ones."""
    return uuid7()
