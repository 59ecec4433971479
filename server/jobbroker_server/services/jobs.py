"""What producers and operators do to jobs: submit, read, wait, cancel, DLQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain.errors import STORE_DOWN
from jobbroker_server.domain.models import Job, JobFilter, JobPage, LeaseRef, NewJob, SubmitResult
from jobbroker_server.domain.states import JobState
from jobbroker_server.metrics import Metrics
from jobbroker_server.services.background import Scheduler
from jobbroker_server.services.batching import GroupCommit
from jobbroker_server.services.dispatcher import CancelReason, Dispatcher
from jobbroker_server.services.watch import JobWatch
from jobbroker_server.store import Store


class Jobs:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        scheduler: Scheduler,
        clock: Clock,
        metrics: Metrics,
        watch: JobWatch,
        *,
        dedup_window: timedelta,
        poll_interval: timedelta,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._scheduler = scheduler
        self._clock = clock
        self._metrics = metrics
        self._watch = watch
        self._dedup_window = dedup_window
        # A waiter looks at its job every poll interval where other replicas
        # change jobs unseen; alone on its store, every change is published
        # here, and the look is only a safety net.
        self._wait_poll = poll_interval.total_seconds() * (1 if store.shared else 30)
        self._submits = GroupCommit(self._store_submits, shared_errors=STORE_DOWN)

    async def _store_submits(self, jobs: list[NewJob]) -> list[SubmitResult]:
        """One group's transaction, which also fills the worker streams with room
        for these jobs' queues; the others are woken to lease."""
        now = self._clock.now()
        ready = Counter(job.queue for job in jobs if job.run_at is None or job.run_at <= now)
        claimed = self._dispatcher.claim(ready)
        asks, lease_for = list(claimed.values()), self._dispatcher.lease_duration
        leased = None
        try:
            results, leased = await self._store.submit_and_lease(
                jobs, now, self._dedup_window, asks, lease_for
            )
        finally:
            await self._dispatcher.deliver(claimed, leased, now)
        stored = [(job, r) for job, r in zip(jobs, results, strict=True) if not r.duplicate]
        self._metrics.count(self._metrics.submitted, (job.queue for job, _ in stored))
        states = {r.state for _, r in stored}
        if JobState.SCHEDULED in states:
            self._scheduler.poke()
        if JobState.PENDING in states:
            if leased is not None:  # what the claimed streams took needs no one else
                ready.subtract(lease.job.queue for leases in leased for lease in leases)
            self._dispatcher.wake_some(ready, but=claimed)
        return results

    async def submit_many(self, jobs: Sequence[NewJob]) -> list[SubmitResult]:
        """Store jobs all-or-nothing, in one transaction with concurrent submits."""
        return await self._submits(jobs)

    def submit_soon(self, jobs: Sequence[NewJob]) -> asyncio.Future[list[SubmitResult]]:
        """`submit_many` for a caller that collects the result later."""
        return self._submits.enqueue(jobs)

    async def get(self, job_id: str) -> Job:
        return await self._store.get_job(job_id)

    async def wait(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then the job at each change of state until it is terminal."""
        with self._watch.subscribe(job_id) as changes:
            job = await self._store.get_job(job_id)
            yield job
            last = job.state
            while not last.terminal:
                state: JobState | None = None
                with contextlib.suppress(TimeoutError):
                    state = await asyncio.wait_for(changes.get(), self._wait_poll)
                job = await self._store.get_job(job_id)
                if state is None:
                    state = job.state  # the poll: a change not published here
                if state is not last:
                    yield job if job.state is state else _as_of(job, state)
                    last = state

    async def cancel(self, job_id: str) -> Job:
        job = await self._store.cancel(job_id, self._clock.now())
        if job.state is JobState.RUNNING:
            ref = LeaseRef(job.id, job.fencing_token)
            self._dispatcher.cancel([ref], CancelReason.CANCELLED)
        else:
            self._watch.publish([(job.id, job.state)])
        return job

    async def find(self, where: JobFilter) -> JobPage:
        return await self._store.list_jobs(where)

    async def replay_dead(self, queue: str | None, job_ids: Sequence[str]) -> list[str]:
        replayed = await self._store.replay_dead(queue, job_ids, self._clock.now())
        if replayed:
            self._watch.publish((job_id, JobState.PENDING) for job_id in replayed)
            self._dispatcher.wake()
        return replayed

    async def purge_dead(self, queue: str | None, job_ids: Sequence[str]) -> int:
        return await self._store.purge_dead(queue, job_ids)


def _as_of(job: Job, state: JobState) -> Job:
    """The job as it is now, showing a state it passed through since."""
    return replace(job, state=state)
