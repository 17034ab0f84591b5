"""The worker in-process: a device added to the registry is consumed without a restart."""

from __future__ import annotations

import asyncio
import json
import time

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.topics import TopicScheme
from ingest.mqtt import BrokerURL
from ingest.partitions import PartitionMap
from ingest.worker import RecordingConsumer, Worker
from tests.cluster.catalogs import synthetic
from tests.servers import Process

pytestmark = pytest.mark.e2e


def publish(port: int, device: str, seq: int) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        body = json.dumps({"boot": "b1", "seq": seq})
        c.publish(f"cw/v1/{device}/status", body, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


async def stored(db: str) -> set[tuple[str, int]]:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        try:
            cur = await conn.execute("SELECT device, seq FROM ingest_records")
        except psycopg.errors.UndefinedTable:
            return set()
        return {(str(d), int(s)) for d, s in await cur.fetchall()}


async def test_a_device_added_at_run_time_is_consumed(broker: Process, pg_url: str) -> None:
    scheme = TopicScheme()
    pm = PartitionMap(synthetic(3), 4)
    worker = Worker(
        broker=BrokerURL.parse(broker.url),
        db=pg_url,
        partitions=pm,
        consumer_factory=lambda p, e: RecordingConsumer(pg_url, p, e, "w", scheme),
        name="w",
        lease_timeout_s=2,
    )
    busy = {p for p in range(4) if pm.devices(p)}
    async with worker:
        deadline = time.monotonic() + 20
        while {p for p, r in worker.runs.items() if r.subscribed} != busy:
            assert time.monotonic() < deadline, "partitions not subscribed"
            await asyncio.sleep(0.05)
        p = worker.add_device("NEW-1", "st-0001")
        assert p == pm.of_station("st-0001")
        source = worker.runs[p].source
        assert source is not None
        assert "cw/v1/NEW-1/+" in source.subscriptions
        subacks = source.subacks
        deadline = time.monotonic() + 10
        while source.subacks == subacks:
            assert time.monotonic() < deadline, "NEW-1 not subscribed"
            await asyncio.sleep(0.02)
        await asyncio.to_thread(publish, broker.port, "NEW-1", 7)
        await asyncio.to_thread(publish, broker.port, "D0002x0", 3)
        deadline = time.monotonic() + 10
        while await stored(pg_url) != {("NEW-1", 7), ("D0002x0", 3)}:
            assert time.monotonic() < deadline, await stored(pg_url)
            await asyncio.sleep(0.1)
    assert worker.runs == {}
