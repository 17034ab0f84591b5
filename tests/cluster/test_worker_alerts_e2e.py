"""Alerts through ``chargewatch ingest`` worker processes (real mosquitto, PostgreSQL and a
local webhook receiver counting deliveries): faults raised on a device of every busy
partition open alerts in PostgreSQL while two workers own the partitions, with ids that
never collide; the worker owning half of them is killed with SIGKILL; the survivor keeps
them open and resolves them when the devices clear their faults. The receiver is down
while the alerts open, so the killed worker dies with notifications pending: the survivor
takes them over once their claims run out. Every notification (opened, resolved) reaches
the receiver exactly once, under a delivery id of its own."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import Catalog
from ingest.alerts.notify import Subscription
from ingest.alerts.store import AlertStore
from ingest.partitions import PartitionMap
from tests.alerts.receiver import Receiver, receiver
from tests.cluster.test_workers_e2e import LEASE_S, gauge, wait_subscribed, worker
from tests.servers import Process, eventually

pytestmark = pytest.mark.e2e

CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
# one device of every partition that has devices: both workers own some of them
DEVICES = [PM.devices(p)[0] for p in range(16) if PM.devices(p)]
SETTINGS = {"verify_s": 0, "startup_grace_s": 0, "tick_s": 0.5}


def publish(port: int, messages: list[tuple[str, str, dict[str, object]]]) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="alerts-pub", protocol=paho.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [
            c.publish(f"cw/v1/{d}/{channel}", json.dumps(body), qos=1)
            for d, channel, body in messages
        ]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def head(seq: int) -> dict[str, object]:
    return {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": "boot-a", "seq": seq}


def online(device: str) -> list[tuple[str, str, dict[str, object]]]:
    spec = CATALOG.devices[device]
    units = "ports" if spec.kind == "pile" else "slots"
    listed = (
        [{"n": n, "state": "available"} for n in range(1, spec.spec.units + 1)]
        if spec.kind == "pile"
        else [{"n": n, "state": "ready", "soc": 95} for n in range(1, spec.spec.units + 1)]
    )
    return [
        (device, "state", {**head(0), "online": True, "kind": spec.kind, units: spec.spec.units}),
        (device, "status", {**head(1), "kind": spec.kind, units: listed}),
    ]


def fault(device: str, seq: int, type_: str) -> tuple[str, str, dict[str, object]]:
    return (device, "event", {**head(seq), "type": type_, "code": "over_current"})


def alerts(db: str) -> dict[str, tuple[int, str]]:
    """device -> (alert id, status) of the fault alerts; fails on two alerts of one device."""
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT device_id, id, status FROM alerts WHERE rule = 'fault' ORDER BY id"
        ).fetchall()
    found: dict[str, tuple[int, str]] = {}
    for device, alert_id, state in rows:
        assert device not in found, f"two fault alerts of {device}"
        found[str(device)] = (int(alert_id), str(state))
    return found


def pending_deliveries(db: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'").fetchone()
    assert row is not None
    return int(row[0])


def check_once(hook: Receiver) -> None:
    """Every notification delivered once: no (event, alert) twice, no delivery id twice."""
    seen = collections.Counter(hook.events())
    assert [k for k, n in seen.items() if n > 1] == []
    ids = collections.Counter(r.headers["x-chargewatch-delivery"] for r in hook.delivered())
    assert [k for k, n in ids.items() if n > 1] == []


def test_alerts_survive_a_killed_worker_and_notify_once(
    broker: Process, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEWATCH_ALERTS", json.dumps(SETTINGS))
    store = AlertStore.on_postgresql(pg_url)
    with receiver() as hook:
        sub = Subscription(id=0, url=hook.url, secret="s3cret", created_at_ms=1)
        store.add_webhook(sub.record())
        store.close()
        with (
            worker("a", broker, pg_url, tmp_path) as (a, a_port),
            worker("b", broker, pg_url, tmp_path) as (_, b_port),
        ):
            wait_subscribed([a_port, b_port])
            eventually(
                lambda: _assert(gauge(a_port, "chargewatch_ingest_partitions_owned") == 8), 20
            )
            publish(broker.port, [m for d in DEVICES for m in online(d)])
            hook.down_for(4)  # the notifications wait in both workers' outboxes, retrying
            publish(broker.port, [fault(d, 2, "fault_raised") for d in DEVICES])

            def all_open() -> dict[str, tuple[int, str]]:
                found = alerts(pg_url)
                assert sorted(found) == sorted(DEVICES)
                assert {s for _, s in found.values()} == {"open"}
                return found

            opened = eventually(all_open, timeout=20, interval=0.2)
            ids = sorted(i for i, _ in opened.values())
            assert len(set(ids)) == len(DEVICES)  # two workers, no id taken twice

            def notified(event: str) -> None:
                got = sorted(i for e, i in hook.events() if e == event)
                assert got == ids

            # every notification saved, claimed by the worker that raised it, not delivered
            eventually(lambda: _assert(pending_deliveries(pg_url) == len(DEVICES)), timeout=4)
            assert hook.delivered() == []
            a.kill()  # SIGKILL: its partitions, alerts and pending notifications go to b
            killed = time.monotonic()
            eventually(
                lambda: _assert(gauge(b_port, "chargewatch_ingest_partitions_owned") == 16),
                timeout=LEASE_S + 5,
            )
            # a's notifications: claimed by b once a's claims ran out, sent once
            eventually(lambda: notified("opened"), timeout=20, interval=0.2)
            sent_s = time.monotonic() - killed
            assert gauge(b_port, "chargewatch_alerts_active") == len(DEVICES)
            taken = gauge(b_port, "chargewatch_webhook_claims_taken_over_total")
            assert 0 < taken < len(DEVICES)  # a's share, not b's own
            publish(broker.port, [fault(d, 3, "fault_cleared") for d in DEVICES])

            def all_resolved() -> None:
                found = alerts(pg_url)
                assert {d: s for d, (_, s) in found.items()} == dict.fromkeys(DEVICES, "resolved")
                assert sorted(i for i, _ in found.values()) == ids  # the same alerts

            eventually(all_resolved, timeout=20, interval=0.2)
            eventually(lambda: notified("resolved"), timeout=20, interval=0.2)
            assert gauge(b_port, "chargewatch_alerts_active") == 0
            time.sleep(2 * LEASE_S)  # claims of a dead worker run out: nothing is sent again
            check_once(hook)
            assert len(hook.delivered()) == 2 * len(DEVICES)
            print(f"\nkill -9 with {taken:.0f} of {len(DEVICES)} notifications pending on the"
                  f" killed worker: all delivered {sent_s:.1f}s after the kill (lease {LEASE_S}s,"
                  f" receiver down 4s from before the faults); {len(hook.requests)} requests,"
                  f" {len(hook.delivered())} delivered, none twice")  # fmt: skip


def _assert(ok: bool) -> None:
    assert ok
