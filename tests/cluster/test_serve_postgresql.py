"""``chargewatch serve --db postgresql://...``: the one-process service with its state in
PostgreSQL, against real mosquitto and PostgreSQL processes. A device's status reaches the
riders' API and the twin row; a key made by ``chargewatch keys --db`` works; an alert opens, is acknowledged over HTTP and is so in
PostgreSQL; a restart (with another, empty data dir) keeps all of it; a second serve on the database is
refused while the first runs; a database behind the
schema is refused with the message that says what to do, and left as it was."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.db import migrate
from tests.pg_server import PgServer
from tests.servers import Process, Service, chargewatch_argv, chargewatch_serve, eventually
from tests.servers import mosquitto as start_mosquitto

pytestmark = pytest.mark.e2e

DEVICE, STATION = "YGR-P01", "yungu-road"  # a 10-port pile of the shipped district
BOOT = "boot-serve-pg"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Process]:
    with start_mosquitto(tmp_path / "mosquitto") as process:
        yield process


class Device:
    """The pile, as a plain MQTT client: QoS 1, no retained messages (what a restarted
    service shows must come from PostgreSQL, not from the broker)."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="serve-pg-device")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, channel: str, body: dict[str, Any]) -> None:
        payload = {"v": 1, "ts": int(time.time() * 1000), "boot": BOOT, **body}
        info = self.client.publish(f"cw/v1/{DEVICE}/{channel}", json.dumps(payload), qos=1)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _pile(service: Service) -> dict[str, Any]:
    r = service.get("/v1/stations")
    assert r.status_code == 200, r.text
    (station,) = [s for s in r.json()["stations"] if s["id"] == STATION]
    return dict(station["piles"])


def _alerts(service: Service, token: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{service.base_url}/v1/alerts",
        params={"station": STATION},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return [a for a in r.json()["alerts"] if a["device"] == DEVICE and a["rule"] == "fault"]


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql).fetchall())  # type: ignore[arg-type]


def test_serve_keeps_its_state_in_postgresql(tmp_path: Path, broker: Process, pg_url: str) -> None:
    made = subprocess.run(  # the key in PostgreSQL, where serve looks for it
        chargewatch_argv("keys", "--db", pg_url, "create", "--name", "tests"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token = made.stdout.splitlines()[0]
    device = Device(broker.port)
    try:
        with chargewatch_serve(tmp_path / "first", broker.url, "--db", pg_url) as service:
            device.send("state", {"seq": 0, "online": True, "kind": "pile", "ports": 10,
                                  "heartbeat_s": 300})  # fmt: skip
            ports = [{"n": n, "state": "charging" if n <= 3 else "available"} for n in range(1, 11)]
            device.send("status", {"seq": 1, "kind": "pile", "ports": ports})

            def seven_free() -> None:
                pile = _pile(service)
                assert (pile["online"], pile["ports_free"]) == (1, 7), pile

            eventually(seven_free, timeout=15)
            # a second serve on the same database is refused at start (ingest.statedb)
            second = subprocess.run(
                chargewatch_argv("serve", "--port", "0", "--data-dir", str(tmp_path / "two"),
                                 "--broker", broker.url, "--db", pg_url),
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert second.returncode == 1, second.stderr
            refusal = second.stderr.strip().splitlines()[-1]
            assert refusal.startswith("chargewatch: another chargewatch serve (chargewatch-serve")
            assert refusal.endswith("one serve per database; stop it first")
            (record,) = _rows(pg_url, f"SELECT record FROM twins WHERE device_id = '{DEVICE}'")
            twin = json.loads(record[0])
            assert (twin["boot"], twin["status_seq"]) == (BOOT, 1)

            device.send("event", {"seq": 2, "type": "fault_raised", "code": "over_current",
                                  "port": 4})  # fmt: skip
            alert = eventually(lambda: _alerts(service, token)[0], timeout=15)
            assert (alert["status"], alert["port"]) == ("open", 4)
            r = httpx.post(
                f"{service.base_url}/v1/alerts/{alert['id']}/ack",
                json={"note": "on my way"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "acknowledged"
            by = r.json()["acknowledged_by"]

            def acknowledged_in_postgresql() -> None:
                rows = _rows(pg_url, f"SELECT status FROM alerts WHERE id = {alert['id']}")
                assert rows == [("acknowledged",)]

            eventually(acknowledged_in_postgresql, timeout=10)
            # the API's audit log is in PostgreSQL too, and nothing went to a file
            audited = _rows(pg_url, "SELECT action FROM audit_log")
            assert ("alert.acknowledge",) in audited
            assert not (service.data_dir / "chargewatch.db").exists()

        # another data dir, empty: whatever the second start shows is from PostgreSQL
        with chargewatch_serve(tmp_path / "second", broker.url, "--db", pg_url) as service:
            assert _pile(service)["ports_free"] == 7
            (again,) = _alerts(service, token)
            assert (again["id"], again["status"]) == (alert["id"], "acknowledged")
            assert again["acknowledged_by"] == by
    finally:
        device.close()


def test_serve_refuses_a_database_behind_its_schema(tmp_path: Path, pg_session: PgServer) -> None:
    url = pg_session.create_database(f"behind_{os.getpid()}_{time.monotonic_ns()}")
    done = subprocess.run(
        chargewatch_argv("serve", "--port", "0", "--data-dir", str(tmp_path / "data")),
        env={**os.environ, "CHARGEWATCH_DB": url},  # the URL from the environment
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "this chargewatch needs" in done.stderr
    assert f"run `chargewatch db upgrade --db {url}`" in done.stderr
    assert migrate.revision_of(url) is None  # serve does not migrate PostgreSQL itself
