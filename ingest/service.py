"""The running ingestor: stores, twins, MQTT source and pipeline, as one async context.

    async with Ingest(config, catalog) as ingest:
        ...  # ingest.twins, ingest.metrics, ingest.ready

With no broker configured it starts the embedded one first. Its state is in the embedded
SQLite file (the data dir's, or ``sqlite:///path``) or in PostgreSQL (``config.db``:
``ingest.statedb``, held by one serve at a time: ``ServeLock``); with PostgreSQL, history goes there too unless ``config.history`` names
an InfluxDB. The housekeeping task (``ingest.housekeeping``) compacts, prunes and rolls up
the embedded history; an InfluxDB history it only rolls up (``ingest.influxrollups``: the
history store is then an ``InfluxRollupStore``; retention is InfluxDB's own, see
``chargewatch influx setup``). A PostgreSQL history drops its day partitions older than
``history_days`` (``ingest.pg_retention``). The data dir's disk is watched for the embedded
file only.

``connect=False`` runs everything but the broker and the MQTT source: messages come in by
``inject`` (the tests' middle layer, like Home Assistant's ``async_fire_mqtt_message``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from types import TracebackType

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest import StoreError
from ingest.alerts.engine import AlertEngine
from ingest.alerts.order_store import WorkOrderStore
from ingest.alerts.orders import WorkOrders
from ingest.alerts.store import AlertStore
from ingest.backup import DataDirLock
from ingest.broker import EmbeddedBroker
from ingest.commands.service import Commands
from ingest.commands.store import CommandStore
from ingest.config import IngestConfig
from ingest.db.database import Database
from ingest.diskusage import DiskWatch
from ingest.gmqtt_source import GmqttSource
from ingest.housekeeping import Housekeeping
from ingest.metrics import IngestMetrics
from ingest.mqtt import BrokerURL, MqttSource, Received
from ingest.passport_store import PassportStore
from ingest.passports import Passports
from ingest.pg_retention import RETENTION, PartitionRetention
from ingest.pg_store import PostgresStore
from ingest.pipeline import Pipeline, Twins
from ingest.readside import now_ms as now_ms
from ingest.rollups import HourlyRollups, ReportSource, RolledHistory
from ingest.sqlite_store import SQLiteStore
from ingest.statedb import ServeLock, StateDB
from ingest.store import HistoryStore, StateStore
from ingest.supervisor import Supervisor

log = logging.getLogger(__name__)


PIPELINE = "ingest:pipeline"
SOURCE = "ingest:mqtt"
DISK = "ingest:disk"
PASSPORTS = "ingest:passports"
HOUSEKEEPING = "ingest:housekeeping"
DB_LOCK = "ingest:db-lock"
REMEMBER_SESSION = "ingest:remember-session"
FATAL_EXIT_STATUS = 70  # EX_SOFTWARE: a task that cannot restart in place died


class Ingest:
    def __init__(
        self,
        config: IngestConfig,
        catalog: Catalog,
        *,
        history: HistoryStore | None = None,
        metrics: IngestMetrics | None = None,
        connect: bool = True,
    ) -> None:
        self.config = config
        self.connect = connect
        self.catalog = catalog
        self.scheme = TopicScheme(config.topic_prefix)
        self.metrics = metrics or IngestMetrics()
        self.twins = Twins(catalog, config.release_soc)
        self._history = history
        self.statedb = StateDB.of(config.db, config.data_dir)  # a bad URL is refused here
        self._stack = AsyncExitStack()
        # every long-lived task of the service: a death fails /readyz, raises an alert and
        # restarts the task, or (pipeline, MQTT source) stops the process (ingest.supervisor)
        self.supervisor = Supervisor(on_failure=self._task_failed, on_fatal=self._fatal)
        # set when a task died that only a restart of the process can bring back; `serve`
        # then stops with FATAL_EXIT_STATUS so that systemd (or the like) starts it again
        self.stopping = asyncio.Event()
        self.fatal: str | None = None
        self.broker_url: BrokerURL | None = None
        self.source: MqttSource | GmqttSource | None = None
        self.pipeline: Pipeline | None = None
        self.state: StateStore | None = None
        self._store: SQLiteStore | PostgresStore | None = None  # state, maybe history
        self._sqlite: SQLiteStore | None = None  # the same, when it is the embedded one
        self.history: HistoryStore | None = None
        self.started_ms = now_ms()
        self.metrics.registry.register(_LiveCollector(self))
        self.alerts: AlertEngine | None = None
        self.passports: Passports | None = None  # battery passports (ingest.passports)
        self.orders: WorkOrders | None = None  # with the alerts (docs/alerts.md, Work orders)
        self.housekeeping: Housekeeping | None = None  # the embedded or an InfluxDB history
        self.retention: PartitionRetention | None = None  # a PostgreSQL history's partitions
        self.db_lock: ServeLock | None = None  # one serve per PostgreSQL database
        # an external broker gave our client id a session before (persisted: a crash of the
        # broker while we were down shows at our next start); None: not tracked (embedded)
        self._session_seen: bool | None = None
        self.disk = DiskWatch(
            self.statedb.path.parent if self.statedb.path is not None else config.data_dir,
            check_s=config.disk_check_s,
            window_s=config.disk_growth_window_s,
            warn_days=config.disk_full_warning_days,
            registry=self.metrics.registry,
        )
        self.commands: Commands | None = None
        self._injected = 0  # message ids of injected messages

    def count_reports_from(self, source: ReportSource) -> None:
        """Riders' reports (kept by the API) count in the hourly rollups from now on."""
        if self.housekeeping is not None and self.housekeeping.rollups is not None:
            self.housekeeping.rollups.reports = source

    async def drain(self, quiet_s: float = 0.5, max_s: float = 10.0) -> None:
        """Wait until nothing arrived for ``quiet_s`` and everything received is written
        (at most ``max_s``): lets a broker deliver what its clients said last."""
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline and self.pipeline is not None:
            last = self.pipeline.last_message_ms or 0
            idle = self.pipeline.unacked == 0
            if idle and now_ms() - last >= quiet_s * 1000:
                return
            await asyncio.sleep(0.05)

    def stalled(self, now: int | None = None) -> str | None:
        """The watchdog: connected, devices expected to report, yet no message for N
        heartbeats. Returns what is wrong, or None."""
        if self.source is None or not self.source.connected or self.pipeline is None:
            return None
        now = now or now_ms()
        expected = [t for t in self.twins.by_id.values() if t.online_flag]
        if not expected:
            return None
        heartbeat_s = min(t.heartbeat_s for t in expected)
        window_ms = int(self.config.watchdog_heartbeats * heartbeat_s * 1000)
        last = self.pipeline.last_message_ms or self.started_ms
        if now - last <= window_ms:
            return None
        return (
            f"no message for {(now - last) / 1000:.0f}s while {len(expected)} devices should"
            f" report every {heartbeat_s}s (silent stall?)"
        )

    def store_problem(self, now: int | None = None) -> str | None:
        """The store outage: its writes fail, or one has been waiting longer than
        ``store_stuck_s`` (a lock held elsewhere, a full or slow disk). Nothing is
        acknowledged meanwhile; the broker keeps the messages. Returns what is wrong."""
        waiting = self._sqlite.write_waiting_s() if self._sqlite is not None else 0.0
        if waiting >= self.config.store_stuck_s:
            return (
                f"store write waiting for {waiting:.0f}s (database locked, disk full or slow?);"
                " nothing is acknowledged meanwhile"
            )
        if self.pipeline is not None and not self.pipeline.store_healthy:
            return "store writes are failing (retrying; nothing is acknowledged)"
        return None

    def problems(self) -> list[str]:
        """Why the service is not ready; empty when it is."""
        problems = []
        stall = self.stalled()
        if stall is not None:
            problems.append(stall)
        if self.source is None or not self.source.connected:
            problems.append(f"not connected to the broker {self.broker_url}")
        if self.supervisor.task(PIPELINE) is None:
            problems.append("ingest pipeline is not running")
        problems += self.supervisor.problems()
        store = self.store_problem()
        if store is not None:
            problems.append(store)
        return problems

    @property
    def ready(self) -> bool:
        return not self.problems()

    async def __aenter__(self) -> Ingest:
        cfg = self.config
        try:
            db = self.statedb
            store: SQLiteStore | PostgresStore
            rolled: RolledHistory | None = None  # an InfluxDB history, rolled up here
            if db.path is not None:
                # one service per data dir; `chargewatch restore` is refused while we hold it
                lock = DataDirLock(db.path.parent)
                await asyncio.to_thread(lock.acquire)
                self._stack.callback(lock.release)
                store = self._sqlite = await asyncio.to_thread(
                    SQLiteStore,
                    db.path,
                    synchronous=cfg.sqlite_synchronous,
                    dead_letters_kept=cfg.dead_letters_kept,
                )
            else:
                assert db.url is not None
                # one serve per database, none beside workers (DatabaseInUse); kept by the
                # supervised DB_LOCK below for the service's life
                self.db_lock = await self._stack.enter_async_context(ServeLock(db.url))
                # refuses a database behind this chargewatch's schema (SchemaBehind)
                store = await asyncio.to_thread(
                    PostgresStore, db.url, dead_letters_kept=cfg.dead_letters_kept
                )
            self._stack.callback(store.close)
            self.state = self._store = store
            if self._history is None and cfg.history is not None:
                from ingest.influx import InfluxHistory  # only when asked for
                from ingest.influxrollups import InfluxRollupStore

                influx = InfluxHistory(
                    cfg.history, on_error=lambda exc: self.metrics.write_errors.inc()
                )
                # the history and its hourly rollups (rolled up by the housekeeping below)
                self._history = rolled = InfluxRollupStore(influx)
                log.info("history: %r", self._history)
                self.disk.history_bytes = influx.disk_bytes
            self.history = self._history or store
            if self._history is not None:
                self._stack.callback(self._history.close)
            # the service's tasks, in one TaskGroup: left (every task stopped) before the
            # stores above close, after what is entered below
            await self._stack.enter_async_context(self.supervisor)
            if self.db_lock is not None:  # another serve or a worker took it: stop
                self.supervisor.start(DB_LOCK, self.db_lock.run, policy="fatal")
            restored = self.twins.restore(await asyncio.to_thread(store.load_twins))
            log.info("store %s: %d device twins restored", db, restored)

            if not self.connect:
                pass  # no broker: messages come by inject()
            elif cfg.broker is None:
                broker = await self._stack.enter_async_context(
                    EmbeddedBroker(
                        cfg.embedded_broker_host,
                        cfg.embedded_broker_port,
                        credentials=cfg.embedded_broker_credentials,
                        prefix=cfg.topic_prefix,
                    )
                )
                self.broker_url = broker.url
            else:
                self.broker_url = BrokerURL.parse(cfg.broker, cfg.cafile)
                seen = await asyncio.to_thread(store.fact, self._session_fact)
                self._session_seen = seen is not None

            self.pipeline = Pipeline(
                catalog=self.catalog,
                scheme=self.scheme,
                twins=self.twins,
                history=self.history,
                state=self.state,
                metrics=self.metrics,
                ack=self._ack,
                batch_max=cfg.batch_max,
                retry_max_s=cfg.store_retry_max_s,
            )
            passport_store = PassportStore(await asyncio.to_thread(self._database))
            self._stack.callback(passport_store.close)
            self.passports = Passports(
                passport_store,
                self.catalog,
                lock_flagged=cfg.batteries.lock_flagged,
                registry=self.metrics.registry,
            )
            await asyncio.to_thread(self.passports.restore)
            # before the alert engine's: an alert a status opens finds its pack in the slot
            self.pipeline.observers.append(self.passports.observe)
            if cfg.alerts.enabled:
                alert_store = AlertStore(await asyncio.to_thread(self._database))
                self._stack.callback(alert_store.close)
                self.alerts = await self._stack.enter_async_context(
                    AlertEngine(
                        cfg.alerts,
                        self.catalog,
                        self.twins,
                        alert_store,
                        registry=self.metrics.registry,
                        supervisor=self.supervisor,
                    )
                )
                self.pipeline.observers.append(self.alerts.observe)
                self.pipeline.observed_through = self.alerts.observed_through
                # numbered in partition 0's range of the journal, where the engine reads it
                self.pipeline.journal_last = await asyncio.to_thread(alert_store.journal_last, 0)
                self.alerts.stall_check = self.stalled
                self.alerts.store_check = self.store_problem
                self.alerts.disk_check = self.disk.problem
                self.alerts.on_opened.append(self.passports.alert_opened)
                self.passports.alerts = self.alerts
                self.alerts.flagged_batteries = self.passports.flagged
                # alerts opened before the passports heard of them (replayed at start, or a
                # crash right after one opened) flag their packs now
                taken = await self.passports.reconcile(
                    list(self.alerts.by_id.values()), self.twins.by_id
                )
                if taken:
                    log.info("passports: %d open safety alerts taken up at start", taken)
                order_store = WorkOrderStore(await asyncio.to_thread(self._database))
                self._stack.callback(order_store.close)
                self.orders = await self._stack.enter_async_context(
                    WorkOrders(self.alerts, order_store, cfg.alerts.work_orders)
                )
                self.pipeline.observers.append(self.orders.observe)
            if db.embedded:  # the state is on this machine's disk
                self.supervisor.start(DISK, self.disk.run)
            self.supervisor.start(PASSPORTS, self.passports.run)
            # compaction, retention and rollups of the embedded history; the rollups only
            # of an InfluxDB history
            embedded = self._sqlite if self.history is self._sqlite else None
            rolled = embedded or rolled
            if rolled is not None:
                self.housekeeping = Housekeeping(
                    embedded,
                    now_ms,
                    history_days=cfg.history_days,
                    grace_s=cfg.compact_grace_s,
                    every_s=cfg.housekeeping_s,
                    first_after_s=cfg.housekeeping_s,
                    rollups=HourlyRollups(rolled, self.catalog, cfg.release_soc),
                )
            if self.housekeeping is not None:
                self.metrics.registry.register(self.housekeeping)
                self.supervisor.start(HOUSEKEEPING, self.housekeeping.run)
            if isinstance(store, PostgresStore) and self.history is store:
                # day partitions past history_days dropped, one runner at a time
                self.retention = PartitionRetention(
                    store,
                    now_ms,
                    history_days=cfg.history_days,
                    every_s=cfg.housekeeping_s,
                    first_after_s=cfg.housekeeping_s,
                )
                self.metrics.registry.register(self.retention)
                self.supervisor.start(RETENTION, self.retention.run)
            command_store = CommandStore(await asyncio.to_thread(self._database))
            self._stack.callback(command_store.close)
            self.commands = await self._stack.enter_async_context(
                Commands(
                    cfg.commands,
                    self.catalog,
                    self.scheme,
                    command_store,
                    supervisor=self.supervisor,
                    registry=self.metrics.registry,
                )
            )
            self.pipeline.observers.append(self.commands.observe)
            self.passports.sender = self.commands  # lock_battery for a flagged pack
            # flagged packs in a slot that no alert announced (a crash lost it, or alerts
            # were off): their flagged_battery and lock now; an unresolved one stands
            announced = self.passports.announce_flagged()
            if announced:
                log.info("passports: %d flagged packs in slots announced at start", announced)
            self.supervisor.start(PIPELINE, self.pipeline.run, policy="fatal")
            if not self.connect:
                return self
            assert self.broker_url is not None
            source_type = GmqttSource if cfg.mqtt_client == "gmqtt" else MqttSource
            self.source = await self._stack.enter_async_context(
                source_type(
                    self.broker_url,
                    client_id=cfg.client_id,
                    subscription=self.scheme.subscription,
                    deliver=self.pipeline.deliver,
                    max_inflight=cfg.max_inflight,
                    on_connection_change=lambda up: self.metrics.broker_connected.set(int(up)),
                    on_session=self._on_session,
                )
            )
            assert self.source is not None
            self.commands.attach(self.source)  # commands go out on its connection
            self.supervisor.start(SOURCE, self._watch_source, policy="fatal")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        # the source's watch first (its task ends with the source), then the pipeline,
        # which finishes the commit in progress while the source can still acknowledge it
        await self.supervisor.stop(SOURCE)
        await self.supervisor.stop(PIPELINE)
        if self.passports is not None:  # what the last batches did to the passports
            await self.supervisor.stop(PASSPORTS)
            try:
                await self.passports.flush()
            except StoreError:
                log.error("battery passports: the last operations were not written")
        await self._stack.aclose()  # leaves the supervisor: every other task, then the stores

    @property
    def _session_fact(self) -> str:
        return f"broker_session {self.broker_url} {self.config.client_id}"

    def _on_session(self, present: bool) -> None:
        """Every (re)connect, on the loop, with CONNACK's session present flag. No session
        for a client id that had one means the broker lost what it held for us (crash
        without persistence, session expiry): counted, logged, alerted (docs/operations.md).
        The very first connect of a client id has none, legitimately."""
        if self._session_seen is None:
            return  # the embedded broker keeps sessions in memory only: lost by design
        if not present and self._session_seen:
            self.metrics.sessions_lost.inc()
            problem = (
                f"the broker {self.broker_url} had no session for client id"
                f" {self.config.client_id!r}: what it held for us (messages queued while we"
                " were away, not yet acknowledged) is lost; check its persistence"
                " (docs/operations.md)"
            )
            log.warning("%s", problem)
            if self.alerts is not None:
                self.alerts.raise_service_event("broker_session_lost", "major", problem)
        if not self._session_seen:
            self._session_seen = True
            log.info("first session of client id %r at %s", self.config.client_id, self.broker_url)
            self.supervisor.spawn(REMEMBER_SESSION, self._remember_session())

    def _database(self) -> Database:
        """A store's own connection to the state database (blocking: call it in a thread)."""
        return self.statedb.database(synchronous=self.config.sqlite_synchronous)

    async def _remember_session(self) -> None:
        if self._store is None:
            return
        try:
            await asyncio.to_thread(self._store.remember, self._session_fact, str(now_ms()))
        except StoreError as exc:  # this process still knows; a restart may not
            log.warning("cannot remember the broker session: %s", exc)

    def _ack(self, received: Received) -> bool:
        if self.source is None:
            return not self.connect  # an injected message has no broker to answer
        return self.source.ack(received)

    def inject(self, topic: str, payload: bytes, *, retained: bool = False) -> None:
        """Hand the pipeline one message as the MQTT source would (QoS 1), with no broker:
        for a service made with ``connect=False``. ``drain`` waits until it is handled."""
        if self.connect or self.pipeline is None:
            raise RuntimeError("inject needs a started Ingest(..., connect=False)")
        self._injected += 1
        self.pipeline.deliver(
            Received(topic, payload, 1, retained, self._injected, now_ms(), generation=0)
        )

    async def _watch_source(self) -> None:
        """The MQTT source runs its own connection loop (reconnecting by itself); this task
        lives as long as that loop, so the supervisor sees the loop die."""
        if self.source is not None:
            await self.source.finished()

    def _task_failed(self, task: str, reason: str) -> None:
        self.metrics.task_deaths.labels(task).inc()
        if self.alerts is not None:
            self.alerts.task_failed(task, reason)

    def _fatal(self, task: str, reason: str) -> None:
        self.fatal = f"task {task} died: {reason}"
        log.critical("%s; stopping the service (exit status %d)", self.fatal, FATAL_EXIT_STATUS)
        self.stopping.set()


class _LiveCollector(Collector):
    """Values computed at scrape time: queue depth, message age, devices, lost messages."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    def collect(self) -> Iterator[Metric]:
        ingest, now = self.ingest, now_ms()
        pipeline = ingest.pipeline
        yield GaugeMetricFamily(
            "chargewatch_queue_depth",
            "Messages received, waiting for the pipeline",
            value=len(pipeline.queue) if pipeline else 0,
        )
        last = pipeline.last_message_ms if pipeline else None
        yield GaugeMetricFamily(
            "chargewatch_last_message_age_seconds",
            "Seconds since the last MQTT message arrived (-1: none yet)",
            value=(now - last) / 1000 if last is not None else -1,
        )
        twins = list(ingest.twins.by_id.values())
        yield GaugeMetricFamily(
            "chargewatch_devices_online",
            "Devices online per contract v1",
            value=sum(1 for t in twins if t.online(now)),
        )
        yield GaugeMetricFamily(
            "chargewatch_ingest_stalled",
            "1 while the watchdog sees a silent stall",
            value=1 if ingest.stalled(now) else 0,
        )
        lost = GaugeMetricFamily(
            "chargewatch_device_lost_messages",
            "Gaps in seq per device, this boot (devices with none are left out)",
            labels=["device"],
        )
        for t in twins:
            if t.lost_messages:
                lost.add_metric([t.device_id], t.lost_messages)
        yield lost
        yield CounterMetricFamily(
            "chargewatch_dead_letters_retained_repeats",
            "Retained messages replayed on a subscribe that were dead-lettered before (not"
            " stored again)",
            value=ingest._store.retained_repeats if ingest._store is not None else 0,
        )
        yield GaugeMetricFamily(
            "chargewatch_lost_messages",
            "Gaps in seq over all devices, current boots",
            value=sum(t.lost_messages for t in twins),
        )
