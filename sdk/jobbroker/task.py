"""`@task`: a typed handle on a handler function, usable by producers and workers.

`Task[I, R]` carries the payload type I and the result type R (for an async
function, the awaited type), so `client.submit(send_email, payload)` checks
the payload and returns a `JobHandle[R]`.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, Unpack, overload

from ._limits import KeyOf, check_declared, rate_limit_of
from .canvas import Piped, Signature
from .types import RateLimit, RetryPolicy, SubmitOptions

if TYPE_CHECKING:
    from .handle import JobHandle

I = TypeVar("I")  # noqa: E741 - the payload type, next to R the result type
R = TypeVar("R")
I_contra = TypeVar("I_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)
X = TypeVar("X")
P = TypeVar("P")
_NONE = object()  # s() given no payload


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """A task's defaults for the jobs submitted to it, and which of its
    handler's exceptions retry a job (None: every one). A concurrency or
    rate key is a str, or a function of the job's payload computing it."""

    name: str | None = None
    queue: str = "default"
    priority: int = 0
    max_attempts: int | None = None
    retry: RetryPolicy | None = None
    timeout: timedelta | None = None
    soft_timeout: timedelta | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    concurrency_key: KeyOf | None = None
    concurrency_limit: int | None = None
    rate_key: KeyOf | None = None
    rate_limit: RateLimit | str | None = None

    def __post_init__(self) -> None:
        retry_on: object = self.retry_on
        if retry_on is not None and not (
            isinstance(retry_on, tuple)
            and all(isinstance(e, type) and issubclass(e, BaseException) for e in retry_on)
        ):
            raise TypeError(
                f"retry_on must be a tuple of exception classes, such as "
                f"(ConnectionError, TimeoutError); got {retry_on!r}"
            )
        check_declared(self.concurrency_key, self.concurrency_limit, self.rate_key, self.rate_limit)


class Task(Generic[I_contra, R_co]):
    """A named handler with its queue and job defaults; call it to run it locally."""

    def __init__(self, fn: Callable[[I_contra], Any], options: TaskOptions) -> None:
        self.fn = fn
        self.name = options.name or f"{_module_name(fn)}.{fn.__qualname__}"
        self.queue = options.queue
        self.priority = options.priority
        self.max_attempts = options.max_attempts
        self.retry = options.retry
        self.timeout = options.timeout
        self.soft_timeout = options.soft_timeout
        self.retry_on = options.retry_on
        self.concurrency_key = options.concurrency_key
        self.concurrency_limit = options.concurrency_limit
        self.rate_key = options.rate_key
        self.rate_limit = rate_limit_of(options.rate_limit, "rate_limit")
        self.is_async = inspect.iscoroutinefunction(fn)
        self._piped: bool | None = None  # whether its input is Piped; read on first use

    def __repr__(self) -> str:
        return f"<Task {self.name!r} queue={self.queue!r}>"

    def delay(self, payload: I_contra) -> JobHandle[R_co]:
        """Submit a job to this task through the default client (see
        `jobbroker.configure`); returns once the broker stored it. Celery's
        `task.delay(...)`, with one payload."""
        from .default import default_client  # the client imports tasks: import it on use

        return default_client().submit(self, payload)

    def apply_async(
        self,
        payload: I_contra,
        *,
        countdown: timedelta | float | None = None,
        eta: datetime | None = None,
        **options: Unpack[SubmitOptions],
    ) -> JobHandle[R_co]:
        """`delay` with options: Celery's `countdown` (seconds, or a timedelta)
        and `eta` (an aware datetime) are `delay` and `run_at`; the others are
        `client.submit`'s (queue, priority, max_attempts, idempotency_key, ...)."""
        from .default import default_client

        if countdown is not None:
            options["delay"] = countdown
        if eta is not None:
            options["run_at"] = eta
        return default_client().submit(self, payload, **options)

    @overload
    def s(
        self: Task[Piped[X, P], R], payload: P, /, **options: Unpack[SubmitOptions]
    ) -> Signature[X, R]: ...
    @overload
    def s(self: Task[I, R], /, **options: Unpack[SubmitOptions]) -> Signature[I, R]: ...
    @overload
    def s(
        self: Task[I, R], payload: I, /, **options: Unpack[SubmitOptions]
    ) -> Signature[object, R]: ...
    def s(self, payload: Any = _NONE, /, **options: Unpack[SubmitOptions]) -> Signature[Any, Any]:
        """A signature of this task for a workflow (see `jobbroker.chain`).
        Without a payload, the step's input is the previous step's result; with
        one, for a task whose input is `Piped[R, P]`, it is that result and the
        payload together; for any other task, the payload alone."""
        if payload is _NONE:
            return Signature(self, None, "result", options)
        if self._piped is None:
            self._piped = _takes_piped(self.fn)
        return Signature(self, payload, "piped" if self._piped else "own", options)


def _module_name(fn: Callable[..., Any]) -> str:
    """The module a task is declared in, by the name a worker imports it by:
    a script run as `python app.py` (or `-m app`) declares its tasks in
    `__main__`, which a worker serving `app` knows as `app`."""
    module = fn.__module__
    if module != "__main__":
        return module
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else module


def _takes_piped(fn: Callable[..., Any]) -> bool:
    """Whether the handler's first parameter is annotated `Piped[...]`."""
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    try:
        hint: Any = typing.get_type_hints(fn).get(params[0].name)
    except (NameError, TypeError):
        hint = params[0].annotation
    if isinstance(hint, str):
        return hint.replace("jobbroker.", "").startswith("Piped[")
    return typing.get_origin(hint) is Piped or hint is Piped


class SyncTask(Task[I_contra, R_co]):
    def __call__(self, payload: I_contra) -> R_co:
        result: R_co = self.fn(payload)
        return result


class AsyncTask(Task[I_contra, R_co]):
    def __call__(self, payload: I_contra) -> Coroutine[Any, Any, R_co]:
        result: Coroutine[Any, Any, R_co] = self.fn(payload)
        return result


class TaskDecorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]  # an async def matches both; the first wins
        self, fn: Callable[[I], Coroutine[Any, Any, R]], /
    ) -> AsyncTask[I, R]: ...
    @overload
    def __call__(self, fn: Callable[[I], R], /) -> SyncTask[I, R]: ...


class _Decorator:
    def __init__(
        self, options: TaskOptions, on_create: Callable[[Task[Any, Any]], object] | None
    ) -> None:
        self._options = options
        self._on_create = on_create

    def __call__(self, fn: Callable[[Any], Any], /) -> Any:
        made: Task[Any, Any] = (
            AsyncTask(fn, self._options)
            if inspect.iscoroutinefunction(fn)
            else SyncTask(fn, self._options)
        )
        if self._on_create is not None:
            self._on_create(made)
        return made


def make_decorator(
    name_or_fn: str | Callable[[Any], Any] | None,
    options: TaskOptions,
    on_create: Callable[[Task[Any, Any]], object] | None = None,
) -> Any:
    """`@task` and `@task(...)` in one: decorate now or return the decorator."""
    if callable(name_or_fn):
        return _Decorator(options, on_create)(name_or_fn)
    return _Decorator(replace(options, name=name_or_fn), on_create)


@overload
def task(  # type: ignore[overload-overlap]  # an async def matches both; the first wins
    fn: Callable[[I], Coroutine[Any, Any, R]], /
) -> AsyncTask[I, R]: ...
@overload
def task(fn: Callable[[I], R], /) -> SyncTask[I, R]: ...
@overload
def task(
    name: str | None = None,
    *,
    queue: str = "default",
    max_attempts: int | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | None = None,
    soft_timeout: timedelta | None = None,
    priority: int = 0,
    retry_on: tuple[type[BaseException], ...] | None = None,
    concurrency_key: KeyOf | None = None,
    concurrency_limit: int | None = None,
    rate_key: KeyOf | None = None,
    rate_limit: RateLimit | str | None = None,
) -> TaskDecorator: ...
def task(
    name: str | Callable[[Any], Any] | None = None,
    *,
    queue: str = "default",
    max_attempts: int | None = None,
    retry: RetryPolicy | None = None,
    timeout: timedelta | None = None,
    soft_timeout: timedelta | None = None,
    priority: int = 0,
    retry_on: tuple[type[BaseException], ...] | None = None,
    concurrency_key: KeyOf | None = None,
    concurrency_limit: int | None = None,
    rate_key: KeyOf | None = None,
    rate_limit: RateLimit | str | None = None,
) -> Any:
    """Turn `def f(payload: I) -> R` (or `async def`) into a `Task[I, R]`.

    The name defaults to "<module>.<qualname>"; the other options but
    `retry_on` are the defaults of every job submitted to this task.
    `retry_on`: the handler's exceptions that retry the job (instances of
    these classes); any other fails it at once, to the dead-letter queue.
    Without it every exception retries; `RetryAfter` and `PermanentError`
    do what they say either way.

    `concurrency_key` and `rate_key` are a str, or a function of the payload
    called at each submit that does not give the key itself
    (`concurrency_key=lambda p: f"customer:{p['customer']}"`; returning None
    leaves the job without one). In a workflow the function is given the
    step's own payload (None for `task.s()`). `concurrency_limit` and
    `rate_limit` (a RateLimit, or "100/s") apply to jobs that have the key;
    without them the queue's `key_concurrency` (else 1) and `key_rate` (else
    no limit) do.
    """
    options = TaskOptions(
        None,
        queue,
        priority,
        max_attempts,
        retry,
        timeout,
        soft_timeout,
        retry_on,
        concurrency_key,
        concurrency_limit,
        rate_key,
        rate_limit,
    )
    return make_decorator(name, options)
