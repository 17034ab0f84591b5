"""Housekeeping of the history: compaction, retention and rollups, in the background.

Every ``every_s``: history older than ``history_days`` is deleted (``SQLiteStore.prune``),
then statuses of hours of device time that ended ``grace_s`` ago are compacted into blocks
(``SQLiteStore.compact``), and those hours rolled up per device and station
(``ingest.rollups``; rollups outlive the raw history). Each batch is one short transaction in a worker thread, and the
loop yields between batches, so ingest's writes interleave with a prune of any size.
The loop is ``ingest.periodic``'s: a store error is logged and the pass retried on the next
round (the supervisor restarts the task if anything else escapes).

With no ``store`` (an InfluxDB history, which keeps its own retention: ``chargewatch influx
setup``) a pass only rolls up, through ``rollups`` (over ``ingest.influxrollups``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.periodic import Periodic
from ingest.rollups import HourlyRollups
from ingest.sqlite_store import SQLiteStore

log = logging.getLogger(__name__)

DAY_MS = 86_400_000


@dataclass(eq=False)  # hashable: a registered collector
class Housekeeping(Collector):
    store: SQLiteStore | None  # None: rollups only (an InfluxDB history)
    clock_ms: Callable[[], int]
    history_days: float = 90.0
    grace_s: float = 600.0
    every_s: float = 300.0
    first_after_s: float = 300.0
    batch: int = 500
    rollups: HourlyRollups | None = None
    blocks_compacted: int = 0
    pruned: int = 0
    hours_rolled_up: int = 0
    passes: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """The periodic task (supervised by the service; ``ingest.periodic``)."""
        what = "history housekeeping"
        await Periodic(what, self.once, self.every_s, self.first_after_s, self._wake).run()

    def collect(self) -> Iterator[Metric]:
        """Metrics (the service registers this collector)."""
        yield CounterMetricFamily(
            "chargewatch_history_pruned",
            "Messages and status blocks deleted past history_days",
            value=self.pruned,
        )
        yield CounterMetricFamily(
            "chargewatch_history_blocks_compacted",
            "Status blocks written (a device's statuses of one hour, compacted)",
            value=self.blocks_compacted,
        )
        yield CounterMetricFamily(
            "chargewatch_history_hours_rolled_up",
            "Hours rolled up per device and station",
            value=self.hours_rolled_up,
        )
        yield CounterMetricFamily(
            "chargewatch_history_housekeeping_passes",
            "Passes of compaction, retention and rollups completed",
            value=self.passes,
        )

    def wake(self) -> None:
        """Run a pass now (tests, and an operator who just shortened the retention)."""
        self._wake.set()

    async def once(self) -> None:
        now = self.clock_ms()
        # retention first: what goes anyway is not compacted before
        cutoff = now - round(self.history_days * DAY_MS)
        before = now - round(self.grace_s * 1000)
        if self.store is not None:
            while n := await asyncio.to_thread(self.store.prune, cutoff, self.batch):
                self.pruned += n
                await asyncio.sleep(0)
            while n := await asyncio.to_thread(self.store.compact, before, 8):
                self.blocks_compacted += n
                await asyncio.sleep(0)
        if self.rollups is not None:
            roll = self.rollups.catch_up
            while await asyncio.to_thread(roll, before, 1, cutoff):
                self.hours_rolled_up += 1
                await asyncio.sleep(0)
        self.passes += 1
        log.debug(
            "history housekeeping: %d blocks compacted, %d pruned in all",
            self.blocks_compacted,
            self.pruned,
        )
