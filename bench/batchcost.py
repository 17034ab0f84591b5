"""What a written batch costs a worker, by batch size: ``python -m bench.batchcost [SIZES]``.

One partition's ``PipelineConsumer.store`` (decode, validate, twins, the fenced
``PostgresStore.write`` of history, twins and their NOTIFY in one transaction) in this
process, on a fresh PostgreSQL (``bench.pgserver``) and district-shaped messages of a
2,000-device catalog's partition 0, in batches of each size. Prints this process's CPU
(user + system, every thread) and PostgreSQL's per message and per batch. No alert engine
(it costs the same per message whatever the batch).

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


def main(argv: list[str]) -> None:
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
