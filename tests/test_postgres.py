"""What only a shared PostgreSQL brings: a submit on one replica wakes the
workers of another at once (LISTEN/NOTIFY), not at the next poll."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta

import pytest

from jobbroker import Client
from jobbroker_server.config import Settings
from jobbroker_server.testing import BrokerThread
from tests.conftest import FAST

SLOW_POLL = timedelta(seconds=30)  # longer than the test may take: only NOTIFY can wake


@pytest.fixture
def replicas(postgres_schema: str) -> Iterator[tuple[BrokerThread, BrokerThread]]:
    settings: Settings = replace(FAST, database=postgres_schema, poll_interval=SLOW_POLL)
    with BrokerThread(settings) as a, BrokerThread(settings) as b:
        yield a, b


@pytest.mark.postgres
@pytest.mark.timeout(30)
def test_submit_on_one_replica_wakes_a_worker_on_another(
    replicas: tuple[BrokerThread, BrokerThread],
) -> None:
    a, b = replicas
    with (
        Client(a.target) as worker_side,
        Client(b.target) as producer,
        worker_side.lease_stream(["notify"], prefetch=1) as stream,
    ):
        leases = iter(stream)
        started = time.monotonic()
        handle = producer.submit("t", None, queue="notify")
        lease = next(leases)
        waited = time.monotonic() - started
        lease.complete()
    assert lease.job.id == handle.id
    assert waited < 5, f"woken after {waited:.1f}s: by the poll, not by NOTIFY"


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_a_transaction_that_loses_a_deadlock_runs_again(postgres_schema: str) -> None:
    """PostgreSQL rolls back the loser of a deadlock whole; the store runs it
    again, and its writes land once."""
    import asyncio

    import asyncpg
    import sqlalchemy as sa

    from jobbroker_server.store.open import open_store
    from jobbroker_server.store.sql import SqlStore
    from tests.test_replicas import Database

    store = open_store(postgres_schema)
    assert isinstance(store, SqlStore)
    tries: list[int] = []

    def update_a_then_b(conn: sa.Connection) -> int:
        tries.append(1)
        conn.execute(sa.text("UPDATE deadlock SET n = n + 1 WHERE id = 1"))
        conn.execute(sa.text("UPDATE deadlock SET n = n + 1 WHERE id = 2"))  # held by the other
        return len(tries)

    async def scenario(other: asyncpg.Connection) -> int:
        await store.migrate()
        await other.execute("CREATE TABLE deadlock (id int PRIMARY KEY, n int NOT NULL)")
        await other.execute("INSERT INTO deadlock VALUES (1, 0), (2, 0)")
        await other.execute("SET deadlock_timeout = '10s'")  # the store's side loses
        tx = other.transaction()
        await tx.start()
        await other.execute("UPDATE deadlock SET n = n + 10 WHERE id = 2")
        run = asyncio.ensure_future(store._run(update_a_then_b))
        waiting = (
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE NOT l.granted AND a.query LIKE 'UPDATE deadlock%'"
        )
        async with asyncio.timeout(20):
            # The store's side waits for row 2: the database says so, and
            # has nothing to await for it.
            while not await other.fetchval(waiting):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await other.execute("UPDATE deadlock SET n = n + 10 WHERE id = 1")  # the circle
        await tx.commit()
        return await run

    db = Database(postgres_schema)  # a connection on the schema, outside the store
    try:
        assert db._runner.run(scenario(db._conn)) == 2
        assert [tuple(r) for r in db.fetch("SELECT id, n FROM deadlock ORDER BY id")] == [
            (1, 11),
            (2, 11),
        ]
    finally:
        db._runner.run(store.close())
        db.close()
