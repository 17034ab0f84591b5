"""Retention of the PostgreSQL history (issue 15 part 1): whole day partitions older than
``history_days`` dropped in the background by ``ingest.pg_retention``, one runner per pass
(an advisory lock), against a real PostgreSQL: what is older than the window is gone, what is
newer kept, two runners at once drop each partition once; ``serve --db postgresql://``
(``Ingest``) runs it supervised."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from devices.catalog import Catalog
from ingest import IngestError
from ingest.alerts.config import AlertsConfig
from ingest.config import IngestConfig
from ingest.mqtt import BrokerURL
from ingest.pg_retention import RETENTION, PartitionRetention, worker_settings
from ingest.pg_store import DAY_MS, PostgresStore, partition_name
from ingest.service import Ingest
from ingest.worker import IngestArgs, run_worker
from tests.db.test_state_contract import row
from tests.servers import Process

T0 = 1_796_256_000_000  # 2026-12-03T00:00Z
TODAY = T0 // DAY_MS


def stored_days(store: PostgresStore, before: int) -> list[str]:
    return [p for p in store.partitions() if p < partition_name(before)]


async def test_days_older_than_the_window_go_newer_stay_two_runners_drop_each_once(
    pg_url: str,
) -> None:
    stores = [PostgresStore(pg_url, now_ms=T0, days_ahead=1) for _ in range(2)]
    try:
        a, b = stores
        # days 100, 95, 91 and 89 before T0, and today
        old = [TODAY - n for n in (100, 95, 91)]
        a.write(
            [row(i, d * DAY_MS + 1000) for i, d in enumerate([*old, TODAY - 89, TODAY])], [], []
        )
        assert stored_days(a, TODAY) == [partition_name(d) for d in [*old, TODAY - 89]]
        runners = [
            PartitionRetention(s, lambda: T0 + 3_600_000, history_days=90, first_after_s=0)
            for s in stores
        ]
        results = await asyncio.gather(*(r.once() for r in runners))
        assert sorted(results, key=lambda n: -1 if n is None else n) in ([None, 3], [0, 3]), (
            "one runner drops the three old days; the other finds the lock taken or none left"
        )
        assert sum(r.dropped for r in runners) == 3, "each partition dropped once"
        assert stored_days(b, TODAY) == [partition_name(TODAY - 89)], "newer than 90 days: kept"
        kept = [m["seq"] for m in b.messages("P1")]
        assert kept == [3, 4], "the 89-day-old message and today's"
        # a runner whose store still believed in a dropped day makes it again for a late row
        b.write([row(9, old[0] * DAY_MS + 5)], [], [])
        assert partition_name(old[0]) in b.partitions()
        assert await runners[1].once() == 1
        assert await runners[0].once() == 0, "nothing left to drop"
        assert sum(r.passes for r in runners) == 4
    finally:
        for s in stores:
            s.close()


async def test_serve_on_postgresql_runs_the_retention_supervised(
    pg_url: str, tmp_path: Path
) -> None:
    seed = PostgresStore(pg_url)
    try:
        old_day = int(time.time() * 1000) // DAY_MS - 120
        seed.write([row(1, old_day * DAY_MS + 1000)], [], [])
        assert partition_name(old_day) in seed.partitions()
    finally:
        seed.close()
    config = IngestConfig(data_dir=tmp_path / "data", db=pg_url, housekeeping_s=3600)
    async with Ingest(config, Catalog.load(), connect=False) as ingest:
        assert RETENTION in ingest.supervisor.names
        assert ingest.retention is not None
        ingest.retention.wake()
        deadline = time.monotonic() + 20
        while ingest.retention.passes == 0:
            assert time.monotonic() < deadline, "no retention pass within 20 s"
            await asyncio.sleep(0.05)
        assert ingest.retention.dropped == 1
        assert ingest.history is not None
        assert isinstance(ingest.history, PostgresStore)
        assert partition_name(old_day) not in ingest.history.partitions()
        assert b"chargewatch_history_partitions_dropped_total 1.0" in _metrics(ingest)


def _metrics(ingest: Ingest) -> bytes:
    return generate_latest(ingest.metrics.registry)


@pytest.mark.parametrize("bad", ["0", "-1", "x", "nan", "40000"])
def test_a_workers_settings_from_the_environment_are_checked(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEWATCH_INGEST__HISTORY_DAYS", bad)
    with pytest.raises(IngestError, match="CHARGEWATCH_INGEST__HISTORY_DAYS"):
        worker_settings()
    monkeypatch.setenv("CHARGEWATCH_INGEST__HISTORY_DAYS", "30")
    monkeypatch.setenv("CHARGEWATCH_INGEST__HOUSEKEEPING_S", "90000" if bad == "40000" else bad)
    with pytest.raises(IngestError, match="CHARGEWATCH_INGEST__HOUSEKEEPING_S"):
        worker_settings()


async def test_a_worker_drops_old_partitions_in_the_background(
    pg_url: str, broker: Process, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``chargewatch ingest``'s ``run_worker`` with history in PostgreSQL: a 30-day window,
    a pass every 0.2 s; a 40-day-old partition goes, a 20-day-old one stays."""
    monkeypatch.setenv("CHARGEWATCH_INGEST__HISTORY_DAYS", "30")
    monkeypatch.setenv("CHARGEWATCH_INGEST__HOUSEKEEPING_S", "0.2")
    today = int(time.time() * 1000) // DAY_MS
    seed = PostgresStore(pg_url)
    try:
        seed.write([row(1, (today - 40) * DAY_MS), row(2, (today - 20) * DAY_MS)], [], [])
        args = IngestArgs(
            broker=BrokerURL.parse(f"mqtt://127.0.0.1:{broker.port}"), db=pg_url,
            catalog=Catalog.load(), partitions=4, worker="w1", metrics_port=None,
            history=None, lease_timeout_s=10, alerts=AlertsConfig(enabled=False),
        )  # fmt: skip
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_worker(args, stop))
            deadline = time.monotonic() + 20
            while partition_name(today - 40) in seed.partitions():
                assert time.monotonic() < deadline, "the old partition is still there after 20 s"
                await asyncio.sleep(0.1)
            stop.set()
        assert partition_name(today - 20) in seed.partitions()
    finally:
        seed.close()
