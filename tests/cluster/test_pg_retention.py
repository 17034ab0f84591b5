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

from devices.catalog import Catalog
from ingest.config import IngestConfig
from ingest.pg_retention import RETENTION, PartitionRetention
from ingest.pg_store import DAY_MS, PostgresStore, partition_name
from ingest.service import Ingest
from tests.db.test_state_contract import row

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
    from prometheus_client import generate_latest

    return generate_latest(ingest.metrics.registry)


@pytest.mark.parametrize("bad", ["0", "-1", "x", "40000"])
def test_history_days_from_the_environment_is_checked(
    bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ingest import IngestError
    from ingest.pg_retention import history_days_from_env

    monkeypatch.setenv("CHARGEWATCH_HISTORY_DAYS", bad)
    with pytest.raises(IngestError, match="CHARGEWATCH_HISTORY_DAYS"):
        history_days_from_env()
    monkeypatch.setenv("CHARGEWATCH_HISTORY_DAYS", "30")
    assert history_days_from_env() == 30.0
    monkeypatch.delenv("CHARGEWATCH_HISTORY_DAYS")
    assert history_days_from_env() == 90.0
