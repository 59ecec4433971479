"""The store contract, run against a real database (SQLite file; PostgreSQL too
when configured). Each operation must move jobs only along allowed edges."""

from __future__ import annotations

import asyncio
import math
import re
import sqlite3
import time
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from jobbroker_server.domain.errors import IllegalTransition, KeyReused, NotFound, UniqueKeyTaken
from jobbroker_server.domain.ids import new_job_id
from jobbroker_server.domain.limits import MAX_LEASE_BYTES
from jobbroker_server.domain.models import (
    AttemptOutcome,
    Completion,
    ErrorInfo,
    Failure,
    Job,
    JobFilter,
    Lease,
    LeaseAsk,
    LeaseRef,
    NewJob,
    Payload,
    Progress,
    ReportStatus,
    SubmitResult,
)
from jobbroker_server.domain.retry import RetryPolicy
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import Moved, Reason, Transition
from jobbroker_server.domain.transitions import check as check_transition
from jobbroker_server.store import Store, open_store
from jobbroker_server.store import sqlite as sqlite_store
from jobbroker_server.store.postgres import engine_url
from jobbroker_server.store.sqlite import BUSY_TIMEOUT_MS

from .waiting import wait_for

T = TypeVar("T")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
LEASE = timedelta(seconds=30)
WINDOW = timedelta(hours=1)


class CheckedStore:
    """The store, with every operation that moves jobs held to its word: each
    transition it returns is allowed by the state table and by its reason, the
    transitions of one job chain (each starts where the one before ended), and
    the last leaves the job's row in the state it names (or deleted). The
    operation's result is returned as the store returns it without the seam,
    and its transitions are kept in ``moved``."""

    def __init__(self, store: Store) -> None:
        self.raw = store
        self.moved: list[Transition] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.raw, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        async def checked(*args: Any, **kwargs: Any) -> Any:
            out = await method(*args, **kwargs)
            if not isinstance(out, Moved):
                return out
            await self._check(out.transitions)
            self.moved += out.transitions
            return out.result

        return checked

    async def _check(self, transitions: list[Transition]) -> None:
        last: dict[str, Transition] = {}
        for t in transitions:
            check_transition(t)
            if t.job_id in last:
                assert last[t.job_id].target is t.source, (last[t.job_id], t)
            last[t.job_id] = t
        for job_id, t in last.items():
            if t.target is None:
                with pytest.raises(NotFound):
                    await self.raw.get_job(job_id, history=False)
                continue
            row = await self.raw.get_job(job_id, history=False)
            assert row.state is t.target, (t, row.state)
            assert row.queue == t.queue


class Harness:
    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = CheckedStore(store)
        self.loop = loop

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def moved_to(self, job_id: str) -> JobState | None:
        """The state the latest operation on the job left it in."""
        return [t for t in self.store.moved if t.job_id == job_id][-1].target


@pytest.fixture
def db(database: str) -> Iterator[Harness]:
    loop = asyncio.new_event_loop()
    store = open_store(database)
    loop.run_until_complete(store.migrate())
    harness = Harness(store, loop)
    yield harness
    loop.run_until_complete(store.close())
    loop.close()


def job(
    queue: str = "q",
    *,
    priority: int = 0,
    run_at: datetime | None = None,
    key: str | None = None,
    max_attempts: int = 3,
    timeout: timedelta | None = None,
    payload: bytes = b"{}",
    unique: str | None = None,
) -> NewJob:
    return NewJob(
        id=new_job_id(),
        queue=queue,
        task="t",
        payload=Payload(payload),
        priority=priority,
        run_at=run_at,
        retry=RetryPolicy(max_attempts=max_attempts, backoff_base=timedelta(seconds=10), jitter=0),
        timeout=timeout,
        soft_timeout=None,
        idempotency_key=key,
        unique_key=unique,
    )


def ref(leases: list[Lease], held: NewJob | Job) -> LeaseRef:
    """The lease on ``held`` among ``leases``: its token is not a count to guess."""
    [lease] = [x for x in leases if x.job.id == held.id]
    return LeaseRef(held.id, lease.fencing_token)


def test_lease_takes_highest_priority_first_then_fifo(db: Harness) -> None:
    jobs = [job(priority=p) for p in (0, 5, 0, 5, 1)]
    db(db.store.submit_many(jobs, T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 10, "w", LEASE, T0))
    got = [lease.job.id for lease in leases]
    assert got == [jobs[1].id, jobs[3].id, jobs[4].id, jobs[0].id, jobs[2].id]
    assert all(lease.job.state is JobState.LEASED for lease in leases)
    assert db(db.store.lease_many(["q"], 10, "w", LEASE, T0)) == []


def test_a_new_job_is_stored_with_what_it_was_given_and_nothing_run_yet(db: Harness) -> None:
    new = job(key="k-1", timeout=timedelta(seconds=5))
    db(db.store.submit_many([new], T0, WINDOW))
    stored = db(db.store.get_job(new.id))
    assert (stored.queue, stored.task, stored.payload, stored.idempotency_key) == (
        "q",
        "t",
        Payload(b"{}"),
        "k-1",
    )
    assert stored.timeout == timedelta(seconds=5) and stored.retry == new.retry
    assert stored.state is JobState.PENDING and stored.created_at == T0
    assert (stored.attempts, stored.progress, stored.progress_message) == (0, 0.0, "")
    assert (stored.fencing_token, stored.history) == (0, ())
    assert stored.started_at is None and stored.finished_at is None
    assert stored.result is None and stored.last_error is None
    assert stored.lease_expires_at is None
    assert db(db.store.lease_many(["q"], 1, "w", LEASE, T0))[0].job.id == new.id


def test_submit_and_lease_fills_each_ask_in_the_same_transaction(db: Harness) -> None:
    older = job(priority=0)
    db(db.store.submit_many([older], T0, WINDOW))
    urgent, plain, later = job(priority=5), job(priority=0), job(run_at=T0 + timedelta(hours=1))
    asks = [
        LeaseAsk(("q",), 2, "w1", MAX_LEASE_BYTES),
        LeaseAsk(("other", "q"), 5, "w2", MAX_LEASE_BYTES),
    ]
    results, leased = db(db.store.submit_and_lease([urgent, plain, later], T0, WINDOW, asks, LEASE))
    assert [r.state for r in results] == [JobState.PENDING, JobState.PENDING, JobState.SCHEDULED]
    # Each ask is served in order, highest priority first, then FIFO: the
    # job already waiting goes before the new one of its priority.
    assert [[x.job.id for x in leases] for leases in leased] == [[urgent.id, older.id], [plain.id]]
    assert all(x.job.state is JobState.LEASED and x.fencing_token >= 1 for x in leased[1])
    assert db(db.store.get_job(later.id)).state is JobState.SCHEDULED
    assert db(db.store.lease_many(["q"], 10, "w", LEASE, T0)) == []


def test_lease_respects_the_limit_and_the_queues(db: Harness) -> None:
    db(db.store.submit_many([job("a"), job("a"), job("b")], T0, WINDOW))
    assert len(db(db.store.lease_many(["a"], 1, "w", LEASE, T0))) == 1
    assert [x.job.queue for x in db(db.store.lease_many(["b"], 5, "w", LEASE, T0))] == ["b"]


def test_delayed_job_waits_for_the_scheduler(db: Harness) -> None:
    [r] = db(db.store.submit_many([job(run_at=T0 + timedelta(minutes=5))], T0, WINDOW))
    assert r.state is JobState.SCHEDULED
    assert db(db.store.lease_many(["q"], 1, "w", LEASE, T0)) == []
    assert db(db.store.next_scheduled_at()) == T0 + timedelta(minutes=5)
    assert db(db.store.promote_scheduled(T0 + timedelta(minutes=4))) == 0
    assert db(db.store.promote_scheduled(T0 + timedelta(minutes=5))) == 1
    assert db.moved_to(r.job_id) is JobState.PENDING
    assert len(db(db.store.lease_many(["q"], 1, "w", LEASE, T0))) == 1


def test_stale_fencing_token_changes_nothing(db: Harness) -> None:
    db(db.store.submit_many([job()], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    stale = LeaseRef(lease.job.id, lease.fencing_token - 1)
    [done] = db(db.store.complete_many([Completion(stale, Payload(b"1"))], T0))
    assert done.status is ReportStatus.LEASE_LOST
    [beat] = db(db.store.heartbeat_many([stale], LEASE, T0))
    assert beat.status is ReportStatus.LEASE_LOST
    after = db(db.store.get_job(lease.job.id))
    assert after.state is JobState.LEASED and after.result is None
    current = LeaseRef(lease.job.id, lease.fencing_token)
    [ok] = db(db.store.complete_many([Completion(current, Payload(b"1"))], T0))
    assert ok.status is ReportStatus.OK and db.moved_to(lease.job.id) is JobState.SUCCEEDED
    [again] = db(db.store.complete_many([Completion(current, Payload(b"2"))], T0))
    assert again.status is ReportStatus.LEASE_LOST
    assert db(db.store.get_job(lease.job.id)).result == Payload(b"1")


def test_unknown_job_reports_not_found(db: Harness) -> None:
    [r] = db(db.store.heartbeat_many([LeaseRef("nope", 1)], LEASE, T0))
    assert r.status is ReportStatus.NOT_FOUND
    with pytest.raises(NotFound, match="nope"):
        db(db.store.get_job("nope"))


def test_failures_back_off_then_dead_letter_with_history(db: Harness) -> None:
    [r] = db(db.store.submit_many([job(max_attempts=2)], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w1", LEASE, T0))
    ref = LeaseRef(r.job_id, lease.fencing_token)
    [f1] = db(db.store.fail_many([Failure(ref, ErrorInfo("E", "one"))], T0))
    assert f1.status is ReportStatus.OK and db.moved_to(r.job_id) is JobState.SCHEDULED
    assert db(db.store.get_job(r.job_id)).scheduled_at == T0 + timedelta(seconds=10)
    db(db.store.promote_scheduled(T0 + timedelta(seconds=10)))
    [lease2] = db(db.store.lease_many(["q"], 1, "w2", LEASE, T0))
    ref2 = LeaseRef(r.job_id, lease2.fencing_token)
    [f2] = db(db.store.fail_many([Failure(ref2, ErrorInfo("E", "two", "tb"))], T0))
    assert f2.status is ReportStatus.OK and db.moved_to(r.job_id) is JobState.DEAD
    dead = db(db.store.get_job(r.job_id))
    assert dead.attempts == 2 and dead.last_error == ErrorInfo("E", "two", "tb")
    assert [(a.worker_id, a.outcome, a.error.message if a.error else "") for a in dead.history] == [
        ("w1", AttemptOutcome.FAILED, "one"),
        ("w2", AttemptOutcome.FAILED, "two"),
    ]
    assert [j.id for j in db(db.store.list_jobs(JobFilter(states=(JobState.DEAD,)))).jobs] == [
        r.job_id
    ]
    assert db(db.store.replay_dead(None, [], T0)) == [r.job_id]
    replayed = db(db.store.get_job(r.job_id))
    assert replayed.state is JobState.PENDING and replayed.attempts == 0
    assert len(replayed.history) == 2  # the history survives a replay


def test_permanent_failure_skips_retries(db: Harness) -> None:
    [r] = db(db.store.submit_many([job(max_attempts=5)], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    ref = LeaseRef(r.job_id, lease.fencing_token)
    [f] = db(db.store.fail_many([Failure(ref, ErrorInfo("E", "x"), permanent=True)], T0))
    assert f.status is ReportStatus.OK and db.moved_to(r.job_id) is JobState.DEAD


def test_idempotency_key_returns_the_existing_job_inside_the_window(db: Harness) -> None:
    first, dup, _other = db(db.store.submit_many([job(key="k"), job(key="k"), job()], T0, WINDOW))
    assert not first.duplicate and dup.duplicate and dup.job_id == first.job_id
    [later] = db(db.store.submit_many([job(key="k")], T0 + timedelta(minutes=59), WINDOW))
    assert later.duplicate and later.job_id == first.job_id
    [fresh] = db(db.store.submit_many([job(key="k")], T0 + timedelta(hours=2), WINDOW))
    assert not fresh.duplicate and fresh.job_id != first.job_id


def test_an_idempotency_key_sent_with_another_job_is_refused(db: Harness) -> None:
    """Within the window the key's job must be the one sent again: the same
    JSON value (in any key order) is a duplicate, another payload, queue or
    task a refusal; past the window the key is free for anything."""
    [first] = db(db.store.submit_many([job(key="k", payload=b'{"a": 1, "b": 2}')], T0, WINDOW))
    [same] = db(db.store.submit_many([job(key="k", payload=b'{"b":2,"a":1}')], T0, WINDOW))
    assert same.duplicate and same.job_id == first.job_id
    for other, what in (
        (job(key="k", payload=b'{"a": 3}'), "payload"),
        (job("q2", key="k", payload=b'{"a": 1, "b": 2}'), "queue ('q')"),
        (replace(job(key="k", payload=b'{"a": 1, "b": 2}'), task="t2"), "task ('t')"),
    ):
        expected = f"idempotency key 'k' was used for job {first.job_id} with a different {what}"
        with pytest.raises(KeyReused, match=re.escape(expected + "; use a new key")):
            db(db.store.submit_many([job(), other], T0, WINDOW))
    assert len(db(db.store.list_jobs(JobFilter(limit=10))).jobs) == 1  # all or nothing
    later = T0 + timedelta(hours=2)
    [fresh] = db(db.store.submit_many([job(key="k", payload=b"[]")], later, WINDOW))
    assert not fresh.duplicate


def test_a_unique_key_names_its_unfinished_job_and_is_free_once_it_ends(db: Harness) -> None:
    first, again = job(unique="u"), job(unique="u", key="other")
    made, dup = db(db.store.submit_many([first, again], T0, WINDOW))
    assert not made.duplicate and (dup.job_id, dup.duplicate) == (first.id, True)
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    [held] = db(db.store.submit_many([job(unique="u")], T0, WINDOW))
    assert (held.job_id, held.state, held.duplicate) == (first.id, JobState.LEASED, True)
    assert db(db.store.get_job(first.id)).unique_key == "u"
    db(db.store.complete_many([Completion(ref([lease], first), None)], T0))
    [after] = db(db.store.submit_many([job(unique="u")], T0, WINDOW))
    assert not after.duplicate and after.job_id != first.id
    # A fresh idempotency key makes no second job of an unfinished unique key.
    [late] = db(db.store.submit_many([job(unique="u", key="k")], T0 + timedelta(hours=2), WINDOW))
    assert late.duplicate and late.job_id == after.job_id


def test_a_replay_is_refused_while_another_job_holds_its_unique_key(db: Harness) -> None:
    dead, twin = job(unique="u", max_attempts=1), job(unique="u", max_attempts=1)
    for doomed in (dead, twin):
        db(db.store.submit_many([doomed], T0, WINDOW))
        [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
        db(db.store.fail_many([Failure(ref([lease], doomed), ErrorInfo("E", "x"))], T0))
    with pytest.raises(UniqueKeyTaken, match="share unique key 'u'"):
        db(db.store.replay_dead(None, [dead.id, twin.id], T0))
    holder = job(unique="u")
    db(db.store.submit_many([holder], T0, WINDOW))
    held_by = f"its unique key 'u' is held by job {holder.id}, which has not finished"
    with pytest.raises(UniqueKeyTaken, match=f"job {dead.id} cannot be replayed: {held_by}"):
        db(db.store.replay_dead(None, [dead.id], T0))
    assert db(db.store.get_job(dead.id)).state is JobState.DEAD
    db(db.store.cancel(holder.id, T0))
    assert db(db.store.replay_dead(None, [dead.id], T0)) == [dead.id]
    assert db.moved_to(dead.id) is JobState.PENDING


def test_reaper_retries_expired_leases_and_times_out_overdue_attempts(db: Harness) -> None:
    quiet, slow = job(), job(timeout=timedelta(seconds=5))
    db(db.store.submit_many([quiet, slow], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 2, "w", timedelta(seconds=60), T0))
    assert db(db.store.reap_expired(T0 + timedelta(seconds=1))) == 0
    # Held in a window, the slow one's hard timeout has not begun: it starts
    # with its handler, which it does later.
    assert db(db.store.reap_expired(T0 + timedelta(seconds=6))) == 0
    started = T0 + timedelta(seconds=6)
    db(db.store.start_many([ref(leases, slow)], started))
    assert db(db.store.get_job(slow.id)).started_at == started
    # It heartbeats but passes its hard timeout.
    db(db.store.heartbeat_many([ref(leases, slow)], timedelta(seconds=60), started))
    assert db(db.store.reap_expired(T0 + timedelta(seconds=10))) == 0
    assert db(db.store.reap_expired(T0 + timedelta(seconds=12))) == 1
    [timed_out] = db.store.moved[-1:]
    assert timed_out.job_id == slow.id and timed_out.reason is Reason.TIMED_OUT
    assert timed_out.source is JobState.RUNNING
    assert db(db.store.reap_expired(T0 + timedelta(seconds=61))) == 1
    [expired] = db.store.moved[-1:]
    assert expired.job_id == quiet.id and expired.source is JobState.LEASED
    assert expired.reason is Reason.LEASE_EXPIRED
    assert expired.target is JobState.SCHEDULED
    assert {lease.job.id for lease in leases} == {quiet.id, slow.id}


def test_cancel_pending_at_once_running_on_report_finished_refused(db: Harness) -> None:
    a, b = job(), job()
    db(db.store.submit_many([a], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    db(db.store.submit_many([b], T0, WINDOW))
    assert db(db.store.cancel(b.id, T0)).state is JobState.CANCELLED
    held = db(db.store.cancel(a.id, T0))
    assert held.state is JobState.LEASED and held.cancel_requested  # its worker is told
    assert db.store.moved[-1].reason is Reason.CANCEL_REQUESTED
    # Asked again, the worker is told again (the first may not have reached it).
    db(db.store.cancel(a.id, T0))
    assert db.store.moved[-1].reason is Reason.CANCEL_REQUESTED
    [r] = db(db.store.fail_many([Failure(ref(leases, a), ErrorInfo("E", "x"))], T0))
    assert r.status is ReportStatus.OK and db.moved_to(a.id) is JobState.CANCELLED
    with pytest.raises(IllegalTransition, match="cancelled job cannot become cancelled"):
        db(db.store.cancel(a.id, T0))


def test_release_hands_back_without_counting_an_attempt(db: Harness) -> None:
    db(db.store.submit_many([job()], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    [r] = db(db.store.release_many([LeaseRef(lease.job.id, lease.fencing_token)], T0))
    assert r.status is ReportStatus.OK and db.moved_to(lease.job.id) is JobState.PENDING
    again = db(db.store.get_job(lease.job.id))
    assert again.attempts == 0 and again.history[0].outcome is AttemptOutcome.RELEASED


def test_retention_deletes_finished_jobs_but_keeps_dead_ones(db: Harness) -> None:
    ok, dead = job(), job(max_attempts=1)
    db(db.store.submit_many([ok, dead], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 2, "w", LEASE, T0))
    db(db.store.complete_many([Completion(ref(leases, ok), None)], T0))
    db(db.store.fail_many([Failure(ref(leases, dead), ErrorInfo("E", "x"))], T0))
    assert db(db.store.delete_finished(T0, 100)) == 0
    assert db(db.store.delete_finished(T0 + timedelta(days=1), 100)) == 1
    with pytest.raises(NotFound):
        db(db.store.get_job(ok.id))
    assert db(db.store.get_job(dead.id)).state is JobState.DEAD
    assert db(db.store.purge_dead(None, [dead.id], T0)) == 1
    assert db(db.store.queue_depths(1000)) == {}


def test_submit_many_is_all_or_nothing(db: Harness) -> None:
    a = job()
    with pytest.raises(Exception, match=r"UNIQUE|unique|duplicate"):
        db(db.store.submit_many([job(), a, a], T0, WINDOW))  # the same id twice
    assert db(db.store.queue_depths(1000)) == {}


def test_a_lease_is_reported_only_under_its_key_and_reaped_whatever_its_key(
    db: Harness,
) -> None:
    kept, lost = job(), job()
    db(db.store.submit_many([kept, lost], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 2, "w", LEASE, T0, MAX_LEASE_BYTES, "key-a"))
    mine, theirs = ref(leases, kept), ref(leases, lost)
    other = replace(mine, holder="key-b")
    for results in (
        db(db.store.heartbeat_many([other], LEASE, T0)),
        db(db.store.complete_many([Completion(other, None)], T0)),
        db(db.store.fail_many([Failure(other, ErrorInfo("E", "x"))], T0)),
        db(db.store.release_many([other], T0)),
        [db(db.store.progress(Progress(other, 0.5, ""), LEASE, T0))],
    ):
        assert [r.status for r in results] == [ReportStatus.LEASE_LOST]
    assert db(db.store.get_job(kept.id)).state is JobState.LEASED
    [done] = db(db.store.complete_many([Completion(replace(mine, holder="key-a"), None)], T0))
    assert done.status is ReportStatus.OK and db.moved_to(kept.id) is JobState.SUCCEEDED
    # The reaper ends an expired lease whichever key holds it.
    assert db(db.store.reap_expired(T0 + LEASE + timedelta(seconds=1))) == 1
    assert db.moved_to(theirs.job_id) is JobState.SCHEDULED
    assert db(db.store.get_job(lost.id)).state is JobState.SCHEDULED


def test_heartbeat_extends_only_current_leases(db: Harness) -> None:
    db(db.store.submit_many([job()], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    later = T0 + timedelta(seconds=20)
    [beat] = db(db.store.heartbeat_many([ref([lease], lease.job)], LEASE, later))
    assert beat.status is ReportStatus.OK and beat.lease_expires_at == later + LEASE
    assert db(db.store.get_job(lease.job.id)).lease_expires_at == later + LEASE
    # The first expiry has passed; the extended lease has not.
    assert db(db.store.reap_expired(T0 + LEASE + timedelta(seconds=1))) == 0


def test_each_completion_keeps_its_own_result(db: Harness) -> None:
    db(db.store.submit_many([job() for _ in range(4)], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 4, "w", LEASE, T0))
    results = [Payload(b"null"), Payload(b"null"), Payload(b"1"), Payload(b"2")]
    done = db(
        db.store.complete_many(
            [
                Completion(LeaseRef(x.job.id, x.fencing_token), r)
                for x, r in zip(leases, results, strict=True)
            ],
            T0,
        )
    )
    assert all(d.status is ReportStatus.OK for d in done)
    stored = [db(db.store.get_job(x.job.id)) for x in leases]
    assert [j.result for j in stored] == results
    assert all(a.outcome is AttemptOutcome.SUCCEEDED for j in stored for a in j.history)


def test_a_retried_lease_starts_with_fresh_progress(db: Harness) -> None:
    db(db.store.submit_many([job()], T0, WINDOW))
    [first] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    ref = LeaseRef(first.job.id, first.fencing_token)
    later = T0 + timedelta(seconds=20)
    [renewed] = [db(db.store.progress(Progress(ref, 0.5, "half"), LEASE, later))]
    # A progress report renews the lease, as a heartbeat does.
    assert renewed.lease_expires_at == later + LEASE
    assert db(db.store.get_job(first.job.id)).lease_expires_at == later + LEASE
    db(db.store.release_many([ref], T0))
    [again] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    assert (again.job.progress, again.job.progress_message) == (0.0, "")
    stored = db(db.store.get_job(again.job.id))
    assert (stored.progress, stored.progress_message) == (0.0, "")


def test_concurrent_operations_fail_alone(db: Harness) -> None:
    """Operations issued together may share a transaction (SQLite groups them);
    one that fails changes nothing and takes none of the others with it."""
    store = db.store

    async def together() -> list[Any]:
        calls: list[Coroutine[Any, Any, Any]] = []
        for i in range(20):
            calls.append(store.submit_many([job()], T0, WINDOW))
            if i % 5 == 0:
                calls.append(store.cancel(f"missing-{i}", T0))
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = db(together())
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    stored = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(failed) == 4 and all(isinstance(e, NotFound) for e in failed)
    assert len(stored) == 20
    listed = db(store.list_jobs(JobFilter(limit=100))).jobs
    assert sorted(j.id for j in listed) == sorted(r[0].job_id for r in stored)


def test_sqlite_wal_is_checkpointed_while_the_store_runs(tmp_path: Path) -> None:
    """Commits never checkpoint (that would sync the file on the caller's
    thread); a thread of the store's own copies the WAL into the database."""
    path = tmp_path / "broker.db"
    db = Harness(open_store(str(path)), asyncio.new_event_loop())
    try:
        db(db.store.migrate())
        before = path.stat().st_size
        for _ in range(20):
            db(db.store.submit_many([job() for _ in range(100)], T0, WINDOW))
        wait_for(lambda: path.stat().st_size > before + 100_000, what="a checkpoint")
    finally:
        db(db.store.close())
        db.loop.close()


def test_sqlite_wal_is_rewound_under_steady_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A passive checkpoint never catches up with writers that never pause, so
    nothing rewinds the WAL: the store restarts it past WAL_RESTART_PAGES and
    truncates it to WAL_KEEP_BYTES, and it stays that size."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.005)
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_PAGES", 100)
    monkeypatch.setattr(sqlite_store, "WAL_KEEP_BYTES", 256 * 1024)
    path, wal = tmp_path / "broker.db", tmp_path / "broker.db-wal"
    db = Harness(open_store(str(path)), asyncio.new_event_loop())
    sizes: list[int] = []

    async def writer() -> None:
        for _ in range(150):
            await db.store.submit_many([job() for _ in range(50)], T0, WINDOW)
            sizes.append(wal.stat().st_size)

    async def writers() -> None:
        await asyncio.gather(*(writer() for _ in range(4)))

    try:
        db(db.store.migrate())
        db(writers())
        # Never rewound, it would hold all ~50 MB written; rewound, it grows by
        # what is written while a restart waits its turn for the store's lock.
        assert max(sizes[-100:]) < 16 * 256 * 1024, max(sizes)
    finally:
        db(db.store.close())
        db.loop.close()
    # What was written is far more than the limit: a WAL never rewound holds it all.
    assert path.stat().st_size > 20 * 256 * 1024


def test_sqlite_wal_restart_gives_way_to_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader in another process (a backup, a `sqlite3` shell) keeps the WAL
    from being rewound; the restart gives up at once instead of holding the
    store's writers for the busy timeout, and closing does not wait on it."""
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.02)
    monkeypatch.setattr(sqlite_store, "WAL_RESTART_PAGES", 100)
    path = tmp_path / "broker.db"
    db = Harness(open_store(str(path)), asyncio.new_event_loop())
    reader = sqlite3.connect(path, isolation_level=None)
    slowest = 0.0

    async def writer() -> None:
        nonlocal slowest
        for _ in range(100):
            began = time.monotonic()
            await db.store.submit_many([job() for _ in range(50)], T0, WINDOW)
            slowest = max(slowest, time.monotonic() - began)

    try:
        db(db.store.migrate())
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchone()  # holds its snapshot
        db(writer())
        assert slowest < BUSY_TIMEOUT_MS / 1000 / 4, slowest
    finally:
        began = time.monotonic()
        db(db.store.close())
        closing = time.monotonic() - began
        db.loop.close()
        reader.close()
    assert closing < BUSY_TIMEOUT_MS / 1000 / 4, closing


def test_sqlite_waits_for_another_process_lock_off_the_event_loop(tmp_path: Path) -> None:
    """An operation that finds the database write-locked by another connection
    (`broker migrate`, a backup) waits on the store's thread, not on the event
    loop: the loop goes on, here to release that lock."""
    path = tmp_path / "broker.db"
    db = Harness(open_store(str(path)), asyncio.new_event_loop())
    other = sqlite3.connect(path, isolation_level=None)

    async def submit_while_locked() -> tuple[SubmitResult, float]:
        other.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        submit = asyncio.ensure_future(db.store.submit_many([job()], T0, WINDOW))
        await asyncio.sleep(0)  # the submit starts and finds the lock taken
        blocked = time.monotonic() - began
        other.execute("COMMIT")
        [result] = await submit
        return result, blocked

    try:
        db(db.store.migrate())
        result, blocked = db(submit_while_locked())
        assert result.state is JobState.PENDING
        # Waiting on the loop would have held it for the busy timeout (10 s).
        assert blocked < BUSY_TIMEOUT_MS / 1000 / 2
    finally:
        other.close()
        db(db.store.close())
        db.loop.close()


def test_queue_depths_count_waiting_running_and_dead_jobs_per_queue(db: Harness) -> None:
    done, dead, running = job("a"), job("a", max_attempts=1), job("a")
    db(db.store.submit_many([done, dead, running], T0, WINDOW))
    leases = db(db.store.lease_many(["a"], 3, "w", LEASE, T0))
    db(db.store.complete_many([Completion(ref(leases, done), None)], T0))
    db(db.store.fail_many([Failure(ref(leases, dead), ErrorInfo("E", "x"))], T0))
    later = job("b", run_at=T0 + timedelta(hours=1))
    db(db.store.submit_many([job("b"), job("b"), later, job("c")], T0, WINDOW))
    assert db(db.store.queue_depths(1000)) == {
        ("a", JobState.LEASED): 1,
        ("a", JobState.DEAD): 1,
        ("b", JobState.PENDING): 2,
        ("b", JobState.SCHEDULED): 1,
        ("c", JobState.PENDING): 1,
    }
    # Past the cap, the other queues are counted together, by state.
    assert db(db.store.queue_depths(1)) == {
        ("a", JobState.LEASED): 1,
        ("a", JobState.DEAD): 1,
        (None, JobState.PENDING): 3,
        (None, JobState.SCHEDULED): 1,
    }


def test_ready_queues_names_the_queues_with_pending_jobs(db: Harness) -> None:
    later = job("later", run_at=T0 + timedelta(hours=1))
    db(db.store.submit_many([job("a"), job("a"), later, job("b")], T0, WINDOW))
    db(db.store.lease_many(["b"], 1, "w", LEASE, T0))
    assert db(db.store.ready_queues(["a", "b", "later", "none"])) == {"a"}


def test_a_lease_takes_no_more_payload_bytes_than_asked_but_always_one_job(db: Harness) -> None:
    big = [job("q", payload=b"x" * 1000) for _ in range(5)]
    db(db.store.submit_many(big, T0, WINDOW))
    first = db(db.store.lease_many(["q"], 10, "w", LEASE, T0, max_bytes=2500))
    assert [lease.job.id for lease in first] == [j.id for j in big[:3]]  # 0, 1000, 2000 before
    alone = db(db.store.lease_many(["q"], 10, "w", LEASE, T0, max_bytes=10))
    assert [lease.job.id for lease in alone] == [big[3].id]
    rest = db(db.store.lease_many(["q"], 10, "w", LEASE, T0))
    assert [lease.job.id for lease in rest] == [big[4].id]


def test_a_listing_holds_no_more_bytes_than_asked_but_always_one_job(db: Harness) -> None:
    big = [job("q", payload=b"x" * 1000) for _ in range(4)]
    db(db.store.submit_many(big, T0, WINDOW))
    page = db(db.store.list_jobs(JobFilter(limit=10, max_bytes=2500)))
    assert [j.id for j in page.jobs] == [j.id for j in big[:2]] and page.more
    page = db(db.store.list_jobs(JobFilter(limit=10, max_bytes=10, after_id=big[1].id)))
    assert [j.id for j in page.jobs] == [big[2].id] and page.more
    page = db(db.store.list_jobs(JobFilter(limit=10, after_id=big[2].id)))
    assert [j.id for j in page.jobs] == [big[3].id] and not page.more


def test_a_stored_job_past_every_limit_neither_stops_leasing_nor_the_reaper(db: Harness) -> None:
    """A row written before the submit limits (or by hand) with a timeout and a
    backoff no datetime can hold: its queue still leases, and its attempt ends."""
    poison = replace(
        job("q", max_attempts=5, timeout=timedelta(days=10**6)),
        retry=RetryPolicy(
            max_attempts=5,
            backoff_base=timedelta(days=10**6),
            backoff_factor=math.inf,
            backoff_cap=timedelta(days=10**7),
        ),
    )
    other = job("q")
    db(db.store.submit_many([poison, other], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 10, "w", LEASE, T0))
    assert {lease.job.id for lease in leases} == {poison.id, other.id}
    assert db(db.store.reap_expired(T0 + LEASE + timedelta(seconds=1))) == 2
    assert {t.job_id: t.target for t in db.store.moved[-2:]} == {
        poison.id: JobState.SCHEDULED,
        other.id: JobState.SCHEDULED,
    }
    again = db(db.store.get_job(poison.id))
    assert T0 < again.scheduled_at <= T0 + LEASE + timedelta(days=30, seconds=2)


def _assert_story(db: Harness, job_id: str) -> list[str]:
    """The job's events chain along allowed transitions to the state its row
    is in; returns their reasons."""
    story = db(db.store.job_events(job_id))
    assert story, f"job {job_id} has no events"
    assert [e.seq for e in story] == sorted({e.seq for e in story})
    state: str | None = None
    for event in story:
        if event.reason == "progress":
            assert state == event.source == event.target
            continue
        source = JobState(event.source) if event.source else None
        check_transition(
            Transition(job_id, event.queue, source, JobState(event.target), Reason(event.reason), 1)
        )
        assert event.source == state, (event, state)
        state = event.target
    assert state == db(db.store.get_job(job_id)).state.value
    return [e.reason for e in story]


def test_every_operation_logs_the_transitions_it_made(db: Harness) -> None:
    flaky, doomed, slow, later, dropped, handed = (
        job(),
        job(max_attempts=1),
        job(),
        job(run_at=T0 + timedelta(seconds=5)),
        job(),
        job(),
    )
    db(db.store.submit_many([flaky, doomed, slow, later, dropped, handed], T0, WINDOW))
    # A duplicate submit is no transition.
    db(db.store.submit_many([replace(flaky, id=new_job_id())], T0, WINDOW))
    assert db(db.store.cancel(dropped.id, T0)).state is JobState.CANCELLED
    leases = db(db.store.lease_many(["q"], 4, "w1", LEASE, T0))
    db(db.store.progress(Progress(ref(leases, flaky), 0.5, "half"), LEASE, T0))
    db(db.store.fail_many([Failure(ref(leases, flaky), ErrorInfo("E", "boom"))], T0))
    db(db.store.fail_many([Failure(ref(leases, doomed), ErrorInfo("E", "dead"))], T0))
    db(db.store.release_many([ref(leases, handed)], T0))
    later_at = T0 + LEASE + timedelta(minutes=5)
    db(db.store.reap_expired(T0 + LEASE + timedelta(seconds=1)))  # slow's lease expires
    db(db.store.promote_scheduled(later_at))  # later, flaky and slow come due
    again = db(db.store.lease_many(["q"], 10, "w2", LEASE, later_at))
    for lease in again:
        db(db.store.complete_many([Completion(ref(again, lease.job), None)], later_at))
    assert db(db.store.replay_dead("q", [doomed.id], later_at)) == [doomed.id]

    assert _assert_story(db, flaky.id) == [
        "submitted",
        "leased",
        "progress",
        "failed",
        "promoted",
        "leased",
        "started",
        "succeeded",
    ]
    assert _assert_story(db, doomed.id) == ["submitted", "leased", "dead_lettered", "replayed"]
    assert _assert_story(db, slow.id) == [
        "submitted",
        "leased",
        "lease_expired",
        "promoted",
        "leased",
        "started",
        "succeeded",
    ]
    assert _assert_story(db, later.id) == [
        "submitted",
        "promoted",
        "leased",
        "started",
        "succeeded",
    ]
    assert _assert_story(db, dropped.id) == ["submitted", "cancelled"]
    assert _assert_story(db, handed.id) == [
        "submitted",
        "leased",
        "released",
        "leased",
        "started",
        "succeeded",
    ]
    [failed] = [e for e in db(db.store.job_events(flaky.id)) if e.reason == "failed"]
    assert failed.actor == "w1" and failed.detail["error"] == "boom" and "run_at" in failed.detail
    [progress] = [e for e in db(db.store.job_events(flaky.id)) if e.reason == "progress"]
    assert progress.detail == {"progress": 0.5, "message": "half"}
    # Resumable: the events after a sequence number are the rest, once each.
    whole = db(db.store.job_events(flaky.id))
    assert db(db.store.job_events(flaky.id, whole[2].seq)) == whole[3:]


def test_a_purged_or_expired_job_takes_its_events_with_it(db: Harness) -> None:
    done, dead = job(), job(max_attempts=1)
    db(db.store.submit_many([done, dead], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 2, "w", LEASE, T0))
    db(db.store.complete_many([Completion(ref(leases, done), None)], T0))
    db(db.store.fail_many([Failure(ref(leases, dead), ErrorInfo("E", "x"))], T0))
    assert db(db.store.purge_dead("q", [dead.id], T0)) == 1
    assert db(db.store.delete_finished(T0 + timedelta(days=1), 100)) == 1
    for gone in (done, dead):
        with pytest.raises(NotFound):
            db(db.store.job_events(gone.id))


def test_a_held_job_runs_from_its_handlers_start(db: Harness) -> None:
    reported, finished_first, never = job(), job(), job(max_attempts=1)
    db(db.store.submit_many([reported, finished_first, never], T0, WINDOW))
    leases = db(db.store.lease_many(["q"], 3, "w", LEASE, T0))
    assert all(x.job.state is JobState.LEASED and x.job.started_at is None for x in leases)
    # A start report: running from then; reported again, nothing moves.
    at = T0 + timedelta(seconds=3)
    db(db.store.start_many([ref(leases, reported)], at))
    db(db.store.start_many([ref(leases, reported)], at + timedelta(seconds=1)))
    started = db(db.store.get_job(reported.id))
    assert started.state is JobState.RUNNING and started.started_at == at
    assert started.history[-1].started_at == at
    # A job that ended before its start was reported started run_time earlier.
    done_at = T0 + timedelta(seconds=10)
    completion = Completion(ref(leases, finished_first), None, timedelta(seconds=2))
    db(db.store.complete_many([completion], done_at))
    done = db(db.store.get_job(finished_first.id))
    assert done.started_at == done_at - timedelta(seconds=2) == done.history[-1].started_at
    assert _assert_story(db, finished_first.id)[-2:] == ["started", "succeeded"]
    # A worker's word cannot put a start before the job could run.
    late = job()
    db(db.store.submit_many([late], done_at, WINDOW))
    [held] = db(db.store.lease_many(["q"], 1, "w", LEASE, done_at))
    liar = Completion(ref([held], late), None, timedelta(days=29))
    db(db.store.complete_many([liar], done_at + timedelta(seconds=1)))
    told = db(db.store.get_job(late.id))
    assert told.started_at == done_at == told.history[-1].started_at
    # A job whose handler never ran (run_time unset) fails from leased.
    db(db.store.fail_many([Failure(ref(leases, never), ErrorInfo("E", "no handler"))], done_at))
    assert _assert_story(db, never.id) == ["submitted", "leased", "dead_lettered"]
    assert db(db.store.get_job(never.id)).started_at is None


def test_event_numbers_only_grow_even_when_the_newest_events_job_is_deleted(db: Harness) -> None:
    first, last = job(), job(max_attempts=1)
    db(db.store.submit_many([first, last], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    [lease2] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    db(db.store.fail_many([Failure(ref([lease2], last), ErrorInfo("E", "x"))], T0))
    newest = db(db.store.job_events(last.id))[-1].seq
    db(db.store.purge_dead("q", [last.id], T0))  # takes the newest events with it
    db(db.store.complete_many([Completion(ref([lease], first), None)], T0))
    assert db(db.store.job_events(first.id))[-1].seq > newest


def test_a_tail_reads_events_in_the_order_their_transactions_committed(
    postgres_schema: str,
) -> None:
    """A transaction that took a lower event number but commits later is not
    passed over, by a tail that started before it or from the end of the log
    while it ran: the tail holds back what committed after it began."""
    loop = asyncio.new_event_loop()
    store = open_store(postgres_schema)
    loop.run_until_complete(store.migrate())
    db = Harness(store, loop)
    slow, quick = job(), job()
    db(db.store.submit_many([slow, quick], T0, WINDOW))
    start = db(db.store.tail_from(0))
    url, settings = engine_url(postgres_schema)
    dsn = url.replace("postgresql+asyncpg", "postgresql")
    open_tx = db(asyncpg.connect(dsn, server_settings=settings))
    try:
        tx = open_tx.transaction()
        db(tx.start())
        db(  # the lower number, taken first, committed last
            open_tx.execute(
                "INSERT INTO job_events (job_id, queue, at, reason, source, target, attempt,"
                " actor, detail) VALUES ($1, 'q', now(), 'cancelled', 'pending', 'cancelled',"
                " 0, 'test', '{}')",
                slow.id,
            )
        )
        db(db.store.cancel(quick.id, T0))  # a higher number, committed first
        assert db(db.store.tail_events(start, None, None, 100)) == ([], start)
        from_now = db(db.store.tail_from(0))  # a tail started now, from the end
        db(tx.commit())
    finally:
        db(open_tx.close())
    for at in (start, from_now):
        got, end = db(db.store.tail_events(at, None, None, 100))
        assert [e.job_id for e in got] == [slow.id, quick.id]
        assert got[0].seq < got[1].seq
        assert db(db.store.tail_events(end, None, None, 100)) == ([], end)
    # Resumed by number after the first, the second comes once.
    resumed = db(db.store.tail_from(got[0].seq))
    assert [e.job_id for e in db(db.store.tail_events(resumed, None, None, 100))[0]] == [quick.id]
    loop.run_until_complete(store.close())
    loop.close()


def test_a_filtered_tail_moves_past_what_it_does_not_want(db: Harness) -> None:
    start = db(db.store.tail_from(0))
    db(db.store.submit_many([job("other") for _ in range(5)], T0, WINDOW))
    found, at = db(db.store.tail_events(start, "quiet", None, 100))
    assert found == [] and at.seq > start.seq  # read once, not again
    db(db.store.submit_many([job("quiet")], T0, WINDOW))
    found, at = db(db.store.tail_events(at, "quiet", None, 100))
    assert [e.queue for e in found] == ["quiet"]
    found, _ = db(db.store.tail_events(start, None, "t", 3))  # by task, a page at a time
    assert len(found) == 3


def test_a_held_job_whose_cancel_was_asked_for_ends_cancelled_when_handed_back(
    db: Harness,
) -> None:
    db(db.store.submit_many([job()], T0, WINDOW))
    [lease] = db(db.store.lease_many(["q"], 1, "w", LEASE, T0))
    db(db.store.cancel(lease.job.id, T0))
    [r] = db(db.store.release_many([ref([lease], lease.job)], T0))
    assert r.status is ReportStatus.OK
    gone = db(db.store.get_job(lease.job.id))
    assert gone.state is JobState.CANCELLED and gone.history[-1].outcome is AttemptOutcome.CANCELLED
    assert db(db.store.lease_many(["q"], 1, "w", LEASE, T0)) == []
