"""A job's state changes as records: what moved, from where to where, and why.

The store returns one Transition for each job an operation moved, and the
broker applies their consequences in one place; each is also a line of the
job's story. ``check`` holds a transition to the state table
(``domain/states.py``) and to what its reason allows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from jobbroker_server.domain.errors import IllegalTransition
from jobbroker_server.domain.states import JobState, allowed

BROKER = "broker"  # the actor of what the broker does by itself


class Reason(enum.StrEnum):
    SUBMITTED = "submitted"
    PROMOTED = "promoted"  # its run time came
    LEASED = "leased"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the attempt failed; a retry is due
    DEAD_LETTERED = "dead_lettered"  # failed for good: permanent, or no attempts left
    LEASE_EXPIRED = "lease_expired"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    RELEASED = "released"  # handed back by its worker, the attempt not counted
    REPLAYED = "replayed"
    PURGED = "purged"  # deleted from the dead-letter queue
    EXPIRED = "expired"  # deleted by retention


_S = JobState
_RETRIED = (_S.SCHEDULED, _S.PENDING)
# What each reason may do: (source, target) pairs, None for a job that does
# not exist before (a submit) or after (a deletion).
SHAPES: dict[Reason, frozenset[tuple[JobState | None, JobState | None]]] = {
    Reason.SUBMITTED: frozenset({(None, _S.PENDING), (None, _S.SCHEDULED)}),
    Reason.PROMOTED: frozenset({(_S.SCHEDULED, _S.PENDING)}),
    Reason.LEASED: frozenset({(_S.PENDING, _S.RUNNING)}),
    Reason.SUCCEEDED: frozenset({(_S.RUNNING, _S.SUCCEEDED)}),
    Reason.FAILED: frozenset((_S.RUNNING, to) for to in _RETRIED),
    Reason.DEAD_LETTERED: frozenset({(_S.RUNNING, _S.DEAD)}),
    # An attempt the broker ended: retried, dead-lettered, or cancelled when
    # a cancel was asked for while it ran.
    Reason.LEASE_EXPIRED: frozenset((_S.RUNNING, to) for to in (*_RETRIED, _S.DEAD, _S.CANCELLED)),
    Reason.TIMED_OUT: frozenset((_S.RUNNING, to) for to in (*_RETRIED, _S.DEAD, _S.CANCELLED)),
    Reason.CANCELLED: frozenset(
        (source, _S.CANCELLED) for source in (_S.PENDING, _S.SCHEDULED, _S.RUNNING)
    ),
    Reason.RELEASED: frozenset({(_S.RUNNING, _S.PENDING)}),
    Reason.REPLAYED: frozenset({(_S.DEAD, _S.PENDING)}),
    Reason.PURGED: frozenset({(_S.DEAD, None)}),
    Reason.EXPIRED: frozenset({(_S.SUCCEEDED, None), (_S.CANCELLED, None)}),
}


@dataclass(frozen=True, slots=True)
class Transition:
    job_id: str
    queue: str
    source: JobState | None  # None: the job is new
    target: JobState | None  # None: the job is gone
    reason: Reason
    attempt: int  # the attempt it concerns (0 before the first lease)
    actor: str = BROKER  # the worker id, or BROKER
    # A little of what happened: the error's type and message, the run time.
    detail: Mapping[str, str | float] = field(default_factory=dict)


def check(transition: Transition) -> Transition:
    """Return ``transition`` if the state table and its reason allow it, else
    raise IllegalTransition naming the job."""
    t = transition
    fits = (t.source, t.target) in SHAPES[t.reason]
    if not fits or (t.source and t.target and not allowed(t.source, t.target)):
        was = t.source or "new"
        now = t.target or "gone"
        raise IllegalTransition(f"job {t.job_id}: {t.reason} cannot take it from {was} to {now}")
    return t


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A line of a job's story as the log keeps it: a transition, or a
    progress report (reason "progress")."""

    seq: int  # only grows
    job_id: str
    queue: str
    at: datetime
    reason: str
    source: str | None
    target: str
    attempt: int
    actor: str
    detail: Mapping[str, str | float]
