"""Work orders and remote commands in a partition consumer, on real PostgreSQL (and real
mosquitto for the commands), as ``serve`` runs them (issue 13): order ids from the
database's sequence (two partitions never share one), order writes fenced by the lease
epoch, each partition loading only its stations' unclosed orders and its devices' open
commands, the automatic transitions (the door opened: on site; the alert resolved: fixed),
and a command queued through the action queue, published on the partition's MQTT session
and closed by the device's ``command_result``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest import IngestError, StoreError
from ingest.actions import ActionQueue
from ingest.commands.config import CommandsConfig
from ingest.commands.model import CommandRecord
from ingest.commands.store import CommandStore
from ingest.gmqtt_source import GmqttSource
from ingest.leases import StaleLease
from ingest.mqtt import BrokerURL, Received
from ingest.partition_consumer import PipelineConsumer
from ingest.pg_store import PostgresStore
from ingest.worker_alerts import WorkerAlerts, commands_config
from tests.cluster.test_partition_alerts import (
    CATALOG,
    CONFIG,
    DEVICE,
    OTHER,
    PM,
    P,
    Q,
    birth,
    consumer,
    lease,
    now_ms,
    status,
)
from tests.mqttclients import Client
from tests.servers import Process

pytestmark = pytest.mark.e2e


OPEN_ELSEWHERE = CommandRecord(
    id="c-of-another-partition", device_id=OTHER, station_id=CATALOG.devices[OTHER].station_id,
    type="reboot", unit=None, state="pending", requested_by="li", requested_key=None,
    requested_at_ms=0, expires_at_ms=now_ms() + 3_600_000, payload="{}",
)  # fmt: skip


def event(seq: int, type_: str, device: str = DEVICE, **fields: Any) -> Received:
    body = {"v": 1, "ts": now_ms(), "boot": "boot-1", "seq": seq, "type": type_, **fields}
    return Received(f"cw/v1/{device}/event", json.dumps(body).encode(), 1, False, seq, now_ms(), 0)


def raised(seq: int, device: str = DEVICE) -> Received:
    return event(seq, "fault_raised", device, code="over_current")


def orders_in_db(db: str) -> list[tuple[int, str, str]]:
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT id, station_id, state FROM work_orders ORDER BY id").fetchall()
    return [(int(i), str(s), str(t)) for i, s, t in rows]


def order_log(db: str, order_id: int) -> list[str]:
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT what FROM work_order_log WHERE order_id = %s ORDER BY id", (order_id,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def command_state(db: str, command_id: str) -> str | None:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT state FROM commands WHERE id = %s", (command_id,)).fetchone()
    return None if row is None else str(row[0])


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def parts(pg_url: str) -> AsyncIterator[tuple[PostgresStore, WorkerAlerts]]:
    store = PostgresStore(pg_url)
    try:
        async with WorkerAlerts(pg_url, CATALOG, CONFIG, claim_lease_s=5) as alerts:
            yield store, alerts
    finally:
        store.close()


async def loaded_with_a_fault(
    store: PostgresStore, alerts: WorkerAlerts, partition: int, epoch: int
) -> tuple[PipelineConsumer, int]:
    """A loaded consumer of ``partition`` whose first device has an open fault alert."""
    device = PM.devices(partition)[0]
    c = consumer(store, alerts, epoch, partition)
    await c.load()
    await c.store([birth(0, device), status(1, device), raised(2, device)])
    assert c.engine is not None
    await c.engine.flush(10)
    [alert_id] = list(c.engine.by_id)
    return c, alert_id


async def test_two_partitions_never_hand_out_the_same_order_id(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts]
) -> None:
    store, alerts = parts
    lease(pg_url, P, 1)
    lease(pg_url, Q, 1)
    p, p_alert = await loaded_with_a_fault(store, alerts, P, 1)
    q, q_alert = await loaded_with_a_fault(store, alerts, Q, 1)
    try:
        assert p.orders is not None
        assert q.orders is not None
        made = await asyncio.gather(p.orders.create(p_alert, "li"), q.orders.create(q_alert, "wu"))
        assert made[0].id != made[1].id
        stations = {CATALOG.devices[d].station_id for d in (DEVICE, OTHER)}
        assert sorted(o[0] for o in orders_in_db(pg_url)) == sorted(o.id for o in made)
        assert {o[1] for o in orders_in_db(pg_url)} == stations
    finally:
        await p.close()
        await q.close()
    # the next owner of P loads P's unclosed order only, not Q's
    lease(pg_url, P, 2)
    again = consumer(store, alerts, 2, P)
    await again.load()
    try:
        assert again.orders is not None
        assert list(again.orders.current) == [made[0].id]
    finally:
        await again.close()


async def test_an_owner_that_lost_the_lease_writes_no_order_nor_command(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts]
) -> None:
    store, alerts = parts
    lease(pg_url, P, 1)
    c, alert_id = await loaded_with_a_fault(store, alerts, P, 1)
    try:
        assert c.orders is not None
        order = await c.orders.create(alert_id, "li", assignee="wu")
        assert order_log(pg_url, order.id) == ["created"]
        lease(pg_url, P, 2)  # the partition moved; this owner has not heard yet
        with pytest.raises(StoreError, match="no longer the lease's"):  # not saved: says so
            await c.orders.add_note(order.id, "li", "written by a stale owner")
        assert order_log(pg_url, order.id) == ["created"]  # the fence refused it
        assert c.commands is not None
        with pytest.raises(StaleLease):  # the applier answers it as a store error (503)
            await c.commands.create(DEVICE, "reboot", requested_by="li")
        assert c.commands.open == {}
        with psycopg.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM commands").fetchone() == (0,)
    finally:
        await c.close()


async def test_an_order_made_on_a_replica_moves_by_itself_as_in_serve(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts]
) -> None:
    """Created through the action queue (as a replica does); the device's door opens: on
    site; the fault clears and the alert resolves: fixed."""
    store, alerts = parts
    lease(pg_url, P, 1)
    c, alert_id = await loaded_with_a_fault(store, alerts, P, 1)
    queue = ActionQueue.on_postgresql(pg_url)
    try:
        assert c.applier is not None
        assert c.orders is not None
        station = CATALOG.devices[DEVICE].station_id
        args = {"alert_id": alert_id, "by": "li", "assignee": None, "due_at_ms": None,
                "note": "please look"}  # fmt: skip
        request = queue.submit(station, "create_work_order", args, 5000)
        assert await c.applier.apply_pending() == 1
        outcome = queue.outcome(request)
        assert outcome is not None
        assert outcome.state == "done", outcome
        assert outcome.result is not None
        order_id = int(outcome.result["order"][0])
        assert orders_in_db(pg_url) == [(order_id, station, "open")]
        await c.store([event(3, "door_opened")])
        await c.orders.flush(10)
        assert orders_in_db(pg_url) == [(order_id, station, "on_site")]
        await c.store([event(4, "fault_cleared", code="over_current")])
        assert c.engine is not None
        await c.engine.flush(10)
        await c.orders.flush(10)
        assert orders_in_db(pg_url) == [(order_id, station, "fixed")]
        assert order_log(pg_url, order_id) == ["created", "on_site", "fixed"]
    finally:
        queue.close()
        await c.close()


async def test_a_queued_command_is_published_on_the_partitions_session_and_answered(
    pg_url: str, parts: tuple[PostgresStore, WorkerAlerts], broker: Process, tmp_path: Path
) -> None:
    store, alerts = parts
    others = CommandStore.on_postgresql(pg_url)
    try:  # another partition's device has an open command: not P's to load nor send
        others.save([replace(OPEN_ELSEWHERE, requested_at_ms=now_ms())])
    finally:
        others.close()
    lease(pg_url, P, 1)
    c = consumer(store, alerts, 1)
    await c.load()
    queue = ActionQueue.on_postgresql(pg_url)
    device = Client(broker.port, client_id="device")
    assert not device.connect().is_failure
    try:
        assert c.applier is not None
        assert c.commands is not None
        device.subscribe(f"cw/v1/{DEVICE}/cmd")
        station = CATALOG.devices[DEVICE].station_id
        args = {"device_id": DEVICE, "ctype": "reboot", "unit": None, "ttl_s": None,
                "requested_by": "li", "requested_key": None}  # fmt: skip
        # queued while the partition's session is not up yet: stored, sent once it is
        request = queue.submit(station, "send_command", args, 5000)
        assert await c.applier.apply_pending() == 1
        outcome = queue.outcome(request)
        assert outcome is not None
        assert outcome.state == "done", outcome
        assert outcome.result is not None
        command_id = str(outcome.result["command"][0])
        assert command_state(pg_url, command_id) == "pending"
        source = GmqttSource(
            BrokerURL.parse(broker.url), client_id="cw-ingest-test",
            subscription=PM.topic_filters(P), deliver=lambda r: None,
        )  # fmt: skip
        async with source:
            c.attach(source)
            await until(lambda: bool(device.messages), 10, "the command published")
            sent = json.loads(device.messages[0].payload)
            assert (sent["id"], sent["type"]) == (command_id, "reboot")
            await until(lambda: command_state(pg_url, command_id) == "sent", 10, "PUBACK")
            await c.store([event(2, "command_result", cmd=command_id, result="done")])
            await until(lambda: command_state(pg_url, command_id) == "done", 10, "answered")
            c.attach(None)
        assert list(c.commands.open) == []  # P's is answered; OTHER's was never P's
        assert [json.loads(m.payload)["id"] for m in device.messages] == [command_id]
        assert command_state(pg_url, OPEN_ELSEWHERE.id) == "pending"
    finally:
        device.close()
        queue.close()
        await c.close()


def test_command_settings_from_the_environment() -> None:
    assert commands_config({}) == CommandsConfig()
    assert commands_config({"CHARGEWATCH_COMMANDS": '{"resend_s": 2}'}).resend_s == 2
    with pytest.raises(IngestError, match="CHARGEWATCH_COMMANDS: not valid"):
        commands_config({"CHARGEWATCH_COMMANDS": '{"resend_s": 0}'})
