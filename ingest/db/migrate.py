"""Bring a database to the schema of ``ingest.db.schema`` (Alembic, no alembic.ini), or say
that it is behind.

Exceptions (``ingest.StoreError`` subclasses)::

    SchemaError            the database cannot be brought to this schema (says why)
    ├── SchemaBehind       the database is at an older revision: run `chargewatch db upgrade`
    └── SchemaAhead        the database was migrated by a newer chargewatch

``upgrade(url)`` migrates; ``ensure_current(url)`` only checks (``ingest`` and ``api`` start
with it and refuse a database behind them). ``ensure_sqlite(path)`` is what each embedded
store does when it opens the file: nothing but one query when the file is current, else an
upgrade, one process at a time (several stores and processes open the same file).

A SQLite file written before migrations existed (the stores' tables, no ``alembic_version``)
is adopted: what an older release lacked is added (missing tables, indexes and nullable
columns), the result is compared with the schema (Alembic's ``compare_metadata``), and only
when nothing differs is it stamped as current. Anything else found in such a file is a
``SchemaError`` naming the differences; nothing is dropped. A table shape the comparison does
not see (``WITHOUT ROWID``) is brought to the schema's as its migration does
(``sqlite_twins_shape``, 0007) before the stamp.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateIndex

from ingest import StoreError, StoreUnavailable
from ingest.db.schema import LEGACY_TABLES, metadata

MIGRATIONS = Path(__file__).with_name("migrations")
PARTITION_PREFIX = "messages_p"
"""History partitions on PostgreSQL (``messages_pYYYYMMDD``): made by the store, not here."""
_UPGRADE_LOCK = 0x6377_6462  # "cwdb": one upgrade at a time on a PostgreSQL server


class SchemaError(StoreError):
    pass


class SchemaBehind(SchemaError):
    pass


class SchemaAhead(SchemaError):
    pass


def engine_url(url: str) -> str:
    """``postgresql://`` (libpq's spelling) means psycopg 3 (docs/benchmarks.md); a bare path
    means a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{Path(url).resolve()}"
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def shown(url: str) -> str:
    """The URL as given, its password masked, for messages."""
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "(an unreadable URL)"


def connect(url: str, **options: Any) -> Engine:
    """An engine for ``url``; a URL SQLAlchemy cannot use is a ``SchemaError`` that says so."""
    try:
        return create_engine(engine_url(url), **options)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise SchemaError(f"cannot use database URL {url!r}: {exc}") from exc


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


@functools.cache
def head() -> str:
    """The revision this chargewatch's schema is at."""
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """What the migrations compare: not the history partitions the store makes."""
    return not (type_ == "table" and name is not None and name.startswith(PARTITION_PREFIX))


def include_object(dialect: str) -> Any:
    """Alembic's ``include_object`` for ``dialect``: an index that exists only on another
    engine (``Index.ddl_if``) is not expected here."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        ddl_if = getattr(obj, "_ddl_if", None)
        if type_ == "index" and not reflected and ddl_if is not None and ddl_if.dialect:
            return bool(ddl_if.dialect == dialect)
        return True

    return include


def differences(conn: Connection) -> list[Any]:
    """What Alembic's autogenerate would change to make the database equal the schema."""
    context = MigrationContext.configure(
        conn,
        opts={
            "include_name": include_name,
            "include_object": include_object(conn.dialect.name),
            "compare_type": True,
        },
    )
    found = []
    for diff in compare_metadata(context, metadata):
        if isinstance(diff, list):  # a column's changes
            diff = [d for d in diff if not _sqlite_key_nullable(conn, d)]
            if not diff:
                continue
        found.append(diff)
    return found


def _sqlite_key_nullable(conn: Connection, change: tuple[Any, ...]) -> bool:
    """SQLite reports a primary key declared without NOT NULL as nullable (``INTEGER PRIMARY
    KEY`` is the rowid and never NULL; the stores never write a NULL key): not a difference."""
    if conn.dialect.name != "sqlite" or change[0] != "modify_nullable":
        return False
    table = metadata.tables.get(change[2])
    return table is not None and change[3] in table.primary_key.columns


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    sqlite = engine_url(url).startswith("sqlite")
    # SQLite: no implicit transactions from the driver; ``upgrade`` opens its own, so that
    # DDL is in it too (pysqlite would commit each CREATE on its own)
    engine = connect(url, connect_args={"isolation_level": None}) if sqlite else connect(url)
    try:
        with engine.connect() as conn:
            yield conn
    except SchemaError:
        raise
    except SQLAlchemyError as exc:
        raise StoreUnavailable(f"database {shown(url)}: {exc}") from exc
    finally:
        engine.dispose()


@functools.cache
def _known() -> frozenset[str]:
    return frozenset(s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions())


def revision_of(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with _connection(url) as conn:
        return _current(conn)


def ensure_current(url: str) -> None:
    """Raise ``SchemaBehind`` (or ``SchemaAhead``) unless the database is at this
    chargewatch's revision."""
    _judge(shown(url), revision_of(url))


def _judge(where: str, rev: str | None) -> None:
    want = head()
    if rev == want:
        return
    if rev is not None and rev not in _known():
        raise SchemaAhead(
            f"database {where} is at revision {rev}, which this chargewatch does not know"
            f" (it needs {want}): it was migrated by a newer chargewatch; run that one"
        )
    raise SchemaBehind(
        f"database {where} is at revision {rev or 'none (never migrated)'}, this chargewatch"
        f" needs {want}: run `chargewatch db upgrade --db {where}`"
    )


def upgrade(url: str) -> str:
    """Migrate the database to this chargewatch's schema (adopting a pre-migration SQLite
    file); returns the revision it is at."""
    with _connection(url) as conn:
        if conn.dialect.name == "postgresql":
            # concurrent upgrades (two workers starting) take turns; released at commit
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _UPGRADE_LOCK})
        else:  # one transaction for all of it, writers locked out (the stores wait)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        rev = _current(conn)
        if rev is None and LEGACY_TABLES & set(inspect(conn).get_table_names()):
            _adopt(conn, shown(url))
        elif rev != head():
            if rev is not None and rev not in _known():
                _judge(shown(url), rev)
            cfg = _config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        conn.commit()
        return _current(conn) or ""


def _adopt(conn: Connection, where: str) -> None:
    """A file the stores made before migrations: add what an older release lacked, verify,
    stamp (module docstring)."""
    insp = inspect(conn)
    have = set(insp.get_table_names())
    metadata.create_all(conn, tables=[t for n, t in metadata.tables.items() if n not in have])
    dialect = conn.dialect.name
    keep = include_object(dialect)
    for name in have & set(metadata.tables):
        table = metadata.tables[name]
        columns = {c["name"] for c in insp.get_columns(name)}
        for column in table.columns:
            if column.name not in columns and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE "{name}" ADD COLUMN "{column.name}" {kind}'))
        indexes = {i["name"] for i in insp.get_indexes(name)}
        for index in table.indexes:
            if index.name not in indexes and keep(index, index.name, "index", False, None):
                conn.execute(CreateIndex(index))
    left = differences(conn)
    if left:
        listed = "\n".join(f"  {d}" for d in left[:20])
        raise SchemaError(
            f"database {where} has tables but no migration record, and they differ from this"
            f" chargewatch's schema; nothing was changed:\n{listed}"
        )
    if dialect == "sqlite":
        sqlite_twins_shape(conn, rowid=True)  # what 0007 does; the stamp skips it
    cfg = _config()
    cfg.attributes["connection"] = conn
    command.stamp(cfg, "head")


def sqlite_twins_shape(conn: Connection, *, rowid: bool) -> None:
    """SQLite's ``twins`` as a rowid table (``rowid``; migration 0007) or ``WITHOUT ROWID``
    (before it), its rows copied over; nothing when it has that shape already."""
    sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'twins'"
    ).scalar()
    if sql is None or ("WITHOUT ROWID" not in str(sql).upper()) == rowid:
        return
    shape = "" if rowid else " WITHOUT ROWID"
    for statement in (
        "CREATE TABLE twins_reshaped (device_id TEXT NOT NULL, record TEXT NOT NULL,"
        f" PRIMARY KEY (device_id)){shape}",
        "INSERT INTO twins_reshaped (device_id, record) SELECT device_id, record FROM twins",
        "DROP TABLE twins",
        "ALTER TABLE twins_reshaped RENAME TO twins",
    ):
        conn.exec_driver_sql(statement)


def _sqlite_revision(path: Path) -> str | None:
    """The file's revision by one query on a plain sqlite3 connection (None: none yet)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None else str(row[0])


def ensure_sqlite(path: str | Path) -> None:
    """The SQLite file at ``path`` at this chargewatch's schema: upgraded (or adopted) when it
    is behind, one query when it is current (every store opening the file calls this)."""
    path = Path(path)
    if path.exists() and _sqlite_revision(path) == head():
        return
    # the upgrade's turn among processes: a flock on the file's directory (no lock file left
    # beside the store; SQLite's own locks are fcntl locks on the file, untouched by this)
    held = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        if _sqlite_revision(path) != head():
            upgrade(f"sqlite:///{path.resolve()}")
    finally:
        os.close(held)  # releases the flock
