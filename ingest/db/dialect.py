"""The few statements that differ between the engines: an upsert is written with the
dialect's own ``insert`` (``on_conflict_do_update`` / ``on_conflict_do_nothing``). A store
builds each such statement once per engine, as module constants, and picks the one of its
``Database`` when it opens (``per_dialect``, ``dialect_of``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.dialects import postgresql, sqlite

from ingest.db.database import Database, PgDatabase

T = TypeVar("T")
DIALECTS = ("sqlite", "postgresql")


def dialect_of(db: Database) -> str:
    """``"postgresql"`` for a ``PgDatabase``, ``"sqlite"`` for the embedded file."""
    return "postgresql" if isinstance(db, PgDatabase) else "sqlite"


def per_dialect(build: Callable[[Callable[..., Any]], T]) -> dict[str, T]:
    """``build(insert)`` with each dialect's ``insert``, by dialect name."""
    return {"sqlite": build(sqlite.insert), "postgresql": build(postgresql.insert)}
