"""One way for a store to talk to its database, whichever engine: SQLite (``serve``) or
PostgreSQL (the cluster).

A store writes its queries once, as SQLAlchemy Core statements over the tables of
``ingest.db.schema``, and runs them through a ``Database``:

    db.transaction([(insert(alerts), [{"id": 1, ...}, ...]), (update(...), [{...}])])
    done = db.execute(insert(webhooks).returning(webhooks.c.id), {"record": "..."})
    rows = db.query(select(alerts.c.record).where(alerts.c.id == bindparam("id")), {"id": 7})

Parameters are named: an insert's are its columns; name the others ``bindparam("b_...")``
(a bind may not share a column's name in an UPDATE's SET). Two implementations:
- ``ingest.sqlite_db.SQLiteDB``: the embedded file, with its turn-taking, fail-fast on a
  locked file and write-wait gauge; it compiles a Core statement for SQLite once
  (``sqlite_sql``) and runs it on its own sqlite3 connection.
- ``PgDatabase`` here: a SQLAlchemy engine over psycopg 3, a pool of connections.

Errors are translated at this boundary, as everywhere in ingest: the server unreachable or
gone (connection refused, terminated, admin shutdown) is ``StoreUnavailable`` (retry later);
anything else the database refuses is ``StoreError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Connection
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.sql.expression import Executable

from ingest import StoreError, StoreUnavailable
from ingest.db import migrate

Params = Mapping[str, Any]
CoreStatement = tuple[Executable, Sequence[Params]]


class Done(NamedTuple):
    """What a lone statement did: rows it touched, and the rows it returned (RETURNING)."""

    rowcount: int
    rows: list[tuple[Any, ...]]


class Database(Protocol):
    """What a store needs of its database (module docstring)."""

    def transaction(self, statements: Sequence[CoreStatement]) -> None:
        """Every statement, once per parameter set, in one transaction, or none of them."""

    def execute(self, statement: Executable, params: Params | None = None) -> Done:
        """One statement on its own (committed)."""

    def query(self, statement: Executable, params: Params | None = None) -> list[tuple[Any, ...]]:
        """The rows a read returns."""

    def write_waiting_s(self) -> float:
        """How long the write in progress has been going on (0: none is)."""

    def close(self) -> None: ...


_SQLITE = sqlite.dialect()


class SqliteSQL(NamedTuple):
    """A Core statement compiled for SQLite: its text, the names of its ``?`` in order, and
    the values of the binds the statement itself carries (constants, a LIMIT)."""

    text: str
    names: tuple[str, ...]
    fixed: dict[str, Any]

    def args(self, params: Params | None) -> tuple[Any, ...]:
        given = params or {}
        try:
            return tuple(given[n] if n in given else self.fixed[n] for n in self.names)
        except KeyError as exc:
            raise StoreError(f"a statement's parameter {exc} is missing") from None


_compiled: dict[tuple[int, tuple[str, ...]], tuple[Executable, SqliteSQL]] = {}
_compiled_lock = threading.Lock()


def sqlite_sql(statement: Executable, keys: Sequence[str] = ()) -> SqliteSQL:
    """``statement`` compiled for SQLite, once per statement and set of keys (an insert's
    columns are the keys it is given). Statements are module constants: the cache keeps them
    alive, and a statement built per call is compiled per call (and cached: build them once)."""
    key = (id(statement), tuple(keys))
    hit = _compiled.get(key)
    if hit is not None and hit[0] is statement:
        return hit[1]
    compiled = statement.compile(  # type: ignore[attr-defined]
        dialect=_SQLITE,
        column_keys=list(keys) or None,
        compile_kwargs={"render_postcompile": True},
    )
    fixed = {
        name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required
    }
    sql = SqliteSQL(compiled.string, tuple(compiled.positiontup or ()), fixed)
    with _compiled_lock:
        _compiled[key] = (statement, sql)
    return sql


class PgDatabase:
    """A ``Database`` on PostgreSQL (module docstring). The schema must be current
    (``chargewatch db upgrade``): opening one behind it raises ``SchemaBehind``."""

    def __init__(self, url: str, *, pool_size: int = 4, check_schema: bool = True) -> None:
        self.url = url
        if check_schema:
            migrate.ensure_current(url)
        self._engine = migrate.connect(url, pool_size=pool_size, pool_pre_ping=True)
        self._writes: dict[int, float] = {}  # thread -> since (monotonic) of its write
        self._writes_lock = threading.Lock()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(f"{migrate.shown(self.url)}: {exc.orig or exc}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise StoreUnavailable(f"{migrate.shown(self.url)}: {exc.orig}") from exc
            raise StoreError(f"{migrate.shown(self.url)}: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"{migrate.shown(self.url)}: {exc}") from exc

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        me = threading.get_ident()
        with self._writes_lock:
            self._writes[me] = time.monotonic()
        try:
            with self._translated(), self._engine.begin() as conn:
                yield conn
        finally:
            with self._writes_lock:
                self._writes.pop(me, None)

    def transaction(self, statements: Sequence[CoreStatement]) -> None:
        with self._writing() as conn:
            for statement, rows in statements:
                if rows:
                    conn.execute(statement, [dict(r) for r in rows])

    def execute(self, statement: Executable, params: Params | None = None) -> Done:
        with self._writing() as conn:
            result = conn.execute(statement, dict(params or {}))
            rows = [tuple(r) for r in result] if result.returns_rows else []
            return Done(result.rowcount if result.rowcount >= 0 else len(rows), rows)

    def query(self, statement: Executable, params: Params | None = None) -> list[tuple[Any, ...]]:
        with self._translated(), self._engine.connect() as conn:
            return [tuple(r) for r in conn.execute(statement, dict(params or {}))]

    def write_waiting_s(self) -> float:
        with self._writes_lock:
            oldest = min(self._writes.values(), default=None)
        return 0.0 if oldest is None else time.monotonic() - oldest

    def close(self) -> None:
        self._engine.dispose()
