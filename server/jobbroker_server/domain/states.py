"""The one table of job state transitions; every state change is checked here."""

from __future__ import annotations

import enum

from jobbroker_server.domain.errors import IllegalTransition


class JobState(enum.StrEnum):
    # On parent jobs (a workflow's later steps), or held back by a flow
    # limit (domain/flow.py); never leased.
    WAITING = "waiting"
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
    # Released when its parents are done (scheduled if its run time is still
    # ahead) or its limit lets it through, or cancelled: asked for, or a
    # parent failed.
    JobState.WAITING: frozenset({JobState.PENDING, JobState.SCHEDULED, JobState.CANCELLED}),
    JobState.SCHEDULED: frozenset({JobState.PENDING, JobState.CANCELLED}),
    # Held back by a flow limit: waiting until it lets the job through.
    JobState.PENDING: frozenset({JobState.LEASED, JobState.WAITING, JobState.CANCELLED}),
    # A held job that never started can still fail (its payload does not
    # decode, its worker has no handler), expire, be handed back or cancelled;
    # only a started one succeeds.
    JobState.LEASED: _ENDED | {JobState.RUNNING},
    JobState.RUNNING: _ENDED | {JobState.SUCCEEDED},
    JobState.DEAD: frozenset({JobState.PENDING}),  # replay
    JobState.SUCCEEDED: frozenset(),
    # Only a job cancelled because a parent failed: that parent was replayed.
    JobState.CANCELLED: frozenset({JobState.WAITING}),
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
