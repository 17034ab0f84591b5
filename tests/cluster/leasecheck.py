"""Test helpers around leases: a recording owner and a sampler of pg_locks vs beliefs."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence

import psycopg

from ingest.leases import DEFAULT_LOCK_SPACE, LeaseManager


class RecordingOwner:
    """A ``PartitionOwner`` that keeps what it was told, in order, with times."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[float, str, int, int]] = []  # (t, what, partition, epoch)
        self.consuming: dict[int, int] = {}

    def acquired(self, partition: int, epoch: int) -> None:
        assert partition not in self.consuming
        self.consuming[partition] = epoch
        self.events.append((time.monotonic(), "acquired", partition, epoch))

    async def released(self, partition: int) -> None:
        await asyncio.sleep(0.01)  # a session's detach takes a moment
        self.consuming.pop(partition)
        self.events.append((time.monotonic(), "released", partition, 0))

    def dropped_all(self) -> None:
        self.events.append((time.monotonic(), "dropped_all", -1, len(self.consuming)))
        self.consuming.clear()


class Sampler:
    """Fails (``violations``) if two workers ever believe they own one partition, or a
    worker believes it holds a partition whose lock its lease connection does not hold.

    Runs *on the workers' loop* and reads pg_locks with a blocking query: no worker can
    change its mind while one sample is taken, so a sample is consistent (a thread could
    read a belief and pg_locks at different moments and see a release or an acquisition
    halfway, in either order). ``exempt(manager)`` leaves a worker out of the lock check
    (one whose connection a test has just killed, until it notices)."""

    def __init__(
        self,
        url: str,
        managers: Sequence[LeaseManager],
        exempt: Callable[[LeaseManager], bool] = lambda m: False,
    ) -> None:
        self.url = url
        self.managers = managers
        self.exempt = exempt
        self.violations: list[str] = []
        self.samples = 0
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def locks(self) -> set[tuple[int, int]] | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=1)
            rows = self._conn.execute(
                "SELECT pid, objid::text::int FROM pg_locks WHERE locktype = 'advisory'"
                " AND granted AND objsubid = 2 AND classid = %s::oid AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())",
                (DEFAULT_LOCK_SPACE,),
            ).fetchall()
        except psycopg.Error:
            if self._conn is not None:  # closed, not dropped: a dropped one warns when collected
                self._conn.close()
            self._conn = None
            return None
        return {(int(str(pid)), int(str(p))) for pid, p in rows}

    def sample(self) -> None:
        locks = self.locks()
        believed = collections.Counter(p for m in self.managers for p in m.owned)
        for p, n in believed.items():
            if n > 1:
                self.violations.append(f"partition {p} believed owned by {n} workers")
        if locks is None:
            return
        self.samples += 1
        holders = collections.Counter(p for _, p in locks)
        for p, n in holders.items():
            if n > 1:
                self.violations.append(f"partition {p} locked by {n} backends")
        for m in self.managers:
            if self.exempt(m):
                continue
            for p in m.held:
                if (m.backend_pid, p) not in locks:
                    self.violations.append(
                        f"{m.config.worker} believes it holds {p} without the lock"
                    )

    async def run(self, every: float = 0.01) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
