"""Concurrency and rate limits on the client side: the keys and limits a
submit and its task declare, checked and written into the JobSpec before
anything is sent (the broker checks them again, and enforces them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jobbroker.v1 import job_pb2

from ._convert import rate_limit_to_pb
from .errors import InvalidArgumentError
from .types import LIMIT_MAX, JobRequest, RateLimit, rate_problem

if TYPE_CHECKING:
    from .task import Task

KEY_MAX = 200  # characters of a concurrency or rate key

# A task's key: the key itself, or a function of the job's payload that
# computes it (None: this job has no key).
KeyOf = str | Callable[[Any], str | None]


def rate_limit_of(value: object, what: str) -> RateLimit | None:
    """A rate limit option (a RateLimit, or "100/s"), if the broker takes it."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return RateLimit.parse(value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{what}: {exc}") from None
    if not isinstance(value, RateLimit):
        raise InvalidArgumentError(
            f"{what} takes a RateLimit or a string such as '100/s', not {value!r}"
        )
    problem = rate_problem(value.count, value.period)
    if problem is not None:
        raise InvalidArgumentError(f"{what} {value} is out of bounds: its {problem}")
    return value


def check_key(value: object, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= KEY_MAX:
        shown = f"{len(value)} characters" if isinstance(value, str) and value else repr(value)
        raise InvalidArgumentError(
            f"{what} is a non-empty string of at most {KEY_MAX} characters, not {shown}"
        )
    return value


def check_limit(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= LIMIT_MAX:
        raise InvalidArgumentError(
            f"{what} is a whole number from 1 to {LIMIT_MAX:,}, not {value!r}"
        )
    return value


def check_declared(
    concurrency_key: object, concurrency_limit: object, rate_key: object, rate_limit: object
) -> None:
    """Refuse a task's bad limits where the task is declared."""
    for key, what in ((concurrency_key, "concurrency_key"), (rate_key, "rate_key")):
        if key is not None and not callable(key):
            check_key(key, f"{what} (a str, or a function of the payload)")
    if concurrency_limit is not None:
        check_limit(concurrency_limit, "concurrency_limit")
    rate_limit_of(rate_limit, "rate_limit")


def _key(given: str | None, declared: KeyOf | None, payload: Any, what: str, task: str) -> str:
    """The job's key: the submit's, else its task's (computed from the payload)."""
    if given is not None:
        return check_key(given, what)
    if declared is None:
        return ""
    if not callable(declared):
        return declared  # checked when the task was declared
    try:
        key = declared(payload)
    except Exception as exc:
        raise InvalidArgumentError(
            f"the {what} function of task {task!r} failed on the job's payload: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return "" if key is None else check_key(key, f"the {what} task {task!r} computed")


def set_limits(spec: job_pb2.JobSpec, request: JobRequest, task: Task[Any, Any] | None) -> None:
    """Write the job's keys and limits into `spec`: the submit's, else its
    task's. A limit of the task's without a key limits nothing; a limit the
    submit gives without any key is refused."""
    given = (request.concurrency_key, request.concurrency_limit, request.rate_key)
    if task is None and given == (None, None, None) and request.rate_limit is None:
        return
    name = task.name if task else str(request.task)
    key = _key(
        request.concurrency_key,
        task.concurrency_key if task else None,
        request.payload,
        "concurrency_key",
        name,
    )
    if request.concurrency_limit is not None:
        check_limit(request.concurrency_limit, "concurrency_limit")
        if not key:
            raise InvalidArgumentError(
                "concurrency_limit limits the jobs of one concurrency_key: give one too"
            )
    if key:
        spec.concurrency_key = key
        limit = request.concurrency_limit or (task.concurrency_limit if task else None)
        spec.concurrency_limit = limit or 0  # 0: the queue's key_concurrency
    key = _key(request.rate_key, task.rate_key if task else None, request.payload, "rate_key", name)
    rate = rate_limit_of(request.rate_limit, "rate_limit")
    if rate is not None and not key:
        raise InvalidArgumentError("rate_limit limits the jobs of one rate_key: give one too")
    if key:
        spec.rate_key = key
        rate = rate or (task.rate_limit if task else None)
        if rate is not None:  # else the queue's key_rate
            rate_limit_to_pb(rate, spec.rate_limit)
