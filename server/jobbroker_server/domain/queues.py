"""A queue's own settings, kept in the store: paused or not, and the job
defaults a queue gives when neither a job nor its task says.

A queue without settings is an ordinary one: running, the broker's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from jobbroker_server.domain.flow import RateLimit
from jobbroker_server.domain.retry import RetryPolicy

MAX_QUEUE_SETTINGS = 10_000  # queues with settings of their own


@dataclass(frozen=True, slots=True)
class QueueDefaults:
    """What a queue's jobs get when they say nothing: None leaves the broker's."""

    max_attempts: int | None = None
    backoff_base: timedelta | None = None
    backoff_factor: float | None = None
    backoff_cap: timedelta | None = None
    timeout: timedelta | None = None
    soft_timeout: timedelta | None = None
    # Whether an attempt whose worker was lost (its lease expired) counts
    # against max_attempts. Counted by default: a job that kills its worker
    # every time must end in the dead-letter queue, not loop for ever.
    lost_worker_counts: bool = True
    # Flow limits (domain/flow.py): of the whole queue's starts, of each rate
    # key's when its jobs carry no rate, of each concurrency key's when its
    # jobs carry no limit.
    rate: RateLimit | None = None
    key_rate: RateLimit | None = None
    key_concurrency: int | None = None

    def retry(self, broker: RetryPolicy) -> RetryPolicy:
        """The queue's retry policy: its own fields over the broker's."""
        return RetryPolicy(
            max_attempts=self.max_attempts or broker.max_attempts,
            backoff_base=_or(self.backoff_base, broker.backoff_base),
            backoff_factor=self.backoff_factor or broker.backoff_factor,
            backoff_cap=_or(self.backoff_cap, broker.backoff_cap),
            jitter=broker.jitter,
        )


def _or(value: timedelta | None, default: timedelta) -> timedelta:
    return default if value is None else value


@dataclass(frozen=True, slots=True)
class QueueSettings:
    name: str
    defaults: QueueDefaults
    paused: bool = False
    paused_by: str = ""  # the API key's name, or "client"
    paused_at: datetime | None = None
    updated_at: datetime | None = None
    # Leased through the flow limits' path (store/flow.py): it has a rate,
    # or has had a job with a key.
    limited: bool = False
