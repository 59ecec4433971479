"""Hot-path statements run straight on SQLite's cursor.

SQLAlchemy's execution pipeline (cache key, execution context, result
processing) cost three times SQLite's own time on the small statements of
leasing and reporting: a one-job lease took 690 µs through it and 170 µs on the
cursor. A Prepared statement is compiled once; its list parameters are
expanded by SQLAlchemy's own ``construct_expanded_state``, once per
combination of list lengths (expanding on every call cost as much as SQLite
ran the statement); each call binds through the columns' bind processors and
returns rows with the result processors applied. Other dialects run the
same statement through ``Connection.execute``.
"""

from __future__ import annotations

import functools
import operator
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from sqlalchemy.sql.compiler import SQLCompiler

Params = Mapping[str, Any]
_MAX_SHAPES = 128  # expanded SQL strings kept per statement


class Prepared:
    def __init__(self, statement: sa.Update | sa.Insert | sa.Select[Any]) -> None:
        self.statement = statement
        self._compiled: SQLCompiler | None = None
        self._row: Any = None  # a namedtuple of the returned columns
        self._results: list[tuple[int, Callable[[Any], Any]]] = []  # by position
        self._binds: dict[str, Callable[[Any], Any]] = {}
        # run_many's plan: the values in the statement's order, those with a
        # processor by position, and the statement's own values (literals).
        self._values: Callable[[Params], tuple[Any, ...]] = tuple
        self._processed: list[tuple[int, Callable[[Any], Any]]] = []
        self._defaults: dict[str, Any] = {}
        # _execute's plan: the list parameters, each bound value in the
        # statement's order, and the expanded SQL by the lists' lengths.
        self._lists: list[str] = []
        self._positions: list[tuple[str, bool, Callable[[Any], Any] | None]] = []
        self._expanded: dict[tuple[int, ...], str] = {}

    def rows(self, conn: Connection, params: Params) -> list[Any]:
        """The rows a SELECT or RETURNING gives, by attribute or position."""
        if conn.dialect.name != "sqlite":
            return list(conn.execute(self.statement, params))
        cursor = self._execute(conn, params)
        try:
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        make = self._row._make
        if not self._results:
            return [make(r) for r in fetched]
        found = []
        for r in fetched:
            values = list(r)
            for i, process in self._results:
                values[i] = process(values[i])
            found.append(make(values))
        return found

    def tuples(self, conn: Connection, params: Params) -> list[tuple[Any, ...]]:
        """The rows as plain tuples, for a SELECT of many rows whose columns
        need no result processing (a namedtuple per row is the cost there)."""
        if conn.dialect.name != "sqlite":
            return [tuple(r) for r in conn.execute(self.statement, params)]
        self._compile(conn)
        assert not self._results, "tuples() is for columns without result processors"
        cursor = self._execute(conn, params)
        try:
            fetched: list[tuple[Any, ...]] = cursor.fetchall()
        finally:
            cursor.close()
        return fetched

    def run(self, conn: Connection, params: Params) -> int:
        """Run a write; how many rows it changed."""
        if conn.dialect.name != "sqlite":
            return int(conn.execute(self.statement, params).rowcount)
        cursor = self._execute(conn, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def run_many(self, conn: Connection, many: Sequence[Params]) -> int:
        """Run a write once per parameter set (no list parameters); how many
        rows it changed in all."""
        if conn.dialect.name != "sqlite":
            return int(conn.execute(self.statement, list(many)).rowcount)
        compiled = self._compile(conn)
        bound = []
        for params in many:
            values = list(self._values({**self._defaults, **params} if self._defaults else params))
            for i, process in self._processed:
                values[i] = process(values[i])
            bound.append(values)
        cursor = dbapi_of(conn).cursor()
        try:
            cursor.executemany(compiled.string, bound)
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def _execute(self, conn: Connection, params: Params) -> Any:
        compiled = self._compile(conn)
        # The expanded SQL depends only on the lengths of the list parameters.
        shape = tuple(len(params[name]) for name in self._lists)
        sql = self._expanded.get(shape)
        if sql is None:
            if len(self._expanded) >= _MAX_SHAPES:
                self._expanded.clear()
            sql = self._expanded[shape] = compiled.construct_expanded_state(params).statement
        bound: list[Any] = []
        defaults = self._defaults
        for name, is_list, process in self._positions:
            value = params[name] if name in params else defaults[name]
            if is_list:
                bound.extend(map(process, value) if process else value)
            else:
                bound.append(process(value) if process else value)
        cursor = dbapi_of(conn).cursor()
        try:
            cursor.execute(sql, bound)
        except BaseException:
            cursor.close()
            raise
        return cursor

    def _compile(self, conn: Connection) -> SQLCompiler:
        if self._compiled is None:
            compiled = self.statement.compile(dialect=conn.dialect)
            assert isinstance(compiled, SQLCompiler)
            columns = getattr(self.statement, "exported_columns", ())
            self._row = namedtuple("Row", [c.key for c in columns])  # type: ignore[misc]
            dialect = conn.dialect
            self._results = [
                (i, processor)
                for i, c in enumerate(columns)
                if (processor := c.type.dialect_impl(dialect).result_processor(dialect, None))
            ]
            self._binds = {
                name: processor
                for name, bind in compiled.binds.items()
                if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect))
            }
            names = compiled.positiontup or []
            if len(names) > 1:  # itemgetter of one name gives a value, not a tuple
                self._values = operator.itemgetter(*names)
            else:
                self._values = functools.partial(_pick, names)
            self._processed = [(i, self._binds[n]) for i, n in enumerate(names) if n in self._binds]
            self._defaults = {
                n: b.effective_value for n, b in compiled.binds.items() if not b.required
            }
            _check_parameters(compiled)
            lists = {name for name, bind in compiled.binds.items() if bind.expanding}
            self._lists = sorted(lists)
            self._positions = [(n, n in lists, self._binds.get(n)) for n in names]
            self._compiled = compiled
        return self._compiled


def _check_parameters(compiled: SQLCompiler) -> None:
    """Refuse what the plan above cannot bind: values in the SQL text
    (literal_execute), values computed per call (callable_), and list
    parameters that are not plain named lists given with every call."""
    for name, bind in compiled.binds.items():
        is_tuple = getattr(bind.type, "_is_tuple_type", False)
        if (
            bind.literal_execute
            or bind.callable is not None
            or (bind.expanding and (not bind.required or is_tuple))
        ):
            raise TypeError(f"a Prepared statement cannot bind parameter {name!r}")


def _pick(names: Sequence[str], params: Params) -> tuple[Any, ...]:
    return tuple(params[name] for name in names)


def dbapi_of(conn: Connection) -> Any:
    """The driver's connection under a SQLAlchemy one."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    return dbapi
