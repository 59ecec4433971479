"""PostgreSQL (asyncpg): many broker replicas on one database."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from jobbroker_server.store.sql import SqlStore
from jobbroker_server.store.tables import jobs


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
        url, server_settings = engine_url(dsn)
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            connect_args={"server_settings": server_settings},
        )
        super().__init__(engine, rng)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.begin() as conn:
            yield conn

    def _insert_ignoring_conflicts(self) -> sa.Insert:
        return pg_insert(jobs).on_conflict_do_nothing(index_elements=["idempotency_key"])
