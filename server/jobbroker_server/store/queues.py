"""Queue settings in the store (``domain/queues.py``): paused or not, and the
defaults of a queue's jobs. A lease reads the paused queues in its own
statement (``ops.PAUSED``), so a pause holds on every replica at once."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import ResourceExhausted
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
    )
    return QueueSettings(
        row.name, defaults, row.paused, row.paused_by, row.paused_at, row.updated_at
    )


def list_queues(conn: Connection) -> list[QueueSettings]:
    return [_settings(r) for r in conn.execute(sa.select(queues).order_by(queues.c.name))]


def _ensure(conn: Connection, name: str, now: datetime) -> None:
    """The queue's row, made with no settings if it has none yet."""
    if conn.execute(sa.select(queues.c.name).where(queues.c.name == name)).first():
        return
    count = conn.execute(sa.select(sa.func.count()).select_from(queues)).scalar() or 0
    if count >= MAX_QUEUE_SETTINGS:
        raise ResourceExhausted(
            f"{count} queues have settings, the most a broker keeps; "
            "clear those of queues no longer used"
        )
    conn.execute(
        queues.insert().values(
            name=name,
            paused=False,
            paused_by="",
            lost_worker_counts=True,
            updated_at=now,
        )
    )


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
            updated_at=now,
        )
    )
    return _one(conn, name)


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
