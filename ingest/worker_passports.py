"""Battery passports in the partitioned ingest workers (issue 13): "a battery pack that
overheated once is remembered by its serial wherever it goes next", when the cabinet it
goes to belongs to another partition, owned by another worker.

Each owned partition runs a ``Passports`` index of its own (``open``), over the partition's
cabinets only: a cabinet is in exactly one partition, so the occupant of each slot has one
owner, and the partition's consumer (``ingest.partition_consumer``) feeds it the statuses
and swaps it stores, before its alert engine sees them, as ``serve`` does. Its writer task
runs here, supervised, and writes the passports to PostgreSQL. The passport rows are shared:
when a pack leaves a cabinet of partition 1 and arrives in one of partition 2, the two
partitions write about the same serial in either order, and ``PassportStore.apply`` merges
them the same whatever the order (see ``ingest.passport_store``). The writes are not fenced
by the lease: they only record what a durable batch said happened, so a former owner's late
write is a fact, merged like any other.

The flagged set is global, and kept in each worker's memory: a pack arriving in a slot is
checked against it on the pipeline's path (a dict lookup; the observers are synchronous,
and a database lookup per arrival would put a round trip into every batch with a swap). A flag is written to PostgreSQL by the
partition whose safety alert raised it, with a NOTIFY of ``FLAGS_CHANNEL``; a maintainer's
clearance (from ``serve`` or an API replica, ``PassportStore.clear``) NOTIFYs the same.
``follow_flags`` (one LISTEN connection per worker) reads the flagged packs again on each
notice (a burst is one read) and every ``reload_s`` (the safety net for a notice lost with a
connection), and hands them to every partition's index (``Passports.adopt_flags``): flags
raised elsewhere are known, cleared ones are dropped (no ``flagged_battery`` for that pack
any more), and a pack that sits in one of the partition's slots (carried here before its
flag's notice, or here before its flag) is locked and alerted then, unless the pack's latest
stay, which the same read returns, shows that it left. The read is one query on the
``battery_flagged`` index with each flagged pack's latest stay (``stays_by_serial``):
~0.7 ms for 50 flagged among 20,000 packs of 5 stays each, measured on the test PostgreSQL
(~0.4 ms without the stays); flagged packs are few, so the set is small. A partition's
index, once restored, announces the flagged packs in its slots that nobody announced
(``Passports.announce_flagged``, called by the partition's consumer): a previous owner that
died before the flag's notice leaves no flagged pack unannounced. A pack flagged in
partition 1 is known in partition 2 a writer
period (0.5 s) plus a notice after its alert opened: far less than carrying a pack from one
cabinet to another takes.

``lock_battery`` goes through the partition's remote commands (``PipelineConsumer.commands``,
which exist when alerts run); without them, the lock is logged and counted as unsent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Collection, Mapping
from types import TracebackType
from typing import NoReturn, Self

from prometheus_client import CollectorRegistry
from pydantic import TypeAdapter, ValidationError

from devices.catalog import Catalog
from ingest import IngestError, StoreError, listen
from ingest.actions import libpq_url
from ingest.passport_store import FLAGS_CHANNEL, PassportStore
from ingest.passports import Flag, PassportMetrics, Passports
from ingest.supervisor import Supervisor

log = logging.getLogger(__name__)

RELOAD_S = 30.0
"""The safety net: the flagged packs are read again this often without a notice."""
GATHER_S = 0.05
"""After a notice, how long more are gathered into the same read."""
BACKOFF_MAX_S = 10.0
FOLLOW_TASK = "passports:flags"
LOCK_ENV = "CHARGEWATCH_INGEST__BATTERIES__LOCK_FLAGGED"


class WorkerPassports:
    """What a worker's partitions share for their passports: the store on PostgreSQL, the
    counters, the writer tasks' supervisor and the flags' listener (module docstring).
    ``async with`` it; ``open`` a partition's index, ``close`` it when the partition goes."""

    def __init__(
        self,
        db_url: str,
        *,
        lock_flagged: bool = True,
        reload_s: float = RELOAD_S,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.db_url = db_url
        self.lock_flagged = lock_flagged
        self.reload_s = reload_s
        self.metrics = PassportMetrics(registry)
        self.supervisor = Supervisor()
        self.indexes: weakref.WeakSet[Passports] = weakref.WeakSet()
        self.reloads = 0  # reads of the flagged packs done
        self.listening = False
        self._store: PassportStore | None = None

    @property
    def store(self) -> PassportStore:
        if self._store is None:
            raise RuntimeError("WorkerPassports not entered")
        return self._store

    async def __aenter__(self) -> Self:
        self._store = await asyncio.to_thread(PassportStore.on_postgresql, self.db_url)
        try:
            await self.supervisor.__aenter__()
        except BaseException:
            self._store.close()
            raise
        self.supervisor.start(FOLLOW_TASK, self.follow_flags)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.supervisor.__aexit__(et, e, tb)
        finally:
            await asyncio.to_thread(self.store.close)

    # -- the partitions' indexes ------------------------------------------------------------

    async def open(
        self, catalog: Catalog, devices: Collection[str], partition: int, epoch: int
    ) -> Passports:
        """The index of ``devices`` (a partition's), restored from PostgreSQL, its writer
        running until ``close``."""
        passports = Passports(
            self.store,
            catalog,
            lock_flagged=self.lock_flagged,
            metrics=self.metrics,
            devices=devices,
        )
        await asyncio.to_thread(passports.restore)
        # a flag written after the restore's read, whose notice came before this, is read
        # by the next reload (the next notice, or ``reload_s`` at the latest); what reloads
        # learn before the partition's alert engine is up is announced with it, by the
        # consumer's ``announce_flagged``
        passports.announcing = False
        self.indexes.add(passports)
        self.supervisor.start(_writer(partition, epoch), passports.run)
        return passports

    async def close(self, passports: Passports, partition: int, epoch: int) -> None:
        """A partition's index goes: its writer stopped, what it has pending written."""
        self.indexes.discard(passports)
        await self.supervisor.stop(_writer(partition, epoch))
        try:
            await passports.flush()
        except StoreError:
            log.error("partition %d: the last passport operations were not written", partition)

    # -- the flags every partition shares ---------------------------------------------------

    async def reload(self) -> None:
        """Read the flagged packs; every partition's index adopts them."""
        indexes = list(self.indexes)
        marks = [p.flushes for p in indexes]  # before the read: see Passports.adopt_flags
        rows = await asyncio.to_thread(self.store.flagged_where)
        flagged = {serial: Flag(at, why) for serial, (at, why, _) in rows.items()}
        last_stays = {serial: last for serial, (_, _, last) in rows.items() if last is not None}
        self.reloads += 1
        for passports, mark in zip(indexes, marks, strict=True):
            passports.adopt_flags(flagged, mark, last_stays)

    async def follow_flags(self) -> NoReturn:
        """LISTEN on ``FLAGS_CHANNEL``: a read of the flagged packs on each (re)connect, on
        each burst of notices, and every ``reload_s`` (``ingest.listen``). A lost connection
        is retried with capped, jittered backoff."""

        def state(listening: bool, _: BaseException | None) -> None:
            self.listening = listening

        await listen.follow(
            libpq_url(self.db_url), [FLAGS_CHANNEL], name="battery flags", on_state=state,
            catch_up=lambda _: self.reload(), gather_s=GATHER_S, period_s=self.reload_s,
            errors=(StoreError,), first_s=0.4, cap_s=BACKOFF_MAX_S,
        )  # fmt: skip


def lock_flagged_setting(environ: Mapping[str, str] | None = None) -> bool:
    """``CHARGEWATCH_INGEST__BATTERIES__LOCK_FLAGGED``, as ``serve`` reads it (default on)."""
    raw = (os.environ if environ is None else environ).get(LOCK_ENV)
    if raw is None or not raw.strip():
        return True
    try:
        return TypeAdapter(bool).validate_python(raw.strip())
    except ValidationError:
        raise IngestError(f"{LOCK_ENV}={raw!r}: use true or false") from None


def _writer(partition: int, epoch: int) -> str:
    return f"passports:partition-{partition}:epoch-{epoch}"
