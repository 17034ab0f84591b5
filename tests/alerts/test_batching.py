"""Alert rules see each message with its device as that message left it, whatever else
arrived in the same batch: a fault raised by an event and then repeated by the next
snapshot is one alert with count 1, batched or not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from devices.topics import TopicScheme
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.pipeline import Batch, Pipeline, Twins
from ingest.sqlite_store import SQLiteStore
from tests.alerts.helpers import CATALOG, Clock, active, running

PILE = "WGS-P01"


def received(seq: int, channel: str, body: dict[str, Any], now: int) -> Received:
    payload = {"v": 1, "ts": now, "boot": "bat1", "seq": seq, **body}
    return Received(f"cw/v1/{PILE}/{channel}", json.dumps(payload).encode(), 1, False, seq, now, 1)


def ports(faulted: int | None = None) -> list[dict[str, Any]]:
    return [
        {"n": n, "state": "faulted", "fault": "over_current"}
        if n == faulted
        else {"n": n, "state": "available"}
        for n in range(1, 11)
    ]


async def test_a_fault_and_its_snapshot_in_one_batch_make_one_alert(tmp_path: Path) -> None:
    clock = Clock()
    twins = Twins(CATALOG)
    store = SQLiteStore(tmp_path / "history.db")
    pipeline = Pipeline(
        catalog=CATALOG,
        scheme=TopicScheme(),
        twins=twins,
        history=store,
        state=store,
        metrics=IngestMetrics(),
        ack=lambda r: True,
    )
    try:
        async with running(tmp_path, clock, twins=twins) as engine:
            pipeline.observers.append(engine.observe)
            now = clock()
            messages = [
                received(0, "state", {"online": True, "kind": "pile", "ports": 10}, now),
                received(1, "status", {"kind": "pile", "ports": ports()}, now),
                received(
                    2, "event", {"type": "fault_raised", "code": "over_current", "port": 3}, now
                ),
                received(3, "status", {"kind": "pile", "ports": ports(faulted=3)}, now),
                received(4, "status", {"kind": "pile", "ports": ports(faulted=3)}, now + 1),
            ]
            batch = Batch()
            for r in messages:  # one batch: every twin change happens before any rule runs
                pipeline.handle(r, batch)
            await pipeline.commit(batch)
            [alert] = active(engine)
            assert (alert.code, alert.unit, alert.count) == ("over_current", 3, 1)
    finally:
        store.close()
