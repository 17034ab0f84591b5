"""Self-monitoring: /metrics shows every counter an operator needs; the watchdog catches a
silent stall (connected, subscribed, yet nothing arrives)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

METRICS = [
    "chargewatch_messages_received_total",
    "chargewatch_messages_accepted_total",
    "chargewatch_messages_duplicate_total",
    "chargewatch_messages_out_of_order_total",
    "chargewatch_dead_letters_total",
    "chargewatch_messages_acked_total",
    "chargewatch_history_rows_written_total",
    "chargewatch_store_write_errors_total",
    "chargewatch_inflight_messages",
    "chargewatch_queue_depth",
    "chargewatch_device_lost_messages",
    "chargewatch_lost_messages",
    "chargewatch_last_message_age_seconds",
    "chargewatch_broker_connected",
    "chargewatch_store_healthy",
    "chargewatch_devices_online",
    "chargewatch_ingest_stalled",
    "chargewatch_data_dir_bytes",
    "chargewatch_disk_free_bytes",
    "chargewatch_disk_size_bytes",
]


@pytest.fixture
def service(broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    # absence rules (the watchdog's alert among them) start at once, not after 15 s
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S", "0")
    with chargewatch_serve(tmp_path / "serve", broker.url) as svc:
        yield svc


def publish(broker: Process, topic: str, payload: dict[str, object] | bytes) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="monitor-test")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client.publish(topic, data, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def samples(service: Service) -> dict[str, float]:
    values = {}
    for line in service.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def status(seq: int, busy: int = 0) -> dict[str, object]:
    ports = [{"n": n, "state": "charging" if n <= busy else "available"} for n in range(1, 11)]
    return {
        "v": 1,
        "ts": int(time.time() * 1000),
        "boot": "mon1",
        "seq": seq,
        "kind": "pile",
        "ports": ports,
    }


def test_metrics_show_every_counter(broker: Process, service: Service) -> None:
    birth = {"v": 1, "ts": int(time.time() * 1000), "boot": "mon1", "seq": 0, "online": True,
             "kind": "pile", "ports": 10}  # fmt: skip
    publish(broker, "cw/v1/SVC-P01/state", birth)
    publish(broker, "cw/v1/SVC-P01/status", status(1))
    publish(broker, "cw/v1/SVC-P01/status", status(1))  # duplicate
    publish(broker, "cw/v1/SVC-P01/status", status(4, busy=2))  # seq 2 and 3 lost
    publish(broker, "cw/v1/SVC-P01/status", b"{")

    def counted() -> None:
        values = samples(service)
        assert values["chargewatch_messages_received_total"] == 5
        assert values['chargewatch_messages_accepted_total{type="status"}'] == 3
        assert values["chargewatch_messages_duplicate_total"] == 1
        assert values['chargewatch_dead_letters_total{reason="not_json"}'] == 1
        assert values["chargewatch_messages_acked_total"] == 5
        assert values["chargewatch_history_rows_written_total"] == 3
        assert values['chargewatch_device_lost_messages{device="SVC-P01"}'] == 2
        assert values["chargewatch_lost_messages"] == 2
        assert values["chargewatch_inflight_messages"] == 0
        assert values["chargewatch_devices_online"] == 1
        assert values["chargewatch_broker_connected"] == 1
        assert values["chargewatch_store_healthy"] == 1
        assert 0 <= values["chargewatch_last_message_age_seconds"] < 60

    eventually(counted)
    exposed = {name.split("{")[0] for name in samples(service)}
    missing = [m for m in METRICS if m not in exposed]
    assert not missing


def test_watchdog_reports_a_silent_stall(broker: Process, service: Service) -> None:
    # a device that promises a heartbeat every second, then falls silent: after 3 heartbeats
    # with nothing from anyone, the service must say it is not ready
    birth = {"v": 1, "ts": int(time.time() * 1000), "boot": "mon1", "seq": 0, "online": True,
             "kind": "pile", "ports": 10, "heartbeat_s": 1}  # fmt: skip
    publish(broker, "cw/v1/SVC-P02/state", birth)
    assert service.get("/readyz").status_code == 200

    def stalled() -> None:
        response = service.get("/readyz")
        assert response.status_code == 503
        assert "silent stall" in " ".join(response.json()["problems"])
        assert samples(service)["chargewatch_ingest_stalled"] == 1

    eventually(stalled, timeout=10)

    def alerted() -> None:
        alerts = maintainer_get(service, "/v1/alerts", rule="ingest_stalled").json()["alerts"]
        assert [(a["rule"], a["severity"], a["status"]) for a in alerts] == [
            ("ingest_stalled", "critical", "open")
        ]
        assert "silent stall" in alerts[0]["info"]

    eventually(alerted, timeout=5)
    publish(broker, "cw/v1/SVC-P02/status", status(1))
    eventually(lambda: _ready(service), timeout=5)


def _ready(service: Service) -> None:
    assert service.get("/readyz").status_code == 200
