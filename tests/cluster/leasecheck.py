"""Test helpers around leases: a recording owner, a sampler of pg_locks vs beliefs, what
worker processes believed they owned, read from their logs, and a lease row set by hand
(``lease``) for the tests of a partition's consumer without a lease manager."""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg

from ingest.leases import DEFAULT_LOCK_SPACE, LeaseManager


def lease(db: str, partition: int, epoch: int) -> None:
    """``partition``'s lease row at ``epoch``: what its fence checks (a consumer tested alone)."""
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO partition_leases VALUES (%s, %s, 'test', now()) ON CONFLICT (partition)"
            " DO UPDATE SET epoch = EXCLUDED.epoch",
            (partition, epoch),
        )


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


# a record of a chargewatch process's log (api/cli.py: "%(asctime)s %(levelname)s %(name)s:
# %(message)s"); a message may run over several lines (a psycopg error's text)
_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ ([\w.]+): ", re.MULTILINE)
_OURS = re.compile(r"partition (\d+): ours \(epoch (\d+)\)")
_RELEASED = re.compile(r"partition (\d+): released")


@dataclass(frozen=True, slots=True)
class Held:
    """A worker's belief that a partition is its own, from its log: from "ours" (logged
    before the partition's consumer starts, so before its first ack) to "released" (logged
    once it acknowledges nothing more, before the unlock) or "lease database lost" (logged
    right after every partition stopped acknowledging). Times are the log's wall clock:
    one clock for every process of this machine."""

    worker: str
    partition: int
    epoch: int
    start: float
    end: float


def _records(log: str) -> Iterator[tuple[float, str, str]]:
    found = list(_RECORD.finditer(log))
    for m, after in zip(found, [*found[1:], None], strict=True):
        # the process's local time, as this one's
        stamp = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
        message = log[m.end() : after.start() if after else len(log)].rstrip("\n")
        yield stamp, m[2], message


def held_from_log(log: str, worker: str, until: float = math.inf) -> list[Held]:
    """``worker``'s beliefs (``Held``) in its ``log`` of ``ingest.leases``; one still open at
    the end ends at ``until`` (when the process was seen dead; never, by default)."""
    out: list[Held] = []
    holding: dict[int, tuple[int, float]] = {}  # partition -> epoch, since
    for t, logger, message in _records(log):
        if logger != "ingest.leases":
            continue
        if m := _OURS.fullmatch(message):
            p = int(m[1])
            assert p not in holding, f"{worker}: told partition {p} is ours twice"
            holding[p] = (int(m[2]), t)
        elif m := _RELEASED.fullmatch(message):
            p = int(m[1])
            assert p in holding, f"{worker}: released partition {p} it did not hold"
            epoch, since = holding.pop(p)
            out.append(Held(worker, p, epoch, since, t))
        elif message.startswith("lease database lost"):
            out += [Held(worker, p, e, since, t) for p, (e, since) in holding.items()]
            holding.clear()
    out += [Held(worker, p, e, since, until) for p, (e, since) in holding.items()]
    return out


def overlaps(held: Iterable[Held]) -> list[str]:
    """For each partition, every belief that began before an earlier one ended (two workers
    owning it at once), or at an epoch not above the earlier one's (each acquisition bumps
    it): one line each, none in a correct run."""
    by_partition: dict[int, list[Held]] = collections.defaultdict(list)
    for h in held:
        by_partition[h.partition].append(h)
    problems = []
    for p, beliefs in sorted(by_partition.items()):
        beliefs.sort(key=lambda h: h.start)
        for i, a in enumerate(beliefs):
            for b in beliefs[i + 1 :]:
                if b.start < a.end:
                    problems.append(
                        f"partition {p}: {b.worker} (epoch {b.epoch}) from {b.start:.3f},"
                        f" {a.worker} (epoch {a.epoch}) until {a.end:.3f}"
                    )
                if b.epoch <= a.epoch:
                    problems.append(
                        f"partition {p}: {b.worker} took epoch {b.epoch} after {a.worker}'s"
                        f" {a.epoch}"
                    )
    return problems
