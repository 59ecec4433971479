"""The SDK's public data types: frozen dataclasses and enums, never protobuf."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypedDict

if TYPE_CHECKING:
    from .task import Task

JSON_CONTENT_TYPE = "application/json"
BYTES_CONTENT_TYPE = "application/octet-stream"


class JobState(StrEnum):
    WAITING = "waiting"  # a workflow's job whose parents have not all succeeded
    PENDING = "pending"
    SCHEDULED = "scheduled"
    LEASED = "leased"  # held in a worker's prefetch window, its handler not started
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job will not change again (short of a DLQ replay)."""
        return self in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)


class AttemptOutcome(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LEASE_EXPIRED = "lease_expired"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    RELEASED = "released"


class CancelReason(StrEnum):
    """Why the broker took a running job back from a worker."""

    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LEASE_EXPIRED = "lease_expired"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry with exponential backoff; None in a field means the broker's default."""

    max_attempts: int | None = None
    backoff_base: timedelta | None = None
    backoff_factor: float | None = None
    backoff_cap: timedelta | None = None
    jitter: float | None = None


# What a client sends (the broker checks the same).
LIMIT_MAX = 1_000_000  # a concurrency limit, a rate's count
RATE_PERIOD_MIN = timedelta(milliseconds=1)
RATE_PERIOD_MAX = timedelta(days=7)
_RATE_UNITS = {
    "ms": 0.001,
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60),
    **dict.fromkeys(("h", "hour", "hours"), 3600),
    **dict.fromkeys(("d", "day", "days"), 86400),
}
_RATE_TEXT = re.compile(r"(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)", re.ASCII)
_RATE_FORMS = "count/period such as '100/s', '1000/min', '5/h' or '10/2s'"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `count` jobs start per `period`, counted on every worker and
    replica together; after a quiet period, `count` may start at once.

    `RateLimit.parse("100/s")` reads the short form the options and the CLI
    take too: a count, "/", then a period with an optional multiplier and a
    unit (ms, s, sec, second, m, min, minute, h, hour, d, day): "1000/min",
    "5/h", "10/2s". A count of at least 1 and a period over 0 make a
    RateLimit; what a submit or a queue may carry is a count up to 1,000,000
    and a period from 1 ms to 7 days (InvalidArgumentError otherwise).
    """

    count: int
    period: timedelta

    def __post_init__(self) -> None:
        count: object = self.count
        period: object = self.period
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise _invalid(f"a RateLimit's count is a whole number of at least 1, not {count!r}")
        if not isinstance(period, timedelta) or period <= timedelta(0):
            raise _invalid(f"a RateLimit's period is a timedelta over 0, not {period!r}")

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """ "100/s" and the like (see the class); InvalidArgumentError, a
        ValueError, for anything else."""
        found = _RATE_TEXT.fullmatch(text.strip().lower()) if isinstance(text, str) else None
        if found is None or found[3] not in _RATE_UNITS:
            raise _invalid(f"{text!r} is not a rate: give {_RATE_FORMS}")
        count = int(found[1])
        times = float(found[2]) if found[2] is not None else 1.0
        # Capped past the longest: a huge multiplier would overflow timedelta.
        seconds = min(times * _RATE_UNITS[found[3]], 2 * RATE_PERIOD_MAX.total_seconds())
        period = timedelta(seconds=seconds)
        problem = rate_problem(count, period)
        if problem is not None:
            raise _invalid(f"{text!r} is not a rate: its {problem}")
        return cls(count, period)

    def __str__(self) -> str:
        """The short form: "100/s", "10/2s", "1000/min"."""
        seconds = self.period.total_seconds()
        for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
            if seconds % size == 0:
                times = int(seconds // size)
                return f"{self.count}/{times if times != 1 else ''}{unit}"
        if seconds == 1:
            return f"{self.count}/s"
        return f"{self.count}/{f'{seconds:.6f}'.rstrip('0').rstrip('.')}s"


def rate_problem(count: int, period: timedelta) -> str | None:
    """What keeps a rate from being sent, if anything."""
    if not 1 <= count <= LIMIT_MAX:
        return f"count is a whole number from 1 to {LIMIT_MAX:,}"
    if not RATE_PERIOD_MIN <= period <= RATE_PERIOD_MAX:
        return "period is from 1 ms to 7 days"
    return None


def _invalid(message: str) -> Exception:
    # errors imports this module: import it here, once both are loaded.
    from .errors import InvalidArgumentError

    return InvalidArgumentError(message)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class Attempt:
    number: int
    worker_id: str
    started_at: datetime | None
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    error: ErrorInfo | None


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    queue: str
    task: str
    payload: bytes
    content_type: str
    priority: int
    state: JobState
    attempts: int
    retry: RetryPolicy
    timeout: timedelta | None
    soft_timeout: timedelta | None
    idempotency_key: str
    metadata: Mapping[str, str]
    tags: tuple[str, ...]
    created_at: datetime | None
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: bytes | None
    result_content_type: str
    last_error: ErrorInfo | None
    history: tuple[Attempt, ...]
    progress: float
    progress_message: str
    cancel_requested: bool = False
    """A cancel of the held or running job was asked for; its worker was told to stop."""
    workflow_id: str = ""
    """The workflow it belongs to ("" for none)."""
    unique_key: str = ""
    """The key only one unfinished job holds at a time ("" for none)."""
    concurrency_key: str = ""
    """Jobs of one concurrency key in one queue run at most `concurrency_limit`
    at once ("" for none)."""
    concurrency_limit: int = 0
    """0: its queue's `key_concurrency` (else 1)."""
    rate_key: str = ""
    """Jobs of one rate key in one queue start at most `rate_limit` ("" for none)."""
    rate_limit: RateLimit | None = None
    """None: its queue's `key_rate` (else no limit)."""

    def json(self) -> Any:
        """The payload decoded as JSON; ValueError if it is not JSON."""
        return _json_loads(self.payload, self.content_type)

    def result_json(self) -> Any:
        """The result decoded as JSON; ValueError if there is none or it is not JSON."""
        if self.result is None:
            raise ValueError(f"job {self.id} has no result")
        return _json_loads(self.result, self.result_content_type)


def _json_loads(data: bytes, content_type: str) -> Any:
    if not is_json(content_type):
        raise ValueError(f"content type {content_type!r} is not JSON")
    return json.loads(data)


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON_CONTENT_TYPE or media.endswith("+json")


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One line of a job's story, from the broker's event log.

    `seq` only grows across the broker: pass the last one seen as `after` to
    pick up where a watch or tail left off. `reason` is what happened
    (submitted, promoted, leased, started, progress, succeeded, failed,
    dead_lettered, lease_expired, timed_out, cancel_requested, cancelled,
    released, replayed); `from_state` is None for a submit. `actor` is the
    worker id, the API key's name or "client", or "broker" for what the broker
    did by itself. `detail` holds a little of what happened: error_type and
    error, progress and message, run_at (RFC 3339).
    """

    seq: int
    job_id: str
    queue: str
    at: datetime
    reason: str
    from_state: JobState | None
    to_state: JobState
    attempt: int
    actor: str
    detail: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why a job is where it is: a sentence a person can act on, and its facts.

    `reason` is one of waiting (a workflow's job: on the parents in
    `waits_on`), parent_failed (cancelled because a parent in `waits_on` did
    not succeed), scheduled (delayed until `run_at`), retry_backoff (an
    attempt failed; retried at `run_at`), pending (`jobs_ahead` of it,
    `workers_serving` streams lease its queue), no_worker (pending, and no
    worker connected to this broker leases its queue), held (leased into
    `worker_id`'s window `since`, its handler not started), running (on
    `worker_id` `since`, with `last_heartbeat`, `lease_expires_at` and the
    hard `deadline`), cancel_requested (held or running, its worker told to
    stop), finished (at `finished_at`, with `last_error` unless it
    succeeded) and limited (waiting, held back by a limit: `limit` says which,
    "concurrency" of its concurrency key, "rate" of its rate key or
    "queue_rate" of its queue, and `limit_key` the key; for a rate,
    `next_token_at` is when its next job may start; for a concurrency key,
    `slot_holders` are the ids of the jobs holding its slots). Fields that do
    not apply are None, zero or empty.
    """

    state: JobState
    summary: str
    reason: str
    attempt: int
    run_at: datetime | None
    jobs_ahead: int
    workers_serving: int
    worker_id: str
    since: datetime | None
    last_heartbeat: datetime | None
    lease_expires_at: datetime | None
    deadline: datetime | None
    cancel_requested: bool
    finished_at: datetime | None
    last_error: ErrorInfo | None
    waits_on: tuple[WaitsOn, ...] = ()
    limit: str = ""
    limit_key: str = ""
    next_token_at: datetime | None = None
    slot_holders: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WaitsOn:
    """A parent job a waiting job waits on."""

    job_id: str
    task: str
    state: JobState


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; pass next_page_token back for the next one."""

    jobs: tuple[Job, ...]
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One job of a `submit_many` batch; the options mean what they mean in `submit`."""

    task: str | Task[Any, Any]
    payload: Any = None
    queue: str | None = None
    priority: int | None = None
    delay: timedelta | float | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    retry: RetryPolicy | None = None
    timeout: timedelta | None = None
    soft_timeout: timedelta | None = None
    idempotency_key: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: Sequence[str] = ()
    unique_key: str | None = None
    concurrency_key: str | None = None
    concurrency_limit: int | None = None
    rate_key: str | None = None
    rate_limit: RateLimit | str | None = None


class SubmitOptions(TypedDict, total=False):
    """The keyword options of `submit`; each defaults to the Task's, then the broker's.

    queue: where the job goes ("default" for a bare task name). priority: higher
    runs first. delay / run_at: run no earlier than that (not both). max_attempts
    and retry: the retry policy. timeout: hard limit of one attempt; soft_timeout:
    the worker cancels the handler after this long. idempotency_key: the same key
    returns the existing job (one is generated per call when not given); sent
    with another payload, task or queue it is refused (FailedPreconditionError).
    unique_key: while a job with this key has not finished, a submit with it
    returns that job (`duplicate` is True); once it finished, a new one is made.
    concurrency_key and concurrency_limit: at most that many jobs of the key
    run at once in the queue (no limit given: the queue's key_concurrency,
    else 1). rate_key and rate_limit: at most that many jobs of the key start
    per period in the queue (a RateLimit or "100/s"; none given: the queue's
    key_rate, else no limit). Both hold across every worker and replica; a
    job held back waits (state waiting, explain reason "limited").
    """

    queue: str | None
    priority: int | None
    delay: timedelta | float | None
    run_at: datetime | None
    max_attempts: int | None
    retry: RetryPolicy | None
    timeout: timedelta | None
    soft_timeout: timedelta | None
    idempotency_key: str | None
    metadata: Mapping[str, str]
    tags: Sequence[str]
    unique_key: str | None
    concurrency_key: str | None
    concurrency_limit: int | None
    rate_key: str | None
    rate_limit: RateLimit | str | None


class Role(StrEnum):
    """What an API key may do on a broker started with `--auth`."""

    PRODUCER = "producer"  # submit, get, wait for, cancel and list jobs
    WORKER = "worker"  # the lease stream, and nothing else
    ADMIN = "admin"  # everything: the DLQ and the keys too


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as the broker lists it: everything but its secret.

    `id` is public (listings and the broker's logs name a key by it); `queues`
    is empty for a key that may use every queue.
    """

    id: str
    name: str
    role: Role
    queues: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedApiKey:
    """A new key, and the `secret` to present as `api_key=`: the broker keeps
    only its hash, so this is the one time it is shown."""

    key: ApiKey
    secret: str = field(repr=False)


class ScheduleOptions(TypedDict, total=False):
    """The job options of a schedule's ticks: `submit`'s, less its timing and key
    (each tick sets run time and idempotency key itself)."""

    queue: str | None
    priority: int | None
    max_attempts: int | None
    retry: RetryPolicy | None
    timeout: timedelta | None
    soft_timeout: timedelta | None
    metadata: Mapping[str, str]
    tags: Sequence[str]
    concurrency_key: str | None
    concurrency_limit: int | None
    rate_key: str | None
    rate_limit: RateLimit | str | None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as the broker holds it: at each tick of `cron` (in
    `timezone`) or of `every`, it submits `task` with `payload` to `queue`.

    `catch_up` says what happens to ticks missed while the broker was down or
    the schedule paused: "skip" runs none of them, "latest" runs the most
    recent one once. `last_job_state` is None once that job was deleted.
    """

    name: str
    cron: str | None
    every: timedelta | None
    timezone: str
    task: str
    queue: str
    payload: bytes
    content_type: str
    catch_up: Literal["skip", "latest"]
    paused: bool
    next_run_at: datetime | None
    last_run_at: datetime | None
    last_job_id: str | None
    last_job_state: JobState | None
    priority: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: timedelta | None = None
    soft_timeout: timedelta | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    def json(self) -> Any:
        """The payload decoded as JSON; ValueError if it is not JSON."""
        return _json_loads(self.payload, self.content_type)


@dataclass(frozen=True, slots=True)
class CreatedSchedule:
    """The schedule registered, and whether that changed anything: False when
    one of that name had this definition already."""

    schedule: Schedule
    changed: bool


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """A schedule declared in code (`jobbroker.schedule(...)`), which
    `Worker(schedules=[...])` registers when it starts."""

    name: str
    task: str | Task[Any, Any]
    payload: Any = None
    cron: str | None = None
    every: timedelta | float | None = None
    timezone: str = "UTC"
    catch_up: Literal["skip", "latest"] = "skip"
    paused: bool = False
    options: ScheduleOptions = field(default_factory=lambda: ScheduleOptions())


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's own settings: paused (by whom, since when) or not, and the
    defaults its jobs get when neither the job nor its task says (None: the
    broker's). `lost_worker_counts`: whether an attempt whose worker was lost
    (its lease expired) counts against `max_attempts`. `rate`: the starts of
    the whole queue, on every replica together; `key_rate` and
    `key_concurrency`: the limits of a rate key or concurrency key whose job
    sets none (None: no rate limit, a concurrency of 1)."""

    name: str
    paused: bool
    paused_by: str
    paused_at: datetime | None
    max_attempts: int | None
    retry: RetryPolicy
    timeout: timedelta | None
    soft_timeout: timedelta | None
    lost_worker_counts: bool
    rate: RateLimit | None = None
    key_rate: RateLimit | None = None
    key_concurrency: int | None = None
