"""A job's state changes as records: what moved, from where to where, and why.

The store returns one Transition for each job an operation moved, and the
broker applies their consequences in one place; each is also a line of the
job's story. ``check`` holds a transition to the state table
(``domain/states.py``) and to what its reason allows.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, NamedTuple, TypeVar

from jobbroker_server.domain.errors import IllegalTransition
from jobbroker_server.domain.states import JobState, allowed

BROKER = "broker"  # the actor of what the broker does by itself


class Reason(enum.StrEnum):
    SUBMITTED = "submitted"
    PROMOTED = "promoted"  # its run time came
    LEASED = "leased"  # into a worker's prefetch window
    STARTED = "started"  # its handler started
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the attempt failed; a retry is due
    DEAD_LETTERED = "dead_lettered"  # failed for good: permanent, or no attempts left
    LEASE_EXPIRED = "lease_expired"
    TIMED_OUT = "timed_out"
    CANCEL_REQUESTED = "cancel_requested"  # of a held job: its worker is told to stop
    CANCELLED = "cancelled"
    RELEASED = "released"  # handed back by its worker, the attempt not counted
    REPLAYED = "replayed"
    PROGRESS = "progress"  # a progress report: not a move, but a line of the story
    PURGED = "purged"  # deleted from the dead-letter queue
    EXPIRED = "expired"  # deleted by retention
    PARENTS_DONE = "parents_done"  # a waiting job's last parent succeeded
    PARENT_FAILED = "parent_failed"  # a waiting job's parent ended dead or cancelled
    RESUMED = "resumed"  # the parent that cancelled it was replayed: it waits again
    LIMITED = "limited"  # held back by a concurrency or rate limit
    ADMITTED = "admitted"  # let through by the limit that held it back


_S = JobState
_RETRIED = (_S.SCHEDULED, _S.PENDING)
_HELD = (_S.LEASED, _S.RUNNING)


def _from_held(*targets: JobState) -> frozenset[tuple[JobState | None, JobState | None]]:
    return frozenset((source, target) for source in _HELD for target in targets)


# What each reason may do: (source, target) pairs, None for a job that does
# not exist before (a submit) or after (a deletion).
SHAPES: dict[Reason, frozenset[tuple[JobState | None, JobState | None]]] = {
    Reason.SUBMITTED: frozenset({(None, _S.PENDING), (None, _S.SCHEDULED), (None, _S.WAITING)}),
    Reason.PROMOTED: frozenset({(_S.SCHEDULED, _S.PENDING)}),
    Reason.LEASED: frozenset({(_S.PENDING, _S.LEASED)}),
    Reason.STARTED: frozenset({(_S.LEASED, _S.RUNNING)}),
    Reason.SUCCEEDED: frozenset({(_S.RUNNING, _S.SUCCEEDED)}),
    Reason.FAILED: _from_held(*_RETRIED),
    Reason.DEAD_LETTERED: _from_held(_S.DEAD),
    # An attempt the broker ended: retried, dead-lettered, or cancelled when
    # a cancel was asked for while it was held.
    Reason.LEASE_EXPIRED: _from_held(*_RETRIED, _S.DEAD, _S.CANCELLED),
    # A leased job times out only on a stream that does not report starts.
    Reason.TIMED_OUT: _from_held(*_RETRIED, _S.DEAD, _S.CANCELLED),
    # The reasons that leave the state as it is. A cancel asked of a held job
    # ends it cancelled when its attempt ends.
    Reason.CANCEL_REQUESTED: frozenset((held, held) for held in _HELD),
    Reason.PROGRESS: frozenset((held, held) for held in _HELD),
    Reason.CANCELLED: frozenset(
        (source, _S.CANCELLED) for source in (_S.WAITING, _S.PENDING, _S.SCHEDULED, *_HELD)
    ),
    Reason.RELEASED: _from_held(_S.PENDING),
    Reason.REPLAYED: frozenset({(_S.DEAD, _S.PENDING)}),
    Reason.PURGED: frozenset({(_S.DEAD, None)}),
    Reason.EXPIRED: frozenset({(_S.SUCCEEDED, None), (_S.CANCELLED, None)}),
    Reason.PARENTS_DONE: frozenset({(_S.WAITING, _S.PENDING), (_S.WAITING, _S.SCHEDULED)}),
    Reason.PARENT_FAILED: frozenset({(_S.WAITING, _S.CANCELLED)}),
    Reason.RESUMED: frozenset({(_S.CANCELLED, _S.WAITING)}),
    Reason.LIMITED: frozenset({(_S.PENDING, _S.WAITING)}),
    Reason.ADMITTED: frozenset({(_S.WAITING, _S.PENDING)}),
}


_NO_DETAIL: dict[str, str | float] = {}  # shared by transitions without detail; never changed


class Transition(NamedTuple):
    """One job's move. A NamedTuple, not a frozen dataclass: three are made
    per job at full speed, and this one is made in half the time."""

    job_id: str
    queue: str
    source: JobState | None  # None: the job is new
    target: JobState | None  # None: the job is gone
    reason: Reason
    attempt: int  # the attempt it concerns (0 before the first lease)
    actor: str = BROKER  # the worker id, or BROKER
    # A little of what happened: the error's type and message, the run time.
    detail: Mapping[str, str | float] = _NO_DETAIL
    # The attempt's fencing token, for telling its worker to stop; never logged.
    token: int = 0
    # Of a held job's end: its concurrency key, whose slot it frees.
    concurrency_key: str | None = None


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Moved(Generic[T]):
    """What a store operation returns: its result, and the transitions it made
    (already in the job event log), for the broker to apply."""

    result: T
    transitions: list[Transition]


def check(transition: Transition) -> Transition:
    """Return ``transition`` if the state table and its reason allow it, else
    raise IllegalTransition naming the job."""
    t = transition
    fits = (t.source, t.target) in SHAPES[t.reason]
    src, dst = t.source, t.target
    if not fits or (src and dst and src is not dst and not allowed(src, dst)):
        was = t.source or "new"
        now = t.target or "gone"
        raise IllegalTransition(f"job {t.job_id}: {t.reason} cannot take it from {was} to {now}")
    return t


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A line of a job's story as the log keeps it: a transition, or a
    progress report."""

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


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where a tail of the whole log stands: after the event numbered ``seq``,
    of transaction ``txid`` (PostgreSQL; 0 on SQLite). Events are read in
    the order they committed.

    On SQLite, with its one writer, that is the order of their numbers. On
    PostgreSQL a transaction that took a lower number can commit after one
    that took a higher: read by number, a follower would pass over it. There
    events are read in the order (transaction id, number), and only those of
    transactions older than every one still running: no event can later
    appear before the position reached. (A long transaction anywhere in the
    database holds the tail back until it ends.)"""

    txid: int
    seq: int
