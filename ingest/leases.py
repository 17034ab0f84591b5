"""Partition leases in PostgreSQL: which ingest worker may consume (and acknowledge) what.

A worker holds a partition by a **session advisory lock** ``(lock_space, partition)`` on one
dedicated connection, so the lease vanishes with a dead worker's connection (kill -9, a
terminated backend, a silent network loss: the server's TCP keepalive and user timeout,
set per session from ``lease_timeout_s``, end the backend). Membership uses the same
mechanism: a worker joins by taking ``(lock_space + 1, member_id)`` and writing a row to
``ingest_members``; the live members are the rows whose lock is held (``pg_locks``), so no
heartbeat timeouts are needed. Each worker computes the same deterministic assignment from
the live members (``assign``: partition p goes to the (p mod M)-th member by join order),
releases what is no longer its own and tries to take what is.

Each acquisition bumps the partition's **fencing epoch** in
``partition_leases(partition, epoch, owner, acquired_at)``. A state store calls
``check_fence`` inside its write transaction: the row is read ``FOR SHARE``, so a write of a
stale owner is refused (``StaleLease``), and a new owner's epoch bump waits until a write of
the old owner that passed the check has committed (the new owner then loads state that
includes it).

Ownership is split in two, so that no two workers ever *believe* they own one partition:
a partition whose lock was just taken waits ``grace_s`` (one health-check period plus its
timeout: the longest a previous owner whose connection died may take to notice) before its
owner is told (``PartitionOwner.acquired``) and it counts as ``owned``.

Loss: a health check (``SELECT 1`` every ``check_interval_s``, at most ``check_timeout_s``)
that fails calls ``PartitionOwner.dropped_all`` first (synchronously, on the loop: every
partition stops acknowledging at once), then forgets every lease, then reconnects with capped,
jittered exponential backoff and takes partitions again. Release (rebalance, shutdown): the
owner stops the partition's consumer and detaches its session first
(``PartitionOwner.released``), then the lock is given up.

Why psycopg's AsyncConnection on the worker's event loop rather than a thread: the consumers
acknowledge on that loop, so "stop acknowledging" is a plain call that runs before the loop
does anything else; a thread would need a cross-thread handshake in the one place where
a delay means acking without a lease. Every query is short and bounded by ``asyncio.timeout``.

Workers and a ``serve`` never share a database (both would ingest, number alerts and write
twins): ``serve`` holds ``SERVE_LOCK`` for its life (``ingest.statedb.ServeLock``), and a
worker that finds it held right after joining (``serve_holder``) refuses to go on
(``LeaseError``); a serve checks for members the same way (``lease_holders``) after taking its
lock, so whichever of two starting at once checks second sees the other. The keys of every
advisory lock of chargewatch are listed in ``ingest.statedb``.

The tables (``partition_leases``, ``ingest_members``, the sequence ``ingest_member_ids``) are
in ``ingest.db.schema``, made by ``chargewatch db upgrade`` (revision 0002); the worker
refuses a database behind that schema before it takes any lease.

Exceptions::

    IngestError
    └── LeaseError         the lease database cannot be used (bad URL, no such database,
        │                  a ``serve`` holds it)
        └── StaleLease     a write by an owner whose epoch is no longer the partition's
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import psycopg
from psycopg.rows import TupleRow
from sqlalchemy import Connection, text

from ingest import IngestError, StoreError, StoreUnavailable
from ingest.backoff import backoff_s
from ingest.db import migrate
from ingest.db.database import CoreStatement, Database
from ingest.partitions import check_partitions

log = logging.getLogger(__name__)

DEFAULT_LOCK_SPACE = 0x63770001  # first key of our advisory locks: partitions; +1 members
SERVE_LOCK = 0x6377_7376  # "cwsv": held by the one `serve` on a database (ingest.statedb)


class LeaseError(IngestError):
    pass


class StaleLease(LeaseError):
    pass


FENCE_SQL = "SELECT 1 FROM partition_leases WHERE partition = %s AND epoch = %s FOR SHARE"

_THIS_DATABASE = "l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
_LIVE = f"""EXISTS (
    SELECT 1 FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND {_THIS_DATABASE}
      AND l.classid = %s::oid AND l.objid = m.member_id::oid
)"""
# who holds a lock: its connection's name and address where this role may see them
_HOLDER = (
    """SELECT l.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), '')
    FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND {} AND """
    + _THIS_DATABASE
)
# a bigint key is (classid, objid) = (high, low 32 bits) with objsubid 1; (int, int) keys 2
_SERVE_SQL = _HOLDER.format("l.objsubid = 1 AND l.classid = 0 AND l.objid = %s::oid")
_LEASES_SQL = _HOLDER.format("l.objsubid = 2 AND l.classid IN (%s::oid, %s::oid)")
_MEMBERS_SQL = f"SELECT m.member_id FROM ingest_members m WHERE {_LIVE} ORDER BY m.member_id"
_FORGET_DEAD_SQL = f"DELETE FROM ingest_members m WHERE NOT {_LIVE}"


async def check_fence(conn: psycopg.AsyncConnection[TupleRow], partition: int, epoch: int) -> None:
    """Inside the caller's write transaction: refuse (``StaleLease``) unless ``epoch`` is still
    the partition's; holds the row so that no new owner's acquisition commits meanwhile."""
    cur = await conn.execute(FENCE_SQL, (partition, epoch))
    if await cur.fetchone() is None:
        raise StaleLease(f"partition {partition}: epoch {epoch} is no longer the lease's")


def _described(rows: Sequence[TupleRow]) -> list[str]:
    out = []
    for pid, name, addr in rows:
        who = f"{name} " if name else ""
        out.append(f"{who}pid {pid}{f' at {addr}' if addr else ''}")
    return sorted(set(out))


async def serve_holder(conn: psycopg.AsyncConnection[TupleRow]) -> str | None:
    """Who holds ``SERVE_LOCK`` on ``conn``'s database (its connection, for messages), or
    None when no ``serve`` does."""
    cur = await conn.execute(_SERVE_SQL.encode(), (SERVE_LOCK,))
    found = _described(await cur.fetchall())
    return ", ".join(found) if found else None


async def lease_holders(
    conn: psycopg.AsyncConnection[TupleRow], lock_space: int = DEFAULT_LOCK_SPACE
) -> list[str]:
    """The workers (their connections) that are members or hold partitions on ``conn``'s
    database."""
    cur = await conn.execute(_LEASES_SQL.encode(), (lock_space, lock_space + 1))
    return _described(await cur.fetchall())


def serving_refused(holder: str, url: str) -> LeaseError:
    """A worker's refusal of a database a ``serve`` holds: one line, saying what to do."""
    return LeaseError(
        f"a chargewatch serve ({holder}) holds {migrate.shown(url)}: workers beside it would"
        " ingest the same devices twice; stop that serve first (the cluster is workers and"
        " `chargewatch api` replicas, without serve)"
    )


async def refuse_if_served(url: str) -> None:
    """Before a worker starts anything: ``serving_refused`` when a ``serve`` holds ``url``
    (the lease manager checks again after joining, for a serve that starts meanwhile)."""
    try:
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=10
        ) as conn:
            holder = await serve_holder(conn)
    except psycopg.ProgrammingError as exc:  # a malformed URL
        raise LeaseError(f"lease database URL: {exc}") from None
    except psycopg.Error as exc:
        raise LeaseError(f"cannot reach {migrate.shown(url)}: {exc}") from None
    if holder is not None:
        raise serving_refused(holder, url)


def holds(conn: Connection, fence: tuple[int, int]) -> bool:
    """Inside a store's write transaction (``PostgresStore.write_fenced``): whether the lease
    of partition ``fence[0]`` is still at epoch ``fence[1]``; when it is, its row is held
    until that transaction ends, so no new owner's acquisition commits meanwhile."""
    return conn.exec_driver_sql(FENCE_SQL, fence).first() is not None


# ``fence`` as the first statement of a ``Database.transaction``: fails the transaction
# (division by zero) unless the lease is still at this epoch, and holds the lease row until
# it ends
_FENCE = text(
    "SELECT 1 / (SELECT count(*)::int FROM (SELECT 1 FROM partition_leases"
    " WHERE partition = :b_partition AND epoch = :b_epoch FOR SHARE) AS held)"
)
_HOLDS = text("SELECT 1 FROM partition_leases WHERE partition = :b_partition AND epoch = :b_epoch")


def fenced_transaction(
    db: Database, statements: Sequence[CoreStatement], fence: tuple[int, int] | None
) -> None:
    """``db.transaction(statements)``; with ``fence`` (partition, epoch; PostgreSQL), only
    while that partition's lease is at that epoch: else ``StaleLease`` and nothing is
    written. The stores of a partition's engines write through it (alerts, work orders,
    commands): a worker that lost the partition writes no more of its state."""
    if fence is None:
        db.transaction(statements)
        return
    held = {"b_partition": fence[0], "b_epoch": fence[1]}
    try:
        db.transaction([(_FENCE, [held]), *statements])
    except StoreError as exc:
        if isinstance(exc, StoreUnavailable) or db.query(_HOLDS, held):
            raise
        raise StaleLease(
            f"partition {fence[0]}: epoch {fence[1]} is no longer the lease's"
        ) from exc


def not_saved(what: str, lost: StaleLease) -> StoreError:
    """The error of a request whose changes the fence dropped (``lost``: the partition moved
    before they were written): nothing of it is saved, and the partition's new owner takes
    it when it is tried again (503 on a replica). The engines of a partition (alerts, work
    orders) raise it from ``flush`` once their writer met ``StaleLease``."""
    return StoreError(
        f"{what} not saved: {lost} (the partition moved to another worker): try again"
    )


def assign(partitions: int, members: Sequence[int]) -> dict[int, list[int]]:
    """Partitions per live member: partition p to ``sorted(members)[p % M]``; every worker
    computes the same from the same members, and the counts differ by at most one."""
    ordered = sorted(members)
    out: dict[int, list[int]] = {m: [] for m in ordered}
    if ordered:
        for p in range(partitions):
            out[ordered[p % len(ordered)]].append(p)
    return out


class PartitionOwner(Protocol):
    """What the lease manager tells the worker; all called on the loop."""

    def acquired(self, partition: int, epoch: int) -> None:
        """The partition is ours with ``epoch``: load its state, then consume and ack."""

    async def released(self, partition: int) -> None:
        """Stop consuming and acknowledging the partition and detach its session (keeping it
        on the broker); returns when nothing more can be acknowledged for it."""

    def dropped_all(self) -> None:
        """Every lease is lost: stop acknowledging everything now (no await before that)."""


@dataclass(frozen=True, slots=True)
class LeaseConfig:
    partitions: int
    worker: str
    lease_timeout_s: float = 10.0
    reconnect_max_s: float = 10.0
    lock_space: int = DEFAULT_LOCK_SPACE

    def __post_init__(self) -> None:
        check_partitions(self.partitions)
        if not 0.5 <= self.lease_timeout_s <= 600:
            raise ValueError(f"lease timeout {self.lease_timeout_s}s: use 0.5..600 s")
        if not 0 <= self.lock_space < 2**31 - 2:
            raise ValueError("lock space must fit a PostgreSQL integer")

    @property
    def check_interval_s(self) -> float:
        return self.lease_timeout_s / 10

    @property
    def check_timeout_s(self) -> float:
        return self.lease_timeout_s / 4

    @property
    def grace_s(self) -> float:
        """How long a previous owner whose connection died may still believe it owns."""
        return self.check_interval_s + self.check_timeout_s


class LeaseManager:
    """Holds this worker's partitions (``owned``: partition -> epoch) while it runs."""

    def __init__(self, dsn: str, config: LeaseConfig, owner: PartitionOwner) -> None:
        self.dsn = dsn
        self.config = config
        self._owner = owner
        self.owned: dict[int, int] = {}  # told to the owner: it consumes and acks these
        self._pending: dict[int, tuple[int, float]] = {}  # locked, in grace: epoch, ready at
        self.member_id: int | None = None
        self.backend_pid: int | None = None  # of the lease connection, for tests and logs
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._task: asyncio.Task[None] | None = None
        self.losses = 0  # times every lease was dropped at once

    @property
    def connected(self) -> bool:
        """Joined, on a lease connection believed up (the health check says otherwise)."""
        return self._conn is not None and not self._conn.closed and self.member_id is not None

    @property
    def held(self) -> set[int]:
        """Partitions whose lock this worker believes it holds (owned or in grace)."""
        return set(self.owned) | set(self._pending)

    async def __aenter__(self) -> LeaseManager:
        self._task = asyncio.create_task(self._run(), name=f"leases-{self.config.worker}")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            # a refusal (LeaseError) ended the task: ``finished`` raised it to its waiter
            with contextlib.suppress(asyncio.CancelledError, LeaseError):
                await self._task
        await self._leave()

    async def finished(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    # -- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._hold()
        except Exception as exc:  # a bug or a bad URL: nothing is acked without a lease
            self._lose(exc)
            raise

    async def _hold(self) -> None:
        failures = 0
        while True:
            try:
                await self._connect()
                failures = 0
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._health(), name="lease-health")
                    tg.create_task(self._rebalance(), name="lease-rebalance")
            except* (psycopg.Error, OSError, TimeoutError) as group:
                self._lose(group.exceptions[0])
            failures += 1
            delay = backoff_s(failures, first_s=0.5, cap_s=self.config.reconnect_max_s)
            log.warning("lease database: reconnect attempt %d in %.1fs", failures, delay)
            await asyncio.sleep(delay)

    async def _connect(self) -> None:
        cfg = self.config
        timeout = max(1.0, cfg.check_timeout_s)
        async with asyncio.timeout(timeout * 2):
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.dsn,
                    autocommit=True,
                    connect_timeout=max(1, round(timeout)),
                    application_name=f"chargewatch-ingest {cfg.worker}"[:63],
                )
            except psycopg.ProgrammingError as exc:  # a malformed URL: no retry helps
                raise LeaseError(f"lease database URL: {exc}") from None
            self._conn = conn
            # the server ends a silent peer's backend, and with it the locks, within
            # about 0.6 lease timeouts (a worker notices its own loss within 0.35)
            idle = max(1, round(cfg.lease_timeout_s * 0.3))
            await conn.execute(
                f"SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = 1;"
                f" SET tcp_keepalives_count = {idle};"
                f" SET tcp_user_timeout = {round(cfg.lease_timeout_s * 600)};"
                f" SET lock_timeout = {round(cfg.check_timeout_s * 1000)};"
                f" SET statement_timeout = {round(cfg.check_timeout_s * 2000)}".encode()
            )
            cur = await conn.execute("SELECT pg_backend_pid(), nextval('ingest_member_ids')")
            row = await cur.fetchone()
            assert row is not None
            self.backend_pid, member_id = int(row[0]), int(row[1])
            await conn.execute("SELECT pg_advisory_lock(%s, %s)", (cfg.lock_space + 1, member_id))
            holder = await serve_holder(conn)  # after joining: a serve starting now sees us
            if holder is not None:
                self._conn = None
                await conn.close()
                raise serving_refused(holder, self.dsn)
            await conn.execute(_FORGET_DEAD_SQL.encode(), (cfg.lock_space + 1,))
            await conn.execute(
                "INSERT INTO ingest_members (member_id, name) VALUES (%s, %s)",
                (member_id, cfg.worker),
            )
            self.member_id = member_id
        log.info("lease database: joined as member %d (%s)", member_id, cfg.worker)

    async def _health(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.check_interval_s)
            async with asyncio.timeout(cfg.check_timeout_s):
                await self._query("SELECT 1")

    async def _rebalance(self) -> None:
        cfg = self.config
        while True:
            async with asyncio.timeout(cfg.check_timeout_s):
                rows = await self._query(_MEMBERS_SQL, (cfg.lock_space + 1,))
            members = [int(r[0]) for r in rows]
            assert self.member_id is not None
            mine = set(assign(cfg.partitions, members).get(self.member_id, []))
            for p in sorted(self.held - mine):
                await self._release(p)
            now = time.monotonic()
            for p, (epoch, ready_at) in sorted(self._pending.items()):
                if p in mine and now >= ready_at:
                    del self._pending[p]
                    self.owned[p] = epoch
                    log.info("partition %d: ours (epoch %d)", p, epoch)
                    self._owner.acquired(p, epoch)
            for p in sorted(mine - self.held):
                await self._try_acquire(p)
            await asyncio.sleep(cfg.check_interval_s)

    async def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[TupleRow]:
        conn = self._conn
        if conn is None or conn.closed:
            raise psycopg.OperationalError("the lease connection is closed")
        cur = await conn.execute(sql.encode(), params)
        return await cur.fetchall() if cur.description else []

    async def _try_acquire(self, p: int) -> None:
        cfg = self.config
        async with asyncio.timeout(cfg.check_timeout_s * 3):
            rows = await self._query("SELECT pg_try_advisory_lock(%s, %s)", (cfg.lock_space, p))
            if not rows or rows[0][0] is not True:
                return  # its previous owner has not let go yet: next round
            try:
                rows = await self._query(
                    "INSERT INTO partition_leases (partition, epoch, owner, acquired_at)"
                    " VALUES (%s, 1, %s, now()) ON CONFLICT (partition) DO UPDATE SET"
                    " epoch = partition_leases.epoch + 1, owner = EXCLUDED.owner,"
                    " acquired_at = EXCLUDED.acquired_at RETURNING epoch",
                    (p, cfg.worker),
                )
            except psycopg.errors.LockNotAvailable:
                # a stale owner's write still holds the fence row: let go, next round
                log.warning("partition %d: fence row busy, trying again", p)
                await self._query("SELECT pg_advisory_unlock(%s, %s)", (cfg.lock_space, p))
                return
        epoch = int(rows[0][0])
        self._pending[p] = (epoch, time.monotonic() + cfg.grace_s)

    async def _release(self, p: int) -> None:
        """Stop the consumer and detach the session first, then give up the lock."""
        if p in self.owned:
            await self._owner.released(p)
            del self.owned[p]
            log.info("partition %d: released", p)
        self._pending.pop(p, None)
        async with asyncio.timeout(self.config.check_timeout_s):
            await self._query("SELECT pg_advisory_unlock(%s, %s)", (self.config.lock_space, p))

    def _lose(self, exc: BaseException) -> None:
        """The lease connection failed: every partition stops acking, then is forgotten."""
        conn, self._conn = self._conn, None
        if conn is None and not self.held:
            log.warning("cannot reach the lease database: %s", exc or type(exc).__name__)
            return
        had = sorted(self.held)
        self._owner.dropped_all()  # first: nothing more is acknowledged
        self.owned.clear()
        self._pending.clear()
        self.losses += 1
        log.error("lease database lost (%s): dropped partitions %s", exc or type(exc).__name__, had)
        self.member_id = self.backend_pid = None
        if conn is not None:
            # closing a broken connection can block on the socket: don't wait for it
            with contextlib.suppress(Exception):
                conn.pgconn.finish()

    async def _leave(self) -> None:
        """Shutdown: release every partition (consumers stopped first), leave, close."""
        conn = self._conn
        try:
            for p in sorted(self.held):
                await self._release(p)
            if conn is not None and self.member_id is not None:
                async with asyncio.timeout(self.config.check_timeout_s):
                    await self._query(
                        "DELETE FROM ingest_members WHERE member_id = %s", (self.member_id,)
                    )
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self._lose(exc)
        finally:
            if self.owned or self._pending:
                self._lose(RuntimeError("shutdown"))
            if conn is not None and not conn.closed:
                with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                    async with asyncio.timeout(self.config.check_timeout_s):
                        await conn.close()
            self._conn = None
