"""Devices outside the registry in the cluster (``ingest.unknown_devices``), against real
mosquitto and PostgreSQL: the owner of partition 0 watches the fleet's ``state`` topic and
keeps a device it does not know as a dead letter ``unknown_device``, counted as ``serve``
counts it; a registered device's birth is no dead letter; a retained birth replayed on the
next subscribe is not kept twice."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import generate_latest

from devices.catalog import Catalog
from ingest.metrics import IngestMetrics
from ingest.mqtt import BrokerURL
from ingest.unknown_devices import WATCH_PARTITION, UnknownDevices
from tests.cluster.catalogs import synthetic
from tests.cluster.workers import in_process_worker
from tests.mqttclients import Client
from tests.servers import Process

pytestmark = pytest.mark.e2e


def birth(device: str) -> bytes:
    body = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": "boot-1", "seq": 0,
            "online": True, "kind": "pile", "ports": 2, "heartbeat_s": 60}  # fmt: skip
    return json.dumps(body).encode()


def publish_births(port: int, *devices: str) -> None:
    """Retained births, as devices send them right after connecting (protocol v1)."""
    c = Client(port, client_id="births")
    assert not c.connect().is_failure
    try:
        for d in devices:
            c.publish(f"cw/v1/{d}/state", birth(d), retain=True)
    finally:
        c.close()


async def until(check: Callable[[], Awaitable[bool] | bool], what: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while True:
        got = check()
        if await got if isinstance(got, Awaitable) else got:
            return
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def counted(metrics: IngestMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "chargewatch_dead_letters_total", {"reason": "unknown_device"}
    )
    return value or 0.0


async def test_a_worker_keeps_a_device_outside_the_registry_as_a_dead_letter(
    broker: Process, pg_url: str
) -> None:
    catalog = synthetic(3)
    with in_process_worker(broker.url, pg_url, catalog) as w:
        worker, store, scheme, metrics = w.worker, w.store, w.scheme, w.metrics
        url = BrokerURL.parse(broker.url)

        def known() -> Catalog | None:
            return worker.catalog

        watcher = UnknownDevices(
            broker=url, client_id="cw-ingest-unknown", scheme=scheme, catalog=known,
            store=store, metrics=metrics,
        )  # fmt: skip
        worker.unknown = watcher.run
        async with worker:
            await until(lambda: watcher.subscribed, "the watcher did not subscribe")
            assert WATCH_PARTITION in worker.leases.owned  # run by partition 0's owner
            await asyncio.to_thread(publish_births, broker.port, "GHOST-1", "D0001x0")

            async def ghost_kept() -> bool:
                dead = await asyncio.to_thread(store.dead_letters)
                return [d.reason for d in dead] == ["unknown_device"]

            await until(ghost_kept, "no dead letter for GHOST-1")
            (dead,) = store.dead_letters()
            assert dead.topic == "cw/v1/GHOST-1/state"
            assert "'GHOST-1' is not in the registry" in dead.detail
            await until(lambda: watcher.seen == 2, "both births not seen")  # D0001x0: no letter
            assert counted(metrics) == 1
            assert b'chargewatch_dead_letters_total{reason="unknown_device"} 1.0' in (
                generate_latest(metrics.registry)
            )
        assert worker._unknown_task is None  # stopped with partition 0
        # a new watcher (the next owner of partition 0): the broker replays the retained
        # birth on its subscribe, and the store recognises it
        again = UnknownDevices(
            broker=url, client_id="cw-ingest-unknown", scheme=scheme, catalog=lambda: catalog,
            store=store, metrics=metrics,
        )  # fmt: skip
        task = asyncio.create_task(again.run())
        await until(lambda: again.seen >= 2, "the retained births not replayed")
        await until(lambda: store.retained_repeats >= 1, "the replay not recognised")
        assert len(await asyncio.to_thread(store.dead_letters)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
