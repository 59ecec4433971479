"""The API key operations: create, list, revoke, and every valid key for the
broker's cache (services/keys.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection

from jobbroker_server.domain.errors import FailedPrecondition, NotFound
from jobbroker_server.domain.keys import ApiKey, Role
from jobbroker_server.store.tables import api_keys

_VALID = api_keys.c.revoked_at.is_(None)


class KeyNameTaken(FailedPrecondition):
    reason = "KEY_NAME_TAKEN"


def taken(name: str) -> KeyNameTaken:
    return KeyNameTaken(f"a valid API key named {name!r} exists; revoke it or pick another name")


def _key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        queues=tuple(row.queues),
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


def create_key(conn: Connection, key: ApiKey) -> None:
    found = conn.execute(sa.select(api_keys.c.id).where(api_keys.c.name == key.name, _VALID))
    if found.first() is not None:
        raise taken(key.name)
    conn.execute(
        api_keys.insert().values(
            id=key.id,
            name=key.name,
            role=key.role.value,
            queues=list(key.queues),
            secret_hash=key.secret_hash,
            created_at=key.created_at,
        )
    )


def list_keys(conn: Connection, include_revoked: bool) -> list[ApiKey]:
    stmt = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
    if not include_revoked:
        stmt = stmt.where(_VALID)
    return [_key(row) for row in conn.execute(stmt)]


def revoke_key(conn: Connection, id_or_name: str, now: datetime) -> ApiKey:
    """Revoke the valid key with this id, else the one with this name."""
    for column in (api_keys.c.id, api_keys.c.name):
        row = conn.execute(sa.select(api_keys).where(column == id_or_name, _VALID)).first()
        if row is not None:
            conn.execute(api_keys.update().where(api_keys.c.id == row.id).values(revoked_at=now))
            return replace(_key(row), revoked_at=now)
    raise NotFound(f"no valid API key has the id or name {id_or_name!r}")
