"""QoS 1 redeliveries across graceful mosquitto restarts are counted once: a message applied
but not yet acknowledged when the broker stops comes again after the restart, after newer
ones, and must count as a duplicate, not as out of order (issue 11, part C: 12 "out of
order" after two restarts with nothing reordered)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

DEVICES = [f"SVC-P{n:02d}" for n in range(1, 21)]
BOOT = "redeliv1"
RATE = 400  # messages a second, round-robin over DEVICES: each device's seqs in order


def metric(service: Service, name: str) -> float:
    for line in service.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def status(seq: int) -> str:
    ports = [{"n": n, "state": "charging" if n <= seq % 11 else "available"} for n in range(1, 11)]
    body = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": BOOT, "seq": seq}
    return json.dumps({**body, "kind": "pile", "ports": ports})


def test_redeliveries_after_broker_restarts_count_once(tmp_path: Path) -> None:
    with mosquitto(tmp_path / "mosquitto") as broker:
        publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id="redelivery-publisher")
        publisher.max_inflight_messages_set(1000)
        publisher.reconnect_delay_set(1, 2)
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        stop = threading.Event()
        last_seq = [0]

        def stream() -> None:
            for device in DEVICES:
                birth = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": BOOT, "seq": 0,
                         "online": True, "kind": "pile", "ports": 10}  # fmt: skip
                publisher.publish(f"cw/v1/{device}/state", json.dumps(birth), qos=1, retain=True)
            seq = 1
            while not stop.is_set():
                for device in DEVICES:
                    publisher.publish(f"cw/v1/{device}/status", status(seq), qos=1, retain=True)
                last_seq[0] = seq
                seq += 1
                stop.wait(len(DEVICES) / RATE)

        thread = threading.Thread(target=stream, daemon=True)
        with chargewatch_serve(tmp_path / "serve", broker.url) as service:
            thread.start()

            def more_than(count: float) -> None:
                assert metric(service, "chargewatch_messages_received_total") >= count

            eventually(lambda: more_than(600), timeout=20)
            # hold the store's write lock: ingest receives and applies, but can neither write
            # nor acknowledge, so the broker keeps what it delivered as in flight
            lock = sqlite3.connect(service.data_dir / "chargewatch.db", isolation_level=None)
            lock.execute("BEGIN IMMEDIATE")

            def inflight(at_least: float) -> None:
                assert metric(service, "chargewatch_inflight_messages") >= at_least

            eventually(lambda: inflight(300), timeout=20)  # 15 statuses a device, unwritten
            broker.stop()  # graceful: mosquitto saves our session, its in-flight messages too
            broker.start()  # and delivers them again, after what ingest already applied
            eventually(lambda: inflight(600), timeout=30)
            lock.execute("ROLLBACK")
            lock.close()
            stop.set()
            thread.join(10)

            def settled() -> None:
                for device in DEVICES:
                    view = service.get(f"/v1/devices/{device}").json()
                    assert view["status_seq"] == last_seq[0], device

            eventually(settled, timeout=30)
            publisher.loop_stop()
            publisher.disconnect()
            # nothing was reordered on the wire: every repeat is a redelivery, counted once
            assert metric(service, "chargewatch_messages_out_of_order_total") == 0
            # and there were redeliveries: the in-flight statuses held by the lock
            assert metric(service, "chargewatch_messages_duplicate_total") >= 300
