"""The one table of job state transitions; every state change is checked here."""

from __future__ import annotations

import enum

from jobbroker_server.domain.errors import IllegalTransition


class JobState(enum.StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    LEASED = "leased"  # held in a worker's prefetch window, its handler not started
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def held(self) -> bool:
        """A worker holds its lease: leased or running."""
        return self in HELD


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})
HELD = (JobState.LEASED, JobState.RUNNING)

# Where an attempt that did not succeed leaves its job: retried now or after a
# backoff, handed back, dead-lettered, or cancelled.
_ENDED = frozenset({JobState.PENDING, JobState.SCHEDULED, JobState.DEAD, JobState.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.PENDING, JobState.CANCELLED}),
    JobState.PENDING: frozenset({JobState.LEASED, JobState.CANCELLED}),
    # A held job that never started can still fail (its payload does not
    # decode, its worker has no handler), expire, be handed back or cancelled;
    # only a started one succeeds.
    JobState.LEASED: _ENDED | {JobState.RUNNING},
    JobState.RUNNING: _ENDED | {JobState.SUCCEEDED},
    JobState.DEAD: frozenset({JobState.PENDING}),  # replay
    JobState.SUCCEEDED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def allowed(src: JobState, dst: JobState) -> bool:
    return dst in TRANSITIONS[src]


def check(src: JobState, dst: JobState) -> JobState:
    """Return ``dst`` if ``src -> dst`` is allowed, else raise IllegalTransition."""
    if not allowed(src, dst):
        raise IllegalTransition(f"a {src} job cannot become {dst}")
    return dst


def sources(dst: JobState) -> frozenset[JobState]:
    """Every state that may move to ``dst``: what a store's WHERE clause admits."""
    return frozenset(src for src, dsts in TRANSITIONS.items() if dst in dsts)
