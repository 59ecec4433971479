"""What a client may send: every field's limit, checked before anything is stored.

Every edge (gRPC today, HTTP later) applies these same checks, so a value the
store or Python's ``datetime`` cannot hold, or one that would overflow when the
broker later computes with it (a deadline, a backoff), never reaches the store.
The limits are the same on every backend: PostgreSQL refuses what SQLite would
store (a NUL byte, an over-long name), so both refuse it here first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta

from jobbroker_server.domain.errors import InvalidArgument, ResourceExhausted

MAX_NAME = 200  # queue, task, idempotency key, worker id, tag, metadata key, error type
MAX_CONTENT_TYPE = 100
MAX_METADATA_ENTRIES = 64
MAX_METADATA_VALUE = 4096
# All of a job's metadata, keys and values: a full lease batch of such jobs
# must still fit one message (MAX_MESSAGE_BYTES) beside its payload budget.
MAX_METADATA_CHARS = 16 * 1024
MAX_TAGS = 64
MAX_ATTEMPTS = 1000
MAX_BACKOFF_FACTOR = 100.0
# The furthest ahead a job may be scheduled, and the longest timeout or
# backoff: far enough for any real schedule, near enough that ``now`` plus any
# of them stays inside what the store and ``datetime`` hold.
MAX_DELAY = timedelta(days=3650)
MAX_TIMEOUT = timedelta(days=30)
MAX_BACKOFF = timedelta(days=30)
# What a worker reports: longer text is cut, not refused (the attempt is over).
MAX_ERROR_MESSAGE = 4096
MAX_TRACEBACK = 16 * 1024
MAX_PROGRESS_MESSAGE = 1024
# A lease stream: how many queues it may serve, and how many leases one
# message may name.
MAX_SUBSCRIBED_QUEUES = 100
MAX_REFS_PER_MESSAGE = 10_000
# Payload bytes one lease message carries at most (or one job's, if larger):
# far inside the SDK's receive limit, with the other fields' limits above.
MAX_LEASE_BYTES = 4 * 1024 * 1024
# What a broker sends and an SDK accepts in one message.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def name(value: str, what: str) -> str:
    """A queue, task, key or worker name: not blank, short, no control characters."""
    if not value.strip():
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidArgument(f"{what} is {len(value)} characters; the limit is {MAX_NAME}")
    if not value.isprintable():
        raise InvalidArgument(f"{what} must not contain control characters (a NUL byte, say)")
    return value


def text(value: str, what: str, limit: int) -> str:
    """Free text a client gives: bounded, and without NUL (PostgreSQL refuses it)."""
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters; the limit is {limit}")
    if "\0" in value:
        raise InvalidArgument(f"{what} must not contain a NUL byte")
    return value


def clipped(value: str, limit: int) -> str:
    """Reported text made storable: NUL bytes replaced, cut to ``limit``."""
    if "\0" in value:
        value = value.replace("\0", "\ufffd")
    return value if len(value) <= limit else value[: limit - 1] + "…"


def metadata(values: Mapping[str, str]) -> dict[str, str]:
    if len(values) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"metadata has {len(values)} entries; the limit is {MAX_METADATA_ENTRIES}"
        )
    total = 0
    for key, value in values.items():
        name(key, "a metadata key")
        text(value, f"metadata[{key!r}]", MAX_METADATA_VALUE)
        total += len(key) + len(value)
    if total > MAX_METADATA_CHARS:
        raise InvalidArgument(
            f"metadata holds {total} characters; the limit is {MAX_METADATA_CHARS}"
        )
    return dict(values)


def tags(values: Sequence[str]) -> tuple[str, ...]:
    if len(values) > MAX_TAGS:
        raise InvalidArgument(f"tags has {len(values)} entries; the limit is {MAX_TAGS}")
    for tag in values:
        name(tag, "a tag")
    return tuple(values)


def payload_size(size: int, limit: int, what: str = "payload") -> None:
    if size > limit:
        raise ResourceExhausted(
            f"{what} is {size} bytes; this broker accepts at most {limit} "
            "(--max-payload-bytes); store large data elsewhere and submit a reference"
        )


def duration(value: timedelta, what: str, limit: timedelta, *, positive: bool = False) -> timedelta:
    if value < timedelta(0):
        raise InvalidArgument(f"{what} must not be negative (got {value.total_seconds()}s)")
    if positive and value == timedelta(0):
        raise InvalidArgument(f"{what} must be positive")
    if value > limit:
        raise InvalidArgument(too_long(what, value.total_seconds(), limit))
    return value


def too_long(what: str, seconds: float, limit: timedelta) -> str:
    return (
        f"{what} is {seconds:.0f}s; the limit is {limit.total_seconds():.0f}s ({limit.days} days)"
    )


def fraction(value: float, what: str) -> float:
    """A number in [0, 1]; NaN and infinities are refused."""
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise InvalidArgument(f"{what} must be between 0 and 1 (got {value})")
    return value


def backoff_factor(value: float) -> float:
    if not 1.0 <= value <= MAX_BACKOFF_FACTOR:  # False for NaN too
        raise InvalidArgument(
            f"retry.backoff_factor must be between 1 and {MAX_BACKOFF_FACTOR:g} (got {value})"
        )
    return value


def max_attempts(value: int) -> int:
    if not 1 <= value <= MAX_ATTEMPTS:
        raise InvalidArgument(
            f"retry.max_attempts must be between 1 and {MAX_ATTEMPTS} (got {value})"
        )
    return value


def finite_seconds(value: float | None, limit: timedelta) -> float | None:
    """A stored number of seconds made safe to compute with: a row written
    before these limits existed may hold anything."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        return limit.total_seconds()
    return min(value, limit.total_seconds())
