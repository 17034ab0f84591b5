"""Retention of a PostgreSQL history: whole day partitions older than ``history_days``
dropped in the background (issue 15 part 1).

Every runner (``serve --db postgresql://``, each ``chargewatch ingest`` worker) runs the task;
each pass runs where PostgreSQL's advisory lock ``RETENTION_LOCK`` is free
(``PostgresStore.prune``: ``pg_try_advisory_xact_lock``, the drops in the same transaction),
so two runners at once drop each partition once: the other skips that round. Every ``every_s``
(the first after ``first_after_s``) the days that ended ``history_days`` before the clock go
(the loop is ``ingest.periodic``'s). A store error is logged and the pass retried on the
next round; the task runs under a
supervisor (the service's, or ``supervised`` for a worker), which logs and restarts it if
anything else escapes.

    IngestError   CHARGEWATCH_INGEST__HISTORY_DAYS or __HOUSEKEEPING_S out of range (workers)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ingest import IngestError
from ingest.periodic import Periodic
from ingest.pg_store import DAY_MS, PostgresStore
from ingest.readside import now_ms
from ingest.supervisor import Supervisor

log = logging.getLogger(__name__)

RETENTION = "ingest:pg-retention"  # the supervised task's name
RETENTION_LOCK = 0x6377_7274  # "cwrt"; every key of ours: ingest.statedb
HISTORY_DAYS_MAX = 36_500


@dataclass(eq=False)  # hashable: a registered collector
class PartitionRetention(Collector):
    store: PostgresStore
    clock_ms: Callable[[], int]
    history_days: float = 90.0
    every_s: float = 3600.0
    first_after_s: float = 300.0
    dropped: int = 0
    passes: int = 0
    skipped: int = 0  # passes another runner held the lock for
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """The periodic task (supervised; ``ingest.periodic``)."""
        what = "history retention"
        await Periodic(what, self.once, self.every_s, self.first_after_s, self._wake).run()

    async def once(self) -> int | None:
        """One pass: how many partitions went (None: another runner holds the lock)."""
        cutoff = self.clock_ms() - round(self.history_days * DAY_MS)
        n = await asyncio.to_thread(self.store.prune, cutoff, lock=RETENTION_LOCK)
        self.passes += 1
        if n is None:
            self.skipped += 1
            log.debug("history retention: another runner is dropping partitions")
        elif n:
            self.dropped += n
            log.info(
                "history retention: %d day partitions older than %g days dropped",
                n, self.history_days,
            )  # fmt: skip
        return n

    def wake(self) -> None:
        """Run a pass now (tests, and an operator who just shortened the retention)."""
        self._wake.set()

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "chargewatch_history_partitions_dropped",
            "PostgreSQL history day partitions dropped past history_days (by this runner)",
            value=self.dropped,
        )
        yield CounterMetricFamily(
            "chargewatch_history_retention_passes",
            "Retention passes of the PostgreSQL history (this runner's, skipped ones included)",
            value=self.passes,
        )


async def supervised(retention: PartitionRetention) -> None:
    """Run ``retention`` under a supervisor of its own until cancelled (a worker has none):
    a death is logged and the task restarted."""
    async with Supervisor() as supervisor:
        supervisor.start(RETENTION, retention.run)
        await asyncio.Event().wait()


def for_worker(store: PostgresStore, registry: CollectorRegistry) -> PartitionRetention:
    """The retention of a ``chargewatch ingest`` worker, from the environment ``serve`` reads
    too: ``CHARGEWATCH_INGEST__HISTORY_DAYS`` (default 90) and ``__HOUSEKEEPING_S`` (the
    period, default 300 s; the first pass after it). Raises IngestError for a bad value."""
    days, every = worker_settings()
    retention = PartitionRetention(
        store, now_ms, history_days=days, every_s=every, first_after_s=every
    )
    registry.register(retention)
    return retention


def worker_settings() -> tuple[float, float]:
    """(history_days, period in s) from the environment; raises IngestError."""
    days = _env_number("CHARGEWATCH_INGEST__HISTORY_DAYS", 90.0, HISTORY_DAYS_MAX)
    return days, _env_number("CHARGEWATCH_INGEST__HOUSEKEEPING_S", 300.0, 86_400.0)


def _env_number(name: str, default: float, most: float) -> float:
    text = os.environ.get(name, str(default))
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= most:  # nan fails too
        raise IngestError(f"{name}={text!r}: a number in (0, {most:g}]")
    return value
