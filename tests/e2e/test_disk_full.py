"""A full disk under a running `chargewatch serve`: the data dir on a small tmpfs, a stream of
statuses through real mosquitto. The service warns as the disk fills, stops acknowledging
when it is full (nothing lost: the broker keeps the rest), and catches up, without loss,
once the tmpfs is grown. Needs root to mount (CI runs as root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.alerts.keys import maintainer_get, maintainer_key
from tests.e2e.test_ingest_faults import Stream, assert_stored_exactly
from tests.e2e.test_selfmonitoring import samples
from tests.servers import Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs here: {mounted.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def _full(service: Service) -> None:
    values = samples(service)
    assert values["chargewatch_store_healthy"] == 0
    problems = service.get("/readyz").json()["problems"]
    assert any("store writes are failing" in p for p in problems), problems


def _acked(service: Service) -> float:
    return samples(service)["chargewatch_messages_acked_total"]


def test_a_full_disk_stops_acknowledging_warns_first_and_recovers_without_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # measure the disk five times a second over a 3 s window, warn 7 days ahead (default)
    monkeypatch.setenv("CHARGEWATCH_INGEST__DISK_CHECK_S", "0.2")
    monkeypatch.setenv("CHARGEWATCH_INGEST__DISK_GROWTH_WINDOW_S", "3")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S", "0")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__VERIFY_S", "3600")  # stays visible
    with (
        tmpfs(tmp_path / "small", "8m") as small,
        mosquitto(tmp_path / "mosquitto") as broker,
        chargewatch_serve(tmp_path / "serve", broker.url, data_dir=small / "data") as service,
    ):
        maintainer_key(service.data_dir)  # while there is room for it
        stream = Stream(broker.port, rate=500)
        stream.start(count=8_000)

        def warned() -> None:
            left = samples(service).get("chargewatch_disk_full_in_seconds")
            assert left is not None
            assert left < 7 * 86_400

        eventually(warned, timeout=30, interval=0.1)
        eventually(lambda: _full(service), timeout=60, interval=0.2)
        stuck = _acked(service)
        # full: nothing more is acknowledged while the stream goes on
        eventually(lambda: _assert_sent_beyond(stream, stuck + 1000), timeout=20)
        assert _acked(service) == stuck
        assert samples(service)["chargewatch_disk_free_bytes"] < 256 * 1024

        grow(small, "64m")  # space returns
        eventually(lambda: _healthy(service), timeout=60, interval=0.2)
        acked = stream.finish()
        assert_stored_exactly(service, acked)
        alerts = maintainer_get(service, "/v1/alerts", rule="disk_filling").json()["alerts"]
        assert [(a["rule"], a["severity"]) for a in alerts] == [("disk_filling", "warning")]
        assert "full in" in alerts[0]["info"]


def _assert_sent_beyond(stream: Stream, count: float) -> None:
    assert stream.sent >= count


def _healthy(service: Service) -> None:
    assert samples(service)["chargewatch_store_healthy"] == 1
    assert service.get("/readyz").status_code == 200
