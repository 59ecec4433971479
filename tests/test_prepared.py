"""Prepared statements on SQLite's cursor give what SQLAlchemy's own execution gives."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from jobbroker_server.store import prepared
from jobbroker_server.store.prepared import Prepared
from jobbroker_server.store.tables import UTCDateTime

metadata = sa.MetaData()
items = sa.Table(
    "items",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def conn(tmp_path: Path) -> Any:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'items.db'}")
    with engine.begin() as c:
        metadata.create_all(c)
        c.execute(
            items.insert(),
            [
                {"id": f"i{k:04d}", "n": k, "at": T0 + timedelta(seconds=k), "data": {"k": k}}
                for k in range(300)
            ],
        )
    with engine.connect() as c:
        yield c
    engine.dispose()


def test_list_parameters_of_every_length_bind_in_the_statements_order(
    conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepared, "_MAX_SHAPES", 8)  # lengths below overflow the cache
    statement = (
        sa.select(items)
        .where(
            items.c.n >= sa.bindparam("low"),
            items.c.id.in_(sa.bindparam("ids", expanding=True)),
            items.c.at < sa.bindparam("before", type_=UTCDateTime()),
            items.c.n != 7,  # a value the statement carries itself
        )
        .order_by(items.c.id)
    )
    prep = Prepared(statement)
    rng = random.Random(4)
    for length in [0, 1, 3, *range(20), 40, 3, 1, 0]:
        ids = [f"i{rng.randrange(300):04d}" for _ in range(length)]
        params = {"low": 5, "ids": ids, "before": T0 + timedelta(seconds=250)}
        assert prep.rows(conn, params) == [tuple(r) for r in conn.execute(statement, params)]
        assert prep.rows(conn, params) == sorted(prep.rows(conn, params))


def test_writes_count_the_rows_they_changed(conn: Any) -> None:
    update = Prepared(
        items.update()
        .where(items.c.id.in_(sa.bindparam("ids", expanding=True)))
        .values(n=sa.bindparam("n"), data=sa.bindparam("data", type_=sa.JSON()))
    )
    assert update.run(conn, {"ids": ["i0001", "i0002", "nope"], "n": -1, "data": {}}) == 2
    assert update.run(conn, {"ids": [], "n": -1, "data": {}}) == 0
    rows = conn.execute(sa.select(items.c.n, items.c.data).where(items.c.n == -1)).all()
    assert [tuple(r) for r in rows] == [(-1, {}), (-1, {})]


@pytest.mark.parametrize(
    "where",
    [
        items.c.id.in_(["i0001", "i0002"]),  # a list the statement carries
        items.c.n == sa.bindparam("n", callable_=lambda: 3),  # a value made per call
        items.c.n == sa.literal(3, literal_execute=True),  # a value in the SQL text
        sa.tuple_(items.c.id, items.c.n).in_(sa.bindparam("pairs", expanding=True)),
    ],
)
def test_parameters_it_cannot_bind_are_refused(conn: Any, where: Any) -> None:
    with pytest.raises(TypeError, match="cannot bind parameter"):
        Prepared(sa.select(items.c.id).where(where)).rows(conn, {"pairs": [("i0001", 1)]})
