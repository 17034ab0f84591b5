"""Duplicates, reordering, a device clock 10 minutes off and a reboot mid-session, from a
plain MQTT client against real mosquitto and ``chargewatch serve``: each message is stored
once, state follows seq (not arrival), and freshness follows our clock (not the device's).

The tests share one broker and service (each drives its own devices, and every check is of
its devices' rows and views)."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

MINUTE_MS = 60_000


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with mosquitto(tmp_path_factory.mktemp("ordering") / "mosquitto") as proc:
        yield proc


@pytest.fixture(scope="module")
def service(broker: Process, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with chargewatch_serve(tmp_path_factory.mktemp("ordering") / "serve", broker.url) as svc:
        yield svc


@pytest.fixture
def client(broker: Process) -> Iterator[paho.Client]:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="ordering-test")
    c.max_inflight_messages_set(1)  # one at a time: the broker forwards in our order
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    yield c
    c.loop_stop()
    c.disconnect()


def send(client: paho.Client, device: str, channel: str, body: dict[str, Any]) -> None:
    info = client.publish(f"cw/v1/{device}/{channel}", json.dumps(body), qos=1)
    info.wait_for_publish(5)
    assert info.is_published()


def now_ms() -> int:
    return int(time.time() * 1000)


def birth(boot: str, seq: int, ts: int, kind: str = "pile") -> dict[str, Any]:
    units = {"ports": 10} if kind == "pile" else {"slots": 12}
    return {"v": 1, "ts": ts, "boot": boot, "seq": seq, "online": True, "kind": kind, **units}


def pile(boot: str, seq: int, ts: int, charging: int, energy: float = 0.0) -> dict[str, Any]:
    ports = [
        {"n": n, "state": "charging" if n <= charging else "available",
         "power_w": 200.0 if n <= charging else 0.0, "energy_wh": energy if n == 1 else 0.0}
        for n in range(1, 11)
    ]  # fmt: skip
    return {"v": 1, "ts": ts, "boot": boot, "seq": seq, "kind": "pile", "ports": ports}


def stored(service: Service, device: str) -> list[tuple[str, int, str]]:
    db = sqlite3.connect(service.data_dir / "chargewatch.db")
    try:
        rows = db.execute(
            "SELECT boot, seq, type FROM messages WHERE device_id = ? ORDER BY boot, seq",
            (device,),
        ).fetchall()
    finally:
        db.close()
    return [(b, int(s), t) for b, s, t in rows]


def device(service: Service, device_id: str) -> dict[str, Any]:
    body: dict[str, Any] = maintainer_get(service, f"/v1/devices/{device_id}").json()  # boot
    return body


def test_duplicates_and_reordering_store_once_and_follow_seq(
    client: paho.Client, service: Service
) -> None:
    dev = "HZA-P01"
    rng = random.Random(3)
    messages = [("state", birth("ord1", 0, now_ms()))]
    for seq in range(1, 121):
        if seq % 10 == 0:
            event = {"v": 1, "ts": now_ms(), "boot": "ord1", "seq": seq, "type": "session_ended",
                     "port": 1, "session": f"s{seq}", "energy_wh": 100.0}  # fmt: skip
            messages.append(("event", event))
        else:
            messages.append(("status", pile("ord1", seq, now_ms(), charging=seq % 11)))
    # swap neighbours here and there, and repeat a fifth of the messages
    wire = list(messages)
    for i in range(1, len(wire) - 1, 7):
        wire[i], wire[i + 1] = wire[i + 1], wire[i]
    wire += [rng.choice(messages) for _ in range(len(messages) // 5)]
    for channel, body in wire:
        send(client, dev, channel, body)

    expected = sorted(("ord1", b["seq"], "birth" if ch == "state" else ch) for ch, b in messages)

    def settled() -> None:
        assert stored(service, dev) == expected
        view = device(service, dev)
        assert view["status_seq"] == 119
        assert sum(p["state"] == "charging" for p in view["ports"]) == 119 % 11
        assert view["lost_messages"] == 0  # every gap was filled by a late message

    eventually(settled)


def test_device_clock_ten_minutes_off_stays_fresh(client: paho.Client, service: Service) -> None:
    for dev, skew in (("HZA-P02", -10 * MINUTE_MS), ("HZA-P03", 10 * MINUTE_MS)):
        ts = now_ms() + skew
        send(client, dev, "state", birth("clk1", 0, ts))
        send(client, dev, "status", pile("clk1", 1, ts, charging=4))

        def fresh(dev: str = dev, ts: int = ts) -> None:
            view = device(service, dev)
            assert view["online"] is True  # freshness is judged by our clock
            assert view["stale"] is False
            assert view["data_age_s"] < 30
            assert view["ports_free"] == 6
            reported = view["reported_at"]  # the device's own time is kept as it said
            assert reported.startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(ts / 1000)))

        eventually(fresh)


def test_reboot_mid_session_counts_each_event_once(client: paho.Client, service: Service) -> None:
    dev = "HZA-P04"
    send(client, dev, "state", birth("bootA", 0, now_ms()))
    started = {"v": 1, "ts": now_ms(), "boot": "bootA", "seq": 1, "type": "session_started",
               "port": 1, "session": "s-77"}  # fmt: skip
    send(client, dev, "event", started)
    send(client, dev, "status", pile("bootA", 2, now_ms(), charging=1, energy=50))
    # power blip: the device reboots (new boot, seq from 0) and resumes the same session
    send(client, dev, "state", birth("bootB", 0, now_ms()))
    send(client, dev, "status", pile("bootB", 1, now_ms(), charging=1, energy=120))
    ended = {"v": 1, "ts": now_ms(), "boot": "bootB", "seq": 2, "type": "session_ended",
             "port": 1, "session": "s-77", "energy_wh": 180.0}  # fmt: skip
    send(client, dev, "event", ended)
    send(client, dev, "status", pile("bootB", 3, now_ms(), charging=0))
    # the broker redelivers the old boot's messages late, and the new boot's end again
    send(client, dev, "event", started)
    send(client, dev, "status", pile("bootA", 2, now_ms(), charging=1, energy=50))
    send(client, dev, "event", ended)

    def settled() -> None:
        rows = stored(service, dev)
        assert rows == [
            ("bootA", 0, "birth"),
            ("bootA", 1, "event"),
            ("bootA", 2, "status"),
            ("bootB", 0, "birth"),
            ("bootB", 1, "status"),
            ("bootB", 2, "event"),
            ("bootB", 3, "status"),
        ]
        view = device(service, dev)
        assert view["boot"] == "bootB"
        assert view["status_seq"] == 3
        assert view["ports_free"] == 10
        assert view["online"] is True

    eventually(settled)
