"""The SQLite adapter under real faults: a full database (``PRAGMA max_page_count`` gives a
real SQLITE_FULL) and a write lock held by another process. The error that surfaces must be
the one that happened, and the connection must stay usable."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ingest import StoreUnavailable
from ingest.sqlite_db import SQLiteDB
from tests.ingest.locker import locked

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, data BLOB NOT NULL);"
INSERT = "INSERT INTO t (data) VALUES (?)"


def count(db: SQLiteDB) -> int:
    return int(db.query("SELECT count(*) FROM t")[0][0])


def test_a_full_database_says_so_and_keeps_working(tmp_path: Path) -> None:
    db = SQLiteDB(tmp_path / "full.db", SCHEMA)
    try:
        db.transaction([(INSERT, [(b"a",)])])
        pages = int(db.query("PRAGMA page_count")[0][0])
        db.execute(f"PRAGMA max_page_count = {pages + 2}")
        with pytest.raises(StoreUnavailable, match="database or disk is full") as caught:
            db.transaction([(INSERT, [(b"x" * 4096,) for _ in range(50)])])
        assert "no transaction is active" not in str(caught.value)
        assert count(db) == 1  # nothing of the failed transaction is left
        db.execute("PRAGMA max_page_count = 1073741823")
        db.transaction([(INSERT, [(b"b",)])])  # and the connection still writes
        assert count(db) == 2
    finally:
        db.close()


def test_a_lock_held_by_another_process_says_locked(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    db = SQLiteDB(path, SCHEMA, busy_timeout_s=0.3)
    try:
        with locked(path):
            with pytest.raises(StoreUnavailable, match="database is locked"):
                db.transaction([(INSERT, [(b"x",)])])
            assert count(db) == 0  # WAL: reads go on while another process writes
        db.transaction([(INSERT, [(b"y",)])])
        assert count(db) == 1
    finally:
        db.close()


def test_a_write_waiting_for_a_lock_is_visible_while_it_waits(tmp_path: Path) -> None:
    path = tmp_path / "waiting.db"
    db = SQLiteDB(path, SCHEMA, busy_timeout_s=5)
    try:
        assert db.write_waiting_s() == 0
        with locked(path):
            writer = threading.Thread(target=db.transaction, args=([(INSERT, [(b"x",)])],))
            writer.start()
            deadline = time.monotonic() + 5
            while db.write_waiting_s() < 0.5 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert 0.5 <= db.write_waiting_s() < 5
        writer.join(10)
        assert db.write_waiting_s() == 0
        assert count(db) == 1  # the lock went away within the busy timeout: written
    finally:
        db.close()
