"""One way for a store to talk to either engine (ingest.db.database): the same Core
statements give the same answers on the embedded SQLite file and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import bindparam, func, insert, select, update

from ingest import StoreError, StoreUnavailable
from ingest.db import migrate
from ingest.db.database import Database, PgDatabase
from ingest.db.schema import facts, webhooks
from ingest.sqlite_db import SQLiteDB
from tests.pg_server import postgresql

BY_ID = select(webhooks.c.record).where(webhooks.c.id == bindparam("b_id"))
RENAME = (
    update(webhooks).where(webhooks.c.id == bindparam("b_id")).values(record=bindparam("b_record"))
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    database: Database
    if request.param == "sqlite":
        database = SQLiteDB(tmp_path / "cw.db")
    else:
        url = request.getfixturevalue("pg_url")
        migrate.upgrade(url)
        database = PgDatabase(url)
    try:
        yield database
    finally:
        database.close()


def test_the_same_statements_give_the_same_answers(db: Database) -> None:
    db.transaction([(insert(webhooks), [{"record": "a"}, {"record": "b"}])])
    done = db.execute(insert(webhooks).returning(webhooks.c.id), {"record": "c"})
    assert done.rowcount == 1
    (new_id,) = done.rows[0]
    assert db.query(BY_ID, {"b_id": new_id}) == [("c",)]
    assert db.execute(RENAME, {"b_id": new_id, "b_record": "c2"}).rowcount == 1
    assert db.execute(RENAME, {"b_id": new_id + 100, "b_record": "x"}).rowcount == 0
    assert db.query(select(webhooks.c.record).order_by(webhooks.c.id)) == [("a",), ("b",), ("c2",)]
    assert db.query(select(func.count()).select_from(webhooks)) == [(3,)]


def test_a_transaction_is_all_or_nothing(db: Database) -> None:
    db.transaction([(insert(facts), [{"name": "x", "value": "1"}])])
    with pytest.raises(StoreError):
        db.transaction(
            [
                (insert(webhooks), [{"record": "kept only if all is"}]),
                (insert(facts), [{"name": "x", "value": "again"}]),  # the key exists
            ]
        )
    assert db.query(select(func.count()).select_from(webhooks)) == [(0,)]
    assert db.query(select(facts.c.value)) == [("1",)]


def test_a_missing_parameter_is_a_clear_error(db: Database) -> None:
    with pytest.raises(StoreError, match="b_id"):
        db.query(BY_ID, {})


def test_postgresql_gone_is_unavailable_and_comes_back() -> None:
    with postgresql() as pg:
        url = pg.url()
        migrate.upgrade(url)
        db = PgDatabase(url)
        try:
            db.execute(insert(facts), {"name": "a", "value": "1"})
            pg.stop()
            with pytest.raises(StoreUnavailable):
                db.execute(insert(facts), {"name": "b", "value": "2"})
            with pytest.raises(StoreUnavailable):
                db.query(select(facts.c.value))
            pg.start()
            db.execute(insert(facts), {"name": "b", "value": "2"})
            assert sorted(db.query(select(facts.c.name))) == [("a",), ("b",)]
        finally:
            db.close()


def test_a_database_behind_the_schema_is_refused(pg_url: str) -> None:
    with pytest.raises(migrate.SchemaBehind, match="db upgrade"):
        PgDatabase(pg_url)


def test_values_the_statement_carries_itself_need_no_parameters(db: Database) -> None:
    """Constants, a LIMIT without OFFSET and NULLs written into a statement are bound by
    the statement itself, on SQLite as on PostgreSQL (SQLite's compiled text has a ``?``
    for each)."""
    db.transaction([(insert(webhooks), [{"record": r} for r in ("a", "b", "c")])])
    first_two = select(webhooks.c.record).order_by(webhooks.c.id).limit(2)
    assert db.query(first_two) == [("a",), ("b",)]
    only_b = select(webhooks.c.record).where(webhooks.c.record == "b")
    assert db.query(only_b) == [("b",)]
    mark = update(webhooks).where(webhooks.c.record == "c").values(record="c!")
    assert db.execute(mark).rowcount == 1
    assert db.query(
        select(webhooks.c.record).where(webhooks.c.id == bindparam("b_id")).limit(1), {"b_id": 3}
    ) == [("c!",)]
