"""The schema every dialect shares (SQLAlchemy Core)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from jobbroker_server.clock import EPOCH
from jobbroker_server.domain.states import JobState

_MICROSECOND = timedelta(microseconds=1)

# Most jobs carry no metadata, no tags and no error: JSON's encoder and
# decoder cost more than the rest of storing or leasing those columns.
_EMPTY_DUMPED: dict[type, str] = {dict: "{}", list: "[]", tuple: "[]", type(None): "null"}
_EMPTY_LOADED: dict[str, Callable[[], Any]] = {"{}": dict, "[]": list, "null": lambda: None}


def json_dumps(value: Any) -> str:
    """The engines' JSON serializer: ``json.dumps``, with empty values at once."""
    if not value and (text := _EMPTY_DUMPED.get(type(value))):
        return text
    return json.dumps(value)


def json_loads(text: str) -> Any:
    """The engines' JSON deserializer: ``json.loads``, with empty values at once."""
    make = _EMPTY_LOADED.get(text)
    return make() if make else json.loads(text)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in and out. PostgreSQL stores timestamptz; SQLite,
    which has no time type, stores microseconds since the epoch (an integer
    compares and converts far faster than ISO text; ``datetime(x / 1e6,
    'unixepoch')`` shows it)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.BigInteger())
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        if dialect.name == "sqlite":
            return (value - EPOCH) // _MICROSECOND
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, int):
            return EPOCH + timedelta(microseconds=value)
        assert isinstance(value, datetime)
        return value.astimezone(UTC)


metadata = sa.MetaData()

# PostgreSQL: the channel on which a job becoming pending (a trigger) or a
# queue's rate reopening (store/flow.py) wakes every replica's streams.
READY_CHANNEL = "jobbroker_ready"

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("queue", sa.String(200), nullable=False),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.String(100), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("backoff_base_s", sa.Float, nullable=False),
    sa.Column("backoff_factor", sa.Float, nullable=False),
    sa.Column("backoff_cap_s", sa.Float, nullable=False),
    sa.Column("backoff_jitter", sa.Float, nullable=False),
    sa.Column("timeout_s", sa.Float),
    sa.Column("soft_timeout_s", sa.Float),
    sa.Column("idempotency_key", sa.String(200), unique=True),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("scheduled_at", UTCDateTime, nullable=False),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("result", sa.LargeBinary),
    sa.Column("result_content_type", sa.String(100)),
    sa.Column("last_error", sa.JSON),
    sa.Column("progress", sa.Float, nullable=False),
    sa.Column("progress_message", sa.Text, nullable=False),
    sa.Column("fencing_token", sa.BigInteger, nullable=False),
    sa.Column("leased_by", sa.String(200)),
    # The API key whose stream holds the lease ("" when auth is off): a report
    # under another key is refused, whatever fencing token it carries.
    sa.Column("lease_key", sa.String(32), nullable=False, server_default=""),
    sa.Column("lease_expires_at", UTCDateTime),
    sa.Column("deadline_at", UTCDateTime),  # hard timeout of the running attempt
    # Set when a running job is cancelled: however its attempt ends, it ends cancelled.
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    # Of a workflow's job (store/dependencies.py): its workflow, how many of
    # its parents have not ended as it needs, and how its input is made from
    # their results when it is released ({"shape": ..., "payload": bool}).
    sa.Column("workflow_id", sa.String(200)),
    sa.Column("waiting_on", sa.Integer, nullable=False, server_default="0"),
    sa.Column("inputs", sa.JSON),
    # Held by one unfinished job at most (ix_jobs_unique; store/dedup.py).
    sa.Column("unique_key", sa.String(200)),
    # Flow limits (store/flow.py): the keys a job is limited by, the limits it
    # carries (NULL: its queue's), and, while it is held back (waiting), which
    # limit holds it: "concurrency" or "rate".
    sa.Column("concurrency_key", sa.String(200)),
    sa.Column("concurrency_limit", sa.Integer),
    sa.Column("rate_key", sa.String(200)),
    sa.Column("rate_count", sa.Integer),
    sa.Column("rate_period_s", sa.Float),
    sa.Column("held_by", sa.String(16)),
)

_pending = jobs.c.state == "pending"
_scheduled = jobs.c.state == "scheduled"
_held = jobs.c.state.in_(["leased", "running"])
_finished = jobs.c.state.in_(["succeeded", "cancelled"])
_dead = jobs.c.state == "dead"

sa.Index(
    "ix_jobs_ready",
    jobs.c.queue,
    jobs.c.priority.desc(),
    jobs.c.id,
    sqlite_where=_pending,
    postgresql_where=_pending,
)
sa.Index(
    "ix_jobs_scheduled",
    jobs.c.scheduled_at,
    sqlite_where=_scheduled,
    postgresql_where=_scheduled,
)
sa.Index(
    "ix_jobs_running",
    jobs.c.lease_expires_at,
    sqlite_where=_held,
    postgresql_where=_held,
)
# Finished jobs by age, for retention. Partial like the three above: a key
# that holds the state is rewritten by every lease and completion.
sa.Index(
    "ix_jobs_finished",
    jobs.c.finished_at,
    sqlite_where=_finished,
    postgresql_where=_finished,
)
# The dead-letter queue in id order, whatever the queue (`dlq ls`, `--all`).
sa.Index("ix_jobs_dead", jobs.c.id, sqlite_where=_dead, postgresql_where=_dead)
sa.Index("ix_jobs_queue_state", jobs.c.queue, jobs.c.state, jobs.c.id)
# One unfinished job per unique key: the submits of a key race on this
# index, on every replica, as those of an idempotency key on its constraint.
_holds_key = sa.and_(
    jobs.c.unique_key.is_not(None),
    jobs.c.state.in_([state.value for state in JobState if not state.terminal]),
)
sa.Index(
    "ix_jobs_unique",
    jobs.c.unique_key,
    unique=True,
    sqlite_where=_holds_key,
    postgresql_where=_holds_key,
)
_in_workflow = jobs.c.workflow_id.is_not(None)
sa.Index(
    "ix_jobs_workflow",
    jobs.c.workflow_id,
    jobs.c.id,
    sqlite_where=_in_workflow,
    postgresql_where=_in_workflow,
)

# Flow limits (store/flow.py). A key's jobs by state: its leased and running
# ones are counted at each lease and end of one, its pending ones held back.
_keyed = jobs.c.concurrency_key.is_not(None)
sa.Index(
    "ix_jobs_concurrency_key",
    jobs.c.queue,
    jobs.c.concurrency_key,
    jobs.c.state,
    sqlite_where=_keyed,
    postgresql_where=_keyed,
)
_rated = jobs.c.rate_key.is_not(None)
sa.Index(
    "ix_jobs_rate_key",
    jobs.c.queue,
    jobs.c.rate_key,
    jobs.c.state,
    sqlite_where=_rated,
    postgresql_where=_rated,
)
# The held-back jobs of each key, in the order they are let through. The
# conditions are written with their values in the SQL text, as queries must
# repeat them for a planner to use the index (ops._is).
HELD_BY_CONCURRENCY = jobs.c.held_by == sa.literal_column("'concurrency'")
HELD_BY_RATE = jobs.c.held_by == sa.literal_column("'rate'")
sa.Index(
    "ix_jobs_held_concurrency",
    jobs.c.queue,
    jobs.c.concurrency_key,
    jobs.c.priority.desc(),
    jobs.c.id,
    sqlite_where=HELD_BY_CONCURRENCY,
    postgresql_where=HELD_BY_CONCURRENCY,
)
sa.Index(
    "ix_jobs_held_rate",
    jobs.c.queue,
    jobs.c.rate_key,
    jobs.c.priority.desc(),
    jobs.c.id,
    sqlite_where=HELD_BY_RATE,
    postgresql_where=HELD_BY_RATE,
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column(
        "job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("fencing_token", sa.BigInteger, primary_key=True),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("worker_id", sa.String(200), nullable=False),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.JSON),
)

# A job's story (store/events.py): a row per transition and per progress
# report, in the transaction that made it; deleted with its job.
job_events = sa.Table(
    "job_events",
    metadata,
    # Only grows: a watch resumes after the last one it saw.
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column(
        "job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("queue", sa.String(200), nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("reason", sa.String(24), nullable=False),
    sa.Column("source", sa.String(16)),
    sa.Column("target", sa.String(16)),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    # Without it SQLite gives the next row the number of a deleted newest one.
    sqlite_autoincrement=True,
)
sa.Index("ix_job_events_job", job_events.c.job_id, job_events.c.seq)

# A workflow's links: a child waits on each of its parents. The parent's
# outcome and result are copied here when it ends, so the child's input does
# not depend on the parent still existing (retention may delete it first).
# A parent's row is no foreign key for that reason; the child's is.
job_deps = sa.Table(
    "job_deps",
    metadata,
    sa.Column(
        "child_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("position", sa.Integer, primary_key=True),  # in the child's order of parents
    sa.Column("parent_id", sa.String(36), nullable=False),
    # Whether the child runs whatever the parent's end (a chord's callback
    # told to run with failures).
    sa.Column("tolerant", sa.Boolean, nullable=False),
    # Whether the child's input is made from the parent's result: only then
    # is the result copied here.
    sa.Column("feeds", sa.Boolean, nullable=False),
    # NULL while the parent has not ended as the child needs; "blocked" when
    # its end cancelled the child; else the state it ended in.
    sa.Column("outcome", sa.String(16)),
    sa.Column("result", sa.LargeBinary),
    sa.Column("result_content_type", sa.String(100)),
    sa.Column("error", sa.JSON),
)
sa.Index("ix_job_deps_parent", job_deps.c.parent_id)

# A queue's own settings (domain/queues.py); a queue without a row has none.
queues = sa.Table(
    "queues",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("paused_by", sa.String(200), nullable=False),
    sa.Column("paused_at", UTCDateTime),
    sa.Column("max_attempts", sa.Integer),
    sa.Column("backoff_base_s", sa.Float),
    sa.Column("backoff_factor", sa.Float),
    sa.Column("backoff_cap_s", sa.Float),
    sa.Column("timeout_s", sa.Float),
    sa.Column("soft_timeout_s", sa.Float),
    sa.Column("lost_worker_counts", sa.Boolean, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Flow limits (store/flow.py): the whole queue's rate, each rate key's and
    # each concurrency key's when a job carries none; and whether the queue
    # is leased through the limits' path (it has a rate, or has had a job
    # with a key): the plain lease passes over it.
    sa.Column("rate_count", sa.Integer),
    sa.Column("rate_period_s", sa.Float),
    sa.Column("key_rate_count", sa.Integer),
    sa.Column("key_rate_period_s", sa.Float),
    sa.Column("key_concurrency", sa.Integer),
    sa.Column("limited", sa.Boolean, nullable=False, server_default=sa.false()),
)

# A rate limit's state, per (queue, rate key; "" for the whole queue), as a
# generic cell rate: ``tat`` is when the bucket would be full again (its
# theoretical arrival time); a row whose tat has passed is as good as none.
# ``waiting``: jobs are held back by it (or, for the queue, streams wait on
# it) until ``next_at``, when the scheduler lets the next ones through.
rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("queue", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("tat", UTCDateTime, nullable=False),
    sa.Column("next_at", UTCDateTime, nullable=False),
    sa.Column("waiting", sa.Boolean, nullable=False),
)
sa.Index(
    "ix_rate_buckets_waiting",
    rate_buckets.c.next_at,
    sqlite_where=rate_buckets.c.waiting,
    postgresql_where=rate_buckets.c.waiting,
)

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

# A row per running broker, rewritten by its health probe about once a second
# (services/health.py): a write that fails is what makes health NOT_SERVING.
broker_health = sa.Table(
    "broker_health",
    metadata,
    sa.Column("broker", sa.String(200), primary_key=True),
    sa.Column("probed_at", UTCDateTime, nullable=False),
)

# API keys (domain/keys.py): the secret's hash, never the secret.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("queues", sa.JSON, nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("revoked_at", UTCDateTime),
)
_valid_key = api_keys.c.revoked_at.is_(None)
# One valid key per name: `broker keys revoke NAME` names one key.
sa.Index(
    "ix_api_keys_name",
    api_keys.c.name,
    unique=True,
    sqlite_where=_valid_key,
    postgresql_where=_valid_key,
)

# Schedules (domain/schedules.py): a job template the cron service submits at
# each tick. A tick is taken by moving next_run_at on from it (store/schedules.py).
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("cron", sa.String(200)),
    sa.Column("every_us", sa.BigInteger),  # exact: ticks are multiples of it
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("queue", sa.String(200), nullable=False),
    sa.Column("task", sa.String(200), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("content_type", sa.String(100), nullable=False),
    # priority, retry, timeouts (in microseconds), metadata, tags
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("catch_up", sa.String(8), nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("next_run_at", UTCDateTime),
    sa.Column("last_run_at", UTCDateTime),
    sa.Column("last_job_id", sa.String(36)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
_running_schedule = schedules.c.paused.is_(False)
sa.Index(
    "ix_schedules_due",
    schedules.c.next_run_at,
    sqlite_where=_running_schedule,
    postgresql_where=_running_schedule,
)
