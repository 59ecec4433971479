"""Streams and credits: push leased jobs to the worker streams that have room.

Each open LeaseStream is a Session with a prefetch window. A session's pump
leases up to its free room (MAX_LEASE_BATCH at a time) whenever it is woken:
a submit to one of its queues, a report that freed a slot, the scheduler, or
the safety net that looks for ready jobs every poll interval, one query for
all idle streams. A session with room for a queue's jobs is instead
claimed by the submit to that queue, which leases for it in the submit's own
transaction (`claim`, then `deliver`): the job reaches the worker without a
second trip to the store.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from jobbroker_server.clock import Clock
from jobbroker_server.domain import limits
from jobbroker_server.domain.errors import ResourceExhausted
from jobbroker_server.domain.models import (
    ErrorInfo,
    Failure,
    Job,
    Lease,
    LeaseAsk,
    LeaseRef,
    ReportResult,
)
from jobbroker_server.domain.states import HELD, JobState
from jobbroker_server.domain.transitions import Reason, Transition
from jobbroker_server.metrics import Metrics
from jobbroker_server.services.changes import Changes
from jobbroker_server.services.failures import log_failure
from jobbroker_server.store import Store

log = logging.getLogger(__name__)

# Most jobs one lease query takes for one stream: a large window is filled by
# several, so no transaction (a submit's, which may lease too) grows with it.
MAX_LEASE_BATCH = 256
# Most queues one round of the safety net looks at.
SAFETY_NET_QUEUES = 500


class CancelReason(enum.StrEnum):
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LEASE_EXPIRED = "lease_expired"


# The transitions whose worker must be told to stop: the broker ended the
# attempt, or a cancel was asked for.
_STOPS = {
    Reason.TIMED_OUT: CancelReason.TIMED_OUT,
    Reason.LEASE_EXPIRED: CancelReason.LEASE_EXPIRED,
    Reason.CANCEL_REQUESTED: CancelReason.CANCELLED,
}


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
    holder: str = ""  # the API key id the stream presented; its leases are bound to it
    reports_starts: bool = True  # False: its jobs' hard timeouts count from the lease
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
        changes: Changes,
        *,
        lease_duration: timedelta,
        poll_interval: timedelta,
        max_streams: int = 1000,
        max_payload_bytes: int = 1024 * 1024,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._changes = changes
        changes.listen(self.on_moved)
        self.lease_duration = lease_duration
        self._poll = poll_interval.total_seconds()
        self._sessions: dict[Session, asyncio.Task[None]] = {}
        self._holder: dict[str, Session] = {}
        self._draining = False
        self._max_streams = max_streams
        # A lease takes at least one job, so the budget holds the largest one.
        self._max_payload = max_payload_bytes
        self._lease_bytes = max(limits.MAX_LEASE_BYTES, max_payload_bytes)
        self._checked = 0  # where the safety net's round of queues goes on
        # The queues leased through their flow limits (store/flow.py), as
        # last known: one learnt late is only leased later, never past its
        # limits (the plain lease passes over it).
        self.limited: set[str] = set()
        self.rated: set[str] = set()  # of those, the ones with a rate of their own
        self.on_rate_spent: Callable[[], None] = lambda: None

    def _limited(self, session: Session) -> tuple[str, ...]:
        limited = self.limited
        return tuple(q for q in session.queues if q in limited) if limited else ()

    def open(
        self,
        worker_id: str,
        queues: Sequence[str],
        prefetch: int,
        holder: str = "",
        reports_starts: bool = True,
    ) -> Session:
        """A session for a new stream. Leases it says it holds from an earlier
        stream are adopted once the store confirms them (``Reports.heartbeat``)."""
        if len(self._sessions) >= self._max_streams:
            raise ResourceExhausted(
                f"this broker serves at most {self._max_streams} lease streams at once "
                "(--max-lease-streams); close idle workers or raise the limit"
            )
        session = Session(worker_id, tuple(queues), prefetch, holder, reports_starts)
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
        # The books first: a cancel that reaches this call while it waits for
        # the pump must not leave the stream counted, or its leases mapped.
        self._forget(session)
        self._metrics.streams.set(len(self._sessions))
        if pump is not None:
            await pump  # it ends at its next wake-up, never mid-lease
            self._forget(session)  # what a lease it finished handed out

    def _forget(self, session: Session) -> None:
        for job_id in session.held:
            if self._holder.get(job_id) is session:
                del self._holder[job_id]

    def set_prefetch(self, session: Session, prefetch: int) -> None:
        session.prefetch = prefetch
        session.wake.set()

    def drain(self) -> None:
        """Stop leasing on every stream: the broker is shutting down."""
        self._draining = True

    def wake(self, queues: Iterable[str]) -> None:
        """Wake every stream of these queues."""
        wanted = set(queues)
        for session in self._sessions:
            if wanted.intersection(session.queues):
                session.wake.set()

    def wake_some(self, ready: Mapping[str, int], but: Iterable[Session] = ()) -> None:
        """Wake as many streams with room as ``ready`` jobs per queue need, not
        every stream of those queues: each woken stream runs a lease query,
        and one job is worth one, not one per open stream."""
        need = {queue: n for queue, n in ready.items() if n > 0}
        skipped = set(but)
        for session in self._sessions:
            if not need:
                return
            if session in skipped or session.closed or not session.wants_more:
                continue
            mine = [queue for queue in session.queues if queue in need]
            if not mine:
                continue
            session.wake.set()
            room = session.room
            for queue in mine:
                taken = min(room, need[queue])
                room -= taken
                need[queue] -= taken
                if need[queue] <= 0:
                    del need[queue]

    def on_moved(self, moved: Sequence[Transition]) -> None:
        """Wake streams for the jobs that became ready (those leased in the
        same operation are not), and tell the workers of ended or cancelled
        attempts to stop."""
        ready: Counter[str] = Counter()
        stops: dict[CancelReason, list[LeaseRef]] = {}
        ran: list[tuple[str, float]] = []
        now = self._clock.monotonic()
        for t in moved:
            if t.source in HELD and t.target not in HELD and t.reason is not Reason.RELEASED:
                session = self._holder.get(t.job_id)
                held = session.held.get(t.job_id) if session is not None else None
                if held is not None:
                    ran.append((t.queue, now - held))
            if t.target is JobState.PENDING and t.source is not JobState.PENDING:
                ready[t.queue] += 1
            elif t.source is JobState.PENDING and t.target is not JobState.PENDING:
                ready[t.queue] -= 1
            stop = _STOPS.get(t.reason)
            if stop is not None:
                stops.setdefault(stop, []).append(LeaseRef(t.job_id, t.token))
        if ran:
            self._metrics.observe(self._metrics.run_seconds, ran)
        # Stops first: a stream whose lease expired is stalled by it, and is
        # not the one woken for the job that went back to pending.
        for reason, refs in stops.items():
            self.cancel(refs, reason)
        if ready:
            self.wake_some(ready)

    def serving(self, queue: str) -> int:
        """How many open streams of this broker lease from ``queue``."""
        return sum(1 for s in self._sessions if not s.closed and queue in s.queues)

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
            room = min(session.room, MAX_LEASE_BATCH)
            session.leasing = True
            claimed[session] = LeaseAsk(
                session.queues,
                room,
                session.worker_id,
                self._lease_bytes,
                session.holder,
                session.reports_starts,
                self._limited(session),
            )
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
            if leased is None or session.rewake or self._full(leases, ask.limit):
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
        """Leases this stream did not hand out, which the store confirmed it
        holds: held from an earlier stream, or reported here after a reconnect.
        (Taken on the stream's word, a stranger naming another's leases would
        take over where their cancellations go.)"""
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
        """Lease for one stream whenever it is woken. An idle stream costs
        nothing: no timer, no query (the safety net in ``run`` looks for it)."""
        while not session.closed:
            await session.wake.wait()
            session.wake.clear()
            if session.leasing:
                session.rewake = True
                continue
            if session.closed or self._draining or not session.wants_more:
                continue
            session.leasing = True
            try:
                full = await self._lease(session)
            except Exception:
                log_failure(log, "leasing for worker %s failed; retrying", session.worker_id)
                full = False
                asyncio.get_running_loop().call_later(self._poll, session.wake.set)
            finally:
                session.leasing = False
            if full:  # there may be more: go on at once, or let another stream
                if session.wants_more:
                    session.wake.set()
                else:
                    self.wake_some(dict.fromkeys(session.queues, 1), but=(session,))

    async def _lease(self, session: Session) -> bool:
        """Lease what fits; True when the batch was full."""
        now = self._clock.now()
        limit = min(session.room, MAX_LEASE_BATCH)
        limited = self._limited(session)
        moved = await self._store.lease_many(
            session.queues,
            limit,
            session.worker_id,
            self.lease_duration,
            now,
            self._lease_bytes,
            session.holder,
            session.reports_starts,
            limited,
        )
        await self._hand_out(session, moved.result, now)
        self._changes.apply(moved.transitions)
        full = self._full(moved.result, limit)
        if not full and any(q in self.rated for q in limited):
            self.on_rate_spent()  # its rate may be spent: the scheduler looks when it refills
        return full

    def _full(self, leases: Sequence[Lease], limit: int) -> bool:
        """Whether a lease may have left jobs it had room for: it took its
        limit, or the next job may not have fitted its bytes."""
        if len(leases) >= limit:
            return True
        taken = sum(len(lease.job.payload.data) for lease in leases)
        return bool(leases) and taken + self._max_payload > self._lease_bytes

    async def run_once(self) -> set[str]:
        """The safety net: wake the streams with room whose queues have ready
        jobs that no wake-up announced (a lock skipped by a lease that another
        replica then rolled back, a notification lost while reconnecting).
        One store call per round, over at most SAFETY_NET_QUEUES queues: a
        client that subscribes to many queues slows the round, not the broker."""
        wanted = list(
            dict.fromkeys(
                queue
                for session in self._sessions
                if not session.closed and not session.leasing and session.wants_more
                for queue in session.queues
            )
        )
        if not wanted or self._draining:
            return set()
        start = self._checked % len(wanted)
        window = (wanted[start:] + wanted[:start])[:SAFETY_NET_QUEUES]
        self._checked = start + len(window)
        ready = await self._store.ready_queues(window)
        if ready:
            self.wake(ready)
        return ready

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.run_once()
            except Exception:
                log_failure(log, "looking for ready jobs failed; retrying")

    async def _hand_out(self, session: Session, leases: list[Lease], now: datetime) -> None:
        if not leases:
            return
        if session.closed:  # the stream went away while the query ran
            refs = [LeaseRef(lease.job.id, lease.fencing_token, session.holder) for lease in leases]
            released = await self._store.release_many(refs, self._clock.now())
            self._changes.apply(released.transitions)
            return
        if any(_size(lease.job) > _DELIVERABLE for lease in leases):
            leases = await self._drop_undeliverable(leases, session.holder, now)
        started = self._clock.monotonic()
        for lease in leases:
            session.held[lease.job.id] = started
            self._holder[lease.job.id] = session
        self._metrics.observe(
            self._metrics.start_latency_seconds,
            ((x.job.queue, max((now - x.job.scheduled_at).total_seconds(), 0.0)) for x in leases),
        )
        session.outbox.put_nowait(Leased(leases))

    async def _drop_undeliverable(
        self, leases: list[Lease], holder: str, now: datetime
    ) -> list[Lease]:
        """Dead-letter the jobs too large for any lease message (stored under a
        larger limit than today's); the rest go on to the worker."""
        kept, failures = [], []
        for lease in leases:
            size = _size(lease.job)
            if size <= _DELIVERABLE:
                kept.append(lease)
                continue
            message = (
                f"the job is {size} bytes, more than the {_DELIVERABLE} a lease message may "
                "carry to a worker: it cannot be delivered"
            )
            ref = LeaseRef(lease.job.id, lease.fencing_token, holder)
            failures.append(Failure(ref, ErrorInfo("Undeliverable", message), permanent=True))
        failed = await self._store.fail_many(failures, now)
        self._changes.apply(failed.transitions)
        log.warning("dead-lettered %d job(s) too large to deliver", len(failures))
        return kept


# A job's bytes in a lease message, but for its small fixed fields: a message
# carries at most limits.MAX_MESSAGE_BYTES, and a job past this never fits.
_DELIVERABLE = limits.MAX_MESSAGE_BYTES - 1024 * 1024


def _size(job: Job) -> int:
    size = len(job.payload.data)
    if job.metadata:
        size += sum(len(key) + len(value) for key, value in job.metadata.items())
    return size
