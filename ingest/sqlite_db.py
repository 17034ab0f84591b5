"""One connection to the service's SQLite file, shared by its stores (history and twins,
alerts, API keys, audit log): WAL, a lock, and sqlite3 errors translated at this boundary.
The file's tables are the migrations' (``ingest.db``): opening it brings it to the schema.

Each store opens its own ``SQLiteDB`` on the same file; WAL lets them write in turn, and a
busy timeout makes one wait for another instead of failing. While a write waits (for the
lock, another process, a slow disk), ``write_waiting_s`` says for how long: the service
reports a write stuck beyond a few seconds instead of looking healthy for the whole timeout.

Calls on one ``SQLiteDB`` take turns (a lock). A write whose turn is held by a write that
has waited more than ``fail_fast_after_s`` for SQLite's own lock (the file is locked, by
another process or connection) fails at once with ``StoreUnavailable`` instead of queueing
behind it for the busy timeout and then waiting out its own: the webhook outbox learns
within a second that the alert store is out, and sends its notification unrecorded.

The file holds webhook secrets and key hashes: its directory is made 0700 and the file
(with its ``-wal`` and ``-shm``, which SQLite creates with the file's own mode) 0600. A
looser directory or file found at start is tightened, with a log line saying so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.expression import Executable

from ingest import StoreError, StoreUnavailable
from ingest.db.database import CoreStatement, Done, Params, sqlite_sql
from ingest.db.migrate import ensure_sqlite

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def _tighten(path: Path, mode: int) -> None:
    """``path`` no looser than ``mode``: group and others lose what ``mode`` denies them."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & ~mode:
        os.chmod(path, current & mode)
        log.warning("%s was mode %o, readable by others: now %o", path, current, current & mode)


def private_file(path: Path) -> None:
    """Create ``path``'s directory (0700) and the file itself (0600) if missing, and tighten
    them if they exist with a looser mode, before SQLite opens it."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _tighten(path.parent, DIR_MODE)
    # O_EXCL: only a file this call creates is opened here. Closing any descriptor of a
    # file drops every POSIX lock this process holds on it: opening an existing database
    # beside the process's own connections would let another process take it for unused,
    # checkpoint and delete its WAL under them (seen in tests/e2e/test_privacy.py).
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, FILE_MODE))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        _tighten(p, FILE_MODE)


@dataclass(frozen=True)
class BulkInsert:
    """``head VALUES (?,..),(?,..),.. tail``: up to ``CHUNK`` rows in one statement.

    ``executemany`` runs SQLite once per row and takes the GIL back after each; from the
    ingest's worker thread, while the event loop is busy, every row then waits out the
    interpreter's switch interval, and a 500-row batch took 10x its time (`bench/notes.md`).
    One statement per ``CHUNK`` rows waits once per chunk, and binds faster too."""

    head: str  # "INSERT ... INTO table (a, b, c)"
    width: int  # columns per row
    tail: str = ""  # "ON CONFLICT ..."

    names: tuple[str, ...] = ()  # the columns, in the order each row gives them (``of``)

    CHUNK = 100  # 100 rows x 9 columns stays under SQLite's oldest variable limit (999)

    @classmethod
    def of(cls, statement: Insert, keys: Sequence[str]) -> BulkInsert:
        """A Core insert of ``keys`` (SQLite's ``prefix_with("OR IGNORE")``, an upsert's
        ``ON CONFLICT`` tail), compiled once (``sqlite_sql``) and run this way. Rows give
        their values in ``names`` order: the table's order of ``keys``, as SQLAlchemy
        writes an insert's columns."""
        compiled = sqlite_sql(statement, keys)
        head, values, tail = compiled.text.partition(" VALUES ")
        one = "(" + ", ".join("?" * len(compiled.names)) + ")"
        if not values or not tail.startswith(one) or compiled.fixed:
            raise ValueError(f"not a one-row insert of {list(keys)}: {compiled.text}")
        return cls(head, len(compiled.names), tail.removeprefix(one).strip(), compiled.names)

    @functools.cache  # noqa: B019 - a few module-level instances
    def sql(self, rows: int) -> str:
        one = "(" + ",".join("?" * self.width) + ")"
        return f"{self.head} VALUES {','.join([one] * rows)} {self.tail}"

    def run(self, db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> None:
        for i in range(0, len(rows), self.CHUNK):
            chunk = rows[i : i + self.CHUNK]
            db.execute(self.sql(len(chunk)), [value for row in chunk for value in row])


Statement = tuple[str | BulkInsert, Sequence[Sequence[Any]]] | CoreStatement


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
        *,
        synchronous: str = "FULL",
        busy_timeout_s: float = 10.0,
        fail_fast_after_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.fail_fast_after_s = fail_fast_after_s
        try:
            private_file(self.path)
            # the schema is the migrations' (ingest.db): one query when the file is current
            ensure_sqlite(self.path)
            self._db = sqlite3.connect(
                self.path,
                check_same_thread=False,
                isolation_level=None,
                timeout=busy_timeout_s,
                cached_statements=512,  # BulkInsert: one statement per chunk size
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._lock = threading.Lock()
        # the write holding the turn started at (None: no write holds it). Not counted: the
        # wait for the turn itself, behind one of our own reads (a long history query is
        # not an outage), or behind another write (which is counted while it holds it).
        self._write_since: float | None = None
        # the write holding the turn is waiting for SQLite's lock since (None: it is not)
        self._locking_since: float | None = None

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write's turn, counted in ``write_waiting_s`` while it holds it; refused at once
        when the write holding the turn is stuck on a locked file (module docstring)."""
        while not self._lock.acquire(timeout=0.05):
            since = self._locking_since
            if since is not None and time.monotonic() - since > self.fail_fast_after_s:
                raise StoreUnavailable(
                    f"{self.path}: database is locked (a write on this connection has"
                    f" waited {time.monotonic() - since:.1f}s for it)"
                )
        self._write_since = time.monotonic()
        try:
            yield
        finally:
            self._write_since = self._locking_since = None
            self._lock.release()

    @contextmanager
    def _locking(self) -> Iterator[None]:
        """Around a statement that may wait for SQLite's lock (BEGIN IMMEDIATE, a lone
        write): a sibling waiting for the turn may give up (``_writing``)."""
        self._locking_since = time.monotonic()
        try:
            yield
        finally:
            self._locking_since = None

    def write_waiting_s(self) -> float:
        """How long the write in progress has been going on: waiting for SQLite's lock (a
        lock held elsewhere), the disk, or working (0: none is)."""
        started = self._write_since
        return 0.0 if started is None else time.monotonic() - started

    def transaction(self, statements: Sequence[Statement]) -> None:
        """Run every (sql, rows) in one transaction, or none of them: each row of ``rows``
        through ``sql`` (executemany), or a ``BulkInsert`` of them all. ``sql`` may be a
        SQLAlchemy Core statement with rows of named parameters (``ingest.db.database``).

        On an error SQLite may already have rolled the transaction back itself (SQLITE_FULL,
        SQLITE_IOERR, SQLITE_NOMEM): ROLLBACK only when one is still open, so the error
        that surfaces is the one that happened ("database or disk is full"), not "cannot
        rollback - no transaction is active"."""
        with self._writing(), _translated(self.path):
            with self._locking():
                self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if not rows:
                        continue
                    if isinstance(sql, BulkInsert):
                        sql.run(self._db, rows)  # type: ignore[arg-type]
                    elif isinstance(sql, Executable):
                        compiled = sqlite_sql(sql, list(rows[0]))
                        self._db.executemany(compiled.text, [compiled.args(r) for r in rows])  # type: ignore[arg-type]
                    else:
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        """Roll back what is still open; a failing rollback is logged, never raised (the
        caller re-raises the error that made it necessary)."""
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("%s: rollback failed: %s", self.path, exc)

    @overload
    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor: ...

    @overload
    def execute(self, sql: Executable, args: Params | None = None) -> Done: ...

    def execute(self, sql: Any, args: Any = ()) -> sqlite3.Cursor | Done:
        """One statement on its own (autocommit); the cursor says rowcount and lastrowid,
        or for a Core statement, ``Done`` (rowcount and the rows RETURNING gave)."""
        if isinstance(sql, Executable):
            compiled = sqlite_sql(sql, list(args or ()))
            with self._writing(), _translated(self.path), self._locking():
                cur = self._db.execute(compiled.text, compiled.args(args))
                rows = cur.fetchall()  # RETURNING's; rowcount counts once they are read
                return Done(cur.rowcount if cur.rowcount >= 0 else len(rows), rows)
        with self._writing(), _translated(self.path), self._locking():
            return self._db.execute(sql, args)

    def query(self, sql: str | Executable, args: Any = ()) -> list[tuple[Any, ...]]:
        """The rows of a read: SQL with positional ``args``, or a Core statement with named
        ones."""
        if isinstance(sql, Executable):
            sql, args = self._sqlite(sql, args)
        with self._lock, _translated(self.path):
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _sqlite(statement: Executable, params: Params | None) -> tuple[str, tuple[Any, ...]]:
        compiled = sqlite_sql(statement)
        return compiled.text, compiled.args(params)

    def close(self) -> None:
        with self._lock:
            self._db.close()
