"""The store contract: one method per thing the broker does, each one transaction.

Every method that changes jobs takes ``now`` from the caller's clock, moves jobs
only along the edges of ``domain.states``, and has committed before it returns.
One that moves jobs returns ``Moved``: its result, and the transitions it made,
which it wrote to the job event log in the same transaction; the broker applies
their consequences in one place (``services.changes``).
A write that needs a lease names the job, state running and the fencing token in
its WHERE clause: zero rows changed means the lease was lost.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from jobbroker_server.domain import limits
from jobbroker_server.domain.flow import SweepCursor
from jobbroker_server.domain.keys import ApiKey
from jobbroker_server.domain.models import (
    Completion,
    Failure,
    Job,
    JobFacts,
    JobFilter,
    JobPage,
    Lease,
    LeaseAsk,
    LeaseRef,
    NewJob,
    Progress,
    ReportResult,
    SubmitResult,
)
from jobbroker_server.domain.queues import QueueDefaults, QueueSettings
from jobbroker_server.domain.schedules import Schedule, Tick
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import JobEvent, LogPosition, Moved


class Store(abc.ABC):
    # Whether other processes change jobs too: then a change can happen that
    # this process does not see, and its waiters must look for themselves.
    shared = False

    @abc.abstractmethod
    async def migrate(self) -> int:
        """Bring the schema to this broker's version and return it; refuse
        (SchemaTooNew) a schema newer than this broker."""

    @abc.abstractmethod
    async def listen(self, on_ready: Callable[[str], None]) -> None:
        """Call ``on_ready(queue)`` whenever another process makes a job of that
        queue ready. A store that only this process uses has nothing to hear."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def submit_many(
        self, jobs: Sequence[NewJob], now: datetime, dedup_window: timedelta
    ) -> Moved[list[SubmitResult]]:
        """Store jobs all-or-nothing. A job whose idempotency key matches one
        created inside ``dedup_window``, or whose unique key an unfinished job
        holds, is not stored; its result names the existing job with
        ``duplicate=True``. An idempotency key sent with another payload, task
        or queue than its job's is refused (KeyReused)."""

    @abc.abstractmethod
    async def lease_many(
        self,
        queues: Sequence[str],
        limit: int,
        worker_id: str,
        lease_for: timedelta,
        now: datetime,
        max_bytes: int = limits.MAX_LEASE_BYTES,
        holder: str = "",
        reports_starts: bool = True,
        limited: Sequence[str] = (),
    ) -> Moved[list[Lease]]:
        """Move up to ``limit`` pending jobs of ``queues`` to leased, highest
        priority first and FIFO within a priority, each with a new fencing token
        (larger than the last by a random step) and bound to the API key
        ``holder``; no more than fit ``max_bytes`` of payload, but always one.
        For a stream that does not report starts, a job's hard timeout counts
        from now."""

    @abc.abstractmethod
    async def submit_and_lease(
        self,
        jobs: Sequence[NewJob],
        now: datetime,
        dedup_window: timedelta,
        asks: Sequence[LeaseAsk],
        lease_for: timedelta,
    ) -> Moved[tuple[list[SubmitResult], list[list[Lease]]]]:
        """``submit_many``, then ``lease_many`` for each ask, in one transaction:
        a worker stream waiting for these queues gets its jobs without a second
        trip to the store. Returns the submit results and each ask's leases."""

    @abc.abstractmethod
    async def heartbeat_many(
        self, leases: Sequence[LeaseRef], lease_for: timedelta, now: datetime
    ) -> list[ReportResult]:
        """Extend each lease that is still current to ``now + lease_for``."""

    @abc.abstractmethod
    async def start_many(
        self, leases: Sequence[LeaseRef], now: datetime
    ) -> Moved[list[ReportResult]]:
        """The handlers of these leased jobs started: move them to running,
        their hard timeouts counting from ``now``."""

    @abc.abstractmethod
    async def progress(
        self, report: Progress, lease_for: timedelta, now: datetime
    ) -> Moved[ReportResult]:
        """Record how far the job is, and renew its lease as a heartbeat does."""

    @abc.abstractmethod
    async def complete_many(
        self, completions: Sequence[Completion], now: datetime
    ) -> Moved[list[ReportResult]]:
        """Succeed each job; one whose start was not reported started its
        completion's ``run_time`` before ``now``."""

    @abc.abstractmethod
    async def fail_many(
        self, failures: Sequence[Failure], now: datetime
    ) -> Moved[list[ReportResult]]:
        """Retry (with backoff, or after ``retry_after``) or dead-letter each job;
        a cancelled failure ends the job cancelled."""

    @abc.abstractmethod
    async def release_many(
        self, leases: Sequence[LeaseRef], now: datetime
    ) -> Moved[list[ReportResult]]:
        """Hand jobs back to pending without counting the attempt."""

    @abc.abstractmethod
    async def cancel(self, job_id: str, now: datetime, actor: str = "client") -> Moved[Job]:
        """Cancel a pending or scheduled job at once. A held job is marked
        (cancel_requested, once) and otherwise unchanged: its worker is asked
        to stop it, and its attempt ends cancelled. Raises NotFound, or
        IllegalTransition for a finished job."""

    @abc.abstractmethod
    async def cancel_workflow(self, workflow_id: str, now: datetime, actor: str) -> Moved[int]:
        """Cancel every job of a workflow that has not ended, as ``cancel``
        does each; how many. Raises NotFound for a workflow without jobs."""

    @abc.abstractmethod
    async def reap_expired(self, now: datetime) -> Moved[int]:
        """End every held attempt whose lease expired, or running one whose
        hard timeout passed, and retry or dead-letter its job; how many."""

    @abc.abstractmethod
    async def promote_scheduled(self, now: datetime) -> Moved[int]:
        """Move scheduled jobs whose time has come to pending; how many."""

    @abc.abstractmethod
    async def next_scheduled_at(self) -> datetime | None:
        """When the next scheduled job is due, or the next rate budget that
        jobs or streams wait on (``store/flow.py``)."""

    @abc.abstractmethod
    async def reopen_limits(self, now: datetime) -> Moved[set[str]]:
        """Let through the jobs held back by rate limits whose next budget is
        due; returns the queues whose own rate reopened."""

    @abc.abstractmethod
    async def sweep_limits(self, now: datetime, after: SweepCursor) -> Moved[SweepCursor]:
        """Let through held-back jobs that no end or budget will, a few keys
        from ``after`` on; returns where the next sweep goes on."""

    @abc.abstractmethod
    async def get_job(self, job_id: str, *, history: bool = True) -> Job:
        """Raises NotFound."""

    @abc.abstractmethod
    async def list_jobs(self, where: JobFilter) -> JobPage: ...

    @abc.abstractmethod
    async def explain_job(self, job_id: str, now: datetime) -> JobFacts:
        """The job (no history), the pending jobs ahead of it, its last lease,
        and the flow limit that holds it back, if one does."""

    @abc.abstractmethod
    async def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        """Up to ``limit`` of the job's events after sequence number ``after``,
        oldest first: each transition an operation made, and each progress
        report, appended in that operation's transaction. Raises NotFound."""

    @abc.abstractmethod
    async def tail_from(self, after: int) -> LogPosition:
        """Where a tail of the whole log starts: after event ``after``, or at
        the end of the log for 0."""

    @abc.abstractmethod
    async def tail_events(
        self, at: LogPosition, queue: str | None, task: str | None, limit: int
    ) -> tuple[list[JobEvent], LogPosition]:
        """Up to ``limit`` events of every job after ``at`` in the order they
        committed, of ``queue``'s or ``task``'s jobs when given; and where
        the next read goes on."""

    @abc.abstractmethod
    async def replay_dead(
        self, queue: str | None, job_ids: Sequence[str], now: datetime, actor: str = "client"
    ) -> Moved[list[str]]:
        """Put dead jobs back to pending with fresh attempts; an empty
        ``job_ids`` means every dead job (of ``queue`` when given)."""

    @abc.abstractmethod
    async def purge_dead(
        self, queue: str | None, job_ids: Sequence[str], now: datetime, actor: str = "client"
    ) -> Moved[int]: ...

    @abc.abstractmethod
    async def delete_finished(self, before: datetime, limit: int) -> Moved[int]:
        """Delete up to ``limit`` succeeded or cancelled jobs finished before
        ``before``; dead jobs stay until replayed or purged."""

    @abc.abstractmethod
    async def queue_depths(self, max_queues: int) -> dict[tuple[str | None, JobState], int]:
        """Jobs waiting, running or dead, by queue for the first ``max_queues``
        queues (in name order), and by state alone (queue None) for the rest."""

    @abc.abstractmethod
    async def ready_queues(self, queues: Sequence[str]) -> set[str]:
        """Which of ``queues`` have a pending job: one index seek per queue."""

    @abc.abstractmethod
    async def probe_write(self, broker: str, now: datetime) -> None:
        """Record that ``broker`` wrote at ``now``, and commit: raises whatever
        keeps the store from taking writes (unreachable, disk full, read-only)."""

    @abc.abstractmethod
    async def create_key(self, key: ApiKey) -> None:
        """Store a new key; KeyNameTaken while a valid key has its name."""

    @abc.abstractmethod
    async def list_keys(self, include_revoked: bool = False) -> list[ApiKey]:
        """Keys in the order they were made: the valid ones, or all."""

    @abc.abstractmethod
    async def revoke_key(self, id_or_name: str, now: datetime) -> ApiKey:
        """Revoke the valid key of that id, else of that name; raises NotFound."""

    # --- schedules (store/schedules.py) ---

    @abc.abstractmethod
    async def put_schedule(
        self, schedule: Schedule, now: datetime, max_schedules: int
    ) -> tuple[Schedule, bool]:
        """Register by name: store it, or change the definition of the one of
        that name (its paused state, runs and, for the same timing, next tick
        kept); whether anything changed. ResourceExhausted past ``max_schedules``."""

    @abc.abstractmethod
    async def get_schedule(self, name: str) -> Schedule:
        """Raises NotFound."""

    @abc.abstractmethod
    async def list_schedules(self, after: str | None, limit: int) -> list[Schedule]:
        """In name order, after ``after``."""

    @abc.abstractmethod
    async def set_schedule_paused(self, name: str, paused: bool, now: datetime) -> Schedule:
        """Raises NotFound."""

    @abc.abstractmethod
    async def delete_schedule(self, name: str) -> None:
        """Raises NotFound."""

    @abc.abstractmethod
    async def due_schedules(self, now: datetime, limit: int) -> list[Schedule]: ...

    @abc.abstractmethod
    async def next_tick_at(self) -> datetime | None: ...

    @abc.abstractmethod
    async def take_tick(
        self,
        name: str,
        due: datetime,
        tick: Tick,
        job: NewJob | None,
        now: datetime,
        dedup_window: timedelta,
    ) -> Moved[str | None]:
        """If ``due`` is still the schedule's next tick, move it on to
        ``tick.next_run_at`` and store ``job`` in the same transaction; the
        id of the job stored, or None (skipped, or taken already)."""

    @abc.abstractmethod
    async def list_queues(self) -> list[QueueSettings]:
        """Every queue that has settings of its own, by name."""

    @abc.abstractmethod
    async def set_queue_defaults(
        self, name: str, defaults: QueueDefaults, now: datetime
    ) -> QueueSettings:
        """Replace a queue's job defaults; RESOURCE_EXHAUSTED past MAX_QUEUE_SETTINGS."""

    @abc.abstractmethod
    async def set_queue_paused(
        self, name: str, paused: bool, actor: str, now: datetime
    ) -> QueueSettings:
        """Pause (no job of it is leased from the commit on, on any replica) or resume."""
