"""What a written batch costs a worker, by batch size: ``python -m bench.batchcost [SIZES]``;
and what group commit saves: ``python -m bench.batchcost group [SIZE]``.

One partition's ``PipelineConsumer.store`` (decode, validate, twins, the fenced
``PostgresStore.write`` of history, twins and their NOTIFY in one transaction) in this
process, on a fresh PostgreSQL (``bench.pgserver``) and district-shaped messages of a
2,000-device catalog's partition 0, in batches of each size. Prints this process's CPU
(user + system, every thread) and PostgreSQL's per message and per batch. No alert engine
(it costs the same per message whatever the batch).

``group``: the 16 partitions' consumers of that catalog each store a batch of SIZE at the
same moment (as a worker's partitions fed live do), 20 times, once sharing one
``GroupCommit`` (one transaction for the 16 batches, the worker's way) and once each with its
own (a transaction each, concurrent), alternated twice, each on a fresh database.

Why: a worker fed live takes what arrived while its last batch was being written, so its
batches are as large as the arrival rate of one partition times the write's latency; a
second worker splits the partitions and writes sooner, so each batch is smaller. This is the
price of that (docs/benchmarks.md, the cluster section).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench import pgserver
from bench.workload import Stream, write_catalog
from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest.db import migrate
from ingest.group_commit import GroupCommit
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import PostgresStore

SIZES = (1, 5, 25, 100, 500)
MESSAGES = 6_000


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(
    work: Path, sizes: tuple[int, ...] = SIZES, messages: int = MESSAGES
) -> list[dict[str, float]]:
    catalog = Catalog.load(write_catalog(work / "catalog.json", 2_000))
    devices = PartitionMap(catalog, 16).devices(0)
    specs = [catalog.devices[d].spec for d in devices]
    out = []
    with pgserver.postgresql() as pg:
        db = pg.create_database("batchcost")
        migrate.upgrade(migrate.engine_url(db))
        store = PostgresStore(db)
        try:
            with store._engine.begin() as conn:  # partition 0 is ours, epoch 1: the fence holds
                conn.exec_driver_sql(
                    "INSERT INTO partition_leases (partition, epoch, owner, acquired_at)"
                    " VALUES (0, 1, 'batchcost', now())"
                )
            for size in sizes:
                now = time.time_ns() // 1_000_000
                stream = Stream(specs, seed=size, births=True).messages(messages + size, now)
                msgs = [Received(t, p, 1, False, i, now, 0) for i, (t, p) in enumerate(stream)]
                consumer = PipelineConsumer(
                    store=store, catalog=catalog, devices=devices, partition=0, epoch=1,
                    scheme=TopicScheme(), metrics=IngestMetrics(CollectorRegistry()),
                )  # fmt: skip
                await consumer.load()
                await consumer.store(msgs[:size])  # the births, and the connection warm
                cpu0, pg0 = _cpu_s(), pg.cpu_s()
                for i in range(size, len(msgs), size):
                    await consumer.store(msgs[i : i + size])
                cpu, pg_cpu = _cpu_s() - cpu0, pgserver.cpu_between(pg0, pg.cpu_s())
                n = len(msgs) - size
                out.append(
                    {
                        "batch": size,
                        "cpu_us_per_msg": cpu / n * 1e6,
                        "pg_cpu_us_per_msg": pg_cpu / n * 1e6,
                        "cpu_ms_per_batch": cpu / (n / size) * 1e3,
                    }
                )
        finally:
            store.close()
    return out


GROUP_ROUNDS = 20


async def _group_round(
    work: Path, pg: pgserver.PgBench, db: str, size: int, shared: bool
) -> dict[str, float]:
    """16 partitions' batches of ``size`` stored at once, ``GROUP_ROUNDS`` times."""
    migrate.upgrade(migrate.engine_url(db))
    catalog = Catalog.load(write_catalog(work / "catalog.json", 2_000))
    pm = PartitionMap(catalog, 16)
    store = PostgresStore(db)
    try:
        with store._engine.begin() as conn:  # every partition ours at epoch 1
            for p in range(16):
                conn.exec_driver_sql(
                    "INSERT INTO partition_leases (partition, epoch, owner, acquired_at)"
                    " VALUES (%s, 1, 'batchcost', now())",
                    (p,),
                )
        group = GroupCommit(store) if shared else None
        now = time.time_ns() // 1_000_000
        consumers, batches = [], []
        for p in range(16):
            devices = pm.devices(p)
            if not devices:
                continue
            consumer = PipelineConsumer(
                store=store, catalog=catalog, devices=devices, partition=p, epoch=1,
                scheme=TopicScheme(), metrics=IngestMetrics(CollectorRegistry()), group=group,
            )  # fmt: skip
            await consumer.load()
            consumers.append(consumer)
            specs = [catalog.devices[d].spec for d in devices]
            stream = Stream(specs, seed=p, births=True).messages(size * (GROUP_ROUNDS + 1), now)
            msgs = [Received(t, m, 1, False, i, now, 0) for i, (t, m) in enumerate(stream)]
            batches.append([msgs[i : i + size] for i in range(0, len(msgs), size)])

        async def round_(r: int) -> int:
            await asyncio.gather(*(c.store(b[r]) for c, b in zip(consumers, batches, strict=True)))
            return sum(len(b[r]) for b in batches)

        await round_(0)  # the births, and the connections warm
        cpu0, pg0 = _cpu_s(), pg.cpu_s()
        n = sum([await round_(r) for r in range(1, GROUP_ROUNDS + 1)])
        cpu, pg_cpu = _cpu_s() - cpu0, pgserver.cpu_between(pg0, pg.cpu_s())
        return {"cpu_us_per_msg": cpu / n * 1e6, "pg_cpu_us_per_msg": pg_cpu / n * 1e6}
    finally:
        store.close()


async def group(work: Path, size: int) -> list[tuple[str, dict[str, float]]]:
    out = []
    with pgserver.postgresql() as pg:
        for i, shared in enumerate((True, False, True, False)):
            (work / str(i)).mkdir()
            db = pg.create_database(f"group{i}")
            row = await _group_round(work / str(i), pg, db, size, shared)
            out.append(("one GroupCommit" if shared else "a transaction each", row))
    return out


def main(argv: list[str]) -> None:
    if argv[:1] == ["group"]:
        size = int(argv[1]) if len(argv) > 1 else 30
        with tempfile.TemporaryDirectory(prefix="cw-batchcost-") as tmp:
            grouped = asyncio.run(group(Path(tmp), size))
        print(f"16 partitions' batches of {size} at once, {GROUP_ROUNDS} times; CPU a message")
        print("| writes | worker us/msg | PostgreSQL us/msg | together |")
        print("| --- | ---: | ---: | ---: |")
        for name, r in grouped:
            cpu, pg = r["cpu_us_per_msg"], r["pg_cpu_us_per_msg"]
            print(f"| {name} | {cpu:.0f} | {pg:.0f} | {cpu + pg:.0f} |")
        return
    sizes = tuple(int(x) for x in argv[0].split(",")) if argv else SIZES
    with tempfile.TemporaryDirectory(prefix="cw-batchcost-") as tmp:
        rows = asyncio.run(measure(Path(tmp), sizes))
    print(f"{MESSAGES:,} messages a size; CPU of this process (a worker's) and PostgreSQL's")
    print("| batch | us/msg | + PostgreSQL us/msg | ms a batch |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['batch']:.0f} | {r['cpu_us_per_msg']:.0f} | {r['pg_cpu_us_per_msg']:.0f} |"
            f" {r['cpu_ms_per_batch']:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
