"""Why a job is where it is: one sentence a person can act on, and the facts
behind it, from the store and from this broker's view of its worker streams."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from jobbroker_server.clock import Clock
from jobbroker_server.domain.flow import CONCURRENCY, RATE, LimitFacts
from jobbroker_server.domain.models import ErrorInfo, Job, WaitsOn
from jobbroker_server.domain.queues import QueueSettings
from jobbroker_server.domain.states import JobState
from jobbroker_server.services.dispatcher import Dispatcher
from jobbroker_server.services.queues import Queues
from jobbroker_server.store import Store
from jobbroker_server.store.ops import MAX_AHEAD


@dataclass(frozen=True, slots=True)
class Explanation:
    state: JobState
    # waiting, parent_failed, limited, scheduled, retry_backoff, paused, pending,
    # no_worker, held, running, cancel_requested, finished
    reason: str
    summary: str
    attempt: int
    run_at: datetime | None = None
    jobs_ahead: int = 0
    workers_serving: int = 0
    worker_id: str = ""
    since: datetime | None = None
    last_heartbeat: datetime | None = None
    lease_expires_at: datetime | None = None
    deadline: datetime | None = None
    cancel_requested: bool = False
    finished_at: datetime | None = None
    last_error: ErrorInfo | None = None
    waits_on: tuple[WaitsOn, ...] = ()
    limit: LimitFacts | None = None


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at else "an unknown time"


def _error(error: ErrorInfo | None) -> str:
    return f"{error.type}: {error.message}" if error else "no error recorded"


class Explainer:
    def __init__(self, store: Store, clock: Clock, dispatcher: Dispatcher, queues: Queues) -> None:
        self._store = store
        self._clock = clock
        self._dispatcher = dispatcher
        self._queues = queues

    async def explain(self, job_id: str) -> Explanation:
        facts = await self._store.explain_job(job_id, self._clock.now())
        job = facts.job
        if facts.limit is not None:
            return _limited(job, facts.limit)
        if facts.waits_on and job.state in (JobState.WAITING, JobState.CANCELLED):
            return _waiting(job, facts.waits_on)
        if job.state is JobState.SCHEDULED:
            return _scheduled(job)
        if job.state is JobState.PENDING:
            settings = await self._queues.settings(job.queue)
            if settings is not None and settings.paused:
                return _paused(job, settings)
            return self._pending(job, facts.ahead)
        if job.state.held:
            return self._held(job, facts.leased_at)
        state = job.state.value
        return Explanation(
            job.state,
            "finished",
            f"finished: {state} at {_when(job.finished_at)}"
            + (
                "" if job.state is JobState.SUCCEEDED else f"; last error: {_error(job.last_error)}"
            ),
            job.attempts,
            finished_at=job.finished_at,
            last_error=job.last_error,
        )

    def _pending(self, job: Job, ahead: int) -> Explanation:
        serving = self._dispatcher.serving(job.queue)
        shown = f"{MAX_AHEAD}+" if ahead >= MAX_AHEAD else str(ahead)
        if serving == 0:
            elsewhere = " (another replica's may)" if self._store.shared else ""
            summary = (
                f"pending with {shown} job(s) ahead of it, but no worker connected to this "
                f"broker leases queue {job.queue!r}{elsewhere}: start one that serves it"
            )
            reason = "no_worker"
        else:
            summary = (
                f"pending with {shown} job(s) ahead of it in queue {job.queue!r} (higher "
                f"priority or older), served by {serving} worker stream(s)"
            )
            reason = "pending"
        return Explanation(
            job.state, reason, summary, job.attempts, jobs_ahead=ahead, workers_serving=serving
        )

    def _held(self, job: Job, leased_at: datetime | None) -> Explanation:
        worker = job.leased_by or "an unknown worker"
        heartbeat = None
        if job.lease_expires_at is not None:
            heartbeat = job.lease_expires_at - self._dispatcher.lease_duration
        if job.state is JobState.LEASED:
            since = leased_at
            summary = (
                f"held in worker {worker}'s window since {_when(since)}, its handler not "
                "started: the worker is busy with the jobs before it"
            )
            reason = "held"
        else:
            since = job.started_at
            summary = (
                f"running on worker {worker} since {_when(since)}; last heartbeat "
                f"{_when(heartbeat)}, lease expires {_when(job.lease_expires_at)}"
            )
            if job.deadline_at is not None:
                summary += f", hard deadline {_when(job.deadline_at)}"
            reason = "running"
        if job.cancel_requested:
            summary = f"cancel requested; the worker was told to stop. It was {summary}"
            reason = "cancel_requested"
        return Explanation(
            job.state,
            reason,
            summary,
            job.attempts,
            worker_id=job.leased_by or "",
            since=since,
            last_heartbeat=heartbeat,
            lease_expires_at=job.lease_expires_at,
            deadline=job.deadline_at,
            cancel_requested=job.cancel_requested,
        )


def _waiting(job: Job, parents: tuple[WaitsOn, ...]) -> Explanation:
    named = ", ".join(f"{p.job_id} ({p.task}, {p.state.value})" for p in parents)
    if job.state is JobState.WAITING:
        summary = f"waiting on parent job(s) {named}: it becomes pending when they succeed"
        reason = "waiting"
    else:
        summary = (
            f"cancelled because parent job(s) {named} did not succeed; replaying the dead "
            "one from the dead-letter queue makes it wait again"
        )
        reason = "parent_failed"
    return Explanation(
        job.state,
        reason,
        summary,
        job.attempts,
        finished_at=job.finished_at,
        last_error=job.last_error,
        waits_on=parents,
    )


def _limited(job: Job, limit: LimitFacts) -> Explanation:
    if limit.limit == CONCURRENCY:
        holding = ", ".join(limit.holders) or "none now"
        summary = (
            f"held back: concurrency key {limit.key!r} of queue {job.queue!r} allows "
            f"{limit.allowed} job(s) at once, held by {holding}; it is let through when "
            "one of them ends"
        )
    else:
        whose = f"rate key {limit.key!r}" if limit.limit == RATE else f"queue {job.queue!r}"
        held = "held back" if job.state is JobState.WAITING else "pending"
        summary = (
            f"{held}: {whose} allows {limit.allowed} job starts; the next may start at "
            f"{_when(limit.next_token_at)}"
        )
    return Explanation(job.state, "limited", summary, job.attempts, limit=limit)


def _paused(job: Job, queue: QueueSettings) -> Explanation:
    summary = (
        f"pending in queue {job.queue!r}, which {queue.paused_by} paused at "
        f"{_when(queue.paused_at)}: nothing of it is leased until "
        f"`broker queues resume {job.queue}`"
    )
    return Explanation(job.state, "paused", summary, job.attempts, since=queue.paused_at)


def _scheduled(job: Job) -> Explanation:
    if job.attempts > 0:
        summary = (
            f"scheduled to retry at {_when(job.scheduled_at)}, backing off after attempt "
            f"{job.attempts} failed ({_error(job.last_error)})"
        )
        reason = "retry_backoff"
    else:
        summary = f"scheduled: delayed until {_when(job.scheduled_at)}"
        reason = "scheduled"
    return Explanation(
        job.state,
        reason,
        summary,
        job.attempts,
        run_at=job.scheduled_at,
        last_error=job.last_error,
    )
