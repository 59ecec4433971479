"""Queue settings in the store (``domain/queues.py``): paused or not, and the
defaults of a queue's jobs. A lease reads the paused queues in its own
statement (``ops.PASSED_OVER``), so a pause holds on every replica at once."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import ResourceExhausted
from jobbroker_server.domain.flow import RateLimit, stored_rate
from jobbroker_server.domain.queues import MAX_QUEUE_SETTINGS, QueueDefaults, QueueSettings
from jobbroker_server.store.tables import queues


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _delta(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def _settings(row: Any) -> QueueSettings:
    defaults = QueueDefaults(
        max_attempts=row.max_attempts,
        backoff_base=_delta(row.backoff_base_s),
        backoff_factor=row.backoff_factor,
        backoff_cap=_delta(row.backoff_cap_s),
        timeout=_delta(row.timeout_s),
        soft_timeout=_delta(row.soft_timeout_s),
        lost_worker_counts=row.lost_worker_counts,
        rate=stored_rate(row.rate_count, row.rate_period_s),
        key_rate=stored_rate(row.key_rate_count, row.key_rate_period_s),
        key_concurrency=row.key_concurrency,
    )
    return QueueSettings(
        row.name,
        defaults,
        row.paused,
        row.paused_by,
        row.paused_at,
        row.updated_at,
        row.limited,
    )


def list_queues(conn: Connection) -> list[QueueSettings]:
    return [_settings(r) for r in conn.execute(sa.select(queues).order_by(queues.c.name))]


def _ensure(conn: Connection, name: str, now: datetime) -> None:
    """The queue's row, made with no settings if it has none yet (once,
    however many transactions race to make it); refused past
    MAX_QUEUE_SETTINGS."""
    if conn.execute(sa.select(queues.c.name).where(queues.c.name == name)).first():
        return
    count = conn.execute(sa.select(sa.func.count()).select_from(queues)).scalar() or 0
    if count >= MAX_QUEUE_SETTINGS:
        raise ResourceExhausted(
            f"{count} queues have settings, the most a broker keeps; "
            "clear those of queues no longer used"
        )
    row = {"name": name, "paused": False, "paused_by": "", "lost_worker_counts": True}
    conn.execute(_insert_ignoring(conn, {**row, "updated_at": now}))


def _insert_ignoring(conn: Connection, row: dict[str, Any]) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(queues).values(row).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(queues).values(row).on_conflict_do_nothing()


def set_defaults(
    conn: Connection, name: str, defaults: QueueDefaults, now: datetime
) -> QueueSettings:
    """Replace the queue's job defaults (its paused state is kept)."""
    _ensure(conn, name, now)
    conn.execute(
        queues.update()
        .where(queues.c.name == name)
        .values(
            max_attempts=defaults.max_attempts,
            backoff_base_s=_seconds(defaults.backoff_base),
            backoff_factor=defaults.backoff_factor,
            backoff_cap_s=_seconds(defaults.backoff_cap),
            timeout_s=_seconds(defaults.timeout),
            soft_timeout_s=_seconds(defaults.soft_timeout),
            lost_worker_counts=defaults.lost_worker_counts,
            rate_count=_count(defaults.rate),
            rate_period_s=_period(defaults.rate),
            key_rate_count=_count(defaults.key_rate),
            key_rate_period_s=_period(defaults.key_rate),
            key_concurrency=defaults.key_concurrency,
            updated_at=now,
        )
    )
    if defaults.rate is not None:
        mark_limited(conn, [name], now)
    return _one(conn, name)


def _count(rate: RateLimit | None) -> int | None:
    return None if rate is None else rate.count


def _period(rate: RateLimit | None) -> float | None:
    return None if rate is None else rate.period.total_seconds()


def mark_limited(conn: Connection, names: Sequence[str], now: datetime) -> None:
    """From now on the queues are leased through the flow limits' path
    (their rows are made if they have none)."""
    found = conn.execute(sa.select(queues.c.name).where(queues.c.name.in_(names), queues.c.limited))
    missing = set(names) - set(found.scalars())
    if not missing:
        return
    for name in sorted(missing):
        _ensure(conn, name, now)
    conn.execute(
        queues.update().where(queues.c.name.in_(names), ~queues.c.limited).values(limited=True)
    )


def set_paused(
    conn: Connection, name: str, paused: bool, actor: str, now: datetime
) -> QueueSettings:
    """Pause or resume; pausing a paused queue keeps who paused it and when."""
    _ensure(conn, name, now)
    if paused:
        values: dict[str, Any] = {"paused": True, "paused_by": actor, "paused_at": now}
        conn.execute(queues.update().where(queues.c.name == name, ~queues.c.paused).values(values))
    else:
        values = {"paused": False, "paused_by": "", "paused_at": None}
        conn.execute(queues.update().where(queues.c.name == name).values(values))
    return _one(conn, name)


def _one(conn: Connection, name: str) -> QueueSettings:
    return _settings(conn.execute(sa.select(queues).where(queues.c.name == name)).one())
