"""Contract messages from a plain MQTT client (not our simulator) against a real mosquitto
and a real ``chargewatch serve`` process, checked over HTTP.

The bad-payload cases share one broker and service (``cabinet_service``, started once for
the module with the cabinet reporting 12 ready batteries): each case checks that its dead
letter adds one to its reason's count, is the newest listed, and leaves the cabinet as it
was. Tests that follow one device through births, Wills and sequences get their own."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

PILE = "WGS-P01"
CABINET = "WGS-C01"


class Device:
    """A hand-driven device: one connection, client id = device id, Will set first."""

    def __init__(self, broker: Process, device_id: str, boot: str, birth_seq: int) -> None:
        self.id = device_id
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.will_set(
            f"cw/v1/{device_id}/state",
            json.dumps({"v": 1, "online": False, "boot": boot, "seq": birth_seq}),
            qos=1,
            retain=True,
        )
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, channel: str, payload: dict[str, Any] | bytes, retain: bool = False) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(f"cw/v1/{self.id}/{channel}", data, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def vanish(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker must send the Will."""
        self.client.loop_stop()
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def birth(boot: str, seq: int, kind: str = "pile") -> dict[str, Any]:
    units = {"ports": 10} if kind == "pile" else {"slots": 12}
    return {
        "v": 1,
        "ts": "2026-11-28T12:00:00.000+08:00",
        "boot": boot,
        "seq": seq,
        "online": True,
        "kind": kind,
        "model": "test",
        "firmware": "1.0",
        "heartbeat_s": 30,
        **units,
    }


def pile_status(boot: str, seq: int, charging: int) -> dict[str, Any]:
    ports = [
        {
            "n": n,
            "state": "charging" if n <= charging else "available",
            "power_w": 200.0 if n <= charging else 0,
        }
        for n in range(1, 11)
    ]
    return {
        "v": 1,
        "ts": 1796284800000 + seq,
        "boot": boot,
        "seq": seq,
        "kind": "pile",
        "ports": ports,
    }


@pytest.fixture
def service(broker: Process, tmp_path: Path) -> Iterator[Service]:
    with chargewatch_serve(tmp_path / "serve", broker.url) as svc:
        yield svc


def device(service: Service, device_id: str) -> dict[str, Any]:
    response = maintainer_get(service, f"/v1/devices/{device_id}")  # boot: maintainers only
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def metric(service: Service, name: str) -> float:
    for line in service.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_birth_status_duplicates_and_order(broker: Process, service: Service) -> None:
    pile = Device(broker, PILE, "boota", 0)
    pile.publish("state", birth("boota", 0), retain=True)
    pile.publish("status", pile_status("boota", 1, charging=3), retain=True)

    def three_charging() -> None:
        d = device(service, PILE)
        assert d["online"] is True
        assert d["stale"] is False
        assert [p["state"] for p in d["ports"]].count("charging") == 3
        assert d["ports_free"] == 7

    eventually(three_charging)
    station = service.get("/v1/stations/wanguo-south").json()
    assert station["piles"]["ports_free"] == 7
    assert station["piles"]["online"] == 1

    # a duplicate (the same boot and seq, even with other content), then an older seq not
    # seen before: neither changes state
    pile.publish("status", pile_status("boota", 1, charging=9))
    pile.publish("status", pile_status("boota", 3, charging=5))
    pile.publish("status", pile_status("boota", 2, charging=9))
    eventually(lambda: _assert_charging(service, 5))
    eventually(lambda: _assert_metric(service, "chargewatch_messages_duplicate_total", 1))
    eventually(lambda: _assert_metric(service, "chargewatch_messages_out_of_order_total", 1))
    assert sum(1 for p in device(service, PILE)["ports"] if p["state"] == "charging") == 5

    # a new boot starts a new sequence at 0, and its birth is accepted after a higher seq
    pile.publish("state", birth("bootb", 0))
    pile.publish("status", pile_status("bootb", 1, charging=1))
    eventually(lambda: _assert_charging(service, 1))
    assert device(service, PILE)["boot"] == "bootb"

    # a late message of the replaced boot is ignored
    pile.publish("status", pile_status("boota", 99, charging=8))
    eventually(lambda: _assert_metric(service, "chargewatch_messages_out_of_order_total", 2))
    _assert_charging(service, 1)


def _assert_charging(service: Service, count: int) -> None:
    ports = device(service, PILE)["ports"]
    assert sum(1 for p in ports if p["state"] == "charging") == count


def _assert_metric(service: Service, name: str, value: float) -> None:
    assert metric(service, name) == value


def test_will_marks_offline_and_late_will_is_ignored(broker: Process, service: Service) -> None:
    first = Device(broker, PILE, "bootw", 0)
    first.publish("state", birth("bootw", 0), retain=True)
    first.publish("status", pile_status("bootw", 1, charging=2), retain=True)
    eventually(lambda: _assert_online(service, True))
    first.vanish()  # Will: boot bootw, seq 0
    eventually(lambda: _assert_online(service, False))
    d = device(service, PILE)
    assert d["stale"] is True
    assert d["ports_free"] == 0  # never counted as free while offline
    assert sum(1 for p in d["ports"] if p["state"] == "charging") == 2  # last known, shown stale
    station = service.get("/v1/stations/wanguo-south").json()
    assert station["piles"]["ports_free"] == 0
    assert station["piles"]["last_known_free"] == 8

    # reconnect within the same boot: the birth takes the next seq (2)
    second = Device(broker, PILE, "bootw", 2)
    second.publish("state", birth("bootw", 2), retain=True)
    eventually(lambda: _assert_online(service, True))
    # a late Will of the first connection (seq 0 < birth 2) must not take it offline
    second.publish("state", {"v": 1, "online": False, "boot": "bootw", "seq": 0})
    eventually(lambda: _assert_metric(service, "chargewatch_stale_deaths_total", 1))
    _assert_online(service, True)
    # a graceful goodbye of the current connection does
    second.publish("state", {"v": 1, "online": False, "boot": "bootw", "seq": 2}, retain=True)
    eventually(lambda: _assert_online(service, False))


def _assert_online(service: Service, online: bool) -> None:
    assert device(service, PILE)["online"] is online


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("cw/v1/WGS-C01/status", b"{not json", "not_json"),
        ("cw/v1/WGS-C01/status", b'{"v": 2, "ts": 1, "boot": "abcd", "seq": 5}', "version"),
        ("cw/v1/NOT-IN-CATALOG/status", b'{"v": 1}', "unknown_device"),
        (
            "cw/v1/WGS-C01/status",
            b'{"v":1,"ts":1,"boot":"cab1","seq":9,"kind":"cabinet","slots":[{"n":1,"state":"ready","soc":NaN}]}',
            "not_json",
        ),
        (
            "cw/v1/WGS-C01/status",
            b'{"v":1,"ts":1,"boot":"cab1","seq":9,"kind":"cabinet","slots":[{"n":1,"state":"ready"}]}',
            "count_mismatch",
        ),
        (
            "cw/v1/WGS-C01/status",
            b'{"v":1,"ts":1,"boot":"cab1","seq":9,"kind":"cabinet","slots":[{"n":1,"state":"full"}]}',
            "schema",
        ),
        ("cw/v1/WGS-C01/telemetry", b"{}", "topic"),
        ("cw/v1/-bad-id/status", b"{}", "topic"),
        ("cw/v1/WGS-C01/status", b"x" * (16 * 1024 + 1), "oversized"),
    ],
)
def test_bad_payloads_are_dead_lettered_and_change_nothing(
    cabinet_service: tuple[Process, Service], topic: str, payload: bytes, reason: str
) -> None:
    broker, service = cabinet_service
    _assert_ready(service, 12)
    before = maintainer_get(service, "/v1/deadletters").json()
    newest_before = before["dead_letters"][0]["id"] if before["dead_letters"] else None

    sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="hostile")
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    try:
        sender.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        sender.disconnect()
        sender.loop_stop()

    def dead_lettered() -> None:
        body = maintainer_get(service, "/v1/deadletters").json()
        assert body["counts"].get(reason) == before["counts"].get(reason, 0) + 1, body
        assert body["dead_letters"][0]["id"] != newest_before, body
        assert body["dead_letters"][0]["reason"] == reason
        assert body["dead_letters"][0]["topic"] == topic

    eventually(dead_lettered)
    assert sum(maintainer_get(service, "/v1/deadletters").json()["counts"].values()) == (
        sum(before["counts"].values()) + 1
    ), "one dead letter, of one reason"
    _assert_ready(service, 12)
    assert service.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def cabinet_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Service]]:
    """One broker and service for the bad-payload cases, the cabinet reporting 12 ready."""
    tmp = tmp_path_factory.mktemp("plain-publisher")
    with (
        mosquitto(tmp / "mosquitto") as broker,
        chargewatch_serve(tmp / "serve", broker.url) as svc,
    ):
        cabinet = Device(broker, CABINET, "cab1", 0)
        cabinet.publish("state", birth("cab1", 0, kind="cabinet"), retain=True)
        slots = [{"n": n, "state": "ready", "soc": 95, "battery": f"B-{n}"} for n in range(1, 13)]
        good = {
            "v": 1,
            "ts": 1796284800000,
            "boot": "cab1",
            "seq": 1,
            "kind": "cabinet",
            "slots": slots,
        }
        cabinet.publish("status", good, retain=True)
        eventually(lambda: _assert_ready(svc, 12))
        try:
            yield broker, svc
        finally:
            cabinet.client.disconnect()
            cabinet.client.loop_stop()


def _assert_ready(service: Service, count: int) -> None:
    assert device(service, CABINET)["batteries_ready"] == count


def test_unknown_ids_and_bad_queries(service: Service) -> None:
    assert service.get("/v1/devices/nope").status_code == 404
    assert service.get("/v1/devices/nope").json()["error"] == "not_found"
    assert service.get("/v1/stations/nope").status_code == 404
    bad = service.get("/v1/stations", lat=95, lon=117.3)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["field"] == "query.lat"
    assert service.get("/v1/stations", lat=31.74).status_code == 422
    assert service.get("/v1/stations", kind="bus").status_code == 422
    never = device(service, "GHY-P01")
    assert never["online"] is False
    assert never["ports"] == []
    assert never["last_seen"] is None


def test_stations_sorted_by_distance_and_filtered(service: Service) -> None:
    body = service.get("/v1/stations", lat=31.7398, lon=117.2931, radius_m=5000).json()
    distances = [s["distance_m"] for s in body["stations"]]
    assert distances == sorted(distances)
    assert len(distances) == 7
    assert body["stations"][0]["id"] == "wanguo-south"
    near = service.get("/v1/stations", lat=31.7398, lon=117.2931, radius_m=300).json()
    assert [s["id"] for s in near["stations"]] == ["wanguo-south"]
    everything = service.get("/v1/stations").json()["stations"]
    assert all(s["distance_m"] is None for s in everything)
    assert service.get("/v1/stations", available="true").json()["stations"] == []
