"""Pick the store for a database URL or path."""

from __future__ import annotations

from jobbroker_server.store.base import Store


def open_store(database: str) -> Store:
    """``postgresql://...`` opens PostgreSQL; anything else is a SQLite file path."""
    if database.startswith(("postgresql://", "postgres://")):
        from jobbroker_server.store.postgres import PostgresStore

        return PostgresStore(database)
    from jobbroker_server.store.sqlite import SqliteStore

    path = database.removeprefix("sqlite:///").removeprefix("sqlite://")
    return SqliteStore(path)
