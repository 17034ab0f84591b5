"""Battery passports through two ``chargewatch ingest`` worker processes (real mosquitto and
PostgreSQL): a pack overheats in a cabinet of a partition one worker owns and is flagged;
swapped into a cabinet of a partition the other worker owns, a critical ``flagged_battery``
alert opens there, and the passport both wrote places it in the second cabinet. No worker
runs remote commands yet (another branch): both locks are counted as unsent."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devices.catalog import Catalog
from ingest.partitions import PartitionMap
from tests.cluster.test_worker_alerts_e2e import publish
from tests.cluster.test_workers_e2e import gauge, wait_subscribed, worker
from tests.servers import Process, eventually

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
CABINETS = [
    (p, d) for p in range(16) for d in PM.devices(p) if CATALOG.devices[d].kind == "cabinet"
]
# partitions go to two workers by parity (p mod 2): one cabinet of each parity
P1, CAB1 = next((p, d) for p, d in CABINETS if p % 2 == 0)
P2, CAB2 = next((p, d) for p, d in CABINETS if p % 2 == 1)


def message(device: str, channel: str, seq: int, body: dict[str, Any]) -> tuple[str, str, Any]:
    head = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": "boot-p", "seq": seq}
    return (device, channel, {**head, **body})


def status(device: str, seq: int, packs: dict[int, tuple[str, float]]) -> tuple[str, str, Any]:
    units = CATALOG.devices[device].spec.units
    slots: list[dict[str, Any]] = [{"n": n, "state": "empty"} for n in range(1, units + 1)]
    for n, (serial, temp) in packs.items():
        slots[n - 1] = {"n": n, "state": "charging", "soc": 60, "battery": serial, "temp_c": temp}
    return message(device, "status", seq, {"kind": "cabinet", "slots": slots})


def birth(device: str) -> tuple[str, str, Any]:
    units = CATALOG.devices[device].spec.units
    return message(device, "state", 0, {"online": True, "kind": "cabinet", "slots": units})


def query(db: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]


def test_a_pack_flagged_on_one_worker_is_caught_on_the_other(
    broker: Process, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEWATCH_ALERTS", json.dumps({"startup_grace_s": 0}))
    with (
        worker("a", broker, pg_url, tmp_path) as (_, a_port),
        worker("b", broker, pg_url, tmp_path) as (_, b_port),
    ):
        wait_subscribed([a_port, b_port])
        owners = dict(query(pg_url, f"SELECT partition, owner FROM partition_leases"
                                    f" WHERE partition IN ({P1}, {P2})"))  # fmt: skip
        assert owners[P1] != owners[P2]  # the two cabinets are on two workers
        publish(broker.port, [birth(CAB1), status(CAB1, 1, {3: ("E-1", 30.0)}),
                              birth(CAB2), status(CAB2, 1, {5: ("E-2", 25.0)})])  # fmt: skip
        publish(broker.port, [status(CAB1, 2, {3: ("E-1", 78.0)})])

        def flagged() -> None:
            rows = query(pg_url, "SELECT flagged, flag_reason FROM battery WHERE serial = 'E-1'")
            assert rows == [(1, "temperature_high")]

        eventually(flagged, timeout=20, interval=0.1)
        swap = {"type": "swap", "slot_out": 5, "battery_out": "E-2", "soc_out": 100,
                "slot_in": 5, "battery_in": "E-1", "soc_in": 20}  # fmt: skip
        publish(broker.port, [message(CAB2, "event", 2, swap)])

        def caught() -> None:
            rows = query(
                pg_url,
                "SELECT device_id, unit, severity, status FROM alerts"
                " WHERE rule = 'flagged_battery' AND code = 'E-1'",
            )
            assert rows == [(CAB2, 5, "critical", "open")]

        eventually(caught, timeout=20, interval=0.1)

        def placed() -> None:
            rows = query(pg_url, "SELECT device_id, slot FROM battery WHERE serial = 'E-1'")
            assert rows == [(CAB2, 5)]

        eventually(placed, timeout=10, interval=0.1)
        locks = sum(gauge(p, "chargewatch_battery_locks_total") for p in (a_port, b_port))
        assert locks == 2  # flagged in cabinet 1, caught in cabinet 2: both unsent
