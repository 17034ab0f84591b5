"""The alerts of a partitioned ingest worker (issue 13): what its partitions share.

One ``AlertStore`` on PostgreSQL and one webhook ``Notifier`` per worker. The notifier
claims deliveries (``claim_lease_s``): each notification is sent by one worker, and one
whose worker died is taken over by another once its claim runs out; its delivery ids come
from the database's sequence. Each owned partition runs an ``AlertEngine`` of its own
(``engine``) over the partition's stations (a station is in one partition, so the station
rules see all of it), with alert and event ids from the database's sequences and the
partition's own range of the event journal. One ``ActionNotices`` per worker (``notices``)
wakes the partitions' action appliers (``ingest.actions``): one LISTEN connection a worker,
not one a partition. The engines' metrics stay with them (one per
partition and lease epoch); the worker's /metrics has their sum (``WorkerAlertsCollector``):
unresolved alerts of the partitions it owns, and its notifier's deliveries.

The work orders and remote commands of the partitions (``ingest.partition_consumer``: a
``WorkOrders`` and a ``Commands`` per partition and lease epoch) share the worker's
``order_store`` and ``command_store`` on PostgreSQL.

Webhook subscriptions are the database's (``AlertStore.webhooks``), added and removed by
``chargewatch serve --db postgresql://`` or any API replica (``ingest.replica``), each change
NOTIFYed on ``WEBHOOKS_CHANNEL`` in its transaction. The notifier follows them
(``follow_webhooks``, a supervised task): it LISTENs on that channel and reads the
subscriptions again (``Notifier.sync``) on each notice, on each (re)connection (what changed
while it was not listening) and every ``reload_s`` (the safety net for a lost notice). A new
subscription gets its delivery lanes: an alert event published after that, on any worker, is
sent to it once (the claims). A removed one's lanes stop and its pending deliveries here are
``dropped`` ("subscription removed"), as serve's ``Notifier.remove`` does; one pending under
another worker's claim is dropped by that worker, or by whoever claims it next. A worker
that claims a delivery of a subscription it has not heard of reads them again first (so it
sends it rather than drop it as removed). A lost LISTEN connection is retried with capped,
jittered backoff; a subscription's counters (delivered, failed, ...) are those of the last
worker that saved them.

The alert rules' settings and how notifications are delivered (timeouts, retries, deadline,
queue bound, default language, console link) come from ``CHARGEWATCH_ALERTS`` (a JSON object
of ``AlertsConfig`` fields, as under ``alerts:`` in ``serve``'s configuration, work orders'
included), the commands' from ``CHARGEWATCH_COMMANDS`` (``CommandsConfig`` fields, as under
``commands:``); where notifications are delivered (the subscriptions) only from the
database, as in ``serve``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import weakref
from collections.abc import Collection, Iterator
from types import TracebackType
from typing import Self

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError

from devices.catalog import Catalog
from ingest import IngestError, StoreError, listen
from ingest.actions import ActionNotices, libpq_url
from ingest.alerts.config import AlertsConfig
from ingest.alerts.engine import AlertEngine
from ingest.alerts.ids import AlertIds, IdPool
from ingest.alerts.notify import Notifier
from ingest.alerts.order_store import WorkOrderStore
from ingest.alerts.store import WEBHOOKS_CHANNEL, AlertStore
from ingest.commands.config import CommandsConfig
from ingest.commands.store import CommandStore
from ingest.pipeline import Twins
from ingest.supervisor import Supervisor

log = logging.getLogger(__name__)

ENV = "CHARGEWATCH_ALERTS"
COMMANDS_ENV = "CHARGEWATCH_COMMANDS"
RELOAD_S = 60.0
"""How often a worker reads the webhook subscriptions without a notice: the longest a lost
NOTIFY leaves a subscription unserved (or a removed one served)."""
BACKOFF_MAX_S = 10.0
GATHER_S = 0.005  # after a notice, how long more are gathered into the same read
FOLLOWER = "webhook:follow"


def alerts_config(environ: dict[str, str] | None = None) -> AlertsConfig:
    """The alert settings of ``CHARGEWATCH_ALERTS`` (defaults when unset)."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if not raw:
        return AlertsConfig()
    try:
        return AlertsConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise IngestError(f"{ENV}: not valid alert settings: {exc}") from None


def commands_config(environ: dict[str, str] | None = None) -> CommandsConfig:
    """The remote commands' settings of ``CHARGEWATCH_COMMANDS`` (defaults when unset)."""
    raw = (os.environ if environ is None else environ).get(COMMANDS_ENV)
    if not raw:
        return CommandsConfig()
    try:
        return CommandsConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise IngestError(f"{COMMANDS_ENV}: not valid command settings: {exc}") from None


class WorkerAlerts:
    def __init__(
        self,
        db_url: str,
        catalog: Catalog,
        config: AlertsConfig,
        *,
        claim_lease_s: float,
        registry: CollectorRegistry | None = None,
        commands: CommandsConfig | None = None,
        reload_s: float = RELOAD_S,
    ) -> None:
        self.db_url = db_url
        self.catalog = catalog
        self.config = config
        self.commands = commands or CommandsConfig()
        self.claim_lease_s = claim_lease_s
        self.reload_s = reload_s
        self.supervisor = Supervisor()
        # the one LISTEN for maintainers' actions of all the partitions' appliers
        self.notices = ActionNotices(db_url)
        self._store: AlertStore | None = None
        self._order_store: WorkOrderStore | None = None
        self._command_store: CommandStore | None = None
        self._notifier: Notifier | None = None
        # the partitions' engines (a closed one goes with its consumer)
        self.engines: weakref.WeakSet[AlertEngine] = weakref.WeakSet()
        if registry is not None:
            registry.register(WorkerAlertsCollector(self))

    @property
    def store(self) -> AlertStore:
        if self._store is None:
            raise RuntimeError("WorkerAlerts not entered")
        return self._store

    @property
    def order_store(self) -> WorkOrderStore:
        if self._order_store is None:
            raise RuntimeError("WorkerAlerts not entered")
        return self._order_store

    @property
    def command_store(self) -> CommandStore:
        if self._command_store is None:
            raise RuntimeError("WorkerAlerts not entered")
        return self._command_store

    @property
    def notifier(self) -> Notifier:
        if self._notifier is None:
            raise RuntimeError("WorkerAlerts not entered")
        return self._notifier

    async def __aenter__(self) -> Self:
        store = self._store = await asyncio.to_thread(AlertStore.on_postgresql, self.db_url)
        try:
            self._order_store = await asyncio.to_thread(WorkOrderStore.on_postgresql, self.db_url)
            self._command_store = await asyncio.to_thread(CommandStore.on_postgresql, self.db_url)
            await self.supervisor.__aenter__()
            try:
                self.supervisor.start("actions:notices", self.notices.run)
                self._notifier = await Notifier(
                    store,
                    self.config.webhooks,
                    supervisor=self.supervisor,
                    catalog=self.catalog,
                    claim_lease_s=self.claim_lease_s,
                    ids=IdPool(lambda n: store.reserve_ids("delivery", n), block=64),
                ).__aenter__()
                notifier = self._notifier
                self.supervisor.start(
                    FOLLOWER,
                    lambda: follow_webhooks(notifier, self.db_url, reload_s=self.reload_s),
                )
            except BaseException:
                await self.supervisor.__aexit__(None, None, None)
                raise
        except BaseException:
            self._close_stores()
            raise
        return self

    def _close_stores(self) -> None:
        for s in (self._command_store, self._order_store, self._store):
            if s is not None:
                s.close()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.supervisor.stop(FOLLOWER)
            if self._notifier is not None:
                await self._notifier.__aexit__(et, e, tb)
        finally:
            try:
                await self.supervisor.__aexit__(et, e, tb)
            finally:
                self._close_stores()

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        if self._notifier is not None:
            self._notifier.catalog = catalog

    def engine(
        self,
        catalog: Catalog,
        twins: Twins,
        stations: Collection[str],
        partition: int,
        epoch: int,
    ) -> AlertEngine:
        """A partition's engine for one lease epoch, its writes fenced by it (not entered:
        the partition's consumer enters it)."""
        engine = AlertEngine(
            self.config,
            catalog,
            twins,
            self.store,
            stations=stations,
            partition=partition,
            ids=AlertIds(self.store.reserve_ids),
            notifier=self.notifier,
        )
        engine.fence = (partition, epoch)
        self.engines.add(engine)
        return engine

    def forget(self, engine: AlertEngine) -> None:
        """A partition's engine closed: its alerts are no longer this worker's."""
        self.engines.discard(engine)


async def follow_webhooks(
    notifier: Notifier,
    db_url: str,
    *,
    reload_s: float = RELOAD_S,
    backoff_max_s: float = BACKOFF_MAX_S,
) -> None:
    """Serve the database's subscriptions (module docstring): ``Notifier.sync`` on each
    NOTIFY of ``WEBHOOKS_CHANNEL``, on each (re)connection and every ``reload_s``. Runs
    until cancelled; reconnects with capped, jittered backoff (``ingest.listen``)."""
    await listen.follow(
        libpq_url(db_url), [WEBHOOKS_CHANNEL], name="webhooks", errors=(StoreError,),
        catch_up=lambda _: notifier.sync(), gather_s=GATHER_S,
        period_s=reload_s, first_s=0.5, cap_s=backoff_max_s,
    )  # fmt: skip


class WorkerAlertsCollector(Collector):
    """The worker's alerts and notifications, computed at scrape time."""

    def __init__(self, alerts: WorkerAlerts) -> None:
        self.alerts = alerts

    def collect(self) -> Iterator[Metric]:
        a = self.alerts
        yield GaugeMetricFamily(
            "chargewatch_alerts_active",
            "Unresolved alerts of the partitions this worker owns",
            value=sum(len(e.by_id) for e in list(a.engines)),
        )
        n = a._notifier
        yield GaugeMetricFamily(
            "chargewatch_webhook_subscriptions",
            "Webhook subscriptions this worker delivers to (the database's, followed)",
            value=len(n.subscriptions) if n is not None else 0,
        )
        yield GaugeMetricFamily(
            "chargewatch_webhook_pending",
            "Webhook deliveries this worker holds, waiting or in flight",
            value=n.pending_count if n is not None else 0,
        )
        yield CounterMetricFamily(
            "chargewatch_webhook_claims_taken_over",
            "Pending deliveries this worker claimed from another (whose claim ran out)",
            value=n.taken_over if n is not None else 0,
        )
        yield CounterMetricFamily(
            "chargewatch_webhook_claims_lost",
            "Deliveries whose claim ran out here (left to other workers)",
            value=n.lost_claims if n is not None else 0,
        )
