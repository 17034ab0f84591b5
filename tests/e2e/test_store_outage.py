"""A store outage against a real ``chargewatch serve``: the SQLite file write-locked by
another process (an admin's shell, a backup) while messages arrive. The service must say so
within seconds (not after the 10 s busy timeout), raise a critical alert and page it through
a webhook, and come back with nothing lost once the lock goes."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from api.auth import KeyStore
from tests.alerts.keys import maintainer_get
from tests.alerts.receiver import Receiver, receiver
from tests.ingest.locker import locked
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

DEVICE = "SVC-P03"
DB = "chargewatch.db"
FAST = {
    "CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0",
    "CHARGEWATCH_INGEST__ALERTS__TICK_S": "0.2",
    "CHARGEWATCH_INGEST__ALERTS__VERIFY_S": "1",
    "CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__BACKOFF_S": "0.05",
}


@pytest.fixture
def served(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Service, Receiver]]:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    with receiver() as hook, chargewatch_serve(tmp_path / "serve", broker.url) as svc:
        yield svc, hook


def publish(broker: Process, channel: str, payload: dict[str, object]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="store-outage-test")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        topic = f"cw/v1/{DEVICE}/{channel}"
        client.publish(topic, json.dumps(payload).encode(), qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def birth() -> dict[str, object]:
    return {"v": 1, "ts": int(time.time() * 1000), "boot": "out1", "seq": 0, "online": True,
            "kind": "pile", "ports": 10}  # fmt: skip


def status(seq: int) -> dict[str, object]:
    ports = [{"n": n, "state": "available"} for n in range(1, 11)]
    return {"v": 1, "ts": int(time.time() * 1000), "boot": "out1", "seq": seq, "kind": "pile",
            "ports": ports}  # fmt: skip


def stored_seqs(data_dir: Path) -> list[int]:
    db = sqlite3.connect(data_dir / DB, timeout=10)
    try:
        rows = db.execute(
            "SELECT seq FROM messages WHERE device_id = ? ORDER BY seq", (DEVICE,)
        ).fetchall()
    finally:
        db.close()
    return [int(r[0]) for r in rows]


def add_webhook(service: Service, url: str) -> None:
    store = KeyStore.in_dir(service.data_dir)
    try:
        token = store.create("store-outage-admin", "admin")[1]
    finally:
        store.close()
    created = httpx.post(
        service.base_url + "/v1/webhooks",
        headers={"Authorization": f"Bearer {token}"},
        json={"url": url, "secret": "store-outage-secret", "rules": ["store_unavailable"]},
        timeout=10,
    )
    assert created.status_code == 201, created.text


def test_a_locked_store_fails_readyz_at_once_and_loses_nothing(
    broker: Process, served: tuple[Service, Receiver]
) -> None:
    svc, _ = served
    publish(broker, "state", birth())
    eventually(lambda: _stored(svc, [0]))
    with locked(svc.data_dir / DB):
        publish(broker, "status", status(1))  # its write now waits for the lock
        locked_at = time.monotonic()

        def not_ready() -> None:
            response = svc.get("/readyz")
            assert response.status_code == 503, response.text
            assert "store write" in " ".join(response.json()["problems"])

        eventually(not_ready, timeout=5)
        assert time.monotonic() - locked_at < 4  # not the 10 s busy timeout
        assert stored_seqs(svc.data_dir) == [0]  # WAL: we can read while it is locked
    eventually(lambda: _ready(svc), timeout=15)
    eventually(lambda: _stored(svc, [0, 1]), timeout=15)


def _ready(service: Service) -> None:
    response = service.get("/readyz")
    assert response.status_code == 200, response.text


def _stored(service: Service, seqs: list[int]) -> None:
    assert stored_seqs(service.data_dir) == seqs


def test_a_locked_store_raises_a_critical_alert_and_pages_it(
    broker: Process, served: tuple[Service, Receiver]
) -> None:
    svc, hook = served
    add_webhook(svc, hook.url)
    publish(broker, "state", birth())
    eventually(lambda: _stored(svc, [0]))
    with locked(svc.data_dir / DB):
        publish(broker, "status", status(1))
        locked_at = time.monotonic()

        def paged() -> None:
            assert events(hook)[:1] == [("opened", "store_unavailable")]

        eventually(paged, timeout=40)
        # store_stuck_s (2 s) and a tick, not the alert store's busy timeout, twice (~21 s)
        assert time.monotonic() - locked_at < 8
        opened = hook.delivered()[0].json["alert"]
        assert opened["severity"] == "critical"
        assert "store write" in opened["info"]
    eventually(lambda: _ready(svc), timeout=15)

    def resolved() -> None:
        assert ("resolved", "store_unavailable") in events(hook)

    eventually(resolved, timeout=15)
    alerts = maintainer_get(svc, "/v1/alerts", rule="store_unavailable").json()["alerts"]
    assert [(a["status"], a["resolved_how"]) for a in alerts] == [("resolved", "auto")]
    eventually(lambda: _stored(svc, [0, 1]), timeout=15)


def events(hook: Receiver) -> list[tuple[str, str]]:
    return [(r.json["event"], r.json["alert"]["rule"]) for r in hook.delivered()]
