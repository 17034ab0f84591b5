"""A maintainer's actions on an API replica reach the ingest worker that owns the alert's
station, as processes: ``chargewatch ingest`` and ``chargewatch api --db`` on real
mosquitto and PostgreSQL. The worker's partition consumer runs the action queue's applier
for its stations (ingest.actions); without it the replica answers 503 "no worker took it".
An acknowledgement, a work order and a remote command: the command goes out on the owning
partition's MQTT session, and the device's answer, on the same session, closes it.
A webhook subscribed on the replica is followed by the worker (NOTIFY ``cw_webhooks``): the
alert's opening reaches the receiver once; after its removal the resolution does not."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from api.auth import KeyStore
from ingest.db.database import PgDatabase
from tests.alerts.keys import maintainer_key
from tests.alerts.receiver import receiver
from tests.cluster.processes import api_replica, db_upgrade, ingest_worker, new_database
from tests.cluster.test_worker_alerts_e2e import (
    DEVICES,
    SETTINGS,
    fault,
    head,
    online,
    publish,
)
from tests.mqttclients import Client
from tests.pg_server import PgServer
from tests.servers import eventually, mosquitto

pytestmark = pytest.mark.e2e


def test_actions_and_webhooks_on_a_replica_reach_the_owning_worker(
    pg_session: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEWATCH_ALERTS", json.dumps(SETTINGS))
    db = new_database(pg_session, "t_actions_e2e")
    db_upgrade(db, None)
    device = DEVICES[0]
    with (
        mosquitto(tmp_path / "mosquitto") as broker,
        ingest_worker("w1", broker.url, db, tmp_path) as worker,
        api_replica("a", db, tmp_path) as replica,
        receiver() as hook,
    ):
        eventually(
            lambda: _subscribed(worker.gauge("chargewatch_ingest_partitions_subscribed")), 30
        )
        admin = {"Authorization": f"Bearer {admin_key(db)}"}
        r = httpx.post(f"{replica.base_url}/v1/webhooks", json={"url": hook.url},
                       headers=admin, timeout=10)  # fmt: skip
        assert r.status_code == 201, r.text
        webhook_id = r.json()["id"]
        eventually(lambda: _equal(worker.gauge("chargewatch_webhook_subscriptions"), 1), 5)
        publish(broker.port, [*online(device), fault(device, 2, "fault_raised")])
        headers = {"Authorization": f"Bearer {maintainer_key(replica.data_dir, db)}"}

        def opened() -> int:
            r = httpx.get(f"{replica.base_url}/v1/alerts", params={"device": device},
                          headers=headers, timeout=10)  # fmt: skip
            assert r.status_code == 200, r.text
            found = [a for a in r.json()["alerts"] if a["rule"] == "fault"]
            assert len(found) == 1, found
            assert found[0]["status"] == "open"
            return int(found[0]["id"])

        alert_id = eventually(opened, timeout=20, interval=0.2)
        r = httpx.post(f"{replica.base_url}/v1/alerts/{alert_id}/ack",
                       json={"note": "on my way"}, headers=headers, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "acknowledged"
        again = httpx.get(f"{replica.base_url}/v1/alerts/{alert_id}", headers=headers, timeout=10)
        assert again.json()["status"] == "acknowledged"

        r = httpx.post(f"{replica.base_url}/v1/alerts/{alert_id}/work-order",
                       json={"assignee": "wu"}, headers=headers, timeout=30)  # fmt: skip
        assert r.status_code == 201, r.text
        order = r.json()
        assert (order["alert_id"], order["state"], order["assignee"]) == (
            alert_id,
            "assigned",
            "wu",
        )
        assert [e["what"] for e in order["log"]] == ["created"]

        listener = Client(broker.port, client_id="the-device")
        assert not listener.connect().is_failure
        try:
            listener.subscribe(f"cw/v1/{device}/cmd")
            r = httpx.post(f"{replica.base_url}/v1/devices/{device}/commands",
                           json={"type": "reboot"}, headers=headers, timeout=30)  # fmt: skip
            assert r.status_code == 202, r.text
            command = r.json()
            assert (command["device"], command["type"]) == (device, "reboot")
            assert command["state"] in ("pending", "sent")
            listener.wait_for(f"cw/v1/{device}/cmd")
            assert json.loads(listener.messages[0].payload)["id"] == command["id"]
        finally:
            listener.close()
        publish(broker.port, [answer(device, 3, command["id"])])

        def answered() -> None:
            r = httpx.get(f"{replica.base_url}/v1/commands/{command['id']}", headers=headers,
                          timeout=10)  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "done"

        eventually(answered, timeout=20, interval=0.2)

        eventually(lambda: _equal(hook.events(), [("opened", alert_id)]), 10)
        r = httpx.delete(f"{replica.base_url}/v1/webhooks/{webhook_id}", headers=admin, timeout=10)
        assert r.status_code == 204, r.text
        eventually(lambda: _equal(worker.gauge("chargewatch_webhook_subscriptions"), 0), 5)
        publish(broker.port, [fault(device, 4, "fault_cleared")])
        eventually(lambda: _equal(_status(replica.base_url, alert_id, headers), "resolved"), 20)
        assert hook.events() == [("opened", alert_id)]  # the resolution went nowhere


def answer(device: str, seq: int, command_id: str) -> tuple[str, str, dict[str, object]]:
    return (device, "event", {**head(seq), "type": "command_result", "cmd": command_id,
                              "result": "done"})  # fmt: skip


def admin_key(db: str) -> str:
    store = KeyStore(PgDatabase(db, pool_size=1))
    try:
        return store.create("ops-lead", "admin")[1]
    finally:
        store.close()


def _equal(got: object, expected: object) -> None:
    assert got == expected


def _status(base_url: str, alert_id: int, headers: dict[str, str]) -> str:
    r = httpx.get(f"{base_url}/v1/alerts/{alert_id}", headers=headers, timeout=10)
    return str(r.json()["status"])


def _subscribed(n: float) -> None:
    assert n >= 7  # the district's 7 stations, one partition each
