"""Group commit (``ingest.group_commit``) against real PostgreSQL: the batches of a worker's
partitions that are ready together share one transaction, each under its own fence; a stale
partition's batch is refused alone, and a batch the database refuses fails alone."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest import StoreError
from ingest.group_commit import GroupCommit
from ingest.leases import StaleLease
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import Part, PostgresStore
from ingest.store import TwinRecord
from tests.cluster.leasecheck import lease

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
A, B, C = [p for p in range(16) if PM.devices(p)][:3]


def status(partition: int, seq: int) -> Received:
    device = PM.devices(partition)[0]
    spec = CATALOG.devices[device]
    units = (
        [{"n": n, "state": "available"} for n in range(1, spec.spec.units + 1)]
        if spec.kind == "pile"
        else [{"n": n, "state": "ready", "soc": 95} for n in range(1, spec.spec.units + 1)]
    )
    now = time.time_ns() // 1_000_000
    body = {"v": 1, "ts": now, "boot": "boot-1", "seq": seq, "kind": spec.kind,
            "ports" if spec.kind == "pile" else "slots": units}  # fmt: skip
    return Received(f"cw/v1/{device}/status", json.dumps(body).encode(), 1, False, seq, now, 0)


async def consumers(
    store: PostgresStore, group: GroupCommit, *partitions: int
) -> list[PipelineConsumer]:
    out = []
    for p in partitions:
        c = PipelineConsumer(store=store, catalog=CATALOG, devices=PM.devices(p), partition=p,
                             epoch=1, scheme=TopicScheme(), metrics=IngestMetrics(), group=group)  # fmt: skip
        await c.load()
        out.append(c)
    return out


def seqs(store: PostgresStore, partition: int) -> list[int]:
    return [m["seq"] for m in store.messages(PM.devices(partition)[0])]


async def test_ready_batches_share_one_transaction(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        for p in (A, B, C):
            lease(pg_url, p, 1)
        group = GroupCommit(store)
        a, b, c = await consumers(store, group, A, B, C)
        await asyncio.gather(a.store([status(A, 1)]), b.store([status(B, 1)]))
        assert group.transactions == 1  # both were waiting when the transaction began
        await c.store([status(C, 1)])  # alone: written at once, nothing waits on purpose
        assert group.transactions == 2
        assert [seqs(store, p) for p in (A, B, C)] == [[1], [1], [1]]
    finally:
        store.close()


async def test_a_stale_partition_is_refused_alone(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        lease(pg_url, A, 1)
        lease(pg_url, B, 1)
        group = GroupCommit(store)
        a, b = await consumers(store, group, A, B)
        lease(pg_url, A, 2)  # A moved to another worker: this one's epoch 1 is stale
        stale, fine = await asyncio.gather(
            a.store([status(A, 1)]), b.store([status(B, 1)]), return_exceptions=True
        )
        assert isinstance(stale, StaleLease)
        assert f"partition {A}" in str(stale)
        assert fine is None
        assert group.transactions == 1  # B's batch committed in the same transaction
        assert seqs(store, A) == []
        assert seqs(store, B) == [1]
    finally:
        store.close()


async def test_a_batch_the_database_refuses_fails_alone(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        lease(pg_url, A, 1)
        lease(pg_url, B, 1)
        group = GroupCommit(store)
        device_a, device_b = PM.devices(A)[0], PM.devices(B)[0]
        bad = Part(
            (A, 1), (), [TwinRecord(device_a, b'{"id": "\\u0000"}\x00')], ()
        )  # NUL: text refuses it
        good = Part((B, 1), (), [TwinRecord(device_b, b'{"id": "%s"}' % device_b.encode())], ())
        refused, fine = await asyncio.gather(
            group.write(bad), group.write(good), return_exceptions=True
        )
        assert isinstance(refused, StoreError), refused
        assert fine is None  # tried again alone after the shared transaction failed
        assert [r["id"] for r in store.load_twins([device_a, device_b])] == [device_b]
    finally:
        store.close()
