"""Flow limits in the store (``domain/flow.py``): the lease of a limited queue,
the jobs held back, and letting them through.

A queue is *limited* once it has a rate or has had a job with a key; the
plain lease passes over it and ``pick`` leases from it instead. ``pick``
locks its candidates as the plain lease does, then each concurrency key
among them (an advisory lock on PostgreSQL, so that two replicas count one
key's slots one after the other) and each rate bucket (its row), counts, and
takes what the limits let through. A key found full, or a rate key found out
of budget, has its pending jobs held back: state waiting, ``held_by`` naming
the limit. They leave the candidates' index, so a key's backlog costs the
lease of other keys nothing; each is held back once and let through once:

- a concurrency key's, when one of its jobs ends (``follow``, in the same
  transaction): as many as the key has free slots;
- a rate key's, when its next budget is due (``reopen``, by the scheduler):
  as many as that budget allows.

``sweep`` (by the reaper) lets through what nothing else would: a key whose
held jobs were cancelled while pending, a limit raised. A held-back job is
not counted as an attempt; the lease of a let-through job counts its limits
again, so a let-through that races another lease only holds it back again.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain import flow
from jobbroker_server.domain.flow import CONCURRENCY, QUEUE_RATE, RATE, LimitFacts, RateLimit
from jobbroker_server.domain.models import Job
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import BROKER, Reason, Transition
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import jobs, queues, rate_buckets

_PENDING = JobState.PENDING.value
_WAITING = JobState.WAITING.value
_HELD = [JobState.LEASED.value, JobState.RUNNING.value]
_ACTIVE = [_PENDING, *_HELD]
HOLD_BACK_AT_ONCE = 1000  # of one key's pending jobs, per lease
LET_THROUGH_AT_ONCE = 64  # of one key's held-back jobs, per end

# The queues the plain lease passes over.
LIMITED = sa.select(queues.c.name).where(queues.c.limited)
WHOLE_QUEUE = ""  # the rate bucket key of a queue's own rate

Key = tuple[str, str]  # (queue, key)
_HELD_BACK = sa.and_(jobs.c.held_by.is_not(None), jobs.c.state == _WAITING)


@dataclass(frozen=True, slots=True)
class _Queue:
    rate: RateLimit | None
    key_rate: RateLimit | None
    key_concurrency: int


@dataclass(slots=True)
class Picked:
    """What ``pick`` decided: the jobs to lease, in lease order, and the
    transitions of the jobs it held back."""

    ids: list[str]
    moved: list[Transition]


def _rate(count: int | None, period_s: float | None) -> RateLimit | None:
    if count is None or period_s is None:
        return None
    return RateLimit(count, timedelta(seconds=period_s))


def _settings(
    conn: Connection, names: Iterable[str], *, leasable: bool = True
) -> dict[str, _Queue]:
    """The limits of the queues ``names``: of those a lease may take from
    (limited, not paused), or of all that have settings."""
    where: list[sa.ColumnElement[bool]] = [queues.c.name.in_(list(names))]
    if leasable:
        where += [queues.c.limited, ~queues.c.paused]
    found = conn.execute(sa.select(queues).where(*where))
    return {
        r.name: _Queue(
            _rate(r.rate_count, r.rate_period_s),
            _rate(r.key_rate_count, r.key_rate_period_s),
            r.key_concurrency or 1,
        )
        for r in found
    }


def _lock_keys(conn: Connection, keys: Iterable[Key]) -> None:
    """Serialize the counting of each key's slots across replicas (PostgreSQL;
    SQLite has one writer). Taken in one order, held to the commit."""
    if conn.dialect.name != "postgresql":
        return
    hashes = sorted({zlib.crc32(f"{q}\0{k}".encode()) - 2**31 for q, k in keys})
    if hashes:
        conn.execute(
            sa.text(
                "SELECT count(pg_advisory_xact_lock(h)) FROM"
                " (SELECT unnest(CAST(:hashes AS bigint[])) AS h ORDER BY h) AS ordered"
            ),
            {"hashes": hashes},
        )


def _held_counts(conn: Connection, keys: Sequence[Key], states: list[str]) -> Counter[Key]:
    counts: Counter[Key] = Counter()
    for queue in {q for q, _ in keys}:
        names = [k for q, k in keys if q == queue]
        found = conn.execute(
            sa.select(jobs.c.concurrency_key, sa.func.count())
            .where(
                jobs.c.queue == queue,
                jobs.c.concurrency_key.in_(names),
                jobs.c.state.in_(states),
            )
            .group_by(jobs.c.concurrency_key)
        )
        for key, count in found:
            counts[(queue, key)] = count
    return counts


def _buckets(conn: Connection, keys: Iterable[Key], now: datetime) -> dict[Key, datetime]:
    """Each bucket's instant, its row locked (made if it has none)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    have = _bucket_rows(conn, wanted)
    missing = [k for k in wanted if k not in have]
    if missing:
        values = [
            {"queue": q, "key": k, "tat": now, "next_at": now, "waiting": False} for q, k in missing
        ]
        insert = _insert_ignoring(conn, values)
        conn.execute(insert)
        have.update(_bucket_rows(conn, missing))
    return have


def _bucket_rows(conn: Connection, keys: Sequence[Key]) -> dict[Key, datetime]:
    tat: dict[Key, datetime] = {}
    for queue in {q for q, _ in keys}:
        names = [k for q, k in keys if q == queue]
        found = conn.execute(
            sa.select(rate_buckets.c.key, rate_buckets.c.tat)
            .where(rate_buckets.c.queue == queue, rate_buckets.c.key.in_(names))
            .order_by(rate_buckets.c.key)
            .with_for_update()
        )
        for key, at in found:
            tat[(queue, key)] = at
    return tat


def _insert_ignoring(conn: Connection, values: list[dict[str, Any]]) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(rate_buckets).values(values).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(rate_buckets).values(values).on_conflict_do_nothing()


def _set_bucket(
    conn: Connection, key: Key, tat: datetime, next_at: datetime, waiting: bool
) -> None:
    conn.execute(
        rate_buckets.update()
        .where(rate_buckets.c.queue == key[0], rate_buckets.c.key == key[1])
        .values(tat=tat, next_at=next_at, waiting=waiting)
    )


_CANDIDATES = Prepared(
    sa.select(
        jobs.c.id,
        jobs.c.queue,
        sa.func.length(jobs.c.payload).label("size"),
        jobs.c.attempts,
        jobs.c.concurrency_key,
        jobs.c.concurrency_limit,
        jobs.c.rate_key,
        jobs.c.rate_count,
        jobs.c.rate_period_s,
    )
    .where(
        jobs.c.state == _PENDING,
        jobs.c.queue.in_(sa.bindparam("queues", expanding=True)),
        jobs.c.id.not_in(sa.bindparam("seen", expanding=True)),
    )
    .order_by(jobs.c.priority.desc(), jobs.c.id)
    .limit(sa.bindparam("limit"))
    .with_for_update(skip_locked=True)
)


class _Budget:
    """What one ``pick`` may still take: per queue, per concurrency key, per
    rate key; and the rate keys it found spent."""

    def __init__(self, settings: dict[str, _Queue]) -> None:
        self.settings = settings
        self.queue_left: dict[str, int] = {}
        self.slots_left: dict[Key, int] = {}
        self.rate_left: dict[Key, int] = {}
        self.rate_of: dict[Key, RateLimit] = {}
        self.taken: Counter[Key] = Counter()  # rate starts, per bucket
        self.spent: set[Key] = set()  # rate keys found without budget

    def key_rate(self, row: Any) -> RateLimit | None:
        if row.rate_count is not None:
            return RateLimit(row.rate_count, timedelta(seconds=row.rate_period_s))
        return self.settings[row.queue].key_rate

    def take(self, row: Any) -> tuple[str, Key] | None:
        """Take the job if its limits let it through; else say which holds
        it: (CONCURRENCY or RATE, its key), or (QUEUE_RATE, its queue's)."""
        queue = row.queue
        if self.queue_left.get(queue, 1) <= 0:
            return QUEUE_RATE, (queue, WHOLE_QUEUE)
        ckey = (queue, row.concurrency_key) if row.concurrency_key is not None else None
        rkey = (queue, row.rate_key) if row.rate_key is not None else None
        if ckey is not None and self.slots_left[ckey] <= 0:
            return CONCURRENCY, ckey
        if rkey is not None and rkey in self.rate_left and self.rate_left[rkey] <= 0:
            self.spent.add(rkey)
            return RATE, rkey
        if queue in self.queue_left:
            self.queue_left[queue] -= 1
            self.taken[(queue, WHOLE_QUEUE)] += 1
        if ckey is not None:
            self.slots_left[ckey] -= 1
        if rkey is not None and rkey in self.rate_left:
            self.rate_left[rkey] -= 1
            self.taken[rkey] += 1
        return None


def pick(
    conn: Connection, names: Sequence[str], limit: int, now: datetime, max_bytes: int
) -> Picked:
    """The jobs of the limited queues ``names`` that a lease of ``limit`` may
    take now (their rows locked), and those held back; the jobs' payloads,
    with all before them, fit ``max_bytes``."""
    settings = _settings(conn, names)
    budget = _Budget(settings)
    whole = {(q, WHOLE_QUEUE): s.rate for q, s in settings.items() if s.rate is not None}
    tats = _buckets(conn, whole, now)
    for key, rate in whole.items():
        budget.queue_left[key[0]] = flow.allowed(tats[key], now, rate)
        budget.rate_of[key] = rate
    open_queues = [q for q in settings if budget.queue_left.get(q, 1) > 0]
    chosen: list[str] = []
    seen: list[str] = []
    moved: list[Transition] = []
    size = 0
    # A round that held a key back may leave room that the next fills from
    # other keys: the held-back jobs left the candidates.
    for _ in range(3):
        if not open_queues or len(chosen) >= limit:
            break
        found = _CANDIDATES.rows(
            conn, {"queues": open_queues, "seen": seen or [""], "limit": limit - len(chosen)}
        )
        if not found:
            break
        seen += [row.id for row in found]
        _count_limits(conn, budget, found, tats, now)
        holding: set[tuple[str, Key]] = set()
        for row in found:
            if size and size + row.size > max_bytes:
                break
            held_by = budget.take(row)
            if held_by is None:
                chosen.append(row.id)
                size += row.size
            elif held_by[0] != QUEUE_RATE:
                holding.add(held_by)
        held = [t for why, key in sorted(holding) for t in _hold_back(conn, why, key, chosen)]
        moved += held
        if not held:
            break
    _write_buckets(conn, budget, tats, now)
    return Picked(chosen, moved)


def _count_limits(
    conn: Connection,
    budget: _Budget,
    found: Sequence[Any],
    tats: dict[Key, datetime],
    now: datetime,
) -> None:
    """Fill the budget for the keys first seen among ``found``."""
    ckeys = sorted(
        {(r.queue, r.concurrency_key) for r in found if r.concurrency_key is not None}
        - budget.slots_left.keys()
    )
    if ckeys:
        _lock_keys(conn, ckeys)
        held = _held_counts(conn, ckeys, _HELD)
        limits: dict[Key, int] = {}
        for r in found:
            if r.concurrency_key is not None:
                key = (r.queue, r.concurrency_key)
                limits.setdefault(
                    key, r.concurrency_limit or budget.settings[r.queue].key_concurrency
                )
        for key in ckeys:
            budget.slots_left[key] = limits[key] - held[key]
    rates = {}
    for r in found:
        key = (r.queue, r.rate_key)
        if r.rate_key is not None and key not in budget.rate_left and key not in rates:
            rate = budget.key_rate(r)
            if rate is not None:
                rates[key] = rate
    if rates:
        tats.update(_buckets(conn, rates, now))
        for key, rate in rates.items():
            budget.rate_left[key] = flow.allowed(tats[key], now, rate)
            budget.rate_of[key] = rate


def _write_buckets(
    conn: Connection, budget: _Budget, tats: dict[Key, datetime], now: datetime
) -> None:
    """The rate buckets after the starts taken; one found spent waits for
    its next budget (``reopen``)."""
    for bucket, rate in budget.rate_of.items():
        tat = flow.taken(tats[bucket], now, rate, budget.taken[bucket])
        whole = bucket[1] == WHOLE_QUEUE
        closed = bucket in budget.spent or (whole and budget.queue_left[bucket[0]] <= 0)
        if budget.taken[bucket] or closed:
            _set_bucket(conn, bucket, tat, flow.next_token_at(tat, rate), closed)


def _hold_back(conn: Connection, limit: str, at: Key, chosen: list[str]) -> list[Transition]:
    """Hold back the key's pending jobs (up to HOLD_BACK_AT_ONCE; not those
    ``chosen``, nor those another lease has locked)."""
    queue, key = at
    column = jobs.c.concurrency_key if limit == CONCURRENCY else jobs.c.rate_key
    pending = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.queue == queue,
            column == key,
            jobs.c.state == _PENDING,
            jobs.c.id.not_in(chosen or [""]),
        )
        .limit(HOLD_BACK_AT_ONCE)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    held = conn.execute(
        jobs.update()
        .where(jobs.c.id.in_(pending))
        .values(state=_WAITING, held_by=limit)
        .returning(jobs.c.id, jobs.c.attempts)
    ).all()
    detail = {"limit": limit, "key": key}
    return [
        Transition(
            job_id,
            queue,
            JobState.PENDING,
            JobState.WAITING,
            Reason.LIMITED,
            attempts,
            BROKER,
            detail,
        )
        for job_id, attempts in held
    ]


def _let_through(
    conn: Connection, queue: str, limit: str, key: str, count: int
) -> list[Transition]:
    """Up to ``count`` of the key's held-back jobs, pending again."""
    column = jobs.c.concurrency_key if limit == CONCURRENCY else jobs.c.rate_key
    picked = conn.execute(
        sa.select(jobs.c.id, jobs.c.attempts)
        .where(_HELD_BACK, jobs.c.queue == queue, jobs.c.held_by == limit, column == key)
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(count)
        .with_for_update(skip_locked=True)
    ).all()
    if not picked:
        return []
    conn.execute(
        jobs.update()
        .where(jobs.c.id.in_([job_id for job_id, _ in picked]))
        .values(state=_PENDING, held_by=None)
    )
    detail = {"limit": limit, "key": key}
    return [
        Transition(
            job_id,
            queue,
            JobState.WAITING,
            JobState.PENDING,
            Reason.ADMITTED,
            attempts,
            BROKER,
            detail,
        )
        for job_id, attempts in picked
    ]


def follow(conn: Connection, transitions: Sequence[Transition]) -> list[Transition]:
    """Let through the held-back jobs of the concurrency keys whose jobs
    ``transitions`` ended."""
    freed = sorted(
        {
            (t.queue, t.concurrency_key)
            for t in transitions
            if t.concurrency_key is not None and t.source in _FREES and t.target not in _FREES
        }
    )
    return admit(conn, freed) if freed else []


_FREES = {JobState.LEASED, JobState.RUNNING}


def admit(conn: Connection, keys: Sequence[Key]) -> list[Transition]:
    """Let through as many held-back jobs of each concurrency key as it has
    slots that no job holds or is about to."""
    waiting = _with_held_back(conn, keys)
    if not waiting:
        return []
    _lock_keys(conn, waiting)
    settings = _settings(conn, {q for q, _ in waiting})
    moved = []
    for queue, key in waiting:
        first = conn.execute(
            sa.select(jobs.c.concurrency_limit)
            .where(
                _HELD_BACK,
                jobs.c.queue == queue,
                jobs.c.held_by == CONCURRENCY,
                jobs.c.concurrency_key == key,
            )
            .order_by(jobs.c.priority.desc(), jobs.c.id)
            .limit(1)
        ).first()
        if first is None:
            continue
        queue_limit = settings[queue].key_concurrency if queue in settings else 1
        active = _held_counts(conn, [(queue, key)], _ACTIVE)[(queue, key)]
        room = min((first.concurrency_limit or queue_limit) - active, LET_THROUGH_AT_ONCE)
        if room > 0:
            moved += _let_through(conn, queue, CONCURRENCY, key, room)
    return moved


def _with_held_back(conn: Connection, keys: Sequence[Key]) -> list[Key]:
    """Of ``keys``, in order, the concurrency keys with held-back jobs: one
    statement per queue, however many keys ended."""
    found: set[Key] = set()
    for queue in {q for q, _ in keys}:
        names = [k for q, k in keys if q == queue]
        rows = conn.execute(
            sa.select(jobs.c.concurrency_key)
            .where(
                _HELD_BACK,
                jobs.c.queue == queue,
                jobs.c.held_by == CONCURRENCY,
                jobs.c.concurrency_key.in_(names),
            )
            .distinct()
        )
        found |= {(queue, k) for (k,) in rows}
    return [key for key in keys if key in found]


def reopen(conn: Connection, now: datetime) -> tuple[list[Transition], set[str]]:
    """The rate buckets whose next budget is due: their held-back jobs let
    through (as many as the budget allows), and the queues whose own rate
    reopened, for their streams to be woken."""
    due = conn.execute(
        sa.select(rate_buckets)
        .where(rate_buckets.c.waiting, rate_buckets.c.next_at <= now)
        .order_by(rate_buckets.c.queue, rate_buckets.c.key)
        .limit(500)
        .with_for_update(skip_locked=True)
    ).all()
    moved: list[Transition] = []
    woken: set[str] = set()
    settings = _settings(conn, {r.queue for r in due})
    for row in due:
        key = (row.queue, row.key)
        queue = settings.get(row.queue)
        if row.key == WHOLE_QUEUE or queue is None:
            woken.add(row.queue)
            _set_bucket(conn, key, row.tat, row.next_at, False)
            continue
        rate = _held_back_rate(conn, row.queue, row.key) or queue.key_rate
        if rate is None:  # the limit was removed: let them all through
            moved += _let_through(conn, row.queue, RATE, row.key, HOLD_BACK_AT_ONCE)
            _set_bucket(conn, key, row.tat, row.next_at, bool(moved))
            continue
        count = flow.allowed(row.tat, now, rate)
        through = _let_through(conn, row.queue, RATE, row.key, count)
        moved += through
        after = flow.taken(row.tat, now, rate, len(through))
        left = len(through) == count
        _set_bucket(conn, key, row.tat, flow.next_token_at(after, rate), left)
    return moved, woken


def _held_back_rate(conn: Connection, queue: str, key: str) -> RateLimit | None:
    row = conn.execute(
        sa.select(jobs.c.rate_count, jobs.c.rate_period_s)
        .where(_HELD_BACK, jobs.c.queue == queue, jobs.c.held_by == RATE, jobs.c.rate_key == key)
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(1)
    ).first()
    return None if row is None else _rate(row.rate_count, row.rate_period_s)


def next_reopen_at(conn: Connection) -> datetime | None:
    """When the next rate bucket with jobs or streams waiting on it reopens."""
    found = conn.execute(
        sa.select(sa.func.min(rate_buckets.c.next_at)).where(rate_buckets.c.waiting)
    ).scalar()
    return found


def sweep(conn: Connection, now: datetime) -> list[Transition]:
    """Let through what no end or budget will: the held-back jobs of
    concurrency keys with free slots, and of rate keys whose bucket waits on
    nothing (at most 500 keys a call)."""
    keys = conn.execute(
        sa.select(jobs.c.queue, jobs.c.held_by, jobs.c.concurrency_key, jobs.c.rate_key)
        .where(_HELD_BACK)
        .distinct()
        .limit(500)
    ).all()
    concurrency = sorted(
        {(q, c) for q, held, c, _ in keys if held == CONCURRENCY and c is not None}
    )
    moved = admit(conn, concurrency) if concurrency else []
    rated = sorted({(q, r) for q, held, _, r in keys if held == RATE and r is not None})
    if rated:
        waiting = _waiting_buckets(conn, rated)
        stranded = [key for key in rated if key not in waiting]
        tats = _buckets(conn, stranded, now)
        for key in stranded:
            _set_bucket(conn, key, tats[key], now, True)  # reopen looks at once
    _prune(conn, now)
    return moved


def _prune(conn: Connection, now: datetime) -> None:
    """Delete buckets that are full again and wait on nothing: as good as
    none, and a client that used many rate keys leaves no trail of them."""
    found = conn.execute(
        sa.select(rate_buckets.c.queue, rate_buckets.c.key)
        .where(~rate_buckets.c.waiting, rate_buckets.c.tat < now)
        .limit(1000)
        .with_for_update(skip_locked=True)
    ).all()
    for queue in {q for q, _ in found}:
        names = [k for q, k in found if q == queue]
        conn.execute(
            rate_buckets.delete().where(
                rate_buckets.c.queue == queue,
                rate_buckets.c.key.in_(names),
                ~rate_buckets.c.waiting,
                rate_buckets.c.tat < now,
            )
        )


def _waiting_buckets(conn: Connection, keys: Sequence[Key]) -> set[Key]:
    found = set()
    for queue in {q for q, _ in keys}:
        names = [k for q, k in keys if q == queue]
        rows = conn.execute(
            sa.select(rate_buckets.c.key).where(
                rate_buckets.c.queue == queue, rate_buckets.c.key.in_(names), rate_buckets.c.waiting
            )
        )
        found |= {(queue, k) for (k,) in rows}
    return found


def explain(conn: Connection, job: Job, now: datetime) -> LimitFacts | None:
    """What limit holds the job back (waiting), or keeps it pending (its
    queue's rate spent); None when none does."""
    queue = _settings(conn, [job.queue], leasable=False).get(job.queue)
    held_by = conn.execute(sa.select(jobs.c.held_by).where(jobs.c.id == job.id)).scalar()
    limits = job.limits
    if job.state is JobState.WAITING and held_by == CONCURRENCY and limits is not None:
        key = limits.concurrency_key or ""
        allowed = limits.concurrency_limit or (queue.key_concurrency if queue else 1)
        holders = conn.execute(
            sa.select(jobs.c.id)
            .where(
                jobs.c.queue == job.queue, jobs.c.concurrency_key == key, jobs.c.state.in_(_HELD)
            )
            .order_by(jobs.c.id)
            .limit(10)
        ).scalars()
        return LimitFacts(CONCURRENCY, key, str(allowed), tuple(holders))
    if job.state is JobState.WAITING and held_by == RATE and limits is not None:
        key = limits.rate_key or ""
        rate = limits.rate_limit or (queue.key_rate if queue else None)
        return _rate_facts(conn, RATE, (job.queue, key), rate, now)
    if job.state is JobState.PENDING and queue is not None and queue.rate is not None:
        return _rate_facts(conn, QUEUE_RATE, (job.queue, WHOLE_QUEUE), queue.rate, now, spent=True)
    return None


def _rate_facts(
    conn: Connection,
    limit: str,
    bucket: Key,
    rate: RateLimit | None,
    now: datetime,
    *,
    spent: bool = False,
) -> LimitFacts | None:
    """A rate's facts; with ``spent``, only if no job may start under it now."""
    tat = conn.execute(
        sa.select(rate_buckets.c.tat).where(
            rate_buckets.c.queue == bucket[0], rate_buckets.c.key == bucket[1]
        )
    ).scalar()
    if rate is None:
        return None
    if spent and flow.allowed(tat, now, rate) > 0:
        return None
    due = now if tat is None else max(now, flow.next_token_at(tat, rate))
    return LimitFacts(limit, bucket[1] or bucket[0], str(rate), next_token_at=due)
