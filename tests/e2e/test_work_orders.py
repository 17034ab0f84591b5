"""Work orders end to end: a real mosquitto, a ``chargewatch serve`` process, and a plain
MQTT client as the cabinet. A maintainer makes a work order from the cabinet's fault alert
over HTTP; the cabinet opens its own door while the order is open -> the order reads
``on_site``; the cabinet reports healthy -> the alert resolves -> the order is ``fixed``;
another maintainer closes it. Errors (401/403/404/409/422), "my orders", the audit log
with each key's owner as the actor, and the repair statistics from the alert's own
timestamps."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import KeyStore
from tests.alerts.receiver import receiver
from tests.e2e.test_alerts import bearer
from tests.mqttclients import Client
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

CABINET, SLOTS = "WGS-C01", 12
FAST = {
    "CHARGEWATCH_INGEST__ALERTS__VERIFY_S": "1",
    "CHARGEWATCH_INGEST__ALERTS__TICK_S": "0.2",
    "CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0",
    "CHARGEWATCH_INGEST__ALERTS__WORK_ORDERS__DUE_MINOR_S": "7200",
}


class Cabinet:
    """The cabinet, spoken by hand: contract v1 messages from a plain paho client."""

    def __init__(self, port: int) -> None:
        self.client = Client(port, client_id=f"dev-{CABINET}")
        assert not self.client.connect().is_failure
        self.seq = 0

    def send(self, channel: str, body: dict[str, Any]) -> None:
        payload = {"v": 1, "boot": "e2e1", "seq": self.seq, "ts": time.time_ns() // 1_000_000}
        self.seq += 1
        self.client.publish(f"cw/v1/{CABINET}/{channel}", json.dumps(payload | body).encode())

    def status(self, faults: list[str]) -> None:
        slots = [
            {"n": n, "state": "ready", "battery": f"B-{n}", "soc": 95, "temp_c": 30.0}
            for n in range(1, SLOTS + 1)
        ]
        self.send("status", {"kind": "cabinet", "slots": slots, "faults": faults})


@pytest.fixture
def served(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Service, dict[str, str]]]:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    data_dir = tmp_path / "serve" / "data"
    keys = {
        "li-wei": create_key(data_dir, "maintainer", "li-wei"),
        "zhao-lei": create_key(data_dir, "maintainer", "zhao-lei"),
        "admin": create_key(data_dir, "admin", "ops-lead"),
    }
    with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as svc:
        yield svc, keys


def create_key(data_dir: Path, role: str, name: str) -> str:
    """A key in the service's data dir, as ``chargewatch keys create`` makes it (in-process:
    that command's own test is elsewhere; a process per key costs seconds)."""
    store = KeyStore.in_dir(data_dir)
    try:
        return store.create(name, role)[1]
    finally:
        store.close()


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339).timestamp() * 1000)


def test_door_puts_the_order_on_site_and_the_healthy_device_fixes_it(
    broker: Process, served: tuple[Service, dict[str, str]]
) -> None:
    svc, keys = served
    li, zhao = bearer(keys["li-wei"]), bearer(keys["zhao-lei"])
    http = httpx.Client(base_url=svc.base_url, timeout=10)
    cabinet = Cabinet(broker.port)
    try:
        cabinet.send(
            "state", {"online": True, "kind": "cabinet", "heartbeat_s": 30, "slots": SLOTS}
        )
        cabinet.status(["door_fault"])

        def fault_alert() -> dict[str, Any]:
            r = http.get("/v1/alerts", headers=li, params={"device": CABINET, "status": "active"})
            found = [a for a in r.json()["alerts"] if a["code"] == "door_fault"]
            assert len(found) == 1, r.text
            return found[0]

        alert = eventually(fault_alert, timeout=15)

        # refused: no key, a bad id, an unknown alert, a bad assignee, a due time gone by
        path = f"/v1/alerts/{alert['id']}/work-order"
        assert http.post(path, json={}).status_code == 401
        assert http.post("/v1/work-orders", headers=li, json={"alert_id": 2**63}).status_code == 422
        assert http.post("/v1/alerts/999999/work-order", headers=li).status_code == 404
        bad = http.post(path, headers=li, json={"assignee": "li\u202ewei"})
        assert bad.status_code == 422, bad.text
        past = http.post(path, headers=li, json={"due_at": "2020-01-01T00:00:00Z"})
        assert past.status_code == 422, past.text
        assert http.get("/v1/work-orders/9223372036854775808", headers=li).status_code == 422
        assert http.get("/v1/work-orders/12345", headers=li).status_code == 404
        assert http.get("/v1/audit", headers=li).status_code == 403

        created = http.post(path, headers=li, json={"assignee": "li-wei", "note": "spare lock"})
        assert created.status_code == 201, created.text
        order = created.json()
        assert (order["state"], order["assignee"], order["created_by"]) == (
            "assigned",
            "li-wei",
            "li-wei",
        )
        assert ms(order["due_at"]) - ms(order["created_at"]) == 7200 * 1000  # the setting
        assert [e["what"] for e in order["log"]] == ["created"]
        again = http.post("/v1/work-orders", headers=zhao, json={"alert_id": alert["id"]})
        assert again.status_code == 409, again.text
        early = http.post(
            f"/v1/work-orders/{order['id']}/state", headers=li, json={"state": "fixed"}
        )
        assert early.status_code == 409
        assert "not resolved" in early.json()["detail"]
        closing = http.post(
            f"/v1/work-orders/{order['id']}/state", headers=li, json={"state": "closed"}
        )
        assert closing.status_code == 409

        mine = http.get("/v1/work-orders", headers=li, params={"mine": "true"}).json()
        assert [o["id"] for o in mine["work_orders"]] == [order["id"]]
        theirs = http.get("/v1/work-orders", headers=zhao, params={"mine": "true"}).json()
        assert theirs["work_orders"] == []

        # the cabinet's own door, while the order is open: someone is there
        cabinet.send("event", {"type": "door_opened"})

        def on_site() -> dict[str, Any]:
            got: dict[str, Any] = http.get(f"/v1/work-orders/{order['id']}", headers=li).json()
            assert got["state"] == "on_site", got
            return got

        seen = eventually(on_site, timeout=10)
        assert seen["on_site_how"] == "door"
        assert seen["log"][-1]["actor"] == CABINET

        # healthy again: the alert verifies (1 s) and resolves, the order is fixed
        cabinet.status([])

        def fixed() -> dict[str, Any]:
            got: dict[str, Any] = http.get(f"/v1/work-orders/{order['id']}", headers=li).json()
            assert got["state"] == "fixed", got
            return got

        done = eventually(fixed, timeout=15)
        resolved = http.get(f"/v1/alerts/{alert['id']}", headers=li).json()
        assert resolved["status"] == "resolved"
        assert resolved["resolved_how"] == "auto"
        assert done["fixed_at"] == resolved["resolved_at"]

        closed = http.post(
            f"/v1/work-orders/{order['id']}/state",
            headers=zhao,
            json={"state": "closed", "note": "lock replaced"},
        )
        assert closed.status_code == 200, closed.text
        assert (closed.json()["state"], closed.json()["closed_by"]) == ("closed", "zhao-lei")
        assert [(e["actor"], e["what"]) for e in closed.json()["log"]] == [
            ("li-wei", "created"),
            (CABINET, "on_site"),
            ("chargewatch", "fixed"),
            ("zhao-lei", "closed"),
        ]

        # the audit log: each action under its key's owner
        admin = bearer(keys["admin"])
        entries = http.get("/v1/audit", headers=admin, params={"target": str(order["id"])})
        acts = [(e["action"], e["actor"]["name"]) for e in entries.json()["entries"]]
        assert acts == [("work_order.state", "zhao-lei"), ("work_order.create", "li-wei")]

        # repair statistics from the alert's own timestamps
        stats = http.get("/v1/stats/repair", headers=li, params={"by": "code"})
        assert stats.status_code == 200, stats.text
        (group,) = [g for g in stats.json()["groups"] if g["key"] == "door_fault"]
        repair_s = (ms(resolved["resolved_at"]) - ms(resolved["opened_at"])) / 1000
        assert group["alerts"] == 1
        assert (group["resolved"], group["acknowledged"]) == (1, 0)
        assert group["mttr_s"] == group["mttr_median_s"] == pytest.approx(repair_s, abs=1e-3)
        assert group["mtta_s"] is None
        by_station = http.get("/v1/stats/repair", headers=li).json()
        assert [g["key"] for g in by_station["groups"]] == ["wanguo-south"]
        assert http.get("/v1/stats/repair", headers=li, params={"by": "x"}).status_code == 422
        span = {"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}
        assert http.get("/v1/stats/repair", headers=li, params=span).status_code == 422

        # the contract: answers and errors declared
        paths = http.get("/openapi.json").json()["paths"]
        move = paths["/v1/work-orders/{order_id}/state"]["post"]["responses"]
        # every error it can give, and no 403: maintainer is the lowest role a key has
        assert set(move) == {"200", "400", "401", "404", "409", "413", "422", "503"}
        assert move["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/WorkOrderDetail"
        )
        assert move["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        listed = paths["/v1/work-orders"]["get"]["responses"]["200"]["content"]
        assert listed["application/json"]["schema"]["$ref"].endswith("/WorkOrderList")
    finally:
        cabinet.client.close()
        http.close()


def test_an_overdue_order_is_notified_like_an_escalation(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's own timer (supervised) finds the order past its due time and sends
    one ``overdue`` notification, with the order, to a subscription that takes escalations."""
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WORK_ORDERS__DUE_MINOR_S", "1")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WORK_ORDERS__CHECK_S", "0.2")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WORK_ORDERS__REPEAT_S", "0")
    data_dir = tmp_path / "serve" / "data"
    li = bearer(create_key(data_dir, "maintainer", "li-wei"))
    admin = bearer(create_key(data_dir, "admin", "ops-lead"))
    with (
        receiver() as hook,
        chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as svc,
        httpx.Client(base_url=svc.base_url, timeout=10) as http,
    ):
        sub = http.post("/v1/webhooks", headers=admin, json={"url": hook.url, "format": "json"})
        assert sub.status_code == 201, sub.text
        cabinet = Cabinet(broker.port)
        try:
            cabinet.send(
                "state", {"online": True, "kind": "cabinet", "heartbeat_s": 30, "slots": SLOTS}
            )
            cabinet.status(["lock_failure"])

            def alert_id() -> int:
                r = http.get("/v1/alerts", headers=li, params={"rule": "lock_failure"})
                found = r.json()["alerts"]
                assert len(found) == 1, found
                return int(found[0]["id"])

            aid = eventually(alert_id, timeout=15)
            made = http.post(f"/v1/alerts/{aid}/work-order", headers=li, json={"assignee": "王芳"})
            assert made.status_code == 201, made.text

            def overdue() -> dict[str, Any]:
                bodies = [r.json for r in hook.delivered() if r.json["event"] == "overdue"]
                assert len(bodies) == 1, [r.json["event"] for r in hook.delivered()]
                body: dict[str, Any] = bodies[0]
                return body

            body = eventually(overdue, timeout=10)
            assert body["alert"]["id"] == aid
            assert body["work_order"]["id"] == made.json()["id"]
            assert body["title"].startswith("【次要】工单超时：锁止故障")
            assert "处理人 王芳" in body["summary"]
            order = http.get(f"/v1/work-orders/{made.json()['id']}", headers=li).json()
            assert order["overdue"] is True
            assert order["overdue_notices"] == 1
            assert [e["note"] for e in order["log"] if e["what"] == "overdue"] == ["notice 1"]
        finally:
            cabinet.client.close()
