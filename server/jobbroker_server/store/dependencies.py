"""Jobs that wait on other jobs (``domain/workflows.py``), in the store.

A waiting job counts its parents that have not ended as it needs
(``jobs.waiting_on``). Every operation that ends jobs passes its transitions
through ``follow``, in its own transaction: a parent's success (or any end,
for a child that tolerates failures) is copied to its links and counted down
on each child, and the child whose count reaches zero is released, its input
made from the links; a parent that ends dead or cancelled cancels the
children that need it, and theirs in turn. Replaying that parent resumes
them: they wait again.

On PostgreSQL, parents of one child that end in different transactions (on
different replicas) count down the same row: the row lock orders them, and
the one that reaches zero releases the child, exactly once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import FailedPrecondition
from jobbroker_server.domain.models import ErrorInfo, NewJob, Payload, WaitsOn
from jobbroker_server.domain.states import JobState
from jobbroker_server.domain.transitions import BROKER, Reason, Transition
from jobbroker_server.domain.workflows import (
    InputTooLarge,
    check_input_size,
    outcome_slot,
    released_input,
    result_slot,
)
from jobbroker_server.store import dedup, rows
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import job_deps, jobs

_S = JobState
_ENDS = frozenset({_S.SUCCEEDED, _S.DEAD, _S.CANCELLED})
_WAITS_AGAIN = (Reason.REPLAYED, Reason.RESUMED)  # its cancelled children may wait again
BLOCKED = "blocked"  # a link whose parent's end cancelled its child
_CHUNK = 500  # ids per IN list


def link(conn: Connection, new: Sequence[NewJob], stored: set[str]) -> None:
    """Store the links of the new jobs that wait on others. A workflow is
    stored whole or, when its jobs' keys name jobs that exist (see ``dedup``),
    not at all; part of one is refused."""
    by_workflow = Counter(job.workflow_id for job in new if job.workflow_id)
    if not by_workflow:
        return
    kept = Counter(job.workflow_id for job in new if job.workflow_id and job.id in stored)
    for workflow, n in by_workflow.items():
        if 0 < kept[workflow] < n:
            raise FailedPrecondition(
                f"workflow {workflow}: {n - kept[workflow]} of its {n} jobs have idempotency "
                "keys of jobs that exist, or unique keys of unfinished ones; submit it with "
                "new keys, or all of the old ones"
            )
        if kept[workflow] and _taken(conn, workflow, n):
            raise FailedPrecondition(
                f"workflow id {workflow!r} is taken by another workflow's jobs; "
                "give each workflow a new id"
            )
    values = [
        {
            "child_id": job.id,
            "position": i,
            "parent_id": parent,
            "tolerant": needs.tolerate_failures,
            "feeds": needs.shape is not None,
        }
        for job in new
        if job.id in stored and (needs := job.needs) is not None
        for i, parent in enumerate(needs.parents)
    ]
    if values:
        _LINK.run_many(conn, values)


_LINK = Prepared(
    job_deps.insert().values(
        {
            c.key: sa.bindparam(c.key, type_=c.type)
            for c in job_deps.c
            if c.key in ("child_id", "position", "parent_id", "tolerant", "feeds")
        }
    )
)


def _taken(conn: Connection, workflow: str, mine: int) -> bool:
    """Whether jobs other than the ``mine`` just stored carry this workflow id."""
    found = conn.execute(
        sa.select(sa.func.count()).select_from(
            sa.select(jobs.c.id).where(jobs.c.workflow_id == workflow).limit(mine + 1).subquery()
        )
    ).scalar()
    return bool(found and found > mine)


def abandon(conn: Connection, workflow: str) -> None:
    """A cancelled workflow stays cancelled: replaying a dead step of it no
    longer resumes the jobs that step cancelled."""
    of_workflow = sa.select(jobs.c.id).where(jobs.c.workflow_id == workflow)
    conn.execute(
        job_deps.update()
        .where(job_deps.c.outcome == BLOCKED, job_deps.c.child_id.in_(of_workflow))
        .values(outcome=_S.CANCELLED.value)
    )


# A job a dead parent cancelled, which a replay of that parent resumes.
BLOCKED_CHILD = sa.exists().where(job_deps.c.child_id == jobs.c.id, job_deps.c.outcome == BLOCKED)

# Asked after every operation that ends jobs, most of which have no
# children: prepared, so that asking costs the hot path next to nothing.
_UNDONE = Prepared(
    sa.select(job_deps.c.child_id, job_deps.c.parent_id, job_deps.c.tolerant)
    .where(job_deps.c.parent_id.in_(sa.bindparam("ids", expanding=True)))
    .where(job_deps.c.outcome.is_(None))
)


def follow(conn: Connection, now: datetime, transitions: Sequence[Transition]) -> list[Transition]:
    """The transitions that ``transitions`` cause through links: children
    released, cancelled or resumed, and theirs in turn."""
    made: list[Transition] = []
    step = list(transitions)
    while step:
        # Each turn follows the last turn's transitions one level down.
        ended = {t.job_id: t.target for t in step if t.target is not None and t.target in _ENDS}
        replayed = [t.job_id for t in step if t.reason in _WAITS_AGAIN]
        purged = [t.job_id for t in step if t.reason is Reason.PURGED]
        step = []
        if ended:
            step += _ended(conn, now, ended)
        if replayed:
            step += _resume(conn, replayed)
        if purged:
            _unblock(conn, purged)
        made += step
    return made


def _unblock(conn: Connection, parents: list[str]) -> None:
    """A purged parent will not be replayed: the jobs it cancelled stay so,
    and retention may delete them."""
    for ids in _chunks(parents):
        conn.execute(
            job_deps.update()
            .where(job_deps.c.parent_id.in_(ids), job_deps.c.outcome == BLOCKED)
            .values(outcome=_S.CANCELLED.value)
        )


def _ended(conn: Connection, now: datetime, ended: dict[str, JobState]) -> list[Transition]:
    links = [row for ids in _chunks(ended) for row in _UNDONE.rows(conn, {"ids": ids})]
    if not links:
        return []
    done: Counter[str] = Counter()  # links of each child that its parents' ends satisfy
    failed: dict[str, str] = {}  # child: a parent whose end cancels it
    for child, parent, tolerant in links:
        if ended[parent] is _S.SUCCEEDED or tolerant:
            done[child] += 1
        else:
            failed.setdefault(child, parent)
    for state in {ended[parent] for _, parent, _ in links}:
        parents = [p for p, s in ended.items() if s is state]
        _record_outcome(conn, parents, state)
    failing = [p for p, s in ended.items() if s is not _S.SUCCEEDED]
    moved = []
    # One pass in id order: two transactions lock the children they share in
    # the same order, and never wait for each other in a circle.
    for child in sorted(failed.keys() | done.keys()):
        cancelled = child in failed and _cancel(conn, now, child, failed[child], ended, failing)
        if cancelled:
            moved.append(cancelled)
        if child in done and (released := _count_down(conn, now, child, done[child])):
            moved.append(released)
    return moved


def _record_outcome(conn: Connection, parents: list[str], state: JobState) -> None:
    """Copy how the parents ended to the links it satisfies."""
    parent = jobs.alias("parent")
    own = parent.c.id == job_deps.c.parent_id
    values: dict[str, Any] = {"outcome": state.value}
    if state is _S.SUCCEEDED:
        values["result"] = sa.select(parent.c.result).where(own).scalar_subquery()
        values["result_content_type"] = (
            sa.select(parent.c.result_content_type).where(own).scalar_subquery()
        )
    else:
        values["error"] = sa.select(parent.c.last_error).where(own).scalar_subquery()
    for ids in _chunks(parents):
        where: list[sa.ColumnElement[bool]] = [
            job_deps.c.parent_id.in_(ids),
            job_deps.c.outcome.is_(None),
        ]
        if state is not _S.SUCCEEDED:
            where.append(job_deps.c.tolerant)
        feeding = [*where, job_deps.c.feeds]
        conn.execute(job_deps.update().where(*feeding).values(values))
        # A child that takes its own payload needs to know only that it ended.
        conn.execute(job_deps.update().where(*where, ~job_deps.c.feeds).values(outcome=state.value))


def _cancel(
    conn: Connection,
    now: datetime,
    child: str,
    parent: str,
    ended: dict[str, JobState],
    failing: list[str],
) -> Transition | None:
    """Cancel a waiting child whose parent failed, and mark the links that
    did it, which a replay of that parent undoes. A child a failed parent
    cancelled before is marked too, so that replaying only one of them does
    not resume it."""
    row = conn.execute(
        sa.select(jobs.c.state, jobs.c.queue, jobs.c.attempts, BLOCKED_CHILD.label("blocked"))
        .where(jobs.c.id == child)
        .with_for_update(of=jobs)
    ).first()
    if row is None or not (row.state == _S.WAITING.value or row.blocked):
        return None  # ended otherwise, or cancelled by someone
    for ids in _chunks(failing):
        conn.execute(
            job_deps.update()
            .where(
                job_deps.c.child_id == child,
                job_deps.c.parent_id.in_(ids),
                job_deps.c.outcome.is_(None),
                sa.not_(job_deps.c.tolerant),
            )
            .values(outcome=BLOCKED)
        )
    if row.state != _S.WAITING.value:
        return None
    state = ended[parent]
    error = ErrorInfo("ParentFailed", f"parent job {parent} ended {state.value}")
    conn.execute(
        jobs.update()
        .where(jobs.c.id == child)
        .values(state=_S.CANCELLED.value, finished_at=now, last_error=rows.error_to_json(error))
    )
    detail = {"parent": parent, "parent_state": state.value}
    return Transition(
        child,
        row.queue,
        _S.WAITING,
        _S.CANCELLED,
        Reason.PARENT_FAILED,
        row.attempts,
        BROKER,
        detail,
    )


def _count_down(conn: Connection, now: datetime, child: str, n: int) -> Transition | None:
    """Count ``n`` satisfied links down on a child; release it at zero."""
    row = conn.execute(
        jobs.update()
        .where(jobs.c.id == child)
        .values(waiting_on=jobs.c.waiting_on - n)
        .returning(jobs.c.state, jobs.c.waiting_on)
    ).first()
    if row and row.waiting_on <= 0 and row.state == _S.WAITING.value:
        return _release(conn, now, child)
    return None


# A released job's links, for its input: their results (all succeeded), or
# their outcomes (a job that tolerates failures). Prepared: a chord's body
# reads one row per member.
_RESULTS = Prepared(
    sa.select(job_deps.c.result, job_deps.c.result_content_type)
    .where(job_deps.c.child_id == sa.bindparam("child"))
    .order_by(job_deps.c.position)
)
_OUTCOMES = Prepared(
    sa.select(
        job_deps.c.outcome, job_deps.c.result, job_deps.c.result_content_type, job_deps.c.error
    )
    .where(job_deps.c.child_id == sa.bindparam("child"))
    .order_by(job_deps.c.position)
)
_RELEASED = Prepared(
    sa.select(
        jobs.c.queue,
        jobs.c.attempts,
        jobs.c.payload,
        jobs.c.content_type,
        jobs.c.inputs,
        jobs.c.scheduled_at,
    ).where(jobs.c.id == sa.bindparam("child"))
)


_INPUT_SIZE = Prepared(
    sa.select(
        sa.func.coalesce(sa.func.sum(sa.func.length(job_deps.c.result)), 0).label("size")
    ).where(job_deps.c.child_id == sa.bindparam("child"))
)


def _release(conn: Connection, now: datetime, child: str) -> Transition:
    [row] = _RELEASED.rows(conn, {"child": child})
    values: dict[str, Any] = {}
    if row.inputs:
        [(size,)] = _INPUT_SIZE.tuples(conn, {"child": child})
        try:
            # A result that is not JSON grows by a third in base64.
            check_input_size(int(size) * 4 // 3 + len(row.payload))
        except InputTooLarge as error:
            return _refuse(conn, now, child, row, str(error))
        if row.inputs.get("tolerant"):
            slots = [
                outcome_slot(outcome, result, kind, rows.error_from_json(error))
                for outcome, result, kind, error in _OUTCOMES.rows(conn, {"child": child})
            ]
        else:
            slots = [result_slot(r, kind) for r, kind in _RESULTS.tuples(conn, {"child": child})]
        own = Payload(row.payload, row.content_type)
        made = released_input(row.inputs["shape"], row.inputs["payload"], own, slots)
        values = {"payload": made.data, "content_type": made.content_type}
    target = _S.SCHEDULED if row.scheduled_at > now else _S.PENDING
    conn.execute(jobs.update().where(jobs.c.id == child).values(state=target.value, **values))
    return Transition(child, row.queue, _S.WAITING, target, Reason.PARENTS_DONE, row.attempts)


def _refuse(conn: Connection, now: datetime, child: str, row: Any, why: str) -> Transition:
    """Cancel a job whose input cannot be made; its error says why."""
    error = ErrorInfo("InputTooLarge", why)
    conn.execute(
        jobs.update()
        .where(jobs.c.id == child)
        .values(state=_S.CANCELLED.value, finished_at=now, last_error=rows.error_to_json(error))
    )
    detail = {"error_type": error.type, "error": why}
    return Transition(
        child, row.queue, _S.WAITING, _S.CANCELLED, Reason.CANCELLED, row.attempts, BROKER, detail
    )


def _resume(conn: Connection, replayed: list[str]) -> list[Transition]:
    """The children a replayed parent cancelled wait again, unless another
    parent's failure still holds them. One whose unique key another job
    holds by now refuses the replay (``dedup.move_back``)."""
    children: set[str] = set()
    for ids in _chunks(replayed):
        found = conn.execute(
            job_deps.update()
            .where(job_deps.c.parent_id.in_(ids), job_deps.c.outcome == BLOCKED)
            .values(outcome=None)
            .returning(job_deps.c.child_id)
        ).scalars()
        children.update(found)
    moved = []
    for child in sorted(children):
        # Locked first, then looked at: a parent failing now in another
        # transaction either marked its link before, or sees the child waiting.
        row = conn.execute(
            sa.select(jobs.c.state, jobs.c.queue, jobs.c.attempts)
            .where(jobs.c.id == child)
            .with_for_update()
        ).first()
        if row is None or row.state != _S.CANCELLED.value:
            continue
        if conn.execute(sa.select(BLOCKED_CHILD).where(jobs.c.id == child)).scalar():
            continue
        waits = (
            jobs.update()
            .where(jobs.c.id == child)
            .values(state=_S.WAITING.value, finished_at=None, last_error=None)
        )
        dedup.move_back(conn, [child], partial(conn.execute, waits), "resumed by this replay")
        moved.append(
            Transition(child, row.queue, _S.CANCELLED, _S.WAITING, Reason.RESUMED, row.attempts)
        )
    return moved


def waits_on(
    conn: Connection, job_id: str, *, blocked_only: bool, limit: int = 10
) -> tuple[WaitsOn, ...]:
    """The parents of a job that have not ended as it needs (or only those
    whose failure cancelled it), first ones first."""
    parent = jobs.alias("parent")
    unsatisfied = job_deps.c.outcome == BLOCKED
    if not blocked_only:
        unsatisfied = sa.or_(job_deps.c.outcome.is_(None), unsatisfied)
    found = conn.execute(
        sa.select(job_deps.c.parent_id, parent.c.task, parent.c.state)
        .join(parent, parent.c.id == job_deps.c.parent_id, isouter=True)
        .where(job_deps.c.child_id == job_id)
        .where(unsatisfied)
        .order_by(job_deps.c.position)
        .limit(limit)
    ).all()
    return tuple(WaitsOn(r.parent_id, r.task, JobState(r.state)) for r in found if r.state)


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    listed = list(ids)
    for start in range(0, len(listed), _CHUNK):
        yield listed[start : start + _CHUNK]
