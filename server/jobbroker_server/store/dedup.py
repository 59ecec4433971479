"""Submits that name a job already stored, and jobs that would take a unique
key back.

The dialects' INSERT skips a row whose idempotency key names a job (created
inside the dedup window), or whose unique key an unfinished job holds
(``ix_jobs_unique``). Only a submit with such a row comes here; a batch
whose rows all went in never does. Each skipped row is answered with the job
it names. An idempotency key sent again with another payload, task or queue
is refused: answering with the old job would drop the new one unseen.

A job that ended holds its unique key no more. Two moves bring one back to an
unfinished state: a replay (dead to pending) and a resume (a child its
parent's failure cancelled waits again when that parent is replayed). When
another job holds the key by then, the replay is refused whole
(UniqueKeyTaken), naming the key and both jobs; nothing is replayed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import Internal, KeyReused, StoreUnavailable, UniqueKeyTaken
from jobbroker_server.domain.models import JSON_CONTENT_TYPE
from jobbroker_server.domain.states import JobState
from jobbroker_server.store.tables import jobs

T = TypeVar("T")

InsertNew = Callable[[Connection, list[dict[str, Any]]], set[str]]
"""INSERT rows into jobs, skipping those whose idempotency or unique key is
taken; the ids it stored. Each dialect supplies its fastest."""

# The state term of ix_jobs_unique, values in the SQL text: only then does
# the planner see that the partial index applies (see ops._is).
_UNFINISHED = jobs.c.state.in_(
    [sa.literal_column(f"'{state.value}'") for state in JobState if not state.terminal]
)

# On PostgreSQL the job holding a unique key may finish between a row's
# INSERT and the SELECT that looks for it: the row is then tried again.
_TRIES = 3


def owners(
    conn: Connection,
    insert_new: InsertNew,
    clashes: list[dict[str, Any]],
    cutoff: datetime,
    *,
    strict: bool,
) -> dict[str, tuple[str, str]]:
    """For each row the INSERT skipped: the id and state of the job it names,
    or its own once stored. Idempotency keys of jobs created before ``cutoff``
    are free again: moved aside first. ``strict``: refuse a key sent again
    with another job (KeyReused)."""
    # Without a target, DO NOTHING skips a taken id too; ids are made fresh.
    for v in clashes:
        if not (v["idempotency_key"] or v["unique_key"]):
            raise Internal(f"job id {v['id']} is a duplicate")
    _free_expired(conn, clashes, cutoff)
    found: dict[str, tuple[str, str]] = {}
    left = clashes
    for _ in range(_TRIES):
        stored = insert_new(conn, left)
        found.update((v["id"], (v["id"], v["state"])) for v in left if v["id"] in stored)
        left = [v for v in left if v["id"] not in stored]
        found.update(_named(conn, left, strict))
        left = [v for v in left if v["id"] not in found]
        if not left:
            return found
    raise StoreUnavailable("the jobs holding these keys kept changing; try again")


def _free_expired(conn: Connection, clashes: list[dict[str, Any]], cutoff: datetime) -> None:
    keys = list({v["idempotency_key"] for v in clashes if v["idempotency_key"]})
    if keys:
        conn.execute(
            jobs.update()
            .where(jobs.c.idempotency_key.in_(keys), jobs.c.created_at < cutoff)
            .values(idempotency_key=None)
        )


def _named(
    conn: Connection, rows: list[dict[str, Any]], strict: bool
) -> dict[str, tuple[str, str]]:
    """The job each row names: by its idempotency key, else by its unique key."""
    keys = list({v["idempotency_key"] for v in rows if v["idempotency_key"]})
    by_key = {}
    if keys:
        found = conn.execute(
            sa.select(
                jobs.c.id,
                jobs.c.state,
                jobs.c.idempotency_key,
                jobs.c.queue,
                jobs.c.task,
                jobs.c.payload,
                jobs.c.content_type,
                jobs.c.inputs,
            ).where(jobs.c.idempotency_key.in_(keys))
        )
        by_key = {row.idempotency_key: row for row in found}
    unique = list({v["unique_key"] for v in rows if v["unique_key"]} - by_key.keys())
    holders = {}
    if unique:
        held = conn.execute(
            sa.select(jobs.c.unique_key, jobs.c.id, jobs.c.state).where(
                jobs.c.unique_key.in_(unique), _UNFINISHED
            )
        )
        holders = {key: (job_id, state) for key, job_id, state in held}
    named = {}
    for v in rows:
        old = by_key.get(v["idempotency_key"])
        if old is not None:
            if strict:
                _check_same(v, old)
            named[v["id"]] = (old.id, old.state)
        elif (holder := holders.get(v["unique_key"])) is not None:
            named[v["id"]] = holder
    return named


def _check_same(row: dict[str, Any], old: Any) -> None:
    """Refuse a resubmit of a key with another job. A workflow's job whose
    input its parents' results made has no payload of its own left to compare."""
    if old.queue != row["queue"]:
        what = f"queue ({old.queue!r})"
    elif old.task != row["task"]:
        what = f"task ({old.task!r})"
    elif old.inputs is None and not _same_payload(
        old.payload, old.content_type, row["payload"], row["content_type"]
    ):
        what = "payload"
    else:
        return
    raise KeyReused(
        f"idempotency key {row['idempotency_key']!r} was used for job {old.id} "
        f"with a different {what}; use a new key"
    )


def _same_payload(data: bytes, kind: str, other: bytes, other_kind: str) -> bool:
    """Equal bytes, or one JSON value: a dict's keys may come in another order."""
    if kind != other_kind:
        return False
    if data == other:
        return True
    if kind != JSON_CONTENT_TYPE:
        return False
    try:
        return bool(json.loads(data) == json.loads(other))
    except ValueError:
        return False


def move_back(conn: Connection, ids: Sequence[str], move: Callable[[], T], what: str) -> T:
    """Run ``move``, which brings the jobs ``ids`` from an end back to an
    unfinished state, under a savepoint: when one of their unique keys is
    held by then, undo it and refuse (UniqueKeyTaken). ``what`` is the move
    in the message: "replayed", "resumed by this replay"."""
    try:
        with conn.begin_nested():
            return move()
    except sa.exc.IntegrityError:
        pass
    raise UniqueKeyTaken(_conflict(conn, ids, what))


def _conflict(conn: Connection, ids: Sequence[str], what: str) -> str:
    mine = conn.execute(
        sa.select(jobs.c.id, jobs.c.unique_key)
        .where(jobs.c.id.in_(list(ids)), jobs.c.unique_key.is_not(None))
        .order_by(jobs.c.id)
    ).all()
    keys = list({key for _, key in mine})
    holders = dict(
        conn.execute(
            sa.select(jobs.c.unique_key, jobs.c.id).where(jobs.c.unique_key.in_(keys), _UNFINISHED)
        ).all()
    )
    seen: dict[str, str] = {}
    for job_id, key in mine:
        if key in holders:
            return (
                f"job {job_id} cannot be {what}: its unique key {key!r} is held by job "
                f"{holders[key]}, which has not finished; try again once it has"
            )
        if key in seen:
            return (
                f"jobs {seen[key]} and {job_id} cannot both be {what}: they share unique "
                f"key {key!r}; replay one of them"
            )
        seen[key] = job_id
    return f"the jobs cannot be {what}: one of their unique keys is held"
