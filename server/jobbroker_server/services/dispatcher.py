"""Streams and credits: push leased jobs to the worker streams that have room.

Each open LeaseStream is a Session with a prefetch window. A session's pump
leases up to its free room in one query whenever it is woken (a submit to one
of its queues, a report that freed a slot, the scheduler) or, as a safety net,
every poll interval. A session with room for a queue's jobs is instead
claimed by the submit to that queue, which leases for it in the submit's own
transaction (`claim`, then `deliver`): the job reaches the worker without a
second trip to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain.models import Lease, LeaseAsk, LeaseRef, ReportResult
from jobbroker_server.domain.states import JobState
from jobbroker_server.metrics import Metrics
from jobbroker_server.services.watch import JobWatch
from jobbroker_server.store import Store

log = logging.getLogger(__name__)


class CancelReason(enum.StrEnum):
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LEASE_EXPIRED = "lease_expired"


@dataclass(frozen=True, slots=True)
class Leased:
    leases: list[Lease]


@dataclass(frozen=True, slots=True)
class Acked:
    seq: int
    results: list[ReportResult]


@dataclass(frozen=True, slots=True)
class Cancel:
    leases: list[LeaseRef]
    reason: CancelReason


Outgoing = Leased | Acked | Cancel


@dataclass(eq=False)
class Session:
    worker_id: str
    queues: tuple[str, ...]
    prefetch: int
    held: dict[str, float] = field(default_factory=dict)  # job id -> leased at (monotonic)
    outbox: asyncio.Queue[Outgoing] = field(default_factory=asyncio.Queue)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    # A lease of this stream expired: its worker may be frozen. No more jobs
    # until it shows life (any report), or the retries would go back to it.
    stalled: bool = False
    leasing: bool = False  # a lease for it is on the way: lease no more meanwhile
    rewake: bool = False  # woken while leasing: look again when that lease is in

    @property
    def room(self) -> int:
        return self.prefetch - len(self.held)

    @property
    def wants_more(self) -> bool:
        """Lease in batches: wait until a quarter of the window is free (an
        idle worker's whole window is), so one query serves many jobs."""
        if self.stalled or self.room <= 0:
            return False
        return self.room >= self.prefetch // 4 or not self.held


class Dispatcher:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        metrics: Metrics,
        watch: JobWatch,
        *,
        lease_duration: timedelta,
        poll_interval: timedelta,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._watch = watch
        self.lease_duration = lease_duration
        self._poll = poll_interval.total_seconds()
        self._sessions: dict[Session, asyncio.Task[None]] = {}
        self._holder: dict[str, Session] = {}
        self._draining = False

    def open(
        self, worker_id: str, queues: Sequence[str], prefetch: int, held: Iterable[LeaseRef]
    ) -> Session:
        session = Session(worker_id, tuple(queues), prefetch)
        self.adopt(session, held)
        self._sessions[session] = asyncio.create_task(self._pump(session))
        self._metrics.streams.set(len(self._sessions))
        session.wake.set()
        return session

    async def close(self, session: Session) -> None:
        """The stream ended. Its leases stay running until they are reported
        on another stream or expire: the worker may only have reconnected."""
        session.closed = True
        session.wake.set()
        pump = self._sessions.pop(session, None)
        if pump is not None:
            await pump  # it ends at its next wake-up, never mid-lease
        for job_id in session.held:
            if self._holder.get(job_id) is session:
                del self._holder[job_id]
        self._metrics.streams.set(len(self._sessions))

    def set_prefetch(self, session: Session, prefetch: int) -> None:
        session.prefetch = prefetch
        session.wake.set()

    def drain(self) -> None:
        """Stop leasing on every stream: the broker is shutting down."""
        self._draining = True

    def wake(self, queues: Iterable[str] | None = None, but: Iterable[Session] = ()) -> None:
        wanted = None if queues is None else set(queues)
        skipped = set(but)
        for session in self._sessions:
            if session in skipped:
                continue
            if wanted is None or wanted.intersection(session.queues):
                session.wake.set()

    def claim(self, ready: Mapping[str, int]) -> dict[Session, LeaseAsk]:
        """Sessions with room (`wants_more`) to fill in the transaction that
        stores `ready` (jobs per queue), as many as those jobs need; each is
        claimed until `deliver`."""
        if self._draining:
            return {}
        needed = dict(ready)
        claimed = {}
        for session in self._sessions:
            if session.closed or session.leasing or not session.wants_more:
                continue
            if not any(needed.get(queue, 0) > 0 for queue in session.queues):
                continue
            room = session.room
            session.leasing = True
            claimed[session] = LeaseAsk(session.queues, room, session.worker_id)
            for queue in session.queues:
                taken = min(room, needed.get(queue, 0))
                needed[queue] = needed.get(queue, 0) - taken
                room -= taken
        return claimed

    async def deliver(
        self,
        claimed: Mapping[Session, LeaseAsk],
        leased: Sequence[list[Lease]] | None,
        now: datetime,
    ) -> None:
        """Hand out what the claiming transaction leased for each claimed
        session; None if it failed, and their pumps take over again."""
        handed = leased if leased is not None else [[] for _ in claimed]
        for session in claimed:
            session.leasing = False
        for (session, ask), leases in zip(claimed.items(), handed, strict=True):
            try:
                await self._hand_out(session, leases, now)
            except Exception:  # releasing a closed stream's leases: they expire instead
                log.exception("handing leases to worker %s failed", session.worker_id)
            if leased is None or session.rewake or len(leases) >= ask.limit:
                session.rewake = False  # there may be more for it: look again
                session.wake.set()

    def settle(self, session: Session, job_ids: Iterable[str]) -> dict[str, float]:
        """Free the slots of reported jobs; return what the session held of them."""
        freed = {}
        for job_id in job_ids:
            held = session.held.pop(job_id, None)
            if held is not None:
                freed[job_id] = held
                if self._holder.get(job_id) is session:
                    del self._holder[job_id]
        if freed:
            session.wake.set()
        return freed

    def adopt(self, session: Session, refs: Iterable[LeaseRef]) -> None:
        """Leases this stream did not hand out: held from an earlier stream, or
        reported here after a reconnect."""
        now = self._clock.monotonic()
        for ref in refs:
            if ref.job_id not in session.held:
                session.held[ref.job_id] = now
                self._holder[ref.job_id] = session

    def cancel(self, refs: Iterable[LeaseRef], reason: CancelReason) -> None:
        """Tell the streams holding these leases to stop running them."""
        by_session: dict[Session, list[LeaseRef]] = {}
        for ref in refs:
            session = self._holder.get(ref.job_id)
            if session is not None:
                by_session.setdefault(session, []).append(ref)
        # The slots stay taken until the worker reports (and is refused): a
        # worker told to stop may still be busy with the job.
        for session, mine in by_session.items():
            session.outbox.put_nowait(Cancel(mine, reason))
            if reason is CancelReason.LEASE_EXPIRED:
                session.stalled = True

    def alive(self, session: Session) -> None:
        """The worker reported: it is not frozen."""
        if session.stalled:
            session.stalled = False
            session.wake.set()

    async def _pump(self, session: Session) -> None:
        while not session.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.wake.wait(), self._poll)
            session.wake.clear()
            if session.leasing:
                session.rewake = True
                continue
            if session.closed or self._draining or not session.wants_more:
                continue
            session.leasing = True
            try:
                await self._lease(session)
            except Exception:
                log.exception("leasing for worker %s failed; retrying", session.worker_id)
            finally:
                session.leasing = False

    async def _lease(self, session: Session) -> None:
        now = self._clock.now()
        leases = await self._store.lease_many(
            session.queues, session.room, session.worker_id, self.lease_duration, now
        )
        await self._hand_out(session, leases, now)

    async def _hand_out(self, session: Session, leases: list[Lease], now: datetime) -> None:
        if not leases:
            return
        if session.closed:  # the stream went away while the query ran
            refs = [LeaseRef(lease.job.id, lease.fencing_token) for lease in leases]
            await self._store.release_many(refs, self._clock.now())
            return
        started = self._clock.monotonic()
        for lease in leases:
            session.held[lease.job.id] = started
            self._holder[lease.job.id] = session
        self._metrics.observe(
            self._metrics.start_latency_seconds,
            ((x.job.queue, max((now - x.job.scheduled_at).total_seconds(), 0.0)) for x in leases),
        )
        self._metrics.count(self._metrics.leased, (lease.job.queue for lease in leases))
        self._watch.publish((lease.job.id, JobState.RUNNING) for lease in leases)
        session.outbox.put_nowait(Leased(leases))
