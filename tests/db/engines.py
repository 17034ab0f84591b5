"""The two engines a store's contract test runs on: the embedded SQLite file and a fresh,
migrated PostgreSQL database (``pg_url``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.db import migrate
from ingest.db.database import Database, PgDatabase
from ingest.sqlite_db import SQLiteDB

ENGINES = ["sqlite", "postgresql"]


def open_database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A ``Database`` on the engine ``request.param`` names, at the current schema."""
    if request.param == "sqlite":
        return SQLiteDB(tmp_path / "cw.db")
    url = request.getfixturevalue("pg_url")
    migrate.upgrade(url)
    return PgDatabase(url)
