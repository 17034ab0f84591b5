"""One owned partition's real processing: the ingest pipeline over the partition's devices,
written to PostgreSQL under the partition's fencing epoch (``ingest.worker.Consumer``).

``load`` (before anything is acknowledged) reads the twins of the partition's devices from
PostgreSQL, so ordering and deduplication by (boot, seq) continue where the previous owner
left them; ``store`` hands a batch to the pipeline's per-message steps (decode, validate,
order/dedupe, twin, dead letters) and writes the batch's history, twins and dead letters
in a transaction that checks the partition's fence first (``ingest.leases.holds``), shared
with the worker's other partitions' batches ready at the same moment (``ingest.group_commit``):
a stale owner's batch is refused (``StaleLease``) and nothing of it is written or
acknowledged. With an InfluxDB history (``--history``) the rows go there first (points
are idempotent: a redelivered row overwrites itself), then the state, fenced.

With the worker's alerts (``ingest.worker_alerts``), ``load`` then starts the partition's
``AlertEngine``: the partition's unresolved alerts and the rules' memory behind them are
loaded from PostgreSQL, and the partition's event journal is replayed, before the first
ack. ``store`` journals the batch's events with it (the partition's journal ids) and the
engine observes what was stored; ``close`` flushes the engine's changes.

With the worker's passports (``ingest.worker_passports``), ``load`` opens the partition's
battery index over its cabinets (restored from PostgreSQL) before the alert engine: the
pipeline's observers see each stored message in ``serve``'s order (passports, then alerts),
a safety alert that opens flags the packs at its slots (``on_opened``), the engine's
station rules never count a flagged pack as ready (``flagged_batteries``: the worker's
global flagged set), and the open safety alerts a crash kept from the passports are taken
up (``reconcile``). Then every flagged pack in the partition's slots that no alert announced
(the previous owner died before the flag's notice, or before it flagged a pack that was
already here) gets its ``flagged_battery`` and its lock (``Passports.announce_flagged``); one
whose alert is still unresolved gets none. A flagged pack's ``lock_battery`` goes out through
the partition's remote commands; ``close`` writes what the index has pending.

Beside the engine, as ``serve`` runs them: the partition's work orders (``WorkOrders`` over
the engine: its stations' unclosed orders, ids from PostgreSQL's sequence, writes fenced by
the epoch) and remote commands (``Commands``: its devices' open commands, published through
the partition's MQTT session, which the worker hands over with ``attach`` once it is up and
takes back as it ends; writes fenced by the epoch). Both observe the pipeline after the
engine, in ``serve``'s order, and the partition's ``ActionApplier`` applies the API
replicas' actions to all three (``ingest.actions``). ``close`` stops the applier, then
flushes the commands' and the orders' last changes, then the engine's.

A batch that fails leaves this consumer's twins ahead of the database: the worker drops the
consumer and the next session's consumer loads the twins again, so the broker's redelivery
is applied to what was committed, never to what was not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from devices.catalog import DEFAULT_RELEASE_SOC, Catalog, Device
from devices.topics import TopicScheme
from ingest import StoreUnavailable
from ingest.actions import ActionApplier
from ingest.alerts.engine import AlertEngine
from ingest.alerts.ids import IdPool
from ingest.alerts.orders import WorkOrders
from ingest.commands.service import Commands, Publisher
from ingest.group_commit import GroupCommit
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.passports import Passports
from ingest.pg_store import Part, PostgresStore
from ingest.pipeline import Batch, Pipeline, Twins
from ingest.store import HistoryStore, TwinRecord
from ingest.twins import Twin
from ingest.worker_alerts import WorkerAlerts
from ingest.worker_passports import WorkerPassports

log = logging.getLogger(__name__)


class PipelineConsumer:
    """The pipeline of one partition for one lease epoch (``ingest.worker.Consumer``)."""

    def __init__(
        self,
        *,
        store: PostgresStore,
        catalog: Catalog,
        devices: Sequence[str],
        partition: int,
        epoch: int,
        scheme: TopicScheme,
        metrics: IngestMetrics,
        history: HistoryStore | None = None,
        release_soc: float = DEFAULT_RELEASE_SOC,
        alerts: WorkerAlerts | None = None,
        passports: WorkerPassports | None = None,
        group: GroupCommit | None = None,
    ) -> None:
        self.state = store
        # the worker's: its partitions' batches share transactions (ingest.group_commit)
        self.group = group or GroupCommit(store)
        self.history = history  # None: the history is the store's (PostgreSQL)
        self.catalog = catalog  # the whole registry: the pipeline routes by it
        self.devices = list(devices)  # the partition's: its twins
        self.partition, self.epoch = partition, epoch
        self.scheme = scheme
        self.metrics = metrics
        self.release_soc = release_soc
        self.pipeline: Pipeline | None = None
        self.restored = 0
        self.alerts = alerts
        self.engine: AlertEngine | None = None
        self.orders: WorkOrders | None = None
        # the partition's remote commands (also what a battery passport's lock_battery is
        # sent through)
        self.commands: Commands | None = None
        self.applier: ActionApplier | None = None
        self.worker_passports = passports
        self.passports: Passports | None = None  # the partition's battery index

    async def load(self) -> None:
        records = await asyncio.to_thread(self.state.load_twins, list(self.devices))
        # after the read: a device added meanwhile (``add_device``) is in both
        twins = Twins(self.catalog, self.release_soc)
        mine = set(self.devices)
        # only the partition's twins: another partition's device is not ours to change
        twins.by_id = {d: t for d, t in twins.by_id.items() if d in mine}
        self.restored = twins.restore(records)
        self.pipeline = Pipeline(
            catalog=self.catalog,
            scheme=self.scheme,
            twins=twins,
            history=self.history or self.state,
            state=self.state,
            metrics=self.metrics,
            ack=lambda r: False,  # the worker acknowledges, after ``store`` returned
        )
        log.info(
            "partition %d (epoch %d): %d twins loaded", self.partition, self.epoch, self.restored
        )
        if self.worker_passports is not None:
            self.passports = await self.worker_passports.open(
                self.catalog, self.devices, self.partition, self.epoch
            )
            # before the alert engine's: an alert a status opens finds its pack in the slot
            self.pipeline.observers.append(self.passports.observe)
        if self.alerts is not None:
            await self._start_alerts(self.pipeline)
        if self.passports is not None:  # a flagged pack's lock_battery; None: logged, unsent
            self.passports.sender = self.commands
            # flagged packs in our slots that nobody announced (a previous owner died before
            # the flag's notice): their flagged_battery and lock now; an unresolved one stands
            announced = self.passports.announce_flagged()
            if announced:
                log.info(
                    "partition %d: %d flagged packs in its slots announced",
                    self.partition, announced,
                )  # fmt: skip

    async def _start_alerts(self, pipeline: Pipeline) -> None:
        assert self.alerts is not None
        stations = {self.catalog.devices[d].station_id for d in self.devices}
        engine = self.alerts.engine(
            self.catalog, pipeline.twins, stations, self.partition, self.epoch
        )
        await engine.__aenter__()  # the unresolved alerts, the memory, the journal replayed
        self.engine = engine
        pipeline.observers.append(engine.observe)
        pipeline.observed_through = engine.observed_through
        if self.passports is not None:
            self.passports.alerts = engine
            engine.on_opened.append(self.passports.alert_opened)
            engine.flagged_batteries = self.passports.flagged
            # safety alerts opened before the passports heard of them (replayed from the
            # journal just now, or a crash right after one opened) flag their packs now
            taken = await self.passports.reconcile(
                list(engine.by_id.values()), pipeline.twins.by_id
            )
            if taken:
                log.info("partition %d: %d open safety alerts taken up", self.partition, taken)
        pipeline.journal_last = await asyncio.to_thread(
            self.alerts.store.journal_last, self.partition
        )
        log.info(
            "partition %d (epoch %d): %d unresolved alerts loaded",
            self.partition, self.epoch, len(engine.by_id),
        )  # fmt: skip
        # the work orders and commands of our stations, and maintainers' actions from the
        # API replicas for them (ingest.actions), for as long as we hold the partition; the
        # applier supervised: a death is logged and it starts again. None of them for a
        # partition without stations: they would serve nobody
        if not stations:
            return
        await self._start_orders_and_commands(engine, pipeline)
        applier = ActionApplier(
            self.alerts.db_url, stations, alerts=engine, orders=self.orders,
            commands=self.commands, notices=self.alerts.notices,
        )  # fmt: skip
        await applier.__aenter__()
        self.applier = applier
        self.alerts.supervisor.start(self._applier_task, applier.run)

    async def _start_orders_and_commands(self, engine: AlertEngine, pipeline: Pipeline) -> None:
        """The partition's work orders and commands, observing after the engine (as in
        ``serve``); their tasks run under the engine's supervisor, which stops with it."""
        assert self.alerts is not None
        store = self.alerts.order_store
        ids = IdPool(store.reserve_ids, block=8)
        orders = WorkOrders(engine, store, self.alerts.config.work_orders, ids=ids)
        await orders.__aenter__()
        self.orders = orders
        pipeline.observers.append(orders.observe)
        commands = Commands(
            self.alerts.commands, self.catalog, self.scheme, self.alerts.command_store,
            supervisor=engine.supervisor, devices=self.devices,
        )  # fmt: skip
        commands.fence = (self.partition, self.epoch)
        await commands.__aenter__()
        self.commands = commands
        pipeline.observers.append(commands.observe)
        log.info(
            "partition %d (epoch %d): %d unclosed work orders, %d open commands loaded",
            self.partition, self.epoch, len(orders.current), len(commands.open),
        )  # fmt: skip

    def attach(self, publisher: Publisher | None) -> None:
        """The partition's MQTT session is up (``publisher``: commands go out on it) or
        has ended (None: they wait, stored, for the next)."""
        if self.commands is None:
            return
        if publisher is None:
            self.commands.detach()
        else:
            self.commands.attach(publisher)

    @property
    def twins(self) -> Twins:
        if self.pipeline is None:
            raise StoreUnavailable(f"partition {self.partition}: not loaded")
        return self.pipeline.twins

    def add_device(self, device: Device, catalog: Catalog) -> None:
        """A device added to the registry: known to this pipeline before it is subscribed."""
        self.catalog = catalog
        if device.id not in self.devices:
            self.devices.append(device.id)
        if self.pipeline is not None:
            self.pipeline.catalog = catalog
            twins = self.pipeline.twins
            twins.catalog = catalog
            twin = twins.by_id.setdefault(device.id, Twin.for_device(device, twins.release_soc))
            if self.commands is not None:
                self.commands.catalog = catalog
            if self.engine is not None:
                self.engine.catalog = catalog
                self.engine.seen.setdefault(device.id, twin.snapshot())
                self.engine.stations = (self.engine.stations or frozenset()) | {device.station_id}
        if self.passports is not None:
            self.passports.catalog = catalog
            if self.passports.devices is not None:
                self.passports.devices.add(device.id)
        if self.alerts is not None:
            self.alerts.set_catalog(catalog)

    async def store(self, batch: Sequence[Received]) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            raise StoreUnavailable(f"partition {self.partition}: not loaded")
        if self.engine is not None:
            await self.engine.ids_top_up()  # the alert ids this batch may need, reserved
        b = Batch()
        for r in batch:
            pipeline.handle(r, b)
        pipeline._journal(b)  # the events, numbered in the partition's journal range
        records = [TwinRecord(d, t.encode()) for d, t in b.changed.items()]
        with self.metrics.write_seconds.time():
            rows = b.rows
            if self.history is not None:  # points are idempotent: a redelivery overwrites
                if rows:
                    await asyncio.to_thread(self.history.append, rows)
                rows = []
            fenced = (self.partition, self.epoch)
            await self.group.write(Part(fenced, rows, records, b.dead, b.unobserved))
        pipeline._count(b)  # counted once it is durable: a refused batch comes again
        self.metrics.written.inc(len(b.rows))
        for twin, msg, received_ms in b.applied:
            for observer in pipeline.observers:
                pipeline._safely(observer, twin, msg, received_ms)
        if b.unobserved and pipeline.observed_through is not None:
            pipeline._safely(pipeline.observed_through, b.unobserved[-1].id)

    @property
    def _applier_task(self) -> str:
        return f"actions:partition-{self.partition}:epoch-{self.epoch}"

    async def close(self) -> None:
        self.pipeline = None
        passports, self.passports = self.passports, None
        if passports is not None and self.worker_passports is not None:
            await self.worker_passports.close(passports, self.partition, self.epoch)
        applier, self.applier = self.applier, None
        if applier is not None and self.alerts is not None:  # before its engine goes
            await self.alerts.supervisor.stop(self._applier_task)
            await applier.__aexit__(None, None, None)
        commands, self.commands = self.commands, None
        if commands is not None:  # its last changes and answers written
            try:
                await commands.__aexit__(None, None, None)
            except Exception as exc:  # open ones are loaded and resent by the next owner
                log.warning("partition %d: last command changes not written (%s)",
                            self.partition, exc)  # fmt: skip
        orders, self.orders = self.orders, None
        if orders is not None:  # its last changes written (at most 5 s), before the engine's
            await orders.__aexit__(None, None, None)
        engine, self.engine = self.engine, None
        if engine is not None:  # its last changes written (at most 5 s), its tasks stopped
            if self.alerts is not None:
                self.alerts.forget(engine)
            await engine.__aexit__(None, None, None)
