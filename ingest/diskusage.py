"""Disk use of the data dir, the free space of its file system, and when that runs out.

A full disk does not lose data (the store's writes fail, nothing is acknowledged, the broker
keeps the rest: docs/operations.md), but it stops the service. So the service measures how
fast free space shrinks and warns days before: ``DiskWatch.sample`` every ``check_s``
(blocking: ``stat`` and ``statvfs``, run in a thread), the slope of free space over the
last ``window_s`` by least squares, and ``problem()`` for the alert engine when the
projected time to full is under ``warn_days``. Free space, not only our file's growth:
whatever fills the disk (the history, logs, a neighbour) stops the store all the same.

Metrics (collected from the last sample, nothing blocks at scrape time)::

    chargewatch_data_dir_bytes              the store's files (database, WAL, shared memory)
    chargewatch_data_dir_growth_bytes_per_second   their growth over the window
    chargewatch_disk_free_bytes             free for us on the data dir's file system
    chargewatch_disk_size_bytes             its size
    chargewatch_disk_full_in_seconds        projected time to full (+Inf: not filling)
    chargewatch_history_disk_bytes          InfluxDB history's shards on its own disk (1.x);
                                            the embedded history is in the data dir
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class DiskSample:
    at_s: float
    dir_bytes: int  # the data dir's files
    free_bytes: int  # available to an unprivileged writer (statvfs f_bavail)
    size_bytes: int


def measure(data_dir: Path, at_s: float) -> DiskSample:
    """One sample of the real data dir (blocking)."""
    used = 0
    try:
        entries = list(os.scandir(data_dir))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False):
                used += entry.stat(follow_symlinks=False).st_blocks * 512  # what the disk holds
        except FileNotFoundError:
            continue  # a WAL removed meanwhile
    st = os.statvfs(data_dir if data_dir.exists() else data_dir.parent)
    return DiskSample(at_s, used, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (per second); None for fewer than two x values."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


class DiskWatch(Collector):
    def __init__(
        self,
        data_dir: str | Path,
        *,
        check_s: float = 60.0,
        window_s: float = 6 * 3600.0,
        warn_days: float = 7.0,
        clock: Callable[[], float] = time.time,
        measure: Callable[[Path, float], DiskSample] = measure,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.check_s = check_s
        self.window_s = window_s
        # no projection before a tenth of the window is measured: one minute of a batch
        # landing is not a trend
        self.min_span_s = window_s / 10
        self.warn_days = warn_days
        self.clock = clock
        self._measure = measure
        self.samples: deque[DiskSample] = deque()
        # the history's size where it lives elsewhere (InfluxHistory.disk_bytes), blocking
        self.history_bytes: Callable[[], int | None] | None = None
        self.history_last: int | None = None
        if registry is not None:
            registry.register(self)

    def sample(self) -> DiskSample:
        """Measure now (blocking) and keep the sample for the window."""
        s = self._measure(self.data_dir, self.clock())
        if self.history_bytes is not None:
            self.history_last = self.history_bytes()
        self.samples.append(s)
        while self.samples and self.samples[0].at_s < s.at_s - self.window_s:
            self.samples.popleft()
        return s

    async def run(self) -> None:
        """The periodic task (supervised by the service)."""
        while True:
            try:
                await asyncio.to_thread(self.sample)
            except OSError as exc:  # the dir replaced under us, a file system gone: say so, go on
                log.warning("cannot measure the disk of %s: %s", self.data_dir, exc)
            await asyncio.sleep(self.check_s)

    def _measured(self) -> bool:
        return len(self.samples) >= 3 and (
            self.samples[-1].at_s - self.samples[0].at_s >= self.min_span_s
        )

    def dir_growth(self) -> float | None:
        """The data dir's growth, bytes per second, over the window (None: not measured yet)."""
        if not self._measured():
            return None
        return slope([(s.at_s, s.dir_bytes) for s in self.samples])

    def full_in_s(self) -> float | None:
        """Seconds until free space runs out at the rate it shrank over the window: +inf
        while it does not shrink, None before the window says anything."""
        if not self._measured():
            return None
        rate = slope([(s.at_s, s.free_bytes) for s in self.samples])
        if rate is None or rate >= 0:
            return math.inf
        return self.samples[-1].free_bytes / -rate

    def problem(self, now_ms: int | None = None) -> str | None:
        """For the alert engine: what to warn about, or None."""
        left = self.full_in_s()
        if left is None or left >= self.warn_days * DAY_S:
            return None
        last = self.samples[-1]
        rate = (last.free_bytes / left) if left > 0 else 0.0
        return (
            f"the disk of {self.data_dir} is full in {left / DAY_S:.1f} days at the measured"
            f" rate ({_size(rate * DAY_S)}/day; {_size(last.free_bytes)} free of"
            f" {_size(last.size_bytes)}, the data dir holds {_size(last.dir_bytes)})"
        )

    def collect(self) -> Iterator[Metric]:
        if self.history_last is not None:
            yield GaugeMetricFamily(
                "chargewatch_history_disk_bytes",
                "Bytes the history's InfluxDB database takes on InfluxDB's disk (1.x shards)",
                value=self.history_last,
            )
        if not self.samples:
            return
        last = self.samples[-1]
        yield GaugeMetricFamily(
            "chargewatch_data_dir_bytes",
            "Bytes the data dir's files take on disk (database, WAL, shared memory)",
            value=last.dir_bytes,
        )
        yield GaugeMetricFamily(
            "chargewatch_disk_free_bytes",
            "Bytes free on the data dir's file system",
            value=last.free_bytes,
        )
        yield GaugeMetricFamily(
            "chargewatch_disk_size_bytes",
            "Size of the data dir's file system",
            value=last.size_bytes,
        )
        growth = self.dir_growth()
        if growth is not None:
            yield GaugeMetricFamily(
                "chargewatch_data_dir_growth_bytes_per_second",
                "Growth of the data dir over the measurement window",
                value=growth,
            )
        left = self.full_in_s()
        if left is not None:
            yield GaugeMetricFamily(
                "chargewatch_disk_full_in_seconds",
                "Projected seconds until the data dir's file system is full (+Inf: not filling)",
                value=left,
            )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1023.95:  # not "1024.0 MiB"
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
