"""Disk use and the time-to-full projection: an injected clock and injected sizes for the
arithmetic, the real file system for the measurement, the real alert engine for the alert."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from ingest.alerts.model import Key
from ingest.diskusage import DAY_S, DiskSample, DiskWatch, measure, slope
from tests.alerts.helpers import Clock, running

GIB = 1 << 30


class Disk:
    """A disk whose free space the test sets; the clock is the test's too."""

    def __init__(self, free: int, size: int = 100 * GIB) -> None:
        self.free, self.size, self.used, self.now = free, size, 0, 1_000_000.0

    def __call__(self, data_dir: Path, at_s: float) -> DiskSample:
        return DiskSample(at_s, self.used, self.free, self.size)

    def clock(self) -> float:
        return self.now


def _watch(disk: Disk, **options: float) -> DiskWatch:
    return DiskWatch(
        "/nowhere", measure=disk, clock=disk.clock, registry=CollectorRegistry(), **options
    )


def _fill(watch: DiskWatch, disk: Disk, *, hours: int, gib_per_day: float) -> None:
    for _ in range(hours + 1):
        watch.sample()
        disk.now += 3600
        disk.free -= int(gib_per_day * GIB / 24)
        disk.used += int(gib_per_day * GIB / 24)


def test_slope_is_least_squares() -> None:
    assert slope([(0, 10), (1, 12), (2, 14)]) == 2
    assert slope([(0, 0), (1, 3), (2, 2), (3, 5)]) == 1.4
    assert slope([(5, 1)]) is None
    assert slope([(5, 1), (5, 2)]) is None


def test_a_disk_filling_at_one_gib_a_day_is_full_in_its_free_gib_days() -> None:
    disk = Disk(free=3 * GIB)
    watch = _watch(disk, window_s=6 * 3600, warn_days=7)
    _fill(watch, disk, hours=6, gib_per_day=1.0)
    left = watch.full_in_s()
    assert left is not None
    assert abs(left / DAY_S - watch.samples[-1].free_bytes / GIB) < 0.01  # ~2.75 days
    problem = watch.problem()
    assert problem is not None
    assert "full in 2.8 days" in problem
    assert "1.0 GiB/day" in problem
    growth = watch.dir_growth()
    assert growth is not None
    assert abs(growth * DAY_S / GIB - 1.0) < 0.01


def test_no_warning_while_the_projection_is_further_than_the_threshold() -> None:
    disk = Disk(free=30 * GIB)
    watch = _watch(disk, window_s=6 * 3600, warn_days=7)
    _fill(watch, disk, hours=6, gib_per_day=1.0)
    left = watch.full_in_s()
    assert left is not None
    assert 29 < left / DAY_S < 30
    assert watch.problem() is None
    watch.warn_days = 40  # the option moves the line
    assert watch.problem() is not None


def test_nothing_is_projected_before_a_tenth_of_the_window_is_measured() -> None:
    disk = Disk(free=GIB)
    watch = _watch(disk, window_s=10 * 3600)
    for _ in range(3):  # three samples over two minutes: a burst, not a trend
        watch.sample()
        disk.now += 60
        disk.free -= GIB // 10
    assert watch.full_in_s() is None
    assert watch.problem() is None
    disk.now += 3600
    disk.free -= GIB // 2
    watch.sample()
    assert watch.full_in_s() is not None
    assert watch.problem() is not None


def test_a_disk_that_does_not_shrink_is_never_full_and_old_samples_leave_the_window() -> None:
    disk = Disk(free=GIB)
    watch = _watch(disk, window_s=3 * 3600)
    _fill(watch, disk, hours=5, gib_per_day=1.0)
    assert len(watch.samples) == 4  # 3 hours of hourly samples, both ends included
    for _ in range(4):  # then space is freed: retention ran
        disk.now += 3600
        disk.free += GIB // 10
        watch.sample()
    assert watch.full_in_s() == math.inf
    assert watch.problem() is None


def test_metrics_come_from_the_last_sample() -> None:
    disk = Disk(free=3 * GIB)
    watch = _watch(disk, window_s=6 * 3600)
    registry = CollectorRegistry()
    registry.register(watch)
    assert b"chargewatch_disk_free_bytes" not in generate_latest(registry)  # nothing measured
    _fill(watch, disk, hours=6, gib_per_day=1.0)
    text = generate_latest(registry).decode()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    last = watch.samples[-1]
    assert values["chargewatch_disk_free_bytes"] == last.free_bytes
    assert values["chargewatch_disk_size_bytes"] == 100 * GIB
    assert values["chargewatch_data_dir_bytes"] == last.dir_bytes
    assert abs(values["chargewatch_disk_full_in_seconds"] / DAY_S - 2.75) < 0.01
    assert abs(values["chargewatch_data_dir_growth_bytes_per_second"] * DAY_S / GIB - 1) < 0.01


def test_measure_sees_the_files_of_the_real_data_dir(tmp_path: Path) -> None:
    before = measure(tmp_path, 0.0)
    (tmp_path / "chargewatch.db").write_bytes(b"\x01" * (1 << 20))
    after = measure(tmp_path, 1.0)
    assert after.dir_bytes - before.dir_bytes >= 1 << 20
    assert 0 < after.free_bytes <= after.size_bytes
    assert measure(tmp_path / "not-yet", 2.0).dir_bytes == 0  # before serve made it


async def test_the_engine_warns_while_the_disk_is_projected_full_and_clears_after(
    tmp_path: Path,
) -> None:
    disk = Disk(free=2 * GIB)
    watch = _watch(disk, window_s=6 * 3600, warn_days=7)
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        engine.disk_check = watch.problem
        engine.tick()
        assert not engine.open  # nothing measured yet
        _fill(watch, disk, hours=6, gib_per_day=0.5)
        engine.tick()
        key = Key("service", None, None, "disk_filling", "disk_filling")
        alert = engine.open[key]
        assert (alert.severity, alert.rule) == ("warning", "disk_filling")
        assert alert.info is not None
        assert "full in 3.8 days" in alert.info
        for _ in range(7):  # retention freed space: no longer filling
            disk.now += 3600
            disk.free += GIB
            watch.sample()
        engine.tick()
        clock.advance(61)  # the verification window
        engine.tick()
        assert key not in engine.open


async def test_the_periodic_task_outlives_a_measurement_that_fails(tmp_path: Path) -> None:
    calls: list[float] = []

    def flaky(data_dir: Path, at_s: float) -> DiskSample:
        calls.append(at_s)
        if len(calls) == 1:
            raise FileNotFoundError("the data dir's file system went away")
        return DiskSample(at_s, 1, 2, 3)

    watch = DiskWatch(tmp_path, check_s=0.01, measure=flaky)
    task = asyncio.create_task(watch.run())
    try:
        async with asyncio.timeout(5):
            while not watch.samples:  # noqa: ASYNC110 - bounded by the timeout
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert len(calls) >= 2
    assert watch.samples[-1].free_bytes == 2
