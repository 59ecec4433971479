"""The one table of job state transitions; every state change is checked here."""

from __future__ import annotations

import enum

from jobbroker_server.domain.errors import IllegalTransition


class JobState(enum.StrEnum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.SCHEDULED: frozenset({JobState.PENDING, JobState.CANCELLED}),
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.CANCELLED}),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.DEAD,
            JobState.CANCELLED,
            JobState.PENDING,  # retry now, or handed back by the worker
            JobState.SCHEDULED,  # retry after a backoff
        }
    ),
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
