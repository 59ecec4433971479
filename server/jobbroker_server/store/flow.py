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
  transaction, after the key's lock): as many as the key has free slots;
- a rate key's, when its next budget is due (``reopen``, by the scheduler):
  as many as that budget allows, less the key's jobs already pending.

The sweeps (by the reaper, a few keys each time, resuming where they
stopped) let through what nothing else would: a key whose jobs were cancelled while
pending, a limit raised. A held-back job is not counted as an attempt; the
lease of a let-through job counts its limits again, so a let-through that
races another lease only holds it back again.

Locks: the first round of a transaction's first ``pick``, and ``admit``,
wait for their keys' locks and buckets, taken in one order. Every later
round or pick only tries them (and makes no bucket), and passes over a key
another transaction holds: two leases never wait on each other in a circle.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain import flow
from jobbroker_server.domain.flow import (
    CONCURRENCY,
    QUEUE_RATE,
    RATE,
    Key,
    LimitFacts,
    RateLimit,
)
from jobbroker_server.domain.models import Job
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import BROKER, Reason, Transition
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import (
    HELD_BY_CONCURRENCY,
    HELD_BY_RATE,
    READY_CHANNEL,
    jobs,
    queues,
    rate_buckets,
)

HOLD_BACK_PER_LEASE = 1000  # jobs held back by one lease, in all
LET_THROUGH_AT_ONCE = 64  # of one key's held-back jobs, per end
SWEEP_KEYS = 50  # of each kind, per sweep
WHOLE_QUEUE = ""  # the rate bucket key of a queue's own rate


def _state(*states: JobState) -> sa.ColumnElement[bool]:
    """The state test with its values in the SQL text, as a partial index
    needs to be chosen (``ops._is``)."""
    if len(states) == 1:
        return jobs.c.state == sa.literal_column(f"'{states[0].value}'")
    return jobs.c.state.in_([sa.literal_column(f"'{s.value}'") for s in states])


_IS_PENDING = _state(JobState.PENDING)
_IS_WAITING = _state(JobState.WAITING)
_IS_HELD = _state(JobState.LEASED, JobState.RUNNING)
_IS_ACTIVE = _state(JobState.PENDING, JobState.LEASED, JobState.RUNNING)
_HELD_BY = {CONCURRENCY: HELD_BY_CONCURRENCY, RATE: HELD_BY_RATE}
_KEY_OF = {CONCURRENCY: jobs.c.concurrency_key, RATE: jobs.c.rate_key}


@dataclass(frozen=True, slots=True)
class _Queue:
    rate: RateLimit | None
    key_rate: RateLimit | None
    key_concurrency: int


class _Bucket(NamedTuple):
    tat: datetime
    waiting: bool


@dataclass(slots=True)
class Picked:
    """What ``pick`` decided: the jobs to lease, and the transitions of the
    jobs it held back."""

    ids: list[str]
    moved: list[Transition]


def _settings(
    conn: Connection, names: Iterable[str], *, leasable: bool = True
) -> dict[str, _Queue]:
    """The limits of the queues ``names``: of those a lease may take from
    (limited, not paused), or of all that have settings."""
    where: list[sa.ColumnElement[bool]] = [queues.c.name.in_(sorted(set(names)))]
    if leasable:
        where += [queues.c.limited, ~queues.c.paused]
    found = conn.execute(sa.select(queues).where(*where))
    return {
        r.name: _Queue(
            flow.stored_rate(r.rate_count, r.rate_period_s),
            flow.stored_rate(r.key_rate_count, r.key_rate_period_s),
            r.key_concurrency or 1,
        )
        for r in found
    }


def _by_queue(keys: Iterable[Key]) -> list[tuple[str, list[str]]]:
    grouped: dict[str, list[str]] = {}
    for queue, key in sorted(set(keys)):
        grouped.setdefault(queue, []).append(key)
    return list(grouped.items())


def _lock_keys(conn: Connection, keys: Iterable[Key], *, wait: bool = True) -> set[Key]:
    """Serialize the counting of each key's slots across replicas
    (PostgreSQL; SQLite has one writer): the keys whose lock this
    transaction holds now, to its commit. Without ``wait``, those it got at
    once."""
    wanted = set(keys)
    if conn.dialect.name != "postgresql" or not wanted:
        return wanted
    of_hash: dict[int, list[Key]] = {}
    for key in wanted:
        of_hash.setdefault(zlib.crc32("\0".join(key).encode()) - 2**31, []).append(key)
    hashes = sorted(of_hash)
    if wait:
        conn.execute(
            sa.text(
                "SELECT count(pg_advisory_xact_lock(h)) FROM"
                " (SELECT unnest(CAST(:hashes AS bigint[])) AS h ORDER BY h) AS ordered"
            ),
            {"hashes": hashes},
        )
        return wanted
    got = conn.execute(
        sa.text(
            "SELECT h FROM (SELECT unnest(CAST(:hashes AS bigint[])) AS h) AS wanted"
            " WHERE pg_try_advisory_xact_lock(h)"
        ),
        {"hashes": hashes},
    ).scalars()
    return {key for h in got for key in of_hash[h]}


def _counts(
    conn: Connection, keys: Iterable[Key], states: sa.ColumnElement[bool], kind: str
) -> Counter[Key]:
    """How many jobs of each key are in ``states``."""
    column = _KEY_OF[kind]
    counts: Counter[Key] = Counter()
    for queue, names in _by_queue(keys):
        found = conn.execute(
            sa.select(column, sa.func.count())
            .where(jobs.c.queue == queue, column.in_(names), states)
            .group_by(column)
        )
        for key, count in found:
            counts[(queue, key)] = count
    return counts


def _buckets(
    conn: Connection, keys: Iterable[Key], now: datetime, *, wait: bool = True
) -> dict[Key, _Bucket]:
    """The buckets, their rows locked (made if they have none); without
    ``wait``, only those that exist and no other transaction holds (making
    one waits for another transaction making it too)."""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    have = _bucket_rows(conn, wanted, wait)
    missing = [k for k in wanted if k not in have]
    if missing and wait:
        made = [
            {"queue": q, "key": k, "tat": now, "next_at": now, "waiting": False} for q, k in missing
        ]
        conn.execute(_insert_ignoring(conn, made))
        have.update(_bucket_rows(conn, missing, wait))
    return have


def _bucket_rows(conn: Connection, keys: Sequence[Key], wait: bool) -> dict[Key, _Bucket]:
    found: dict[Key, _Bucket] = {}
    for queue, names in _by_queue(keys):
        rows = conn.execute(
            sa.select(rate_buckets.c.key, rate_buckets.c.tat, rate_buckets.c.waiting)
            .where(rate_buckets.c.queue == queue, rate_buckets.c.key.in_(names))
            .order_by(rate_buckets.c.key)
            .with_for_update(skip_locked=not wait)
        )
        for key, tat, waiting in rows:
            found[(queue, key)] = _Bucket(tat, waiting)
    return found


def _insert_ignoring(conn: Connection, values: list[dict[str, Any]]) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(rate_buckets).values(values).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(rate_buckets).values(values).on_conflict_do_nothing()


def _set_bucket(conn: Connection, key: Key, **values: Any) -> None:
    conn.execute(
        rate_buckets.update()
        .where(rate_buckets.c.queue == key[0], rate_buckets.c.key == key[1])
        .values(**values)
    )


_CANDIDATES = Prepared(
    sa.select(
        jobs.c.id,
        jobs.c.queue,
        sa.func.length(jobs.c.payload).label("size"),
        jobs.c.concurrency_key,
        jobs.c.concurrency_limit,
        jobs.c.rate_key,
        jobs.c.rate_count,
        jobs.c.rate_period_s,
    )
    .where(
        _IS_PENDING,
        jobs.c.queue.in_(sa.bindparam("queues", expanding=True)),
        jobs.c.id.not_in(sa.bindparam("seen", expanding=True)),
    )
    .order_by(jobs.c.priority.desc(), jobs.c.id)
    .limit(sa.bindparam("limit"))
    .with_for_update(skip_locked=True)
)


@dataclass
class _Budget:
    """What one ``pick`` may still take: per queue, per concurrency key, per
    rate key; the buckets it holds; what it could not lock."""

    settings: dict[str, _Queue]
    queue_left: dict[str, int] = field(default_factory=dict)
    slots_left: dict[Key, int] = field(default_factory=dict)
    rate_left: dict[Key, int] = field(default_factory=dict)
    rate_of: dict[Key, RateLimit] = field(default_factory=dict)
    buckets: dict[Key, _Bucket] = field(default_factory=dict)
    taken: Counter[Key] = field(default_factory=Counter)  # starts, per bucket
    spent: set[Key] = field(default_factory=set)  # rate keys found without budget
    busy: set[tuple[str, Key]] = field(default_factory=set)  # locked by another

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
            if (RATE, rkey) not in self.busy:
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
    conn: Connection,
    names: Sequence[str],
    limit: int,
    now: datetime,
    max_bytes: int,
    *,
    wait: bool = True,
) -> Picked:
    """The jobs of the limited queues ``names`` that a lease of ``limit`` may
    take now (their rows locked), and those held back; the jobs' payloads,
    with all before them, fit ``max_bytes``. ``wait``: this is the first
    pick of its transaction, which may wait for its keys' locks."""
    budget = _Budget(_settings(conn, names))
    whole = {(q, WHOLE_QUEUE): s.rate for q, s in budget.settings.items() if s.rate is not None}
    budget.buckets = _buckets(conn, whole, now, wait=wait)
    for key, rate in whole.items():
        bucket = budget.buckets.get(key)
        budget.queue_left[key[0]] = 0 if bucket is None else flow.allowed(bucket.tat, now, rate)
        if bucket is not None:
            budget.rate_of[key] = rate
    chosen: list[str] = []
    seen: list[str] = []
    moved: list[Transition] = []
    size = 0
    # A round that held a key back, or spent a queue's rate, may leave room
    # that the next fills from other keys and queues.
    for round_ in range(3):
        open_queues = [q for q in budget.settings if budget.queue_left.get(q, 1) > 0]
        if not open_queues or len(chosen) >= limit:
            break
        found = _CANDIDATES.rows(
            conn, {"queues": open_queues, "seen": seen or [""], "limit": limit - len(chosen)}
        )
        if not found:
            break
        seen += [row.id for row in found]
        _count_limits(conn, budget, found, now, wait=wait and round_ == 0)
        holding: set[tuple[str, Key]] = set()
        closed_queue = False
        for row in found:
            if size and size + row.size > max_bytes:
                break
            held_by = budget.take(row)
            if held_by is None:
                chosen.append(row.id)
                size += row.size
            elif held_by[0] == QUEUE_RATE:
                closed_queue = True
            elif held_by not in budget.busy:
                holding.add(held_by)
        held: list[Transition] = []
        for why, key in sorted(holding):
            room = HOLD_BACK_PER_LEASE - len(moved) - len(held)
            if room > 0:
                held += _hold_back(conn, why, key, chosen, room)
        moved += held
        if not held and not closed_queue:
            break
    _write_buckets(conn, budget, now)
    return Picked(chosen, moved)


def _count_limits(
    conn: Connection, budget: _Budget, found: Sequence[Any], now: datetime, *, wait: bool
) -> None:
    """Fill the budget for the keys first seen among ``found``."""
    limits: dict[Key, int] = {}
    rates: dict[Key, RateLimit] = {}
    for r in found:
        settings = budget.settings[r.queue]
        if r.concurrency_key is not None:
            key = (r.queue, r.concurrency_key)
            if key not in budget.slots_left:
                # The smallest that any of its jobs here asks for: a job
                # cannot lift another's limit.
                own = r.concurrency_limit or settings.key_concurrency
                limits[key] = min(limits.get(key, own), own)
        if r.rate_key is not None:
            key = (r.queue, r.rate_key)
            rate = flow.stored_rate(r.rate_count, r.rate_period_s) or settings.key_rate
            if rate is not None and key not in budget.rate_left:
                known = rates.get(key)
                rates[key] = rate if known is None or rate.interval > known.interval else known
    if limits:
        locked = _lock_keys(conn, limits, wait=wait)
        held = _counts(conn, locked, _IS_HELD, CONCURRENCY)
        for key, allowed in limits.items():
            budget.slots_left[key] = allowed - held[key] if key in locked else 0
            if key not in locked:
                budget.busy.add((CONCURRENCY, key))
    if rates:
        got = _buckets(conn, rates, now, wait=wait)
        budget.buckets.update(got)
        for key, rate in rates.items():
            bucket = got.get(key)
            budget.rate_left[key] = 0 if bucket is None else flow.allowed(bucket.tat, now, rate)
            if bucket is None:
                budget.busy.add((RATE, key))
            else:
                budget.rate_of[key] = rate


def _write_buckets(conn: Connection, budget: _Budget, now: datetime) -> None:
    """The rate buckets after the starts taken; one found spent waits for
    its next budget (``reopen``)."""
    for key, rate in budget.rate_of.items():
        bucket = budget.buckets[key]
        tat = flow.taken(bucket.tat, now, rate, budget.taken[key])
        whole = key[1] == WHOLE_QUEUE
        closed = key in budget.spent or (whole and budget.queue_left[key[0]] <= 0)
        if budget.taken[key] or closed:
            # Only reopen says that nothing waits on it any more.
            waiting = bucket.waiting or closed
            _set_bucket(conn, key, tat=tat, next_at=flow.next_token_at(tat, rate), waiting=waiting)


def _hold_back(
    conn: Connection, limit: str, at: Key, chosen: list[str], most: int
) -> list[Transition]:
    """Hold back up to ``most`` of the key's pending jobs (not those
    ``chosen``, nor those another lease has locked)."""
    queue, key = at
    column = _KEY_OF[limit]
    pending = (
        sa.select(jobs.c.id)
        .where(jobs.c.queue == queue, column == key, _IS_PENDING, jobs.c.id.not_in(chosen or [""]))
        .limit(most)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    held = conn.execute(
        jobs.update()
        .where(jobs.c.id.in_(pending))
        .values(state=JobState.WAITING.value, held_by=limit)
        .returning(jobs.c.id, jobs.c.attempts)
    ).all()
    detail = {"limit": limit, "key": key}
    waiting, pending_state = JobState.WAITING, JobState.PENDING
    return [
        Transition(job_id, queue, pending_state, waiting, Reason.LIMITED, attempts, BROKER, detail)
        for job_id, attempts in held
    ]


def _held_back(limit: str, queue: str, key: str) -> tuple[sa.ColumnElement[bool], ...]:
    return (_HELD_BY[limit], _IS_WAITING, jobs.c.queue == queue, _KEY_OF[limit] == key)


def _let_through(
    conn: Connection, queue: str, limit: str, key: str, count: int
) -> list[Transition]:
    """Up to ``count`` of the key's held-back jobs, pending again."""
    picked = conn.execute(
        sa.select(jobs.c.id, jobs.c.attempts)
        .where(*_held_back(limit, queue, key))
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(count)
        .with_for_update(skip_locked=True)
    ).all()
    if not picked:
        return []
    conn.execute(
        jobs.update()
        .where(jobs.c.id.in_([job_id for job_id, _ in picked]))
        .values(state=JobState.PENDING.value, held_by=None)
    )
    detail = {"limit": limit, "key": key}
    waiting, pending = JobState.WAITING, JobState.PENDING
    return [
        Transition(job_id, queue, waiting, pending, Reason.ADMITTED, attempts, BROKER, detail)
        for job_id, attempts in picked
    ]


def _first_held_back(conn: Connection, limit: str, queue: str, key: str) -> Any:
    """The key's next held-back job's own limits, or None if none is held back."""
    return conn.execute(
        sa.select(jobs.c.concurrency_limit, jobs.c.rate_count, jobs.c.rate_period_s)
        .where(*_held_back(limit, queue, key))
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(1)
    ).first()


_FREES = {JobState.LEASED, JobState.RUNNING}


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


def admit(conn: Connection, keys: Sequence[Key]) -> list[Transition]:
    """Let through as many held-back jobs of each concurrency key as it has
    slots that no job holds or is about to. The keys' locks come first: a
    lease holding a key back commits before this looks, or waits for it."""
    _lock_keys(conn, keys)
    waiting = _with_held_back(conn, keys)
    if not waiting:
        return []
    settings = _settings(conn, {q for q, _ in waiting}, leasable=False)
    active = _counts(conn, waiting, _IS_ACTIVE, CONCURRENCY)
    moved = []
    for queue, key in waiting:
        first = _first_held_back(conn, CONCURRENCY, queue, key)
        if first is None:
            continue
        queue_limit = settings[queue].key_concurrency if queue in settings else 1
        room = min(
            (first.concurrency_limit or queue_limit) - active[(queue, key)], LET_THROUGH_AT_ONCE
        )
        if room > 0:
            moved += _let_through(conn, queue, CONCURRENCY, key, room)
    return moved


def _with_held_back(conn: Connection, keys: Sequence[Key]) -> list[Key]:
    """Of ``keys``, the concurrency keys with held-back jobs: one statement
    per queue, however many keys ended."""
    found: set[Key] = set()
    for queue, names in _by_queue(keys):
        rows = conn.execute(
            sa.select(jobs.c.concurrency_key)
            .where(
                HELD_BY_CONCURRENCY,
                _IS_WAITING,
                jobs.c.queue == queue,
                jobs.c.concurrency_key.in_(names),
            )
            .distinct()
        )
        found |= {(queue, k) for (k,) in rows}
    return sorted(found)


def reopen(conn: Connection, now: datetime) -> tuple[list[Transition], set[str]]:
    """The rate buckets whose next budget is due: their held-back jobs let
    through (as many as the budget allows, less the key's jobs already
    pending), and the queues whose own rate reopened, whose streams are woken
    (on every replica)."""
    due = conn.execute(
        sa.select(rate_buckets)
        .where(rate_buckets.c.waiting, rate_buckets.c.next_at <= now)
        .order_by(rate_buckets.c.queue, rate_buckets.c.key)
        .limit(500)
        .with_for_update(skip_locked=True)
    ).all()
    moved: list[Transition] = []
    woken: set[str] = set()
    settings = _settings(conn, {r.queue for r in due}, leasable=False)
    for row in due:
        key = (row.queue, row.key)
        if row.key == WHOLE_QUEUE:
            woken.add(row.queue)
            _set_bucket(conn, key, waiting=False)
            continue
        first = _first_held_back(conn, RATE, row.queue, row.key)
        if first is None:  # nothing waits on it any more
            _set_bucket(conn, key, waiting=False)
            continue
        queue = settings.get(row.queue)
        rate = flow.stored_rate(first.rate_count, first.rate_period_s) or (
            queue.key_rate if queue else None
        )
        if rate is None:  # the limit was removed: let them through
            moved += _let_through(conn, row.queue, RATE, row.key, LET_THROUGH_AT_ONCE)
            _set_bucket(conn, key, next_at=now)
            continue
        pending = _counts(conn, [key], _IS_PENDING, RATE)[key]
        count = flow.allowed(row.tat, now, rate) - pending
        if count <= 0:
            # Its pending jobs take the budget when they are leased, and that
            # lease sets when the next is due; until then look once a period.
            _set_bucket(conn, key, next_at=now + rate.period)
            continue
        through = _let_through(conn, row.queue, RATE, row.key, count)
        moved += through
        # When the budget after these and the pending ones is due.
        after = flow.taken(row.tat, now, rate, len(through) + pending)
        _set_bucket(conn, key, next_at=flow.next_token_at(after, rate))
    if woken and conn.dialect.name == "postgresql":
        for name in sorted(woken):
            conn.execute(sa.select(sa.func.pg_notify(READY_CHANNEL, name)))
    return moved, woken


def next_reopen_at(conn: Connection) -> datetime | None:
    """When the next rate bucket with jobs or streams waiting on it reopens."""
    found: datetime | None = conn.execute(
        sa.select(sa.func.min(rate_buckets.c.next_at)).where(rate_buckets.c.waiting)
    ).scalar()
    return found


def sweep_concurrency(conn: Connection, after: Key | None) -> tuple[list[Transition], Key | None]:
    """Let through what no end will: the held-back jobs of concurrency keys
    with free slots (a key whose jobs were cancelled while pending, a limit
    raised); SWEEP_KEYS keys a call, from where the last one stopped."""
    keys = _held_back_keys(conn, CONCURRENCY, after)
    return admit(conn, keys) if keys else [], _resume_at(keys)


def sweep_rates(conn: Connection, now: datetime, after: Key | None) -> Key | None:
    """Have reopen look at once at the rate keys with held-back jobs whose
    bucket waits on nothing; then prune the buckets that are as good as
    none. Its own transaction: it takes buckets, and no key's lock."""
    keys = _held_back_keys(conn, RATE, after)
    for key, bucket in _buckets(conn, keys, now).items():
        if not bucket.waiting:
            _set_bucket(conn, key, waiting=True, next_at=now)
    _prune(conn, now)
    return _resume_at(keys)


def _resume_at(keys: list[Key]) -> Key | None:
    """Where the next sweep starts: after the last key, or over at the first."""
    return keys[-1] if len(keys) >= SWEEP_KEYS else None


def _held_back_keys(conn: Connection, limit: str, after: Key | None) -> list[Key]:
    """Up to SWEEP_KEYS keys with held-back jobs, in order after ``after``:
    one index seek each, however many jobs a key holds back."""
    column = _KEY_OF[limit]
    found: list[Key] = []
    while len(found) < SWEEP_KEYS:
        where = [_HELD_BY[limit], _IS_WAITING]
        if after is not None:
            where.append(sa.tuple_(jobs.c.queue, column) > sa.tuple_(*after))
        row = conn.execute(
            sa.select(jobs.c.queue, column).where(*where).order_by(jobs.c.queue, column).limit(1)
        ).first()
        if row is None:
            break
        after = (row[0], row[1])
        found.append(after)
    return found


def _prune(conn: Connection, now: datetime) -> None:
    """Delete buckets that are full again and wait on nothing: as good as
    none, and a client that used many rate keys leaves no trail of them."""
    found = conn.execute(
        sa.select(rate_buckets.c.queue, rate_buckets.c.key)
        .where(~rate_buckets.c.waiting, rate_buckets.c.tat < now)
        .limit(1000)
        .with_for_update(skip_locked=True)
    ).all()
    for queue, names in _by_queue((q, k) for q, k in found):
        conn.execute(
            rate_buckets.delete().where(
                rate_buckets.c.queue == queue,
                rate_buckets.c.key.in_(names),
                ~rate_buckets.c.waiting,
                rate_buckets.c.tat < now,
            )
        )


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
            .where(jobs.c.queue == job.queue, jobs.c.concurrency_key == key, _IS_HELD)
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
