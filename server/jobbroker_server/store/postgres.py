"""PostgreSQL (asyncpg): many broker replicas on one database."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import create_async_engine

from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import jobs

P = ParamSpec("P")
T = TypeVar("T")


def engine_url(dsn: str) -> tuple[str, dict[str, str]]:
    """The SQLAlchemy URL for a ``postgresql://`` DSN, and asyncpg server settings.

    A ``schema`` query parameter puts the broker's tables in that schema.
    """
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    settings = {"search_path": query.pop("schema")} if "schema" in query else {}
    url = urlunsplit(
        ("postgresql+asyncpg", parts.netloc, parts.path, urlencode(query), parts.fragment)
    )
    return url, settings


class PostgresStore(SqlStore):
    def __init__(self, dsn: str, rng: random.Random | None = None, pool_size: int = 10) -> None:
        super().__init__(rng)
        url, server_settings = engine_url(dsn)
        self._engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            connect_args={"server_settings": server_settings},
        )

    async def _transact(
        self, op: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        async with self._engine.begin() as conn:
            return await conn.run_sync(op, *args, **kwargs)

    def _insert_ignoring_conflicts(self) -> sa.Insert:
        return pg_insert(jobs).on_conflict_do_nothing(index_elements=["idempotency_key"])

    async def _dispose(self) -> None:
        await self._engine.dispose()
