"""Devices outside the registry, seen by the cluster: one watcher of the fleet's births.

``serve`` subscribes to every topic under the prefix (``TopicScheme.subscription``), so a
message from a device outside the catalog becomes a dead letter ``unknown_device``: counted in
``chargewatch_dead_letters_total{reason="unknown_device"}`` and listed by
``/v1/deadletters``. A worker's partition sessions subscribe only to their registered
devices' topics (``ingest.partitions``), so such a device's messages reach no worker at all:
a device whose registry entry was removed, or one registered in the broker's credentials and
not in the registry, would be silent.

Receiving everything to find them (``<prefix>/+/+`` on one worker) would hand that worker the
whole fleet's traffic again, the load the partitions split. Instead, while a worker owns
partition ``WATCH_PARTITION`` (so one worker at a time, by its lease), it also runs this
watcher: its own persistent session (the partitions' client id prefix + ``-unknown``)
subscribed to ``<prefix>/+/state`` only. Every device publishes a retained birth right after
each connect and has a retained Will (protocol v1): two messages per connection, a tiny share
of the traffic, and a device outside the registry is seen at its first connect (and, retained,
at each subscribe). Such a message is kept as a dead letter ``unknown_device`` in PostgreSQL
(where the API replicas list them) and counted in the same counter as serve's; a retained
birth replayed on the next subscribe is recognised by the store and not kept again
(``ingest.replays``). Every message is acknowledged once that write returned; a failed write
leaves the session (the broker delivers again) and starts over after a capped backoff.

Not seen, unlike serve: an unknown device's status and events (only its births and Wills),
and topics outside ``<prefix>/<device>/<channel>``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest import IngestError
from ingest.backoff import backoff_s
from ingest.gmqtt_source import GmqttSource
from ingest.metrics import IngestMetrics
from ingest.mqtt import BrokerURL, Received
from ingest.pg_store import PostgresStore
from ingest.store import DeadLetter

log = logging.getLogger(__name__)

WATCH_PARTITION = 0  # its owner runs the watcher
REASON = "unknown_device"  # serve's reason (ingest.pipeline)
BATCH_MAX = 500


@dataclass(eq=False)
class UnknownDevices:
    """The watcher (module docstring); ``run`` until cancelled."""

    broker: BrokerURL
    client_id: str
    scheme: TopicScheme
    catalog: Callable[[], Catalog | None]  # the registry as the worker knows it now
    store: PostgresStore
    metrics: IngestMetrics
    retry_max_s: float = 5.0
    source: GmqttSource | None = None
    seen: int = 0  # state messages handled (known devices' included)
    _queue: deque[Received] = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def subscribed(self) -> bool:
        src = self.source
        return src is not None and src.connected and src.subacks > 0

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._session()
            except Exception as exc:
                failures += 1
                delay = backoff_s(failures, first_s=0.5, cap_s=self.retry_max_s)
                if isinstance(exc, IngestError | psycopg.Error | OSError | TimeoutError):
                    log.warning("unknown devices: %s; again in %.1fs", exc, delay)
                else:  # never silently
                    log.critical("unknown devices: a bug; again in %.1fs", delay, exc_info=exc)
                await asyncio.sleep(delay)

    async def _session(self) -> None:
        self._queue.clear()
        source = GmqttSource(
            self.broker,
            client_id=self.client_id,
            subscription=f"{self.scheme.prefix}/+/state",
            deliver=self._deliver,
        )
        async with source:
            self.source = source
            try:
                while True:
                    await self._wake.wait()
                    self._wake.clear()
                    while self._queue:
                        n = min(BATCH_MAX, len(self._queue))
                        await self._handle(source, [self._queue.popleft() for _ in range(n)])
            finally:
                self.source = None

    def _deliver(self, msg: Received) -> None:
        self._queue.append(msg)
        self._wake.set()

    async def _handle(self, source: GmqttSource, batch: list[Received]) -> None:
        catalog = self.catalog()
        dead = [d for d in (self._unknown(r, catalog) for r in batch) if d is not None]
        if dead:
            await asyncio.to_thread(self.store.save, (), dead)
            self.metrics.dead_letters.labels(REASON).inc(len(dead))
            for d in dead:
                log.warning("dead letter %s on %s: %s", REASON, d.topic, d.detail)
        self.seen += len(batch)
        for r in batch:
            source.ack(r)

    def _unknown(self, r: Received, catalog: Catalog | None) -> DeadLetter | None:
        topic = self.scheme.parse(r.topic)
        if topic is None or catalog is None or topic.device_id in catalog.devices:
            return None
        detail = f"{topic.device_id!r} is not in the registry"
        return DeadLetter.of(r.received_ms, r.topic, REASON, detail, r.payload, retained=r.retained)
