"""The worker in-process with the real pipeline: a device added to the device registry
reaches its partition's owner by LISTEN/NOTIFY and is consumed without a restart; a database
behind the schema (never migrated, or by an older release) is refused by ``chargewatch
ingest`` with what to run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import DeviceSpec
from devices.topics import TopicScheme
from ingest.db import migrate, registry
from ingest.metrics import IngestMetrics
from ingest.mqtt import BrokerURL, Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import PostgresStore
from ingest.worker import Worker, follow_registry
from tests.cluster.catalogs import synthetic
from tests.cluster.processes import new_database
from tests.cluster.workers import in_process_worker
from tests.db.older import contents, migrated_behind
from tests.pg_server import PgServer
from tests.servers import Process

pytestmark = pytest.mark.e2e


def publish(port: int, device: str, seq: int) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        ports = [{"n": 1, "state": "available"}, {"n": 2, "state": "charging"}]
        body = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": "boot-1", "seq": seq,
                "kind": "pile", "ports": ports}  # fmt: skip
        c.publish(f"cw/v1/{device}/status", json.dumps(body), qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


async def stored(db: str) -> set[tuple[str, int]]:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        cur = await conn.execute("SELECT device_id, seq FROM messages WHERE type = 'status'")
        return {(str(d), int(s)) for d, s in await cur.fetchall()}


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_device_added_to_the_registry_is_consumed_without_a_restart(
    broker: Process, pg_url: str
) -> None:
    with in_process_worker(broker.url, pg_url, synthetic(3)) as w:
        worker, store, pm = w.worker, w.store, w.partitions
        busy = {p for p in range(4) if pm.devices(p)}
        async with worker:
            follow = asyncio.create_task(follow_registry(worker, pg_url, w.registry))

            async def subscribed() -> bool:
                return {p for p, r in worker.runs.items() if r.subscribed} == busy

            await until(subscribed, "partitions not subscribed", 20)
            # what the rules watch (ChargewatchPartitionUnowned and others, deploy/prometheus)
            values = worker.metrics.registry.get_sample_value
            for q in range(4):
                labels = {"partition": str(q)}
                assert values("chargewatch_ingest_partition_owned", labels) == 1
                assert values("chargewatch_ingest_partition_devices", labels) == len(pm.devices(q))
            assert values("chargewatch_ingest_lease_database_up") == 1
            p = pm.of_station("st-0001")
            before = len(pm.devices(p))
            source = worker.runs[p].source
            assert source is not None
            subacks = source.subacks
            assert pm.of_device("NEW-1") is None
            with w.engine.begin() as conn:  # another process would do the same
                registry.add_device(conn, "st-0001", DeviceSpec(id="NEW-1", kind="pile", ports=2))

            async def noticed() -> bool:
                return source.subacks > subacks

            await until(noticed, "NEW-1 not subscribed")
            assert pm.of_device("NEW-1") == p
            devices = values("chargewatch_ingest_partition_devices", {"partition": str(p)})
            assert devices == len(pm.devices(p)) == before + 1
            assert "cw/v1/NEW-1/+" in source.subscriptions
            await asyncio.to_thread(publish, broker.port, "NEW-1", 7)
            await asyncio.to_thread(publish, broker.port, "D0002x0", 3)

            async def both() -> bool:
                return await stored(pg_url) == {("NEW-1", 7), ("D0002x0", 3)}

            await until(both, "not stored")
            twins = {t["device_id"]: t for t in store.load_twins(["NEW-1"])}
            assert twins["NEW-1"]["status_seq"] == 7
            assert twins["NEW-1"]["station_id"] == "st-0001"
            assert store.dead_letters() == []
            follow.cancel()
        assert worker.runs == {}
        assert values("chargewatch_ingest_partition_owned", {"partition": "0"}) == 0
        assert values("chargewatch_ingest_lease_database_up") == 0


def test_ingest_refuses_a_database_behind_its_schema(pg_session: PgServer) -> None:
    """Never migrated (``--db``) and one migration behind, as the release before left it
    (named by ``CHARGEWATCH_DB``), the two at once: each refused with what to run, and
    nothing written (a worker seeds an empty registry once past the check)."""
    never = pg_session.create_database("t_ingest_behind")
    older = new_database(pg_session, "ingest_older")
    revision = migrated_behind(older)
    before = {url: contents(url) for url in (never, older)}
    argv = [sys.executable, "-m", "api.cli", "ingest", "--broker", "mqtt://127.0.0.1:1"]

    def refused(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})  # fmt: skip

    with ThreadPoolExecutor(2) as pool:
        runs = pool.map(refused, [["--db", never], []], [{}, {"CHARGEWATCH_DB": older}])
        for url, rev, out in zip(
            (never, older), ("none (never migrated)", revision), runs, strict=True
        ):
            assert out.returncode == 1, out.stdout + out.stderr
            assert (
                f"chargewatch ingest: database {url} is at revision {rev}, this chargewatch"
                f" needs {migrate.head()}: run `chargewatch db upgrade --db {url}`"
            ) in out.stdout
            assert contents(url) == before[url]


async def test_a_partition_whose_consumer_hits_a_bug_is_retried_and_counted(
    broker: Process, pg_url: str
) -> None:
    """A partition's run is a task of its own: an exception nobody expected (a bug, not an
    outage) once ended it silently, the lease still held and nothing consumed again. Now
    it is logged with its traceback, counted, and the partition's session starts again."""
    catalog = synthetic(1)
    store = PostgresStore(pg_url)
    scheme = TopicScheme()
    pm = PartitionMap(catalog, 1)
    metrics = IngestMetrics()
    bugs = [RuntimeError("a bug in the consumer")]

    class Buggy(PipelineConsumer):
        async def store(self, batch: list[Received]) -> None:
            if bugs:
                raise bugs.pop()
            await super().store(batch)

    def consumer(p: int, epoch: int) -> PipelineConsumer:
        return Buggy(store=store, catalog=catalog, devices=pm.devices(p), partition=p,
                     epoch=epoch, scheme=scheme, metrics=metrics)  # fmt: skip

    worker = Worker(broker=BrokerURL.parse(broker.url), db=pg_url, partitions=pm,
                    consumer_factory=consumer, name="w", lease_timeout_s=2, catalog=catalog)  # fmt: skip
    device = next(iter(pm.devices(0)))
    try:
        async with worker:

            async def subscribed() -> bool:
                return bool(worker.runs) and worker.runs[0].subscribed

            await until(subscribed, "partition not subscribed", 20)
            await asyncio.to_thread(publish, broker.port, device, 1)

            async def kept() -> bool:
                return await stored(pg_url) == {(device, 1)}

            await until(kept, "the message is never stored after the consumer's bug", 20)
            assert not bugs
            assert worker.metrics.partition_failures.labels("bug")._value.get() == 1
    finally:
        store.close()
