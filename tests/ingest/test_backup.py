"""Backups of the embedded store: WAL included, checked before they replace anything, and
refused while a service holds the data dir (real SQLite files, real flock, real processes)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.backup import (
    LOCK_FILE,
    DataDirInUse,
    DataDirLock,
    NotABackup,
    backup,
    check,
    restore,
)
from ingest.sqlite_store import DB_FILE, SQLiteStore
from tests.ingest.test_sqlite_store import T0, row
from tests.servers import eventually


def _seqs(db_file: Path) -> list[int]:
    db = sqlite3.connect(db_file)
    try:
        return sorted(s for (s,) in db.execute("SELECT seq FROM messages"))
    finally:
        db.close()


def _store_with(data: Path, count: int) -> SQLiteStore:
    store = SQLiteStore.in_dir(data)
    store.append([row(seq, T0 + seq) for seq in range(1, count + 1)])
    return store


def test_a_backup_holds_what_is_still_in_the_wal_and_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = _store_with(data, 200)  # stays open: its commits sit in the WAL, not checkpointed
    try:
        assert (data / f"{DB_FILE}-wal").stat().st_size > 0
        # copying the database file alone misses them: what the test would miss without WAL
        shutil.copy(data / DB_FILE, tmp_path / "naive.db")
        # the migrations made the schema before WAL was on; every row is only in the WAL yet
        assert _seqs(tmp_path / "naive.db") == []

        summary = backup(data, tmp_path / "out.bak")
    finally:
        store.close()
    assert _seqs(tmp_path / "out.bak") == list(range(1, 201))
    assert summary.messages == 200
    assert stat.S_IMODE((tmp_path / "out.bak").stat().st_mode) == 0o600
    # one self-contained file, nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "naive.db", "out.bak"]


@pytest.mark.parametrize("name", [DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}.bak"])
def test_a_backup_never_replaces_the_live_store(tmp_path: Path, name: str) -> None:
    data = tmp_path / "data"
    store = _store_with(data, 10)
    try:
        with pytest.raises(Exception, match="own files: write the backup elsewhere"):
            backup(data, data / name)
        store.append([row(11, T0 + 11)])  # the live store still takes writes
    finally:
        store.close()
    assert _seqs(data / DB_FILE) == list(range(1, 12))
    backup(data, data / "backups.db")  # elsewhere in the dir is fine


def test_backup_of_a_missing_store_says_so(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no store to back up"):
        backup(tmp_path / "nothing", tmp_path / "out.bak")
    assert not (tmp_path / "out.bak").exists()


def test_restore_puts_the_backup_in_place_and_keeps_the_replaced_store(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    _store_with(old, 30).close()
    backup(old, tmp_path / "b.bak")
    current = _store_with(new, 5)  # a store with a WAL left behind, as after a crash
    shutil.copy(new / f"{DB_FILE}-wal", tmp_path / "wal-copy")
    current.close()
    (tmp_path / "wal-copy").rename(new / f"{DB_FILE}-wal")

    when = datetime(2026, 12, 2, 15, 0, 0, tzinfo=UTC)
    summary = restore(new, tmp_path / "b.bak", now=when)

    assert not (new / f"{DB_FILE}-wal").exists()  # the old WAL went aside, not onto the new file
    assert _seqs(new / DB_FILE) == list(range(1, 31))
    aside = new / f"{DB_FILE}.replaced-20261202T150000Z"
    assert summary.kept_aside == aside
    assert _seqs(aside) == list(range(1, 6))  # the replaced store, its WAL with it
    assert not list(new.glob(".*restoring*"))
    SQLiteStore.in_dir(new).close()  # the service opens it


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a database at all" * 100, "not a sound SQLite store"),
        (None, "not a chargewatch store"),  # a sound SQLite file of another schema
        ("truncated", "damaged|not a sound"),
    ],
)
def test_restore_refuses_a_file_that_is_not_a_sound_store(
    tmp_path: Path, content: bytes | str | None, reason: str
) -> None:
    data = tmp_path / "data"
    _store_with(data, 7).close()
    bad = tmp_path / "bad.bak"
    if content is None:
        other = sqlite3.connect(bad)
        other.execute("CREATE TABLE notes (t TEXT)")
        other.commit()
        other.close()
    elif content == "truncated":
        big = tmp_path / "big"
        _store_with(big, 3000).close()
        backup(big, tmp_path / "full.bak")
        whole = (tmp_path / "full.bak").read_bytes()
        bad.write_bytes(whole[: len(whole) // 2])
    else:
        assert isinstance(content, bytes)
        bad.write_bytes(content)

    with pytest.raises(NotABackup, match=reason):
        restore(data, bad)
    assert _seqs(data / DB_FILE) == list(range(1, 8))  # untouched
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(DB_FILE + "-")) == [
        DB_FILE,
        LOCK_FILE,
    ]


def test_restore_refuses_a_raw_copy_whose_last_commits_are_in_a_wal_beside_it(
    tmp_path: Path,
) -> None:
    raw = tmp_path / "raw"
    live = _store_with(raw, 9)  # open: its commits are in the WAL
    try:
        with pytest.raises(NotABackup, match="WAL beside it"):
            restore(tmp_path / "data", raw / DB_FILE)
    finally:
        live.close()  # closing checkpoints the WAL into the file and removes it
    restore(tmp_path / "data", raw / DB_FILE)
    assert _seqs(tmp_path / "data" / DB_FILE) == list(range(1, 10))


def test_restore_is_refused_while_the_data_dir_is_locked(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _store_with(data, 3).close()
    backup(data, tmp_path / "b.bak")
    with DataDirLock(data), pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
        restore(data, tmp_path / "b.bak")
    restore(data, tmp_path / "b.bak")  # released: now it goes


def test_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    """flock dies with its process: a crash never leaves the data dir locked."""
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ingest.backup import DataDirLock;"
            f" DataDirLock({str(data)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(DataDirInUse, match=f"pid {holder.pid}"):
            DataDirLock(data).acquire()
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()

    def free() -> None:
        try:
            DataDirLock(data).acquire()
        except DataDirInUse as exc:
            raise AssertionError(str(exc)) from exc

    eventually(free, timeout=5)


def test_check_counts_what_a_backup_holds(tmp_path: Path) -> None:
    _store_with(tmp_path / "d", 12).close()
    summary = backup(tmp_path / "d", tmp_path / "b.bak")
    assert (check(tmp_path / "b.bak").messages, summary.messages) == (12, 12)
