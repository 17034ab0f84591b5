"""The partition consumer against real PostgreSQL (and influxd 1.6.7 for ``--history``):
a batch is written under the fence, a stale owner's batch is refused with nothing stored,
and a new owner continues from the stored twins (a redelivery is a duplicate)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest.influx import InfluxHistory
from ingest.leases import StaleLease
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import PostgresStore
from ingest.store import HistoryStore
from tests.cluster.leasecheck import lease
from tests.influx_servers import influxd
from tests.servers import eventually

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
P = next(p for p in range(16) if PM.devices(p))
DEVICE = PM.devices(P)[0]


def status(seq: int) -> Received:
    units = CATALOG.devices[DEVICE].spec.units
    kind = CATALOG.devices[DEVICE].kind
    listed = (
        [{"n": n, "state": "available"} for n in range(1, units + 1)]
        if kind == "pile"
        else [{"n": n, "state": "ready", "soc": 95} for n in range(1, units + 1)]
    )
    now = time.time_ns() // 1_000_000
    body = {"v": 1, "ts": now, "boot": "boot-1", "seq": seq, "kind": kind,
            "ports" if kind == "pile" else "slots": listed}  # fmt: skip
    return Received(f"cw/v1/{DEVICE}/status", json.dumps(body).encode(), 1, False, seq, now, 0)


def consumer(
    store: PostgresStore, epoch: int, history: HistoryStore | None = None
) -> PipelineConsumer:
    return PipelineConsumer(store=store, catalog=CATALOG, devices=PM.devices(P), partition=P,
                            epoch=epoch, scheme=TopicScheme(), metrics=IngestMetrics(),
                            history=history)  # fmt: skip


async def test_fenced_writes_and_the_next_owner_continues(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    try:
        lease(pg_url, P, 1)
        first = consumer(store, 1)
        await first.load()
        await first.store([status(1), status(2)])
        lease(pg_url, P, 2)  # the partition moved
        with pytest.raises(StaleLease):
            await first.store([status(3)])
        assert [m["seq"] for m in store.messages(DEVICE)] == [1, 2]  # 3 refused: not stored
        second = consumer(store, 2)
        await second.load()
        assert second.restored == 1
        await second.store([status(2), status(3)])  # 2 again: the broker redelivers
        assert second.twins[DEVICE].duplicates == 1
        assert [m["seq"] for m in store.messages(DEVICE)] == [1, 2, 3]
        assert store.load_twins([DEVICE])[0]["status_seq"] == 3
    finally:
        store.close()


async def test_history_in_influxdb_state_in_postgresql(pg_url: str, tmp_path: Path) -> None:
    store = PostgresStore(pg_url)
    with influxd(tmp_path / "influxd") as server:
        history = InfluxHistory(f"influx1://127.0.0.1:{server.port}?db=cw", retry_s=2)
        history.create_database()  # as an operator does for serve --history
        try:
            lease(pg_url, P, 1)
            c = consumer(store, 1, history)
            await c.load()
            await c.store([status(5)])

            def in_influx() -> None:
                assert [m["seq"] for m in history.messages(DEVICE)] == [5]

            eventually(in_influx, timeout=10)
            assert store.messages(DEVICE) == []  # not in PostgreSQL's history
            assert store.load_twins([DEVICE])[0]["status_seq"] == 5
        finally:
            history.close()
            store.close()
