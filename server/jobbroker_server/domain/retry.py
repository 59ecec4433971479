"""Retry policy: how many attempts, and how long to wait between them."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import timedelta

from jobbroker_server.domain.limits import MAX_BACKOFF


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
        """The wait after failed attempt number ``attempt`` (1-based).

        Computed in logarithms, so no attempt count or factor overflows a
        float; a stored policy that predates the submit limits (NaN, infinities,
        negatives) waits its cap, or nothing."""
        base = self.backoff_base.total_seconds()
        cap = self.backoff_cap.total_seconds()
        factor, jitter = self.backoff_factor, self.jitter
        if not cap > 0.0 or not base > 0.0:  # zero, negative or NaN
            return _ZERO
        cap = min(cap, _MAX_WAIT)
        factor = factor if math.isfinite(factor) and factor >= 1.0 else 1.0
        grown = math.log(base) + max(attempt - 1, 0) * math.log(factor)
        capped = cap if grown >= math.log(cap) else math.exp(grown)
        jitter = min(max(jitter, 0.0), 1.0) if math.isfinite(jitter) else 0.0
        spread = capped * jitter * (2 * (rng or random).random() - 1)
        return timedelta(seconds=min(max(capped + spread, 0.0), _MAX_WAIT))


# The longest wait any policy gives: ``now`` plus it always fits a datetime.
_MAX_WAIT = MAX_BACKOFF.total_seconds()
_ZERO = timedelta(0)


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
    if retry_after is not None:
        return min(max(retry_after, _ZERO), MAX_BACKOFF)
    return policy.delay(attempts, rng)
