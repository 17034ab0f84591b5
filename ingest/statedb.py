"""Where ``serve`` keeps its state: the embedded SQLite file (the default, in the data dir) or
a PostgreSQL database, chosen by one URL (``--db``, ``CHARGEWATCH_DB``):

    (none)                      <data dir>/chargewatch.db, migrated by serve itself
    sqlite:///path/to/file.db   the embedded store at that path, migrated by serve itself
    postgresql://user@host/db   PostgreSQL, at this chargewatch's schema (`chargewatch db
                                upgrade`); one behind is refused (``SchemaBehind``)

``StateDB.database()`` opens one connection (SQLite) or pool (PostgreSQL) for a store; every
store of the service and of its API takes one (``AlertStore(db)``, ``KeyStore(db)``, ...).
The URL's forms are SQLAlchemy's: ``sqlite:///relative/file.db``, ``sqlite:////abs/file.db``.

One ``serve`` per database: the embedded file by the data dir's ``flock``
(``ingest.backup.DataDirLock``), PostgreSQL by ``ServeLock``, a session advisory lock
(``SERVE_LOCK``) on a connection of its own, held for the service's life. A second serve, or a
serve on a database where ``chargewatch ingest`` workers hold leases, is refused at start
(``DatabaseInUse``: two ingestors would number alerts and write twins over each other); the
workers refuse a database a serve holds (``ingest.leases``). A dead serve's lock goes with its
connection (the server's TCP keepalive ends a silent peer's backend within about 10 s). A
running serve checks its connection every ``check_s``; a lost one is taken again, and if
another serve or a worker got there meanwhile, ``ServeLock.run`` raises ``DatabaseInUse`` and
the service stops (its supervisor's ``fatal`` policy).

PostgreSQL advisory locks of chargewatch, one database each (keys of (int, int) locks are a
different space from bigint keys)::

    (0x63770001, p)  partition p's lease (ingest.leases)           (int, int) keys
    (0x63770002, m)  membership of worker m (ingest.leases)         (int, int) keys
    0x63776462       "cwdb" one `db upgrade` at a time (ingest.db.migrate)
    0x63777061       "cwpa" making a history day partition (ingest.pg_store)
    0x63777265       "cwre" seeding the device registry (ingest.worker)
    0x63777274       "cwrt" one retention pass at a time (ingest.pg_retention)
    0x63777376       "cwsv" the one serve on the database (here; ingest.leases.SERVE_LOCK)

Exceptions (``ingest.StoreError``s): ``StateURLError``: a URL of neither kind;
``DatabaseInUse``: another serve, or workers, use the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg.rows import TupleRow

from ingest import StoreError, StoreUnavailable
from ingest.backoff import backoff_s
from ingest.db import migrate
from ingest.db.database import Database, PgDatabase
from ingest.leases import DEFAULT_LOCK_SPACE, SERVE_LOCK, lease_holders, serve_holder
from ingest.sqlite_db import SQLiteDB
from ingest.sqlite_store import DB_FILE

_SQLITE = "sqlite:///"
_POSTGRESQL = ("postgresql://", "postgres://", "postgresql+psycopg://")


log = logging.getLogger(__name__)


class StateURLError(StoreError):
    pass


class DatabaseInUse(StoreError):
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


class ServeLock:
    """``serve``'s claim on a PostgreSQL database (module docstring): taken on entering or
    refused (``DatabaseInUse``); ``run`` keeps it, as a supervised task."""

    def __init__(
        self, url: str, *, check_s: float = 5.0, lock_space: int = DEFAULT_LOCK_SPACE
    ) -> None:
        self.url = url
        self.check_s = check_s
        self.lock_space = lock_space  # the workers' (ingest.leases.LeaseConfig)
        self.backend_pid: int | None = None  # of the lock's connection
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None

    async def __aenter__(self) -> ServeLock:
        await self._take()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._close()

    async def run(self) -> None:
        """Check the connection every ``check_s``; take the lock again on a new one when it
        was lost (backoff while the server cannot be reached); ``DatabaseInUse`` when another
        serve or a worker took the database meanwhile."""
        while True:
            await asyncio.sleep(self.check_s)
            try:
                async with asyncio.timeout(max(1.0, self.check_s)):
                    await self._query("SELECT 1")
                continue
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.error("database lock of serve lost: %s", exc or type(exc).__name__)
            await self._close()
            failures = 0
            while True:
                try:
                    await self._take()
                    log.info("database lock of serve taken again")
                    break
                except StoreUnavailable as exc:
                    failures += 1
                    delay = backoff_s(failures, first_s=0.5, cap_s=10.0)
                    log.warning("%s; attempt %d again in %.1fs", exc, failures, delay)
                    await asyncio.sleep(delay)

    async def _take(self) -> None:
        shown = migrate.shown(self.url)
        try:
            async with asyncio.timeout(20):
                conn = await psycopg.AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=10,
                    application_name=f"chargewatch-serve {socket.gethostname()}-{os.getpid()}"[:63],
                )
        except psycopg.ProgrammingError as exc:  # a malformed URL: no retry helps
            raise StoreError(f"--db {shown}: {exc}") from None
        except (psycopg.Error, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot reach {shown}: {exc or 'timeout'}") from None
        self._conn = conn
        try:
            async with asyncio.timeout(20):
                # the server ends a silent dead peer's backend (and its lock) in about 10 s
                await conn.execute(
                    b"SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1;"
                    b" SET tcp_keepalives_count = 5; SET tcp_user_timeout = 10000"
                )
                cur = await conn.execute(
                    "SELECT pg_backend_pid(), pg_try_advisory_lock(%s)", (SERVE_LOCK,)
                )
                row = await cur.fetchone()
                assert row is not None
                self.backend_pid, taken = int(row[0]), row[1] is True
                holder = None if taken else await serve_holder(conn)
                workers = await lease_holders(conn, self.lock_space) if taken else []
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self._close()
            raise StoreUnavailable(f"cannot lock {shown}: {exc or 'timeout'}") from None
        if not taken:
            await self._close()
            raise DatabaseInUse(
                f"another chargewatch serve ({holder or 'its connection is not visible'}) holds"
                f" {shown}: one serve per database; stop it first"
            )
        if workers:
            await self._close()
            raise DatabaseInUse(
                f"chargewatch ingest workers ({', '.join(workers)}) hold partition leases on"
                f" {shown}: serve beside them would ingest the same devices twice; stop them,"
                " or run `chargewatch api --db` replicas beside the workers instead of serve"
            )

    async def _query(self, sql: str) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            raise psycopg.OperationalError("the lock's connection is closed")
        await conn.execute(sql.encode())

    async def _close(self) -> None:
        """Closing the connection gives the lock up."""
        conn, self._conn = self._conn, None
        self.backend_pid = None
        if conn is not None and not conn.closed:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                async with asyncio.timeout(5):
                    await conn.close()
