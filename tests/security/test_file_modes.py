"""The data dir and its SQLite file hold webhook secrets and key hashes: the dir is 0700,
the file and its -wal/-shm 0600, and a looser dir or file found at start is tightened with
a log line. Real files, real SQLite (the modes are what the kernel reports)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from api.auth import KeyStore
from ingest.alerts.store import AlertStore
from ingest.sqlite_store import SQLiteStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask would leave them 0755/0644
    try:
        data = tmp_path / "data"
        store = SQLiteStore.in_dir(data)
        alerts = AlertStore.in_dir(data)
        keys = KeyStore.in_dir(data)
        try:
            keys.create("someone", "admin")  # a write: the WAL and its index exist now
            db = data / "chargewatch.db"
            assert _mode(data) == 0o700
            for f in (db, data / "chargewatch.db-wal", data / "chargewatch.db-shm"):
                assert f.exists(), f
                assert _mode(f) == 0o600, f"{f.name}: {_mode(f):o}"
        finally:
            keys.close()
            alerts.close()
            store.close()
    finally:
        os.umask(old)


def test_a_loose_data_dir_is_tightened_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    KeyStore.in_dir(data).close()
    db = data / "chargewatch.db"
    os.chmod(data, 0o755)
    os.chmod(db, 0o644)
    with caplog.at_level(logging.WARNING, logger="ingest.sqlite_db"):
        KeyStore.in_dir(data).close()
    assert _mode(data) == 0o700
    assert _mode(db) == 0o600
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "was mode 755" in said, said
    assert "was mode 644" in said, said
