"""Battery passports in the cluster (issue 13) on real PostgreSQL: two partitions' consumers,
each with the passports of a worker of its own (``WorkerPassports``: its own LISTEN), and
the partitions' alert engines. A pack that overheats in a cabinet of one partition is known
as flagged in the other's worker by the flags' NOTIFY and caught when it appears there
(also when it arrived before the notice); a maintainer's clearance on an API replica reaches
both workers and answers what ``serve`` answers.

A flagged pack's ``lock_battery`` goes out through the partition's remote commands
(``PipelineConsumer.commands``): partition 1's are the real ones (the lock is stored as an
open command, sent once the partition's MQTT session attaches: none does here); partition
2's sender is swapped for a recorder after loading, to see each lock it asks for."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devices.catalog import Catalog
from devices.topics import TopicScheme
from ingest.alerts.config import AlertsConfig
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import PostgresStore
from ingest.worker_alerts import WorkerAlerts
from ingest.worker_passports import FOLLOW_TASK, WorkerPassports, lock_flagged_setting
from tests.alerts.helpers import eventually
from tests.cluster.leasecheck import lease

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
CABINETS = [
    (p, d) for p in range(16) for d in PM.devices(p) if CATALOG.devices[d].kind == "cabinet"
]
P1, CAB1 = CABINETS[0]
P2, CAB2 = next((p, d) for p, d in CABINETS if p != P1)
CONFIG = AlertsConfig(tick_s=3600, startup_grace_s=0, verify_s=0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Messages:
    """A cabinet's messages, numbered."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seq = -1
        self.units = CATALOG.devices[device].spec.units

    def _msg(self, channel: str, body: dict[str, Any]) -> Received:
        self.seq += 1
        head = {"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": self.seq}
        payload = json.dumps({**head, **body}).encode()
        topic = f"cw/v1/{self.device}/{channel}"
        return Received(topic, payload, 1, False, self.seq, now_ms(), 0)

    def birth(self) -> Received:
        return self._msg(
            "state", {"online": True, "kind": "cabinet", "slots": self.units, "heartbeat_s": 30}
        )

    def status(self, packs: dict[int, tuple[str, float]]) -> Received:
        slots: list[dict[str, Any]] = [{"n": n, "state": "empty"} for n in range(1, self.units + 1)]
        for n, (serial, temp) in packs.items():
            slots[n - 1] = {"n": n, "state": "charging", "soc": 60, "battery": serial,
                            "temp_c": temp}  # fmt: skip
        return self._msg("status", {"kind": "cabinet", "slots": slots})

    def swap(self, slot: int, out: str, into: str) -> Received:
        return self._msg(
            "event",
            {"type": "swap", "slot_out": slot, "battery_out": out, "soc_out": 100,
             "slot_in": slot, "battery_in": into, "soc_in": 20},
        )  # fmt: skip


class Recorder:
    """Records each lock (in place of partition 2's remote commands, after loading)."""

    def __init__(self) -> None:
        self.locks: list[tuple[str, int, str]] = []

    def send_lock_battery(self, device_id: str, slot: int, reason: str) -> None:
        self.locks.append((device_id, slot, reason))


@dataclass
class Cluster:
    one: PipelineConsumer  # partition P1 (CAB1), worker 1
    two: PipelineConsumer  # partition P2 (CAB2), worker 2
    w1: WorkerPassports
    w2: WorkerPassports
    commands: Recorder  # partition P2's
    alerts: WorkerAlerts
    store: PostgresStore


@pytest.fixture
async def cluster(pg_url: str) -> AsyncIterator[Cluster]:
    store = PostgresStore(pg_url)
    try:
        async with (
            WorkerAlerts(pg_url, CATALOG, CONFIG, claim_lease_s=5) as alerts,
            WorkerPassports(pg_url, reload_s=600) as w1,  # 600 s: only a NOTIFY reloads
            WorkerPassports(pg_url, reload_s=600) as w2,
        ):
            consumers = []
            for partition, passports in ((P1, w1), (P2, w2)):
                lease(pg_url, partition, 1)
                consumers.append(
                    PipelineConsumer(store=store, catalog=CATALOG, devices=PM.devices(partition),
                                     partition=partition, epoch=1, scheme=TopicScheme(),
                                     metrics=IngestMetrics(), alerts=alerts, passports=passports)
                )  # fmt: skip
            commands = Recorder()
            try:
                for c in consumers:
                    await c.load()
                    assert c.passports is not None
                    assert c.commands is not None
                    assert c.passports.sender is c.commands  # the lock's one wiring
                consumers[1].passports.sender = commands  # type: ignore[union-attr]
                await eventually(lambda: _holds(w1.listening and w2.listening))
                yield Cluster(consumers[0], consumers[1], w1, w2, commands, alerts, store)
            finally:
                for c in consumers:
                    await c.close()
    finally:
        store.close()


def locks(c: PipelineConsumer) -> list[tuple[str, int | None]]:
    assert c.commands is not None
    return [(r.device_id, r.unit) for r in c.commands.open.values() if r.type == "lock_battery"]


def _holds(condition: bool) -> bool:
    assert condition
    return condition


def flagged_alerts(c: PipelineConsumer) -> list[tuple[str | None, int | None, str, str | None]]:
    assert c.engine is not None
    return sorted(
        (a.device_id, a.unit, a.severity, a.code)
        for a in c.engine.by_id.values()
        if a.rule == "flagged_battery"
    )


async def overheat_in_cabinet_one(c: Cluster, cab1: Messages, serial: str) -> None:
    await c.one.store([cab1.birth(), cab1.status({3: (serial, 30.0)})])
    await c.one.store([cab1.status({3: (serial, 78.0)})])
    assert c.one.passports is not None
    assert c.one.passports.flagged[serial].reason == "temperature_high"


async def test_a_pack_that_overheated_in_one_partition_is_caught_in_another(
    cluster: Cluster,
) -> None:
    c, cab1, cab2 = cluster, Messages(CAB1), Messages(CAB2)
    assert c.two.passports is not None
    await c.two.store([cab2.birth(), cab2.status({5: ("B-2", 25.0)})])
    await overheat_in_cabinet_one(c, cab1, "B-1")
    # partition 1's lock: an open lock_battery command of its remote commands, stored
    assert c.one.commands is not None
    await eventually(lambda: _holds(locks(c.one) == [(CAB1, 3)]))
    # worker 2 hears of it by the NOTIFY of the flag's write (its reload is 600 s away)
    await eventually(lambda: _holds("B-1" in c.two.passports.flagged))  # type: ignore[union-attr]
    # carried to cabinet 2 and swapped into slot 5: caught there at once, locked
    await c.two.store([cab2.swap(5, "B-2", "B-1")])
    assert flagged_alerts(c.two) == [(CAB2, 5, "critical", "B-1")]
    assert c.commands.locks == [(CAB2, 5, "flagged battery B-1")]
    assert c.two.engine is not None
    assert "B-1" in c.two.engine.flagged_batteries  # never counted as ready there
    # the passport the two partitions wrote: both stays, both events, where it is now
    await c.one.passports.flush()  # type: ignore[union-attr]
    await c.two.passports.flush()
    p = c.w1.store.passport("B-1")
    assert p is not None
    assert (p["device_id"], p["slot"], p["flagged"], p["max_temp_c"]) == (CAB2, 5, True, 78.0)
    assert [(s["device_id"], s["slot"], s["to_ms"] is None) for s in p["stays"]] == [
        (CAB2, 5, True),
        (CAB1, 3, False),  # ended as it began in cabinet 2 (cabinet 1 has not said so)
    ]
    assert [(e["kind"], e["device_id"]) for e in p["events"]] == [
        ("appeared", CAB2),
        ("temperature_high", CAB1),
    ]


async def test_a_pack_that_arrived_before_the_flags_notice_is_caught_when_it_comes(
    cluster: Cluster,
) -> None:
    """Worker 2 is deaf for a while (its LISTEN task stopped): the pack arrives in cabinet 2
    after it was flagged in cabinet 1, unknown as flagged there; the next read of the flags
    catches it where it sits. A pack that cabinet 2 still names, but whose latest stay is in
    cabinet 1 since after it came to cabinet 2 (our stale view: it left without cabinet 2
    saying so), is not alerted there."""
    c, cab1, cab2 = cluster, Messages(CAB1), Messages(CAB2)
    await c.w2.supervisor.stop(FOLLOW_TASK)
    await c.two.store([cab2.birth(), cab2.status({7: ("S-9", 25.0)})])
    await overheat_in_cabinet_one(c, cab1, "B-4")
    # S-9 is in cabinet 1 now, overheating too (cabinet 2 still names it in slot 7)
    await c.one.store([cab1.status({3: ("B-4", 78.0), 4: ("S-9", 78.0)})])
    assert c.one.passports is not None
    assert "S-9" in c.one.passports.flagged
    await c.two.store([cab2.status({5: ("B-4", 25.0), 7: ("S-9", 25.0)})])
    assert flagged_alerts(c.two) == []  # not known yet
    await c.one.passports.flush()
    await c.w2.reload()
    assert flagged_alerts(c.two) == [(CAB2, 5, "critical", "B-4")]
    assert c.commands.locks == [(CAB2, 5, "flagged battery B-4")]


async def test_a_pack_flagged_after_it_arrived_is_caught_by_the_next_read(
    cluster: Cluster,
) -> None:
    """Partition 1 still names B-5 in cabinet 1 (its cabinet has not reported it gone) when
    cabinet 1 overheats there; B-5 sits in cabinet 2 since before that flag: it is announced
    there all the same, once."""
    c, cab1, cab2 = cluster, Messages(CAB1), Messages(CAB2)
    await c.w2.supervisor.stop(FOLLOW_TASK)
    await c.one.store([cab1.birth(), cab1.status({3: ("B-5", 30.0)})])
    await c.two.store([cab2.birth(), cab2.status({5: ("B-5", 25.0)})])
    await c.two.passports.flush()  # type: ignore[union-attr]
    await c.one.store([cab1.status({3: ("B-5", 78.0)})])
    assert "B-5" in c.one.passports.flagged  # type: ignore[union-attr]
    await c.one.passports.flush()  # type: ignore[union-attr]
    await c.w2.reload()
    assert flagged_alerts(c.two) == [(CAB2, 5, "critical", "B-5")]
    assert c.commands.locks == [(CAB2, 5, "flagged battery B-5")]
    await c.w2.reload()
    assert c.two.engine is not None
    assert [a.count for a in c.two.engine.by_id.values() if a.rule == "flagged_battery"] == [1]


async def test_a_flagged_pack_found_at_takeover_raises_its_alert_once(
    cluster: Cluster, pg_url: str
) -> None:
    """Worker 2 owns partition 2 and is deaf (its LISTEN task stopped: the flags' notices
    never reach it). B-6 is flagged in cabinet 1 and then carried into cabinet 2, slot 6;
    B-7 arrives in cabinet 2, slot 7, shortly before cabinet 1 (which still names it)
    overheats and flags it. Worker 2 dies (its consumer ends) before any read of the flags.
    Worker 1 takes partition 2: each pack gets one critical ``flagged_battery`` where it sits
    and a stored ``lock_battery``; B-8, flagged by its own alert in cabinet 2 (locked then),
    gets none. A restart of the partition's consumer with the alerts open adds nothing."""
    c, cab1, cab2 = cluster, Messages(CAB1), Messages(CAB2)
    await c.w2.supervisor.stop(FOLLOW_TASK)
    await c.two.store([cab2.birth(), cab2.status({8: ("B-8", 25.0)})])
    await c.one.store([cab1.birth(), cab1.status({4: ("B-6", 30.0), 5: ("B-7", 30.0)})])
    await c.one.store([cab1.status({4: ("B-6", 79.0), 5: ("B-7", 30.0)})])
    await c.two.store([cab2.status({6: ("B-6", 25.0), 7: ("B-7", 25.0), 8: ("B-8", 25.0)})])
    await c.one.store([cab1.status({5: ("B-7", 79.0)})])  # cabinet 1's stale view of B-7
    await c.two.store([cab2.status({6: ("B-6", 25.0), 7: ("B-7", 25.0), 8: ("B-8", 80.0)})])
    assert c.one.passports is not None
    assert {"B-6", "B-7"} <= set(c.one.passports.flagged)
    await c.one.passports.flush()
    assert flagged_alerts(c.two) == []  # worker 2 never heard of the flags
    assert locks(c.two) == []  # B-8's lock went to the recorder
    assert c.commands.locks == [(CAB2, 8, "battery B-8: temperature_high")]
    await c.two.close()  # worker 2 dies: what it had is written

    async def take(epoch: int, passports: WorkerPassports) -> PipelineConsumer:
        lease(pg_url, P2, epoch)
        consumer = PipelineConsumer(
            store=c.store, catalog=CATALOG, devices=PM.devices(P2), partition=P2, epoch=epoch,
            scheme=TopicScheme(), metrics=IngestMetrics(), alerts=c.alerts, passports=passports,
        )  # fmt: skip
        await consumer.load()
        return consumer

    taken = await take(2, c.w1)
    try:
        assert flagged_alerts(taken) == [
            (CAB2, 6, "critical", "B-6"),
            (CAB2, 7, "critical", "B-7"),
        ]
        # stored as open commands of the partition (sent once its MQTT session attaches)
        await eventually(lambda: _holds(sorted(locks(taken)) == [(CAB2, 6), (CAB2, 7)]))
        assert taken.engine is not None
        ids = sorted(a.id for a in taken.engine.by_id.values() if a.rule == "flagged_battery")
    finally:
        await taken.close()
    again = await take(3, c.w2)
    try:
        assert again.engine is not None
        flagged = [a for a in again.engine.by_id.values() if a.rule == "flagged_battery"]
        assert sorted(a.id for a in flagged) == ids
        assert [a.count for a in flagged] == [1, 1]
        assert sorted(locks(again)) == [(CAB2, 6), (CAB2, 7)]  # open, none added
    finally:
        await again.close()


def test_the_workers_lock_setting_is_serves() -> None:
    assert lock_flagged_setting({}) is True
    assert lock_flagged_setting({"CHARGEWATCH_INGEST__BATTERIES__LOCK_FLAGGED": "false"}) is False
    with pytest.raises(Exception, match="use true or false"):
        lock_flagged_setting({"CHARGEWATCH_INGEST__BATTERIES__LOCK_FLAGGED": "perhaps"})


async def test_a_clearance_on_a_replica_reaches_every_worker_and_answers_as_serve(
    cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    from tests.replica.test_replica_alerts import bearer, maintainer_token, replica

    c, cab1, cab2 = cluster, Messages(CAB1), Messages(CAB2)
    assert c.two.passports is not None
    await c.two.store([cab2.birth(), cab2.status({})])
    await overheat_in_cabinet_one(c, cab1, "C-1")
    await eventually(lambda: _holds("C-1" in c.two.passports.flagged))  # type: ignore[union-attr]
    key = bearer(maintainer_token(pg_url))
    async with (
        replica(pg_url, tmp_path, "a") as (side, http, _),
        replica(pg_url, tmp_path, "b") as (other, _, _),
    ):
        await eventually(lambda: _holds("C-1" in side.flagged_batteries))
        await eventually(lambda: _holds("C-1" in other.flagged_batteries))
        r = await http.post("/v1/batteries/C-1/clear", headers=key, json={"note": "cell OK"})
        assert r.status_code == 200, r.text
        cleared = r.json()
        assert cleared["flagged"] is False
        assert [(x["note"], x["by"], x["flag_reason"]) for x in cleared["clearances"]] == [
            ("cell OK", "li-wei", "temperature_high")
        ]
        assert "C-1" not in side.flagged_batteries  # the rider views count it again
        # the other replica hears of it by the clearance's NOTIFY (its refresh is 30 s away)
        cleared_at = time.monotonic()
        await eventually(lambda: _holds("C-1" not in other.flagged_batteries), within_s=1.0)
        assert time.monotonic() - cleared_at < 1.0
        again = await http.post("/v1/batteries/C-1/clear", headers=key, json={"note": "x"})
        assert (again.status_code, again.json()["detail"]) == (409, "battery 'C-1' is not flagged")
        never = await http.post("/v1/batteries/NEVER-1/clear", headers=key, json={"note": "x"})
        assert never.status_code == 404
        served = await serves_answer(tmp_path / "serve")
        assert shape(cleared) == shape(served)
    # both workers drop the flag (the clearance's NOTIFY) ...
    for passports in (c.one.passports, c.two.passports):
        await eventually(lambda p=passports: _holds("C-1" not in p.flagged))  # type: ignore[misc]
    # ... so the pack carried to cabinet 2 opens no flagged_battery there
    await c.two.store([cab2.status({2: ("C-1", 25.0)})])
    assert flagged_alerts(c.two) == []
    assert c.commands.locks == []


async def serves_answer(tmp_path: Path) -> Any:
    """``serve``'s answer to the same clearance (in-process, the embedded store)."""
    from tests.api.test_batteries import CAB1 as SERVE_CAB
    from tests.api.test_batteries import Feed
    from tests.security.inprocess import bearer, in_process

    async with in_process(tmp_path, alerts=True, passports=True) as ip:
        feed = Feed(ip.ingest)
        feed.born(SERVE_CAB)
        feed.status(SERVE_CAB, {3: {"battery": "C-1", "temp_c": 78.0, "state": "charging"}})
        r = await ip.http.post(
            "/v1/batteries/C-1/clear", headers=bearer(ip.key()), json={"note": "cell OK"}
        )
        assert r.status_code == 200, r.text
        return r.json()


def shape(value: Any) -> Any:
    """A JSON answer's structure: its keys, and the type of each value (None apart)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return None if value is None else type(value).__name__
