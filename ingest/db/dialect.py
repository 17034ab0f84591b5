"""The few statements that differ between the engines. An upsert is written with the
dialect's own ``insert`` (``on_conflict_do_update`` / ``on_conflict_do_nothing``): a store
builds each such statement once per engine, as module constants (``Upserts``,
``per_dialect``), and picks the one of its ``Database`` when it opens (``dialect_of``); the
SQLite form is then compiled once, like every other statement (``sqlite_sql``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert

from ingest.db.database import Database, PgDatabase

T = TypeVar("T")
Dialect = Literal["sqlite", "postgresql"]
DIALECTS: tuple[Dialect, ...] = ("sqlite", "postgresql")


def dialect_of(db: Database) -> Dialect:
    """``"postgresql"`` for a ``PgDatabase``, ``"sqlite"`` for the embedded file."""
    return "postgresql" if isinstance(db, PgDatabase) else "sqlite"


def per_dialect(build: Callable[[Callable[..., Any]], T]) -> dict[str, T]:
    """``build(insert)`` with each dialect's ``insert``, by dialect name."""
    return {"sqlite": build(sqlite.insert), "postgresql": build(postgresql.insert)}


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
        self._by_dialect = {d: upsert(table, d, key=key, kept=kept) for d in DIALECTS}

    def for_(self, dialect: Dialect) -> Insert:
        return self._by_dialect[dialect]
