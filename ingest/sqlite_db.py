"""One connection to the service's SQLite file, shared by its stores (history and twins,
alerts, API keys): WAL, a lock, and sqlite3 errors translated at this boundary.

Each store opens its own ``SQLiteDB`` on the same file; WAL lets them write in turn, and a
busy timeout makes one wait for another instead of failing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ingest import StoreError, StoreUnavailable

Statement = tuple[str, Sequence[Sequence[Any]]]


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """sqlite3 errors -> StoreUnavailable (locked, disk full, I/O: retry) or StoreError."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise StoreUnavailable(f"{path}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: {exc}") from exc


class SQLiteDB:
    def __init__(
        self,
        path: str | Path,
        schema: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(schema)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def transaction(self, statements: Sequence[Statement]) -> None:
        """Run every (sql, rows) with executemany in one transaction, or none of them."""
        with self._lock, _translated(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if rows:
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement on its own (autocommit); the cursor says rowcount and lastrowid."""
        with self._lock, _translated(self.path):
            return self._db.execute(sql, args)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, _translated(self.path):
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()
