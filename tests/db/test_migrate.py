"""ingest.db.migrate: migrations to the schema on both engines, adoption of a file made
before migrations, and the refusal of a database behind."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect

from ingest.db import migrate
from ingest.db.schema import metadata
from ingest.sqlite_store import SQLiteStore
from ingest.store import TwinRecord
from tests.pg_server import PgServer

LEGACY_SQL = (Path(__file__).parent / "pre_alembic_schema.sql").read_text()


def _tables(url: str) -> set[str]:
    engine = migrate.connect(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def _differences(url: str) -> list[object]:
    engine = migrate.connect(url)
    try:
        with engine.connect() as conn:
            return migrate.differences(conn)
    finally:
        engine.dispose()


def _legacy_file(path: Path, sql: str = LEGACY_SQL) -> str:
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.execute("INSERT INTO facts VALUES ('broker_session', 'yes')")
    db.execute("INSERT INTO twins VALUES ('WGS-P01', '{}')")
    db.commit()
    db.close()
    return f"sqlite:///{path}"


def _twins_shape(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'twins'").fetchone()
    finally:
        db.close()
    return "WITHOUT ROWID" if "WITHOUT ROWID" in sql.upper() else "rowid"


def _migrated(url: str, revision: str, move: Callable[[Config, str], None]) -> None:
    """The database upgraded or downgraded (``move``) to ``revision``, in one transaction as
    ``migrate.upgrade`` does it."""
    engine = migrate.connect(url, connect_args={"isolation_level": None})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            cfg = migrate._config()
            cfg.attributes["connection"] = conn
            move(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def test_a_file_of_0006_gets_rowid_twins_with_its_twins_intact(tmp_path: Path) -> None:
    """0007: ``twins`` was WITHOUT ROWID, whose ~2 KB records overflow the clustered index's
    cells (docs/benchmarks.md); the file ``serve`` opens is upgraded by itself."""
    path = tmp_path / "c.db"
    url = f"sqlite:///{path}"
    _migrated(url, "0006", command.upgrade)
    assert _twins_shape(path) == "WITHOUT ROWID"
    records = {
        f"P{i:03d}": json.dumps({"device_id": f"P{i:03d}", "pad": "x" * (1900 + i)})
        for i in range(50)
    }
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO twins VALUES (?, ?)", records.items())
    db.commit()
    db.close()

    store = SQLiteStore(path)  # serve's store: migrates its file when it opens it
    try:
        assert migrate.revision_of(url) == migrate.head()
        assert _twins_shape(path) == "rowid"
        assert {t["device_id"]: t for t in store.load_twins()} == {
            d: json.loads(r) for d, r in records.items()
        }
        # the key still holds: an upsert replaces the record, it adds no row
        new = '{"device_id": "P007", "pad": "new"}'
        store.save([TwinRecord("P007", new.encode())], [])
        twins = {t["device_id"]: t for t in store.load_twins()}
        assert len(twins) == 50
        assert twins["P007"] == {"device_id": "P007", "pad": "new"}
    finally:
        store.close()
    assert _differences(url) == []
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
    _migrated(url, "0006", command.downgrade)  # and back, the rows with it
    assert _twins_shape(path) == "WITHOUT ROWID"
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*), sum(length(record)) FROM twins").fetchone() == (
        50,
        sum(len(r) for r in records.values()) - len(records["P007"]) + len(new),
    )
    db.close()


def test_upgrade_of_an_empty_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert migrate.revision_of(url) is None
    assert migrate.upgrade(url) == migrate.head()
    assert migrate.revision_of(url) == migrate.head()
    assert set(metadata.tables) <= _tables(url)
    assert _differences(url) == []
    migrate.ensure_current(url)


def test_upgrade_of_an_empty_postgresql(pg_url: str) -> None:
    assert migrate.revision_of(pg_url) is None
    assert migrate.upgrade(pg_url) == migrate.head()
    assert migrate.revision_of(pg_url) == migrate.head()
    assert set(metadata.tables) <= _tables(pg_url)
    assert _differences(pg_url) == []
    migrate.ensure_current(pg_url)
    assert migrate.upgrade(pg_url) == migrate.head()  # again: nothing to do


def test_history_is_range_partitioned_on_postgresql(pg_session: PgServer, pg_url: str) -> None:
    migrate.upgrade(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    strategy = pg_session.psql(
        "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'messages'::regclass",
        database,
    )
    assert strategy == "r"


def test_a_file_made_before_migrations_is_adopted_with_its_data(tmp_path: Path) -> None:
    url = _legacy_file(tmp_path / "c.db")
    assert migrate.revision_of(url) is None
    assert migrate.upgrade(url) == migrate.head()
    assert _differences(url) == []
    db = sqlite3.connect(tmp_path / "c.db")
    assert db.execute("SELECT value FROM facts").fetchall() == [("yes",)]
    assert db.execute("SELECT device_id FROM twins").fetchall() == [("WGS-P01",)]
    assert {"stations", "devices"} <= _tables(url)  # the registry, new in the baseline
    assert _twins_shape(tmp_path / "c.db") == "rowid"  # as 0007 makes it (schema.py)


def test_an_older_file_gets_what_its_release_lacked(tmp_path: Path) -> None:
    """Before keys expired and deliveries were retried, and before work orders."""
    older = (
        LEGACY_SQL.replace(
            ", revoked_at_ms INTEGER, expires_at_ms INTEGER", ", revoked_at_ms INTEGER"
        )
        .replace(
            ", body TEXT NOT NULL,\n    next_try_at_ms INTEGER, deadline_at_ms INTEGER,"
            " last_attempt_at_ms INTEGER",
            ", body TEXT NOT NULL",
        )
        .split("-- ingest/alerts/order_store.py")[0]
    )
    assert "expires_at_ms" not in older
    assert "next_try_at_ms" not in older
    url = _legacy_file(tmp_path / "c.db", older)
    migrate.upgrade(url)
    assert _differences(url) == []
    db = sqlite3.connect(tmp_path / "c.db")
    columns = {row[1] for row in db.execute("PRAGMA table_info(deliveries)")}
    assert {"next_try_at_ms", "deadline_at_ms", "last_attempt_at_ms"} <= columns
    assert "work_orders" in _tables(url)
    assert db.execute("SELECT value FROM facts").fetchall() == [("yes",)]


def test_a_foreign_file_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    url = _legacy_file(
        tmp_path / "c.db", LEGACY_SQL.replace("record    TEXT NOT NULL", "other INTEGER")
    )
    before = _tables(url)
    with pytest.raises(migrate.SchemaError, match="differ from this chargewatch's schema") as exc:
        migrate.upgrade(url)
    assert "twins" in str(exc.value)
    assert _tables(url) == before  # nothing added, not even the version table
    assert migrate.revision_of(url) is None


def test_a_database_behind_is_refused_with_what_to_run(pg_url: str) -> None:
    with pytest.raises(migrate.SchemaBehind) as exc:
        migrate.ensure_current(pg_url)
    assert str(exc.value) == (
        f"database {pg_url} is at revision none (never migrated), this chargewatch needs"
        f" {migrate.head()}: run `chargewatch db upgrade --db {pg_url}`"
    )


def test_messages_never_show_a_password() -> None:
    url = "postgresql://cw:s3cret@127.0.0.1:5432/cw"
    assert migrate.shown(url) == "postgresql://cw:***@127.0.0.1:5432/cw"


def test_a_database_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate.upgrade(url)
    db = sqlite3.connect(tmp_path / "c.db")
    db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.commit()
    with pytest.raises(migrate.SchemaAhead, match="is at revision 9999, which this chargewatch"):
        migrate.ensure_current(url)
    with pytest.raises(migrate.SchemaAhead):
        migrate.upgrade(url)


def test_ensure_sqlite_on_a_current_file_only_reads(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    migrate.ensure_sqlite(path)  # missing: created at the schema
    assert migrate.revision_of(f"sqlite:///{path}") == migrate.head()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
    try:
        started = time.monotonic()
        migrate.ensure_sqlite(path)  # an upgrade would wait for the lock
        assert time.monotonic() - started < 1.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_an_unusable_url_says_so() -> None:
    with pytest.raises(migrate.SchemaError, match="cannot use database URL 'nosuch://x'"):
        migrate.upgrade("nosuch://x")
