"""A partition consumer's alerts on real PostgreSQL (issue 13): an event that opens an alert
is in PostgreSQL's alerts; the next owner of the partition loads it with the rules' memory
behind it (a timer pass does not resolve it) and resolves it when the device clears the
fault; the event journal is each partition's own (a partition replays its entries and
never deletes another's); two workers' ids never collide; an owner that lost the lease
writes nothing, and a maintainer's or a rider's action it applies meanwhile is answered 503
(not saved), through a replica's app over httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devices.catalog import Catalog
from devices.contract import decode
from devices.topics import TopicScheme
from ingest import StoreError
from ingest.alerts.config import AlertsConfig
from ingest.alerts.ids import AlertIds, IdPool
from ingest.alerts.store import AlertStore, journal_range
from ingest.metrics import IngestMetrics
from ingest.mqtt import Received
from ingest.partition_consumer import PipelineConsumer
from ingest.partitions import PartitionMap
from ingest.pg_store import PostgresStore
from ingest.store import Unobserved
from ingest.worker_alerts import WorkerAlerts, alerts_config
from tests.alerts.helpers import eventually
from tests.cluster.leasecheck import lease
from tests.replica.test_replica import seeded
from tests.replica.test_replica_alerts import bearer, maintainer_token, replica

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
P, Q = [p for p in range(16) if PM.devices(p)][:2]
DEVICE = PM.devices(P)[0]
OTHER = PM.devices(Q)[0]
# the timer's pass only when a test asks (tick_s), every condition judged at once (grace 0),
# a cleared fault resolved at once (verify_s 0)
CONFIG = AlertsConfig(tick_s=3600, startup_grace_s=0, verify_s=0)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def status(seq: int, device: str = DEVICE) -> Received:
    spec = CATALOG.devices[device]
    listed = (
        [{"n": n, "state": "available"} for n in range(1, spec.spec.units + 1)]
        if spec.kind == "pile"
        else [{"n": n, "state": "ready", "soc": 95} for n in range(1, spec.spec.units + 1)]
    )
    body = {"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": seq, "kind": spec.kind,
            "ports" if spec.kind == "pile" else "slots": listed}  # fmt: skip
    return Received(f"cw/v1/{device}/status", json.dumps(body).encode(), 1, False, seq, now_ms(), 0)


def birth(seq: int, device: str = DEVICE) -> Received:
    spec = CATALOG.devices[device]
    units = "ports" if spec.kind == "pile" else "slots"
    body = {"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": seq, "online": True,
            "kind": spec.kind, units: spec.spec.units}  # fmt: skip
    return Received(f"cw/v1/{device}/state", json.dumps(body).encode(), 1, False, seq, now_ms(), 0)


def event(seq: int, type_: str, device: str = DEVICE) -> Received:
    body = {"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": seq, "type": type_,
            "code": "over_current"}  # fmt: skip
    return Received(f"cw/v1/{device}/event", json.dumps(body).encode(), 1, False, seq, now_ms(), 0)


def alert_tables(db: str) -> list[list[tuple[Any, ...]]]:
    """Everything an alert action may write: alerts, their notes and events, riders' reports."""
    tables = ("alerts", "alert_notes", "alert_events", "rider_reports")
    with psycopg.connect(db) as conn:
        return [conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables]


def assert_queued(db: str, count: int) -> None:
    """``count`` actions wait in the action queue, taken by no applier."""
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM action_queue WHERE state = 'queued'").fetchone()
    assert row == (count,)


def alerts_in_db(db: str) -> list[tuple[int, str, str, str]]:
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT id, device_id, rule, status FROM alerts ORDER BY id").fetchall()
    return [(int(i), str(d), str(r), str(s)) for i, d, r, s in rows]


@pytest.fixture
async def parts(pg_url: str) -> AsyncIterator[tuple[PostgresStore, WorkerAlerts]]:
    store = PostgresStore(pg_url)
    try:
        async with WorkerAlerts(pg_url, CATALOG, CONFIG, claim_lease_s=5) as alerts:
            yield store, alerts
    finally:
        store.close()


def consumer(
    store: PostgresStore, alerts: WorkerAlerts, epoch: int, partition: int = P
) -> PipelineConsumer:
    return PipelineConsumer(store=store, catalog=CATALOG, devices=PM.devices(partition),
                            partition=partition, epoch=epoch, scheme=TopicScheme(),
                            metrics=IngestMetrics(), alerts=alerts)  # fmt: skip


async def test_an_alert_opened_by_one_owner_is_kept_and_resolved_by_the_next(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts]
) -> None:
    store, alerts = parts
    lease(pg_url, P, 1)
    first = consumer(store, alerts, 1)
    await first.load()
    await first.store([birth(0), status(1), event(2, "fault_raised")])
    assert first.engine is not None
    await first.engine.flush(10)
    [(alert_id, device, rule, state)] = alerts_in_db(pg_url)
    assert (device, rule, state) == (DEVICE, "fault", "open")
    # the owner dies (nothing more of it runs: its engine is left, not closed)
    await first.engine.supervisor.__aexit__(None, None, None)
    lease(pg_url, P, 2)
    second = consumer(store, alerts, 2)
    await second.load()
    try:
        engine = second.engine
        assert engine is not None
        assert list(engine.by_id) == [alert_id]  # loaded before anything is acknowledged
        engine.tick()  # the fault an event raised is still remembered: nothing resolves
        await engine.flush(10)
        assert alerts_in_db(pg_url) == [(alert_id, DEVICE, "fault", "open")]
        await second.store([event(3, "fault_cleared")])
        await engine.flush(10)
        assert alerts_in_db(pg_url) == [(alert_id, DEVICE, "fault", "resolved")]
    finally:
        await second.close()
        if first.applier is not None:  # the dead owner's connections, which a process
            await first.applier.__aexit__(None, None, None)  # exit would have closed


async def test_each_partition_replays_its_own_journal_and_deletes_only_it(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts]
) -> None:
    """Events stored whose alert effects never became durable (the owner died between the
    two commits): the next owner replays its partition's, and leaves the other's alone."""
    store, alerts = parts
    lease(pg_url, P, 1)
    before = consumer(store, alerts, 1)
    await before.load()
    await before.store([birth(0), status(1)])
    await before.close()
    raised = json.dumps({"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": 5,
                         "type": "fault_raised", "code": "over_current"})  # fmt: skip
    p_lo, q_lo = journal_range(P)[0], journal_range(Q)[0]
    store.write((), [], [], [Unobserved(p_lo + 1, DEVICE, now_ms(), raised)])
    store.write((), [], [], [Unobserved(q_lo + 1, OTHER, now_ms(), raised)])
    lease(pg_url, P, 2)
    c = consumer(store, alerts, 2)
    await c.load()
    try:
        assert c.engine is not None
        await c.engine.flush(10)
        assert [(d, r, s) for _, d, r, s in alerts_in_db(pg_url)] == [(DEVICE, "fault", "open")]
        assert alerts.store.unobserved(P) == []  # replayed, done with
        assert [e[1] for e in alerts.store.unobserved(Q)] == [OTHER]  # not P's to touch
        assert c.pipeline is not None
        assert c.pipeline.journal_last == p_lo + 1
        await c.store([event(6, "fault_raised")])  # journaled after the last, in P's range
        assert alerts.store.journal_last(P) in (p_lo, p_lo + 2)  # deleted once observed
    finally:
        await c.close()


async def test_two_workers_never_take_the_same_ids(pg_url: str) -> None:
    a, b = AlertStore.on_postgresql(pg_url), AlertStore.on_postgresql(pg_url)
    try:
        pools = [AlertIds(a.reserve_ids, block=8), AlertIds(b.reserve_ids, block=8)]
        deliveries = [
            IdPool(lambda n: a.reserve_ids("delivery", n), block=4),
            IdPool(lambda n: b.reserve_ids("delivery", n), block=4),
        ]
        await asyncio.gather(*(p.top_up() for p in pools), *(d.top_up() for d in deliveries))
        taken = [[p.alerts.take() for _ in range(20)] for p in pools]  # past a block: dry
        events = [[p.events.take() for _ in range(40)] for p in pools]
        sent = [[d.take() for _ in range(10)] for d in deliveries]
        for pair in (taken, events, sent):
            assert not set(pair[0]) & set(pair[1])
            assert all(len(set(ids)) == len(ids) for ids in pair)
        assert pools[0].alerts.dry >= 1
        # the delivery ids go on after the time-based ones (migration 0004)
        assert min(sent[0] + sent[1]) > (now_ms() - 60_000) * 1000
    finally:
        a.close()
        b.close()


def test_alert_settings_from_the_environment() -> None:
    assert alerts_config({}) == AlertsConfig()
    assert alerts_config({"CHARGEWATCH_ALERTS": '{"verify_s": 2}'}).verify_s == 2
    with pytest.raises(Exception, match="CHARGEWATCH_ALERTS: not valid"):
        alerts_config({"CHARGEWATCH_ALERTS": '{"verify_s": -1}'})


async def test_an_owner_that_lost_the_lease_writes_no_alert(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts]
) -> None:
    store, alerts = parts
    lease(pg_url, P, 1)
    c = consumer(store, alerts, 1)
    await c.load()
    try:
        await c.store([birth(0), status(1)])
        assert c.engine is not None
        lease(pg_url, P, 2)  # the partition moved; this owner has not heard yet
        raised = event(2, "fault_raised")
        c.engine.observe(c.twins[DEVICE], decode("event", raised.payload), now_ms())
        assert len(c.engine.by_id) == 1  # opened in memory ...
        with pytest.raises(StoreError, match="no longer the lease's"):  # says it is not saved
            await c.engine.flush(10)
        assert alerts_in_db(pg_url) == []  # ... never written: the fence refused it
    finally:
        await c.close()


async def test_a_stale_owner_answers_a_maintainers_action_as_not_saved(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts], tmp_path: Path
) -> None:
    """The partition moved and its owner has not heard yet: an alert action its applier
    takes from a replica (acknowledge, a note, resolve, a rider's report; each on an owner
    of its own, at the next epoch) is dropped by the fence and answered 503 with the reason,
    never "saved", and the database is as before. An action asked after that is left for
    the next owner, which has the alert open and acknowledges it."""
    seeded(pg_url)  # the stations and devices in the registry, as a replica reads them
    token = maintainer_token(pg_url)
    store, alerts = parts
    owners: list[PipelineConsumer] = []

    async def owner(epoch: int) -> PipelineConsumer:
        lease(pg_url, P, epoch)
        owners.append(c := consumer(store, alerts, epoch))
        await c.load()
        return c

    try:
        # the replica waits long enough for the next owner to load (20 s, not 5)
        async with replica(pg_url, tmp_path, "a", action_wait_s=20) as (_, http, _):
            stale = await owner(1)
            await stale.store([birth(0), status(1), event(2, "fault_raised")])
            assert stale.engine is not None
            await stale.engine.flush(10)
            [(alert_id, _, _, _)] = alerts_in_db(pg_url)
            before = alert_tables(pg_url)
            path, auth = f"/v1/alerts/{alert_id}", bearer(token)
            station = CATALOG.devices[DEVICE].station_id
            report = {"station": station, "device": DEVICE, "category": "smoke", "text": "smoke"}
            asked = [
                (f"{path}/ack", {"note": "on my way"}, auth), (f"{path}/notes", {"text": "seen"}, auth),
                (f"{path}/resolve", {}, auth), ("/v1/reports", report, {}),
            ]  # fmt: skip
            for epoch, (url, body, headers) in enumerate(asked, start=2):
                lease(pg_url, P, epoch)  # the partition moved; its owner has not heard yet
                r = await http.post(url, headers=headers, json=body)
                assert r.status_code == 503, (url, r.text)
                assert r.json()["error"] == "unavailable"
                assert "not saved" in r.json()["detail"], url
                # the stale owner took it (its epoch is the reason) ...
                assert f"epoch {epoch - 1} is no longer the lease's" in r.json()["detail"], url
                assert alert_tables(pg_url) == before  # ... and wrote nothing of it
                if epoch <= len(asked):
                    await stale.close()  # it hears that the partition moved
                    stale = await owner(epoch)

            # asked again while the last stale owner still runs: it knows now that nothing
            # it applies is saved, and leaves the action queued for the partition's next owner
            again = asyncio.create_task(
                http.post(f"{path}/ack", headers=auth, json={"note": "again"})
            )
            await eventually(lambda: assert_queued(pg_url, 1))
            assert stale.applier is not None
            assert await stale.applier.apply_pending() == 0
            assert_queued(pg_url, 1)
            await stale.close()
            new = await owner(len(asked) + 1)  # the next owner: the alert open, the action taken
            r = await again
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "acknowledged"
            assert "again" in r.text
            assert new.engine is not None
            assert new.engine.by_id[alert_id].status == "acknowledged"
            assert alerts_in_db(pg_url) == [(alert_id, DEVICE, "fault", "acknowledged")]
    finally:
        for c in owners:
            await c.close()
