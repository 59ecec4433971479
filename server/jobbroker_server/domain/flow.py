"""Flow limits: at most N jobs of a concurrency key held at once, at most N
jobs of a rate key (or of a whole queue) started per period.

The broker enforces both in the store, in the lease itself (``store/flow.py``):
every worker and replica leases from the one store, so a limit holds across
all of them without a share of the budget per replica. A rate is a generic
cell rate algorithm (the token bucket kept as one instant): N per period,
and a burst of N after a quiet period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from jobbroker_server.domain.errors import InvalidArgument

MAX_CONCURRENCY = 1_000_000
MAX_RATE_COUNT = 1_000_000
MIN_RATE_PERIOD = timedelta(milliseconds=1)
MAX_RATE_PERIOD = timedelta(days=7)
MIN_RATE_INTERVAL = timedelta(microseconds=1)  # between two starts


Key = tuple[str, str]  # (queue, a concurrency or rate key)
# Where the sweep of held-back jobs goes on: after these concurrency and rate
# keys (None: from the first).
SweepCursor = tuple[Key | None, Key | None]

# What holds a job back (``jobs.held_by``), and what explain calls it.
CONCURRENCY = "concurrency"
RATE = "rate"


@dataclass(frozen=True, slots=True)
class RateLimit:
    count: int
    period: timedelta

    @property
    def interval(self) -> timedelta:
        """The time one start takes from the budget."""
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count} per {self.period.total_seconds():g}s"


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The limits a job is under: the keys it was submitted with, and the
    limits it carries (None: its queue's; a concurrency key under none at
    all allows one job at a time, a rate key under none is not limited)."""

    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    rate_key: str | None = None
    rate_limit: RateLimit | None = None


QUEUE_RATE = "queue_rate"  # explain's name for a queue's own rate


@dataclass(frozen=True, slots=True)
class LimitFacts:
    """What holds a job back, for explain: ``limit`` is CONCURRENCY, RATE or
    QUEUE_RATE; ``allowed`` the limit as a person reads it ("4", "50 per 1s")."""

    limit: str
    key: str
    allowed: str
    holders: tuple[str, ...] = ()  # concurrency: jobs holding the key's slots
    next_token_at: datetime | None = None  # rate: when the next job may start


def stored_rate(count: int | None, period_s: float | None) -> RateLimit | None:
    """A rate as the store keeps it (a count and a period in seconds, NULL
    for none)."""
    if count is None or period_s is None:
        return None
    return RateLimit(count, timedelta(seconds=period_s))


def rate_limit(count: int, period_s: float, what: str) -> RateLimit:
    """A rate limit from a client's numbers, or InvalidArgument saying why not."""
    if not 1 <= count <= MAX_RATE_COUNT:
        raise InvalidArgument(f"{what}: count must be 1 to {MAX_RATE_COUNT}, got {count}")
    low, high = MIN_RATE_PERIOD.total_seconds(), MAX_RATE_PERIOD.total_seconds()
    if not (math.isfinite(period_s) and low <= period_s <= high):
        raise InvalidArgument(
            f"{what}: period must be {low * 1000:g} ms to {high / 86400:g} days, got {period_s}s"
        )
    rate = RateLimit(count, timedelta(seconds=period_s))
    if rate.interval < MIN_RATE_INTERVAL:
        raise InvalidArgument(
            f"{what}: {count} per {period_s:g}s is more than one start a microsecond, "
            "the finest rate the broker keeps"
        )
    return rate


def concurrency_limit(value: int, what: str) -> int:
    if not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidArgument(f"{what} must be 1 to {MAX_CONCURRENCY}, got {value}")
    return value


def allowed(tat: datetime | None, now: datetime, limit: RateLimit) -> int:
    """How many jobs may start now under ``limit``, whose bucket is at ``tat``
    (None: never used)."""
    start = now if tat is None or tat < now else tat
    room = (now + limit.period - start) * limit.count / limit.period
    return max(0, min(limit.count, math.floor(room + 1e-9)))


def taken(tat: datetime | None, now: datetime, limit: RateLimit, count: int) -> datetime:
    """The bucket's instant once ``count`` jobs started now."""
    start = now if tat is None or tat < now else tat
    # One rounding to the microsecond for the whole count, not one per start.
    return start + limit.period * count / limit.count


def next_token_at(tat: datetime, limit: RateLimit) -> datetime:
    """When the next job may start, from a bucket at ``tat``."""
    return tat - limit.period + limit.interval
