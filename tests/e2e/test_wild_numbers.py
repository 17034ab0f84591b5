"""One device message with a wild number, against a real mosquitto and a real ``chargewatch
serve``: it is a dead letter or is held, and neither stops alerting nor leaves lasting
wrong state (issue 11, parts A and C)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

PILE = "SVC-P01"  # 10 ports, at service-centre with 39 more piles of 10
STATION = "service-centre"
BOOT = "wild1"


@pytest.fixture
def service(broker: Process, tmp_path: Path) -> Iterator[Service]:
    with chargewatch_serve(tmp_path / "serve", broker.url) as svc:
        yield svc


@pytest.fixture
def client(broker: Process) -> Iterator[paho.Client]:
    """One connection, QoS 1: the broker delivers its messages in the order they are sent."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="wild-numbers-test")
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    yield c
    c.loop_stop()
    c.disconnect()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def send(client: paho.Client, channel: str, body: dict[str, Any], device: str = PILE) -> None:
    payload = {"v": 1, "ts": now_ms(), "boot": BOOT, **body}
    client.publish(f"cw/v1/{device}/{channel}", json.dumps(payload), qos=1).wait_for_publish(5)


def status(seq: int, charging: int = 0, **extra: Any) -> dict[str, Any]:
    ports = [{"n": n, "state": "charging" if n <= charging else "available"} for n in range(1, 11)]
    return {"seq": seq, "kind": "pile", "ports": ports, **extra}


def birth(seq: int, **extra: Any) -> dict[str, Any]:
    return {"seq": seq, "online": True, "kind": "pile", "ports": 10, **extra}


def fault(seq: int, **unit: int) -> dict[str, Any]:
    return {"seq": seq, "type": "fault_raised", "code": "smoke", **unit}


def device(service: Service) -> dict[str, Any]:
    body: dict[str, Any] = service.get(f"/v1/devices/{PILE}").json()
    return body


def dead_letter_counts(service: Service) -> dict[str, int]:
    counts: dict[str, int] = maintainer_get(service, "/v1/deadletters").json()["counts"]
    return counts


def test_a_port_that_does_not_exist_never_stops_alerting(
    client: paho.Client, service: Service
) -> None:
    # port 2^63 once passed validation and killed the alert writer (its SQLite insert
    # overflowed): /v1/alerts hung from then on and no alert was saved again
    send(client, "state", birth(0))
    send(client, "status", status(1))
    send(client, "event", fault(2, port=2**63))
    send(client, "event", fault(3, port=11))  # a 10-port pile
    send(client, "event", fault(4, port=3))

    def alerted() -> None:
        response = maintainer_get(service, "/v1/alerts", device=PILE)  # 10 s timeout: no hang
        assert response.status_code == 200
        faults = [(a["code"], a["port"]) for a in response.json()["alerts"]]
        assert faults == [("smoke", 3)]

    eventually(alerted)

    def counted() -> None:
        assert dead_letter_counts(service) == {"schema": 1, "unknown_unit": 1}

    eventually(counted)


def test_one_forged_message_leaves_no_lasting_wrong_state(
    client: paho.Client, service: Service
) -> None:
    send(client, "state", birth(0))
    send(client, "status", status(1, charging=2))

    def free_ports(free: int) -> None:
        piles = service.get(f"/v1/stations/{STATION}").json()["piles"]
        assert (piles["ports_total"], piles["ports_free"]) == (400, free)

    eventually(lambda: free_ports(8))

    # a birth claiming 256 ports (it once made ports_total 646 here): a dead letter
    send(client, "state", birth(2, ports=256))

    def refused() -> None:
        assert dead_letter_counts(service) == {"count_mismatch": 1}

    eventually(refused)
    # a seq near 2^53: held, so the device's own next status still applies
    send(client, "status", status(2**53 - 1, charging=10))
    send(client, "status", status(3, charging=1))

    def real_status_applied() -> None:
        view = device(service)
        assert (view["status_seq"], view["lost_messages"]) == (3, 1)  # 2 was the dead birth
        assert view["online"] is True

    eventually(real_status_applied)
    eventually(lambda: free_ports(9))

    # a forged Will naming the live connection, then the device's next status: online again
    client.publish(
        f"cw/v1/{PILE}/state", json.dumps({"v": 1, "online": False, "boot": BOOT, "seq": 0}), qos=1
    ).wait_for_publish(5)

    def offline() -> None:
        assert device(service)["state_online"] is False

    eventually(offline)
    send(client, "status", status(4, charging=1))

    def back_online() -> None:
        view = device(service)
        assert (view["online"], view["state_online"], view["status_seq"]) == (True, True, 4)

    eventually(back_online)
    eventually(lambda: free_ports(9))

    # a status from year 9999: kept as the device's time, and counted as skew
    send(client, "status", status(5, charging=1, ts="9999-12-31T23:59:59Z"))

    def skew_counted() -> None:
        view = device(service)
        assert (view["status_seq"], view["reported_at"]) == (5, "9999-12-31T23:59:59.000Z")
        metrics = service.get("/metrics").text
        assert "chargewatch_clock_skew_messages_total 1.0" in metrics

    eventually(skew_counted)
