"""What a worker reports on its stream, applied to the store.

Each report is committed before its Ack is queued; the slots of finished
attempts are freed so the stream's pump can lease more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from jobbroker_server.clock import Clock
from jobbroker_server.domain.errors import STORE_DOWN
from jobbroker_server.domain.models import (
    Completion,
    Failure,
    LeaseRef,
    Progress,
    ReportResult,
    ReportStatus,
)
from jobbroker_server.domain.states import JobState
from jobbroker_server.metrics import Metrics
from jobbroker_server.services.batching import GroupCommit
from jobbroker_server.services.dispatcher import Dispatcher, Session
from jobbroker_server.services.watch import JobWatch
from jobbroker_server.store import Store


class Reports:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        clock: Clock,
        metrics: Metrics,
        watch: JobWatch,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock
        self._metrics = metrics
        self._watch = watch
        self._completions = GroupCommit(self._store_completions, shared_errors=STORE_DOWN)
        self._heartbeats = GroupCommit(self._store_heartbeats, shared_errors=STORE_DOWN)

    async def _store_completions(self, completions: list[Completion]) -> list[ReportResult]:
        return await self._store.complete_many(completions, self._clock.now())

    async def _store_heartbeats(self, leases: list[LeaseRef]) -> list[ReportResult]:
        lease_for = self._dispatcher.lease_duration
        return await self._store.heartbeat_many(leases, lease_for, self._clock.now())

    async def heartbeat(self, session: Session, leases: Sequence[LeaseRef]) -> list[ReportResult]:
        """Extend the leases; those the store confirms are this stream's from now on."""
        results = await self._heartbeats(leases)
        current = zip(leases, results, strict=True)
        self._dispatcher.adopt(session, (ref for ref, r in current if r.status is ReportStatus.OK))
        self._dispatcher.settle(session, _lost(results))
        return results

    async def progress(self, session: Session, report: Progress) -> list[ReportResult]:
        result = await self._store.progress(report, self._clock.now())
        self._dispatcher.settle(session, _lost([result]))
        return [result]

    async def complete(
        self, session: Session, completions: Sequence[Completion]
    ) -> list[ReportResult]:
        results = await self._completions(completions)
        self._finish(session, results)
        return results

    async def fail(self, session: Session, failures: Sequence[Failure]) -> list[ReportResult]:
        results = await self._store.fail_many(failures, self._clock.now())
        self._finish(session, results)
        return results

    async def release(self, session: Session, leases: Sequence[LeaseRef]) -> list[ReportResult]:
        results = await self._store.release_many(leases, self._clock.now())
        self._finish(session, results, counted=False)  # it wakes the queues they went back to
        return results

    def _finish(
        self, session: Session, results: Sequence[ReportResult], *, counted: bool = True
    ) -> None:
        freed = self._dispatcher.settle(session, (r.job_id for r in results))
        moved = [
            (r.job_id, r.queue, r.state)
            for r in results
            if r.status is ReportStatus.OK and r.state is not None
        ]
        self._watch.publish((job_id, state) for job_id, _, state in moved)
        if counted:
            now = self._clock.monotonic()
            self._metrics.observe(
                self._metrics.run_seconds,
                ((queue, now - freed[job_id]) for job_id, queue, _ in moved if job_id in freed),
            )
            self._metrics.count_outcomes((queue, state) for _, queue, state in moved)
        retried = Counter(r.queue for r in results if r.state is JobState.PENDING)
        if retried:
            self._dispatcher.wake_some(retried)


def _lost(results: Sequence[ReportResult]) -> list[str]:
    return [r.job_id for r in results if r.status is not ReportStatus.OK]
