"""The worker in-process with the real pipeline: a device added to the device registry
reaches its partition's owner by LISTEN/NOTIFY and is consumed without a restart; a worker
whose lease connection is terminated acknowledges nothing until it holds its partitions
again; a database behind the schema (never migrated, or by an older release) is refused by
``chargewatch ingest`` with what to run."""

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
from ingest.gmqtt_source import GmqttSource
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


def status(seq: int) -> str:
    """A contract v1 status of a 2-port pile."""
    ports = [{"n": 1, "state": "available"}, {"n": 2, "state": "charging"}]
    return json.dumps({"v": 1, "ts": time.time_ns() // 1_000_000, "boot": "boot-1", "seq": seq,
                       "kind": "pile", "ports": ports})  # fmt: skip


def publish(port: int, device: str, seq: int) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(f"cw/v1/{device}/status", status(seq), qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def stream(port: int, devices: list[str], count: int, rate: float) -> set[tuple[str, int]]:
    """``count`` QoS 1 statuses round-robin over ``devices``, ``rate`` per second: (device,
    seq) of each."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="stream", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        start, sent, infos = time.monotonic(), set(), []
        for i in range(count):
            device, seq = devices[i % len(devices)], i // len(devices)
            infos.append(c.publish(f"cw/v1/{device}/status", status(seq), qos=1))
            sent.add((device, seq))
            time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        for info in infos:
            info.wait_for_publish(10)
        return sent
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


async def test_a_worker_whose_lease_is_lost_acks_nothing_until_it_holds_again(
    broker: Process, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database stays up but the worker's lease connection is terminated (its locks go
    with it) mid-stream: the moment the worker notices, it acknowledges nothing more until
    it holds its partitions again (new epochs), and nothing is lost. Each acknowledgement is
    checked as it is made: ``GmqttSource.ack`` is wrapped (the real one runs, PUBACK
    included) to record whether the partition was the worker's then, by its current run's
    session."""
    catalog = synthetic(8)
    with in_process_worker(broker.url, pg_url, catalog) as w:
        worker, pm = w.worker, w.partitions
        session_of = {pm.client_id(p): p for p in range(4)}
        acks: list[int] = []  # partition of each PUBACK
        stray: list[str] = []
        real_ack = GmqttSource.ack

        def ack(source: GmqttSource, msg: Received) -> bool:
            p = session_of[source.client_id]
            run = worker.runs.get(p)
            owned = p in worker.leases.owned and run is not None and run.source is source
            done = real_ack(source, msg)
            if done:
                acks.append(p)
                if not owned:
                    stray.append(f"partition {p} acked, lease losses {worker.leases.losses}")
            return done

        monkeypatch.setattr(GmqttSource, "ack", ack)
        busy = {p for p in range(4) if pm.devices(p)}
        async with worker:

            async def subscribed() -> bool:
                return {p for p, r in worker.runs.items() if r.subscribed} == busy

            await until(subscribed, "partitions not subscribed", 20)
            devices = sorted(catalog.devices)
            sending = asyncio.create_task(
                asyncio.to_thread(stream, broker.port, devices, count=900, rate=300)
            )

            async def acking() -> bool:
                return len(acks) > 100

            await until(acking, "nothing acknowledged", 10)
            had = dict(worker.leases.owned)
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
                await conn.execute("SELECT pg_terminate_backend(%s)", (worker.leases.backend_pid,))

            async def noticed() -> bool:
                return worker.leases.losses == 1

            # within one health check and its timeout (the grace a next owner waits)
            await until(noticed, "the loss not noticed", worker.leases.config.grace_s + 0.3)
            assert not worker.runs
            acked_at_loss = len(acks)

            async def again() -> bool:
                owned = worker.leases.owned
                return owned.keys() == had.keys() and all(owned[p] > had[p] for p in had)

            await until(again, "the partitions not taken again", 10)
            assert stray == []  # nothing acknowledged from the loss to here
            sent = await sending

            async def all_stored() -> bool:
                return await stored(pg_url) == sent

            await until(all_stored, "not everything stored", 20)
        assert len(acks) > acked_at_loss  # acknowledging again once it held them
        assert stray == []  # nor by a session of before the loss


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
