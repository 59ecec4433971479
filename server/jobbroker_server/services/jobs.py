"""What producers and operators do to jobs: submit, read, wait, cancel, DLQ."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain.errors import STORE_DOWN, BrokerError
from jobbroker_server.domain.models import Job, JobFilter, JobPage, NewJob, SubmitResult
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import JobEvent
from jobbroker_server.services.batching import GroupCommit
from jobbroker_server.services.changes import Changes
from jobbroker_server.services.dispatcher import Dispatcher
from jobbroker_server.services.watch import JobWatch
from jobbroker_server.store import Store

WATCH_PAGE = 500  # events per read of a watch


class Jobs:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        changes: Changes,
        clock: Clock,
        watch: JobWatch,
        *,
        dedup_window: timedelta,
        poll_interval: timedelta,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._changes = changes
        self._clock = clock
        self._watch = watch
        self._dedup_window = dedup_window
        # A waiter looks at its job every poll interval where other replicas
        # change jobs unseen; alone on its store, every change is published
        # here, and the look is only a safety net.
        self._wait_poll = poll_interval.total_seconds() * (1 if store.shared else 30)
        self._submits = GroupCommit(self._store_submits, shared_errors=STORE_DOWN)

    async def _store_submits(self, jobs: list[NewJob]) -> list[SubmitResult]:
        """One group's transaction, which also fills the worker streams with room
        for these jobs' queues; for the rest, the others are woken to lease."""
        now = self._clock.now()
        ready = Counter(
            job.queue
            for job in jobs
            if job.needs is None and (job.run_at is None or job.run_at <= now)
        )
        claimed = self._dispatcher.claim(ready)
        asks, lease_for = list(claimed.values()), self._dispatcher.lease_duration
        leased = None
        try:
            moved = await self._store.submit_and_lease(
                jobs, now, self._dedup_window, asks, lease_for
            )
            results, leased = moved.result
        finally:
            await self._dispatcher.deliver(claimed, leased, now)
        # The store marked them limited in that transaction. (A lease asked
        # for before passed over them: their jobs' pending transitions wake
        # the streams again.)
        self._dispatcher.limited |= {job.queue for job in jobs if job.limits is not None}
        self._changes.apply(moved.transitions)
        return results

    async def submit_many(self, jobs: Sequence[NewJob]) -> list[SubmitResult]:
        """Store jobs all-or-nothing, in one transaction with concurrent submits."""
        return await self._submits(jobs)

    def submit_soon(self, jobs: Sequence[NewJob]) -> asyncio.Future[list[SubmitResult]]:
        """`submit_many` for a caller that collects the result later."""
        return self._submits.enqueue(jobs)

    async def submit_each(self, jobs: Sequence[NewJob]) -> list[SubmitResult | BrokerError]:
        """Each job stored or refused on its own: they still share a
        transaction, and a group that fails is tried again a job at a time."""
        done = await asyncio.gather(*(self._submits([job]) for job in jobs), return_exceptions=True)
        answers: list[SubmitResult | BrokerError] = []
        for outcome in done:
            if isinstance(outcome, BaseException) and not isinstance(outcome, BrokerError):
                raise outcome
            answers.append(outcome if isinstance(outcome, BrokerError) else outcome[0])
        return answers

    async def get(self, job_id: str) -> Job:
        return await self._store.get_job(job_id)

    async def wait(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then the job at each change of state until it is terminal."""
        with self._watch.subscribe(job_id) as changes:
            job = await self._store.get_job(job_id)
            yield job
            last = job.state
            while not last.terminal:
                passed: list[JobState] = []
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._wait_poll):
                        passed.append(await changes.get())
                while not changes.empty():  # progress reports pile up: read them at once
                    passed.append(changes.get_nowait())
                new = [s for i, s in enumerate(passed) if s is not (passed[i - 1] if i else last)]
                if passed and not new:
                    continue  # a progress report, or a cancel asked: no change of state
                job = await self._store.get_job(job_id)
                for state in new or [job.state]:  # none published: the poll looks
                    if state is not last and not last.terminal:
                        yield job if job.state is state else _as_of(job, state)
                        last = state

    async def events(self, job_id: str, after: int, limit: int) -> list[JobEvent]:
        return await self._store.job_events(job_id, after, limit)

    async def watch(self, job_id: str, after: int) -> AsyncIterator[JobEvent]:
        """The job's events after ``after``, then each one as it is written,
        until the one that left the job terminal.

        A job's operations lock its row, so its events commit in the order of
        their sequence numbers, on every backend: reading after the last one
        sent misses none."""
        with self._watch.subscribe(job_id) as changes:
            while True:
                found = await self._store.job_events(job_id, after, WATCH_PAGE)
                for event in found:
                    yield event
                    after = event.seq
                if len(found) == WATCH_PAGE:
                    continue
                if found and JobState(found[-1].target).terminal:
                    return
                if not found and (await self._store.get_job(job_id, history=False)).state.terminal:
                    # Terminal, and every event up to it read: unless its last
                    # one was written between the two reads.
                    if not await self._store.job_events(job_id, after, 1):
                        return
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._wait_poll):
                        await changes.get()
                while not changes.empty():
                    changes.get_nowait()

    async def cancel(self, job_id: str, actor: str) -> Job:
        cancelled = await self._store.cancel(job_id, self._clock.now(), actor)
        self._changes.apply(cancelled.transitions)
        return cancelled.result

    async def cancel_workflow(self, workflow_id: str, actor: str) -> int:
        cancelled = await self._store.cancel_workflow(workflow_id, self._clock.now(), actor)
        self._changes.apply(cancelled.transitions)
        return cancelled.result

    async def find(self, where: JobFilter) -> JobPage:
        return await self._store.list_jobs(where)

    async def replay_dead(self, queue: str | None, job_ids: Sequence[str], actor: str) -> list[str]:
        replayed = await self._store.replay_dead(queue, job_ids, self._clock.now(), actor)
        self._changes.apply(replayed.transitions)
        return replayed.result

    async def purge_dead(self, queue: str | None, job_ids: Sequence[str], actor: str) -> int:
        purged = await self._store.purge_dead(queue, job_ids, self._clock.now(), actor)
        self._changes.apply(purged.transitions)
        return purged.result


def _as_of(job: Job, state: JobState) -> Job:
    """The job as it is now, showing a state it passed through since."""
    return replace(job, state=state)
