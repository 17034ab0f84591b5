"""Where ``serve`` keeps its state: the embedded SQLite file (the default, in the data dir) or
a PostgreSQL database, chosen by one URL (``--db``, ``CHARGEWATCH_DB``):

    (none)                      <data dir>/chargewatch.db, migrated by serve itself
    sqlite:///path/to/file.db   the embedded store at that path, migrated by serve itself
    postgresql://user@host/db   PostgreSQL, at this chargewatch's schema (`chargewatch db
                                upgrade`); one behind is refused (``SchemaBehind``)

``StateDB.database()`` opens one connection (SQLite) or pool (PostgreSQL) for a store; every
store of the service and of its API takes one (``AlertStore(db)``, ``KeyStore(db)``, ...).
The URL's forms are SQLAlchemy's: ``sqlite:///relative/file.db``, ``sqlite:////abs/file.db``.

Exceptions: ``StateURLError`` (an ``ingest.StoreError``): a URL of neither kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ingest import StoreError
from ingest.db import migrate
from ingest.db.database import Database, PgDatabase
from ingest.sqlite_db import SQLiteDB
from ingest.sqlite_store import DB_FILE

_SQLITE = "sqlite:///"
_POSTGRESQL = ("postgresql://", "postgres://", "postgresql+psycopg://")


class StateURLError(StoreError):
    pass


@dataclass(frozen=True)
class StateDB:
    """The embedded file at ``path``, or PostgreSQL at ``url`` (exactly one is set)."""

    path: Path | None = None
    url: str | None = None

    @classmethod
    def of(cls, db: str | None, data_dir: str | Path) -> StateDB:
        """From ``--db`` (None or empty: the file in ``data_dir``)."""
        if not db:
            return cls(path=Path(data_dir) / DB_FILE)
        if db.startswith(_SQLITE):
            file = db.removeprefix(_SQLITE)
            if not file or file.endswith("/"):
                raise StateURLError(f"--db {db}: name the SQLite file (sqlite:///path/file.db)")
            return cls(path=Path(file))
        if db.startswith(_POSTGRESQL):
            return cls(url=db)
        raise StateURLError(
            f"--db {migrate.shown(db)}: give postgresql://user@host/db or sqlite:///path"
        )

    @property
    def embedded(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else migrate.shown(self.url or "")

    def database(self, *, synchronous: str = "FULL") -> Database:
        """A store's own connection: blocking (call it from a thread)."""
        if self.path is not None:
            return SQLiteDB(self.path, synchronous=synchronous)
        assert self.url is not None
        return PgDatabase(self.url)  # refuses a database behind the schema (SchemaBehind)
