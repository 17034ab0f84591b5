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

The alert rules' settings come from ``CHARGEWATCH_ALERTS`` (a JSON object of
``AlertsConfig`` fields, as under ``alerts:`` in ``serve``'s configuration); webhook
subscriptions are the database's.
"""

from __future__ import annotations

import asyncio
import json
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
from ingest import IngestError
from ingest.actions import ActionNotices
from ingest.alerts.config import AlertsConfig
from ingest.alerts.engine import AlertEngine
from ingest.alerts.ids import AlertIds, IdPool
from ingest.alerts.notify import Notifier
from ingest.alerts.store import AlertStore
from ingest.pipeline import Twins
from ingest.supervisor import Supervisor

ENV = "CHARGEWATCH_ALERTS"


def alerts_config(environ: dict[str, str] | None = None) -> AlertsConfig:
    """The alert settings of ``CHARGEWATCH_ALERTS`` (defaults when unset)."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if not raw:
        return AlertsConfig()
    try:
        return AlertsConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise IngestError(f"{ENV}: not valid alert settings: {exc}") from None


class WorkerAlerts:
    def __init__(
        self,
        db_url: str,
        catalog: Catalog,
        config: AlertsConfig,
        *,
        claim_lease_s: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.db_url = db_url
        self.catalog = catalog
        self.config = config
        self.claim_lease_s = claim_lease_s
        self.supervisor = Supervisor()
        # the one LISTEN for maintainers' actions of all the partitions' appliers
        self.notices = ActionNotices(db_url)
        self._store: AlertStore | None = None
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
    def notifier(self) -> Notifier:
        if self._notifier is None:
            raise RuntimeError("WorkerAlerts not entered")
        return self._notifier

    async def __aenter__(self) -> Self:
        store = self._store = await asyncio.to_thread(AlertStore.on_postgresql, self.db_url)
        try:
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
            except BaseException:
                await self.supervisor.__aexit__(None, None, None)
                raise
        except BaseException:
            store.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._notifier is not None:
                await self._notifier.__aexit__(et, e, tb)
        finally:
            try:
                await self.supervisor.__aexit__(et, e, tb)
            finally:
                self.store.close()

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
