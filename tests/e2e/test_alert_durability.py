"""No alert is lost across a stop or a crash (issue 11 B), against real processes: mosquitto,
``chargewatch serve``, and SQLite held by another process.

Before the fix, a stop cancelled the commit in progress (its thread still committed, but no
ack was sent and no rule saw the message; the redelivery was then a duplicate), and a crash
between a batch's commit and the alert writer's lost the alerts of the events in it: they
live only in the rules' memory.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

PILES = [f"SVC-P{n:02d}" for n in range(1, 21)]  # 20 ten-port piles of the shipped catalog
CODES = ["over_current", "relay_stuck", "meter_failure", "ground_fault", "under_voltage"]
BOOT = "boot0001"


class Publisher:
    """A plain MQTT client as the devices: QoS 1, every PUBACK awaited."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="devices")
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[paho.MQTTMessageInfo] = []

    def send(self, device: str, channel: str, body: dict[str, Any]) -> None:
        payload = {"v": 1, "ts": int(time.time() * 1000), "boot": BOOT, **body}
        info = self.client.publish(
            f"cw/v1/{device}/{channel}", json.dumps(payload), qos=1, retain=channel != "event"
        )
        self.infos.append(info)

    def births(self) -> None:
        for device in PILES:
            self.send(
                device,
                "state",
                {"seq": 0, "online": True, "kind": "pile", "ports": 10, "heartbeat_s": 30},
            )

    def wait_acked(self, timeout: float = 60) -> None:
        for info in self.infos:
            info.wait_for_publish(timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _fault(seq: int, code: str, port: int) -> dict[str, Any]:
    return {"seq": seq, "type": "fault_raised", "code": code, "port": port}


def _stored_faults(data: Path) -> set[tuple[str, int, str]]:
    db = sqlite3.connect(data / "chargewatch.db")
    try:
        rows = db.execute("SELECT device_id, payload FROM messages WHERE type = 'event'").fetchall()
    finally:
        db.close()
    return {
        (device, int(body["port"]), str(body["code"]))
        for device, text in rows
        if (body := json.loads(text))["type"] == "fault_raised"
    }


def _alerted(data: Path) -> set[tuple[str, int, str]]:
    db = sqlite3.connect(data / "chargewatch.db")
    try:
        rows = db.execute(
            "SELECT device_id, unit, code FROM alerts WHERE rule = 'fault'"
        ).fetchall()
    finally:
        db.close()
    return {(d, int(u), c) for d, u, c in rows if d is not None and u is not None}


@contextmanager
def _hold_write_lock(db: Path, seconds: float) -> Iterator[None]:
    """Another process holds SQLite's write lock on the service's file for ``seconds``."""
    script = (
        "import sqlite3, sys, time\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "db.execute('COMMIT')\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, str(db), str(seconds)], stdout=subprocess.PIPE
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        yield


def test_sigterm_while_the_write_waits_on_a_lock_loses_no_alert(tmp_path: Path) -> None:
    """The issue's deterministic case: a write lock held 6 s, a fault_raised, SIGTERM within
    the window, restart: the event is stored and its alert exists."""
    data = tmp_path / "data"
    with mosquitto(tmp_path / "mosquitto") as broker:
        devices = Publisher(broker.port)
        try:
            with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data) as service:
                devices.births()
                devices.wait_acked()
                eventually(lambda: _assert_online(service, PILES[0]), timeout=20)
                with _hold_write_lock(data / "chargewatch.db", 6):
                    devices.send(PILES[0], "event", _fault(1, "relay_stuck", 3))
                    time.sleep(1)  # the pipeline has it, its write waits on the lock
                    started = time.monotonic()
                    service.process.stop(signal.SIGTERM, timeout=30)
                    stopped_after = time.monotonic() - started
                assert service.process.proc is not None
                assert service.process.proc.returncode == 0
            assert _stored_faults(data) == {(PILES[0], 3, "relay_stuck")}
            # the stop waited for the commit and its rules, and saved the alert
            assert _alerted(data) == {(PILES[0], 3, "relay_stuck")}, (
                f"stopped after {stopped_after:.1f}s"
            )
            with chargewatch_serve(tmp_path / "serve2", broker.url, data_dir=data) as service:
                alerts = _open_alerts(service)
                assert [(a["device"], a["port"], a["code"]) for a in alerts] == [
                    (PILES[0], 3, "relay_stuck")
                ]
        finally:
            devices.close()


def _assert_online(service: Any, device: str) -> None:
    assert service.get(f"/v1/devices/{device}").json()["online"] is True


def _open_alerts(service: Any) -> list[dict[str, Any]]:
    from tests.alerts.keys import maintainer_get

    answer = maintainer_get(service, "/v1/alerts", rule="fault", status="open")
    assert answer.status_code == 200, answer.text
    alerts: list[dict[str, Any]] = answer.json()["alerts"]
    return alerts


def test_kill_9_mid_stream_of_faults_leaves_no_stored_fault_without_its_alert(
    tmp_path: Path,
) -> None:
    """Before the fix, four runs left 136, 0, 98 and 273 stored fault events with no alert."""
    data = tmp_path / "data"
    faults = [
        (device, port, code) for device in PILES for port in range(1, 11) for code in CODES
    ]  # 1,000 distinct conditions, each raised once
    with mosquitto(tmp_path / "mosquitto") as broker:
        devices = Publisher(broker.port)
        stop = threading.Event()
        try:
            with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data) as service:
                devices.births()
                devices.wait_acked()
                eventually(lambda: _assert_online(service, PILES[-1]), timeout=20)
                seqs = dict.fromkeys(PILES, 1)

                def stream() -> None:
                    for device, port, code in faults:
                        if stop.is_set():
                            return
                        devices.send(device, "event", _fault(seqs[device], code, port))
                        seqs[device] += 1
                        time.sleep(0.0005)  # ~2,000 msg/s

                publisher = threading.Thread(target=stream, daemon=True)
                publisher.start()
                eventually(lambda: _assert_at_least(len(_stored_faults(data)), 200), timeout=30)
                service.process.kill()  # SIGKILL: nothing flushed, nothing said
                publisher.join(60)
            devices.wait_acked()
            with chargewatch_serve(tmp_path / "serve2", broker.url, data_dir=data):

                def every_fault_stored_and_alerted() -> None:
                    stored = _stored_faults(data)
                    assert len(stored) == len(faults)
                    missing = stored - _alerted(data)
                    assert not missing, f"{len(missing)} stored faults with no alert"

                eventually(every_fault_stored_and_alerted, timeout=60, interval=0.5)
        finally:
            stop.set()
            devices.close()


def _assert_at_least(value: int, floor: int) -> None:
    assert value >= floor
