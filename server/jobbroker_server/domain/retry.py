"""Retry policy: how many attempts, and how long to wait between them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_base: timedelta = timedelta(seconds=1)
    backoff_factor: float = 2.0
    backoff_cap: timedelta = timedelta(minutes=10)
    jitter: float = 0.1  # the delay is spread by +/- this fraction

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def delay(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        """The wait after failed attempt number ``attempt`` (1-based)."""
        raw = self.backoff_base.total_seconds() * self.backoff_factor ** max(attempt - 1, 0)
        capped = min(raw, self.backoff_cap.total_seconds())
        spread = capped * self.jitter * (2 * (rng or random).random() - 1)
        return timedelta(seconds=max(capped + spread, 0.0))


def after_failure(
    *,
    attempts: int,
    policy: RetryPolicy,
    permanent: bool,
    retry_after: timedelta | None,
    rng: random.Random | None = None,
) -> timedelta | None:
    """How long until the next attempt, or None when the job is dead."""
    if permanent or policy.exhausted(attempts):
        return None
    return retry_after if retry_after is not None else policy.delay(attempts, rng)
