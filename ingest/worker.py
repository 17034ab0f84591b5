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

The consumer of ``chargewatch ingest`` is ``ingest.partition_consumer.PipelineConsumer``
(the pipeline over the partition's devices, written to PostgreSQL under the fence, with the
partition's alerts, work orders, remote commands and battery passports:
``ingest.worker_alerts``, ``ingest.worker_passports``); the session is handed to it while it
is up (``Consumer.attach``): the partition's commands are published on it. The
device registry is followed by LISTEN on ``ingest.db.registry.CHANNEL`` (``follow_registry``):
a device added there is known to its partition's consumer and subscribed without a restart.
While it owns partition 0 the worker also runs ``ingest.unknown_devices`` (``unknown``):
births of devices outside the registry, kept as dead letters.
The worker starts only on a database at this chargewatch's schema (``chargewatch db
upgrade``) and no ``serve`` holds (``ingest.leases.serve_holder``); an empty registry is
seeded from the catalog (``--catalog`` or the district). It records where it writes the
history (``--history``: InfluxDB, or PostgreSQL's day partitions) in ``facts``
(``pg_store.HISTORY_FACT``), which the API replicas check theirs against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from devices.catalog import Catalog, CatalogError, Device
from devices.topics import TopicScheme
from ingest import IngestError, StoreError, listen, pg_retention
from ingest.alerts.config import AlertsConfig
from ingest.backoff import backoff_s
from ingest.commands.config import CommandsConfig
from ingest.commands.service import Publisher
from ingest.db import migrate, registry
from ingest.gmqtt_source import GmqttSource
from ingest.group_commit import GroupCommit
from ingest.leases import (
    LeaseConfig,
    LeaseError,
    LeaseManager,
    refuse_if_served,
)
from ingest.metrics import IngestMetrics
from ingest.mqtt import BrokerURL, Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import DEFAULT_PARTITIONS, PartitionMap
from ingest.pg_store import HISTORY_FACT, PostgresStore, history_engine
from ingest.store import HistoryStore
from ingest.unknown_devices import WATCH_PARTITION, UnknownDevices
from ingest.worker_alerts import WorkerAlerts, alerts_config, commands_config
from ingest.worker_passports import WorkerPassports, lock_flagged_setting

log = logging.getLogger(__name__)

MAX_BATCH = 500
RELEASE_WAIT_S = 2.0  # a release lets the batch being written finish (and ack) this long
SEQ_MAX = 2**53


class Consumer(Protocol):
    """One partition's processing for one lease epoch."""

    async def load(self) -> None:
        """Load the partition's state (twins, open alerts) before anything is acked."""

    async def store(self, batch: Sequence[Received]) -> None:
        """Make ``batch`` durable, fenced by the epoch; raise (``StaleLease``,
        ``StoreUnavailable``) and nothing of it is acknowledged."""

    def add_device(self, device: Device, catalog: Catalog) -> None:
        """A device added to the registry (``catalog``, the registry now) in this partition:
        known to the consumer before its topics are subscribed."""

    def attach(self, publisher: Publisher | None) -> None:
        """The partition's MQTT session is up (``publisher``: what the consumer sends to
        devices, remote commands, goes out on it) or has ended (None)."""

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
        self.transactions = Counter(
            "chargewatch_ingest_transactions",
            "state transactions committed: the partitions' batches ready together share one"
            " (ingest.group_commit)",
            registry=r,
        )
        self.acked = Counter("chargewatch_ingest_acked", "messages acknowledged", registry=r)
        self.store_errors = Counter(
            "chargewatch_ingest_store_errors", "batches the store refused or failed", registry=r
        )
        self.lease_losses = Counter(
            "chargewatch_ingest_lease_losses", "times every lease was dropped", registry=r
        )
        self.partition_failures = Counter(
            "chargewatch_ingest_partition_failures",
            "a partition's session ended by an error and started again: outage (the store or"
            " the broker) or bug (an exception nobody expected, logged with its traceback)",
            ["reason"],
            registry=r,
        )


class _PartitionCollector(Collector):
    """At scrape time, per partition: whether this worker owns it and how many registered
    devices it has (every worker says the same), so that Prometheus sees a partition with
    devices that no worker owns (deploy/prometheus: ChargewatchPartitionUnowned); and
    whether the lease database's connection is up."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        owned = GaugeMetricFamily(
            "chargewatch_ingest_partition_owned",
            "1 while this worker owns the partition (its lease, past the grace)",
            labels=["partition"],
        )
        devices = GaugeMetricFamily(
            "chargewatch_ingest_partition_devices",
            "registered devices of the partition",
            labels=["partition"],
        )
        for p in range(w.partitions.partitions):
            owned.add_metric([str(p)], 1 if p in w.leases.owned else 0)
            devices.add_metric([str(p)], len(w.partitions.devices(p)))
        yield owned
        yield devices
        yield GaugeMetricFamily(
            "chargewatch_ingest_lease_database_up",
            "1 while this worker's lease connection to PostgreSQL is up (it holds no partition"
            " otherwise)",
            value=1 if w.leases.connected else 0,
        )


class PartitionRun:
    """One owned partition: its consumer and its MQTT session."""

    def __init__(self, worker: Worker, partition: int, epoch: int) -> None:
        self.worker = worker
        self.partition = partition
        self.epoch = epoch
        self.active = True  # False: nothing more is acknowledged, ever
        self.releasing = False  # True: no new batch is taken (``finish_batch``)
        self.idle = asyncio.Event()  # set while no batch is being written
        self.idle.set()
        self.source: GmqttSource | None = None
        self.consumer: Consumer | None = None
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
            except Exception as exc:
                outage = isinstance(exc, IngestError | psycopg.Error | OSError | TimeoutError)
                failures += 1
                delay = backoff_s(failures, first_s=0.5, cap_s=5.0)
                metrics = self.worker.metrics
                if outage:
                    metrics.store_errors.inc()
                    log.warning(
                        "partition %d: %s; session detached, again in %.1fs",
                        self.partition,
                        exc or type(exc).__name__,
                        delay,
                    )
                else:  # never silently: the lease is held, so no other worker takes over
                    log.critical(
                        "partition %d: its session died of a bug; again in %.1fs",
                        self.partition,
                        delay,
                        exc_info=exc,
                    )
                metrics.partition_failures.labels("outage" if outage else "bug").inc()
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        w = self.worker
        consumer = w.consumer_factory(self.partition, self.epoch)
        self.consumer = consumer
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
                consumer.attach(source)  # commands go out on the partition's session
                try:
                    await self._consume(source, consumer)
                finally:
                    consumer.attach(None)
                    self.source = None
        finally:
            self.consumer = None
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
            while self._queue and self.active and not self.releasing:
                batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                self.idle.clear()
                try:
                    await consumer.store(batch)
                finally:
                    self.idle.set()
                metrics.stored.inc(len(batch))
                if not self.active:  # the lease went while the batch was written
                    return
                for m in batch:  # no await from the check to the last ack
                    if source.ack(m):
                        metrics.acked.inc()

    async def finish_batch(self, within_s: float) -> None:
        """A release (the lease still held): take no new batch, and let the one being
        written commit and be acknowledged (at most ``within_s``), so that the next owner
        is not handed again what this one already stored."""
        self.releasing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self.idle.wait()


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
        catalog: Catalog | None = None,
        unknown: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.catalog = catalog  # the registry as this worker knows it
        # run while this worker owns WATCH_PARTITION: devices outside the registry
        # (ingest.unknown_devices.UnknownDevices.run)
        self.unknown = unknown
        self._unknown_task: asyncio.Task[None] | None = None
        self.broker = broker
        self.db = db
        self.partitions = partitions
        self.consumer_factory = consumer_factory
        self.name = name
        self.metrics = Metrics()
        self.runs: dict[int, PartitionRun] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        # the partition runs and the unknown-devices watch: tasks of this group, entered and
        # left with the worker, so that none outlives it
        self._group = asyncio.TaskGroup()
        self.leases = LeaseManager(
            db,
            LeaseConfig(
                partitions=partitions.partitions, worker=name, lease_timeout_s=lease_timeout_s
            ),
            self,
        )
        self.metrics.registry.register(_PartitionCollector(self))

    async def __aenter__(self) -> Worker:
        await self._group.__aenter__()
        await self.leases.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self.leases.__aexit__(None, None, None)
        finally:
            await self._detach_all()
            await self._group.__aexit__(None, None, None)

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
        self._tasks[partition] = self._group.create_task(
            run.run(previous), name=f"partition-{partition}"
        )
        if partition == WATCH_PARTITION and self.unknown is not None:
            self._unknown_task = self._group.create_task(self.unknown(), name="unknown-devices")

    async def released(self, partition: int) -> None:
        run = self.runs.get(partition)
        if run is not None:
            await run.finish_batch(RELEASE_WAIT_S)
            if self.runs.get(partition) is run:  # not dropped meanwhile
                del self.runs[partition]
            run.stop_acking()
        task = self._tasks.pop(partition, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if partition == WATCH_PARTITION:
            await self._stop_unknown()

    def dropped_all(self) -> None:
        for run in self.runs.values():  # first, and without an await: no ack from now on
            run.stop_acking()
        self.runs.clear()
        for task in self._tasks.values():
            task.cancel()  # each detaches its session in the background
        if self._unknown_task is not None:
            self._unknown_task.cancel()

    async def _detach_all(self) -> None:
        self.dropped_all()
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._stop_unknown()

    async def _stop_unknown(self) -> None:
        task, self._unknown_task = self._unknown_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # -- the registry -----------------------------------------------------------------------

    def add_device(self, device: Device, catalog: Catalog) -> int:
        """A device added to the registry (``catalog``: the registry now): its partition's
        consumer learns it, then the partition's session subscribes to it."""
        self.catalog = catalog
        partition, new = self.partitions.add_device(device.id, device.station_id)
        run = self.runs.get(partition)
        if new and run is not None:
            if run.consumer is not None:
                run.consumer.add_device(device, catalog)
            if run.source is not None:
                run.source.add_subscription(self.partitions.topic_filter(device.id))
        return partition


# -- the registry -----------------------------------------------------------------------------


async def follow_registry(
    worker: Worker, db: str, load: Callable[[], Catalog | None], *, retry_max_s: float = 5.0
) -> None:
    """LISTEN for registry changes; on each (and on every (re)connect, for what was missed
    meanwhile) read the registry and hand the devices this worker does not know yet to
    ``Worker.add_device``. Reconnects with capped, jittered backoff (``ingest.listen``)."""
    await listen.follow(
        db, [registry.CHANNEL], name="registry", catch_up=lambda _: _catch_up(worker, load),
        errors=(StoreError, CatalogError), first_s=0.5, cap_s=retry_max_s,
    )  # fmt: skip


async def _catch_up(worker: Worker, load: Callable[[], Catalog | None]) -> None:
    catalog = await asyncio.to_thread(load)
    if catalog is None:
        return
    added = [d for d in catalog.devices.values() if worker.partitions.of_device(d.id) is None]
    worker.catalog = catalog
    for device in added:
        p = worker.add_device(device, catalog)
        log.info("registry: device %s (station %s) added to partition %d",
                 device.id, device.station_id, p)  # fmt: skip


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
    alerts: AlertsConfig
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    lock_flagged: bool = True


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ingest", help="a partitioned ingest worker (PostgreSQL leases)")
    p.add_argument(
        "--broker",
        help="mqtt[s]://[user:pass@]host:port (default: CHARGEWATCH_BROKER, which keeps the"
        " password out of the process list)",
    )
    p.add_argument("--db", help="postgresql://… (default: CHARGEWATCH_DB)")
    p.add_argument(
        "--catalog", type=Path, help="catalog JSON for an empty registry; default: the district"
    )
    p.add_argument(
        "--history",
        help="InfluxDB URL for the history (default: CHARGEWATCH_HISTORY, which keeps a token"
        " out of the process list; neither: PostgreSQL day partitions)",
    )
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
    broker = args.broker or os.environ.get("CHARGEWATCH_BROKER")
    if not broker:
        raise IngestError("ingest needs --broker mqtt://… (or CHARGEWATCH_BROKER)")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise IngestError(f"--metrics-port {args.metrics_port}: use 0..65535")
    lease = os.environ.get("CHARGEWATCH_LEASE_TIMEOUT_S", "10")
    try:
        lease_s = float(lease)
    except ValueError:
        raise IngestError(f"CHARGEWATCH_LEASE_TIMEOUT_S={lease!r} is not a number") from None
    return IngestArgs(
        broker=BrokerURL.parse(broker),
        db=db,
        catalog=Catalog.load(args.catalog),
        partitions=args.partitions,
        worker=args.worker or f"{socket.gethostname()}-{os.getpid()}",
        metrics_port=args.metrics_port,
        history=args.history or os.environ.get("CHARGEWATCH_HISTORY") or None,
        lease_timeout_s=lease_s,
        alerts=alerts_config(),
        commands=commands_config(),
        lock_flagged=lock_flagged_setting(),
    )


def registry_catalog(engine: Engine, seed: Catalog) -> Catalog:
    """The registry (seeded from ``seed`` when it is empty: the first worker does it)."""
    with engine.begin() as conn:
        found = registry.load_catalog(conn)
        if found is not None:
            return found
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SEED_LOCK})
        found = registry.load_catalog(conn)  # another worker seeded it meanwhile
        if found is not None:
            return found
        registry.import_catalog(conn, seed)
        log.info("registry: seeded from %s", seed.source)
        return seed


_SEED_LOCK = 0x6377_7265  # "cwre"


def record_history(store: PostgresStore, url: str | None) -> None:
    """Say in the database where this worker writes the history (``HISTORY_FACT``): an API
    replica that reads the other store reports it in /readyz instead of answering nothing."""
    engine = history_engine(url)
    before = store.fact(HISTORY_FACT)
    if before is not None and before != engine:
        log.warning(
            "history: written to %s until now, this worker writes it to %s: give every worker"
            " and every API replica the same --history",
            before,
            engine,
        )
    store.remember(HISTORY_FACT, engine)


async def run_worker(a: IngestArgs, stop: asyncio.Event) -> None:
    # not beside a serve (ingest.statedb.ServeLock): refused before the registry is seeded or
    # an alert sent; the lease manager checks again once it joined
    await refuse_if_served(a.db)
    # a database behind this chargewatch's schema is refused before anything starts
    store = await asyncio.to_thread(PostgresStore, a.db)
    history: HistoryStore | None = None
    engine = migrate.connect(a.db, pool_size=1, pool_pre_ping=True)
    try:
        await asyncio.to_thread(record_history, store, a.history)
        catalog = await asyncio.to_thread(registry_catalog, engine, a.catalog)
        scheme = TopicScheme()
        pm = PartitionMap(catalog, a.partitions, topic_prefix=scheme.prefix)
        worker: Worker
        metrics: IngestMetrics
        if a.history:
            from ingest.influx import InfluxHistory  # only when asked for

            history = InfluxHistory(a.history, on_error=lambda exc: metrics.write_errors.inc())
            log.info("history: %r", history)

        def consumer(p: int, epoch: int) -> PipelineConsumer:
            assert worker.catalog is not None
            return PipelineConsumer(
                store=store,
                catalog=worker.catalog,
                devices=pm.devices(p),
                partition=p,
                epoch=epoch,
                scheme=scheme,
                metrics=metrics,
                history=history,
                alerts=alerts,
                passports=passports,
                group=group,
            )

        worker = Worker(
            broker=a.broker,
            db=a.db,
            partitions=pm,
            consumer_factory=consumer,
            name=a.worker,
            lease_timeout_s=a.lease_timeout_s,
            catalog=catalog,
        )
        metrics = IngestMetrics(worker.metrics.registry)  # the pipelines': one /metrics
        # the partitions' batches share transactions
        group = GroupCommit(store, committed=worker.metrics.transactions)
        # the owner of partition 0 watches for devices outside the registry
        unknown = UnknownDevices(
            broker=a.broker,
            client_id=f"{pm.client_prefix}-unknown",
            scheme=scheme,
            catalog=lambda: worker.catalog,
            store=store,
            metrics=metrics,
        )
        worker.unknown = unknown.run
        if a.metrics_port is not None:
            start_http_server(a.metrics_port, addr="127.0.0.1", registry=worker.metrics.registry)

        def load() -> Catalog | None:
            with engine.begin() as conn:
                return registry.load_catalog(conn)

        alerts: WorkerAlerts | None = None
        passports: WorkerPassports | None = None
        async with contextlib.AsyncExitStack() as stack:
            if a.alerts.enabled:  # its claims of webhook deliveries run out like the leases
                alerts = await stack.enter_async_context(
                    WorkerAlerts(
                        a.db,
                        catalog,
                        a.alerts,
                        claim_lease_s=max(a.lease_timeout_s, 1.0),
                        commands=a.commands,
                        registry=worker.metrics.registry,
                    )
                )
            # battery passports: each partition's index, the flags shared by every worker
            passports = await stack.enter_async_context(
                WorkerPassports(a.db, lock_flagged=a.lock_flagged, registry=worker.metrics.registry)
            )
            async with worker:
                log.info("worker %s: %d partitions, broker %s", a.worker, a.partitions, a.broker)
                async with asyncio.TaskGroup() as tg:
                    tasks = [
                        tg.create_task(worker.run_forever(), name="metrics"),
                        tg.create_task(worker.leases.finished(), name="leases"),
                        tg.create_task(follow_registry(worker, a.db, load), name="registry"),
                    ]
                    if history is None:  # day partitions past history_days go (pg_retention)
                        retention = pg_retention.for_worker(store, worker.metrics.registry)
                        tasks.append(
                            tg.create_task(pg_retention.supervised(retention), name="retention")
                        )
                    await stop.wait()
                    for task in tasks:
                        task.cancel()
    finally:
        engine.dispose()
        if history is not None:
            history.close()
        store.close()


def command(args: argparse.Namespace) -> int:
    try:
        a = _ingest_args(args)
        PartitionMap(a.catalog, a.partitions)  # the partition count, checked before start
        pg_retention.worker_settings()  # history_days and the period, checked before start
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
    except* (LeaseError, StoreError) as group:
        failed.extend(group.exceptions)
    if failed:
        print(f"chargewatch ingest: {failed[0]}", flush=True)
        return 1
    return 0
