"""The SQLite adapter under real faults: a full database (``PRAGMA max_page_count`` gives a
real SQLITE_FULL) and a write lock held by another process. The error that surfaces must be
the one that happened, and the connection must stay usable."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ingest import StoreUnavailable
from ingest.sqlite_db import SQLiteDB
from tests.ingest.locker import locked

SCHEMA = "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, data BLOB NOT NULL);"
INSERT = "INSERT INTO t (data) VALUES (?)"


def _open(path: Path, **options: Any) -> SQLiteDB:
    """The store's file (the migrations' schema) with a test table of its own."""
    db = SQLiteDB(path, **options)
    db.execute(SCHEMA)
    return db


def count(db: SQLiteDB) -> int:
    return int(db.query("SELECT count(*) FROM t")[0][0])


def test_a_full_database_says_so_and_keeps_working(tmp_path: Path) -> None:
    db = _open(tmp_path / "full.db")
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
    db = _open(path, busy_timeout_s=0.3)
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
    db = _open(path, busy_timeout_s=5)
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


def test_a_write_does_not_queue_behind_a_stuck_one(tmp_path: Path) -> None:
    """The alert store's writer waits out the busy timeout on a locked file; the webhook
    outbox, on the same connection, must learn at once that the store is out (and send the
    notification unrecorded) instead of queueing behind it for the timeout and then its own."""
    path = tmp_path / "stuck.db"
    db = _open(path, busy_timeout_s=5, fail_fast_after_s=0.5)
    try:
        with locked(path):
            stuck = threading.Thread(target=db.transaction, args=([(INSERT, [(b"x",)])],))
            stuck.start()
            deadline = time.monotonic() + 5
            while db.write_waiting_s() < 0.1 and time.monotonic() < deadline:
                time.sleep(0.02)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="locked"):
                db.execute(INSERT, (b"y",))
            assert time.monotonic() - started < 2  # not the 5 s busy timeout, twice
        stuck.join(10)
        db.execute(INSERT, (b"z",))  # a write that is not stuck is waited for as before
        assert count(db) == 2
    finally:
        db.close()


def test_a_write_waits_for_one_in_progress_that_is_not_stuck(tmp_path: Path) -> None:
    db = _open(tmp_path / "busy.db", fail_fast_after_s=0.5)
    try:
        rows = [(b"x" * 1000,) for _ in range(20_000)]
        writers = [
            threading.Thread(target=db.transaction, args=([(INSERT, rows)],)) for _ in range(3)
        ]
        for w in writers:
            w.start()
        for w in writers:
            w.join(30)
        assert count(db) == 60_000
    finally:
        db.close()


def test_a_write_behind_a_slow_read_of_ours_is_not_a_stuck_store(tmp_path: Path) -> None:
    """A long history query holds the connection's turn; the write waiting behind it is not
    a store outage (no alert, /readyz stays ready)."""
    db = _open(tmp_path / "read.db")
    try:
        db._db.create_function("pause", 1, time.sleep)  # a read that takes 1.5 s
        reader = threading.Thread(target=db.query, args=("SELECT pause(1.5)",))
        reader.start()
        deadline = time.monotonic() + 5
        while not db._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)  # until the reader holds the turn
        writer = threading.Thread(target=db.transaction, args=([(INSERT, [(b"x",)])],))
        writer.start()
        seen = []
        while reader.is_alive():
            seen.append(db.write_waiting_s())
            time.sleep(0.05)
        writer.join(10)
        reader.join(10)
        assert max(seen) < 0.5
        assert count(db) == 1
    finally:
        db.close()
