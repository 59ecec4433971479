"""What a worker reports on its stream, applied to the store.

Each report is committed before its Ack is queued; the slots of finished
attempts are freed so the stream's pump can lease more.
"""

from __future__ import annotations

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
from jobbroker_server.services.batching import GroupCommit
from jobbroker_server.services.changes import Changes
from jobbroker_server.services.dispatcher import Dispatcher, Session
from jobbroker_server.store import Store


class Reports:
    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        clock: Clock,
        changes: Changes,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._clock = clock
        self._changes = changes
        self._completions = GroupCommit(self._store_completions, shared_errors=STORE_DOWN)
        self._heartbeats = GroupCommit(self._store_heartbeats, shared_errors=STORE_DOWN)

    async def _store_completions(self, completions: list[Completion]) -> list[ReportResult]:
        done = await self._store.complete_many(completions, self._clock.now())
        self._changes.apply(done.transitions)
        return done.result

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

    async def start(self, session: Session, leases: Sequence[LeaseRef]) -> list[ReportResult]:
        started = await self._store.start_many(leases, self._clock.now())
        self._changes.apply(started.transitions)
        self._dispatcher.settle(session, _lost(started.result))
        return started.result

    async def progress(self, session: Session, report: Progress) -> list[ReportResult]:
        lease_for = self._dispatcher.lease_duration
        reported = await self._store.progress(report, lease_for, self._clock.now())
        self._changes.apply(reported.transitions)
        self._dispatcher.settle(session, _lost([reported.result]))
        return [reported.result]

    async def complete(
        self, session: Session, completions: Sequence[Completion]
    ) -> list[ReportResult]:
        results = await self._completions(completions)
        self._finish(session, results)
        return results

    async def fail(self, session: Session, failures: Sequence[Failure]) -> list[ReportResult]:
        failed = await self._store.fail_many(failures, self._clock.now())
        self._changes.apply(failed.transitions)
        self._finish(session, failed.result)
        return failed.result

    async def release(self, session: Session, leases: Sequence[LeaseRef]) -> list[ReportResult]:
        released = await self._store.release_many(leases, self._clock.now())
        self._changes.apply(released.transitions)
        self._finish(session, released.result)
        return released.result

    def _finish(self, session: Session, results: Sequence[ReportResult]) -> None:
        """Free the stream's slots of the reported jobs."""
        self._dispatcher.settle(session, (r.job_id for r in results))


def _lost(results: Sequence[ReportResult]) -> list[str]:
    return [r.job_id for r in results if r.status is not ReportStatus.OK]
