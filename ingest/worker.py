"""``chargewatch ingest``: a worker that consumes the partitions its leases give it.

The lease manager (``ingest.leases``) decides which partitions are this worker's; for each,
the worker runs a ``PartitionRun``: the partition's consumer loads its state first
(``Consumer.load``: the lead wires the twins and open alerts of the PostgreSQL store here),
then the partition's MQTT persistent session (``ingest.gmqtt_source``, the partition's own
client id and exactly its devices' filters) hands messages to the consumer in batches, and
each message is acknowledged only after ``Consumer.store`` returned (durable, fenced) and
only while the partition is still ours. Losing every lease stops every acknowledgement at
once (``dropped_all``: a flag read right before each ack, on the same loop); a release stops
the consumer and detaches the session (keeping it on the broker) before the lock goes. A
store that fails detaches the session (the broker delivers again what was not acked) and
tries again after a capped backoff.

Until the state store is wired in, ``RecordingConsumer`` records (partition, device, boot,
seq) in PostgreSQL (table ``ingest_records``, created here), fenced in the same transaction:
what the end-to-end tests count to prove nothing is lost or stored twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from psycopg.rows import TupleRow

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest import IngestError, StoreUnavailable
from ingest.gmqtt_source import GmqttSource
from ingest.leases import (
    DEFAULT_LOCK_SPACE,
    LeaseConfig,
    LeaseError,
    LeaseManager,
    check_fence,
)
from ingest.mqtt import BrokerURL, Received
from ingest.partitions import DEFAULT_PARTITIONS, PartitionMap

log = logging.getLogger(__name__)

MAX_BATCH = 500
SEQ_MAX = 2**53


class Consumer(Protocol):
    """One partition's processing for one lease epoch."""

    async def load(self) -> None:
        """Load the partition's state (twins, open alerts) before anything is acked."""

    async def store(self, batch: Sequence[Received]) -> None:
        """Make ``batch`` durable, fenced by the epoch; raise (``StaleLease``,
        ``StoreUnavailable``) and nothing of it is acknowledged."""

    async def close(self) -> None: ...


ConsumerFactory = Callable[[int, int], Consumer]  # (partition, epoch) -> consumer


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.owned = Gauge("chargewatch_ingest_partitions_owned", "partitions held", registry=r)
        self.subscribed = Gauge(
            "chargewatch_ingest_partitions_subscribed",
            "owned partitions whose session is up and subscribed",
            registry=r,
        )
        self.stored = Counter("chargewatch_ingest_stored", "messages stored", registry=r)
        self.acked = Counter("chargewatch_ingest_acked", "messages acknowledged", registry=r)
        self.store_errors = Counter(
            "chargewatch_ingest_store_errors", "batches the store refused or failed", registry=r
        )
        self.lease_losses = Counter(
            "chargewatch_ingest_lease_losses", "times every lease was dropped", registry=r
        )


class PartitionRun:
    """One owned partition: its consumer and its MQTT session."""

    def __init__(self, worker: Worker, partition: int, epoch: int) -> None:
        self.worker = worker
        self.partition = partition
        self.epoch = epoch
        self.active = True  # False: nothing more is acknowledged, ever
        self.source: GmqttSource | None = None
        self._queue: deque[Received] = deque()
        self._wake = asyncio.Event()

    def stop_acking(self) -> None:
        self.active = False
        self._wake.set()

    @property
    def subscribed(self) -> bool:
        src = self.source
        return src is not None and src.connected and src.subacks > 0

    async def run(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # the same partition's last run is still detaching
            with contextlib.suppress(BaseException):
                await previous
        failures = 0
        while self.active:
            try:
                await self._session()
                return
            except (IngestError, psycopg.Error, OSError, TimeoutError) as exc:
                self.worker.metrics.store_errors.inc()
                failures += 1
                delay = min(5.0, 0.25 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning(
                    "partition %d: %s; session detached, again in %.1fs",
                    self.partition,
                    exc or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        w = self.worker
        consumer = w.consumer_factory(self.partition, self.epoch)
        try:
            await consumer.load()
            if not self.active:
                return
            source = GmqttSource(
                w.broker,
                client_id=w.partitions.client_id(self.partition),
                subscription=w.partitions.topic_filters(self.partition),
                deliver=self._deliver,
            )
            self._queue.clear()
            async with source:
                self.source = source
                try:
                    await self._consume(source, consumer)
                finally:
                    self.source = None
        finally:
            with contextlib.suppress(Exception):
                await consumer.close()

    def _deliver(self, msg: Received) -> None:
        self._queue.append(msg)
        self._wake.set()

    async def _consume(self, source: GmqttSource, consumer: Consumer) -> None:
        metrics = self.worker.metrics
        while self.active:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and self.active:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                await consumer.store(batch)
                metrics.stored.inc(len(batch))
                if not self.active:  # the lease went while the batch was written
                    return
                for m in batch:  # no await from the check to the last ack
                    if source.ack(m):
                        metrics.acked.inc()


class Worker:
    """Ties leases to partition sessions (``ingest.leases.PartitionOwner``)."""

    def __init__(
        self,
        *,
        broker: BrokerURL,
        db: str,
        partitions: PartitionMap,
        consumer_factory: ConsumerFactory,
        name: str,
        lease_timeout_s: float = 10.0,
    ) -> None:
        self.broker = broker
        self.db = db
        self.partitions = partitions
        self.consumer_factory = consumer_factory
        self.name = name
        self.metrics = Metrics()
        self.runs: dict[int, PartitionRun] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self.leases = LeaseManager(
            db,
            LeaseConfig(
                partitions=partitions.partitions, worker=name, lease_timeout_s=lease_timeout_s
            ),
            self,
        )

    async def __aenter__(self) -> Worker:
        await self.leases.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.leases.__aexit__(None, None, None)
        await self._detach_all()

    async def run_forever(self) -> None:
        while True:
            self.metrics.owned.set(len(self.runs))
            self.metrics.subscribed.set(sum(r.subscribed for r in self.runs.values()))
            self.metrics.lease_losses.inc(self.leases.losses - self._losses_seen)
            self._losses_seen = self.leases.losses
            await asyncio.sleep(0.2)

    _losses_seen = 0

    # -- PartitionOwner ---------------------------------------------------------------------

    def acquired(self, partition: int, epoch: int) -> None:
        run = PartitionRun(self, partition, epoch)
        self.runs[partition] = run
        previous = self._tasks.get(partition)
        self._tasks[partition] = asyncio.create_task(
            run.run(previous), name=f"partition-{partition}"
        )

    async def released(self, partition: int) -> None:
        run = self.runs.pop(partition, None)
        if run is not None:
            run.stop_acking()
        task = self._tasks.pop(partition, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def dropped_all(self) -> None:
        for run in self.runs.values():  # first, and without an await: no ack from now on
            run.stop_acking()
        self.runs.clear()
        for task in self._tasks.values():
            task.cancel()  # each detaches its session in the background

    async def _detach_all(self) -> None:
        self.dropped_all()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- the registry -----------------------------------------------------------------------

    def add_device(self, device_id: str, station_id: str) -> int:
        """A device added to the registry: its partition's owner subscribes to it now."""
        partition, new = self.partitions.add_device(device_id, station_id)
        run = self.runs.get(partition)
        if new and run is not None and run.source is not None:
            run.source.add_subscription(self.partitions.topic_filter(device_id))
        return partition


# -- the recording consumer -------------------------------------------------------------------

RECORDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_records (
    device text NOT NULL,
    boot text NOT NULL,
    seq bigint NOT NULL,
    partition integer NOT NULL,
    epoch bigint NOT NULL,
    worker text NOT NULL,
    deliveries integer NOT NULL DEFAULT 1,
    stored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, boot, seq)
)
"""


class RecordingConsumer:
    """Records each message's (partition, device, boot, seq) once, fenced; a message stored
    again (delivered again after a crash) counts in ``deliveries`` instead."""

    def __init__(
        self, db: str, partition: int, epoch: int, worker: str, scheme: TopicScheme
    ) -> None:
        self.db, self.partition, self.epoch, self.worker = db, partition, epoch, worker
        self.scheme = scheme
        self.conn: psycopg.AsyncConnection[TupleRow] | None = None
        self.loaded = -1
        self.bad = 0

    async def load(self) -> None:
        try:
            async with asyncio.timeout(10):
                self.conn = await psycopg.AsyncConnection.connect(self.db, connect_timeout=5)
                async with self.conn.transaction():
                    await self.conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, 0)", (DEFAULT_LOCK_SPACE + 3,)
                    )
                    await self.conn.execute(RECORDS_SCHEMA.encode())
                cur = await self.conn.execute(
                    "SELECT count(*) FROM ingest_records WHERE partition = %s", (self.partition,)
                )
                row = await cur.fetchone()
                await self.conn.commit()
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot load partition {self.partition}: {exc}") from exc
        self.loaded = int(row[0]) if row else 0

    def _row(self, msg: Received) -> tuple[object, ...] | None:
        topic = self.scheme.parse(msg.topic)
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return None
        if topic is None or not isinstance(body, dict):
            return None
        boot, seq = body.get("boot"), body.get("seq")
        if not isinstance(boot, str) or not 1 <= len(boot) <= 32:
            return None
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < SEQ_MAX:
            return None
        return (topic.device_id, boot, seq, self.partition, self.epoch, self.worker)

    async def store(self, batch: Sequence[Received]) -> None:
        rows = [r for r in map(self._row, batch) if r is not None]
        self.bad += len(batch) - len(rows)
        conn = self.conn
        if conn is None:
            raise StoreUnavailable("not loaded")
        try:
            async with asyncio.timeout(10), conn.transaction():
                await check_fence(conn, self.partition, self.epoch)
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO ingest_records (device, boot, seq, partition, epoch, worker)"
                        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (device, boot, seq) DO"
                        " UPDATE SET deliveries = ingest_records.deliveries + 1",
                        rows,
                    )
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise StoreUnavailable(f"partition {self.partition}: {exc}") from exc

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


# -- the command ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IngestArgs:
    broker: BrokerURL
    db: str
    catalog: Catalog
    partitions: int
    worker: str
    metrics_port: int | None
    history: str | None
    lease_timeout_s: float


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ingest", help="a partitioned ingest worker (PostgreSQL leases)")
    p.add_argument("--broker", required=True, help="mqtt[s]://[user:pass@]host:port")
    p.add_argument("--db", help="postgresql://… (default: CHARGEWATCH_DB)")
    p.add_argument("--catalog", type=Path, help="site catalog JSON; default: the district")
    p.add_argument("--history", help="history store URL (not used by this worker yet)")
    p.add_argument(
        "--partitions", type=int, default=DEFAULT_PARTITIONS, help="partitions (default 16)"
    )
    p.add_argument("--worker", help="this worker's name (default: host-pid)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics on 127.0.0.1:P")


def _ingest_args(args: argparse.Namespace) -> IngestArgs:
    db = args.db or os.environ.get("CHARGEWATCH_DB")
    if not db:
        raise IngestError("ingest needs --db postgresql://… (or CHARGEWATCH_DB)")
    if not db.startswith(("postgresql://", "postgres://")):
        raise IngestError(f"--db must be a postgresql:// URL, not {db.split(':', 1)[0]}:")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise IngestError(f"--metrics-port {args.metrics_port}: use 0..65535")
    lease = os.environ.get("CHARGEWATCH_LEASE_TIMEOUT_S", "10")
    try:
        lease_s = float(lease)
    except ValueError:
        raise IngestError(f"CHARGEWATCH_LEASE_TIMEOUT_S={lease!r} is not a number") from None
    return IngestArgs(
        broker=BrokerURL.parse(args.broker),
        db=db,
        catalog=Catalog.load(args.catalog),
        partitions=args.partitions,
        worker=args.worker or f"{socket.gethostname()}-{os.getpid()}",
        metrics_port=args.metrics_port,
        history=args.history,
        lease_timeout_s=lease_s,
    )


async def run_worker(a: IngestArgs, stop: asyncio.Event) -> None:
    scheme = TopicScheme()
    pm = PartitionMap(a.catalog, a.partitions, topic_prefix=scheme.prefix)
    worker = Worker(
        broker=a.broker,
        db=a.db,
        partitions=pm,
        consumer_factory=lambda p, e: RecordingConsumer(a.db, p, e, a.worker, scheme),
        name=a.worker,
        lease_timeout_s=a.lease_timeout_s,
    )
    if a.metrics_port is not None:
        start_http_server(a.metrics_port, addr="127.0.0.1", registry=worker.metrics.registry)
    if a.history:
        log.warning("--history is not used by this worker yet (recording consumer)")
    async with worker:
        log.info("worker %s: %d partitions, broker %s", a.worker, a.partitions, a.broker)
        async with asyncio.TaskGroup() as tg:
            metrics = tg.create_task(worker.run_forever(), name="metrics")
            leases = tg.create_task(worker.leases.finished(), name="leases")
            await stop.wait()
            metrics.cancel()
            leases.cancel()


def command(args: argparse.Namespace) -> int:
    try:
        a = _ingest_args(args)
        PartitionMap(a.catalog, a.partitions)  # the partition count, checked before start
        LeaseConfig(partitions=a.partitions, worker=a.worker, lease_timeout_s=a.lease_timeout_s)
    except (IngestError, ValueError) as exc:
        print(f"chargewatch ingest: {exc}", flush=True)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(a, stop)

    failed: list[BaseException] = []
    try:
        asyncio.run(main())
    except* LeaseError as group:
        failed.extend(group.exceptions)
    if failed:
        print(f"chargewatch ingest: {failed[0]}", flush=True)
        return 1
    return 0
