"""An upsert as a Core statement for either engine: ``INSERT ... ON CONFLICT (key) DO
UPDATE SET col = excluded.col`` is spelled by each dialect's own ``insert``. A store keeps
both forms as module constants (``Upserts``) and picks its database's with ``dialect_of``:
the SQLite form is then compiled once, like every other statement (``sqlite_sql``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from ingest.db.database import Database, PgDatabase

Dialect = Literal["sqlite", "postgresql"]


def dialect_of(db: Database) -> Dialect:
    return "postgresql" if isinstance(db, PgDatabase) else "sqlite"


def upsert(
    table: Table, dialect: Dialect, *, key: Sequence[str] = ("id",), kept: Sequence[str] = ()
) -> Insert:
    """Insert a row, or update every column of the row with the same ``key`` but the key
    and ``kept`` (written once, by the insert)."""
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    return insert.on_conflict_do_update(
        index_elements=list(key),
        set_={
            c.name: insert.excluded[c.name]
            for c in table.columns
            if c.name not in key and c.name not in kept
        },
    )


class Upserts:
    """``upsert`` of one table for both engines, built once: ``for_(dialect)``."""

    def __init__(
        self, table: Table, *, key: Sequence[str] = ("id",), kept: Sequence[str] = ()
    ) -> None:
        self._by_dialect: dict[Dialect, Insert] = {
            d: upsert(table, d, key=key, kept=kept) for d in ("sqlite", "postgresql")
        }

    def for_(self, dialect: Dialect) -> Insert:
        return self._by_dialect[dialect]
