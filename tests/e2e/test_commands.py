"""Remote commands end to end: HTTP (maintainer key) -> the service (in process, its own
MQTT publisher) -> real mosquitto -> the device -> ``command_result`` -> the pipeline ->
the command's state over HTTP. The devices are the simulator (every command type) and a
plain paho client playing firmware by hand (answering late, twice, never, or for another
device's command); a restart of the service with an open command resends it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.audit import AuditQuery
from api.auth import KeyStore
from devices.catalog import Catalog
from ingest.commands.config import CommandsConfig
from ingest.config import IngestConfig
from ingest.inprocess import read_and_act
from ingest.service import Ingest
from simulators.config import BrokerAddress, FleetConfig
from simulators.fleet import Fleet
from tests.alerts.helpers import eventually
from tests.mqttclients import Client
from tests.servers import Process, free_port

pytestmark = pytest.mark.e2e

PILE, CABINET = "WGS-P01", "WGS-C01"  # run by the simulator
HAND = "WGS-P02"  # played by hand with paho
OTHER = "WGS-P03"  # another hand-played device


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


@dataclass
class Served:
    ingest: Ingest
    http: httpx.AsyncClient
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def send(self, device: str, ctype: str, **body: Any) -> httpx.Response:
        return await self.http.post(
            f"/v1/devices/{device}/commands", headers=self.auth, json={"type": ctype, **body}
        )

    async def command(self, ident: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/commands/{ident}", headers=self.auth)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def state_becomes(self, ident: str, state: str, within_s: float = 10) -> dict[str, Any]:
        async def check() -> dict[str, Any]:
            c = await self.command(ident)
            assert c["state"] == state, c
            return c

        return await eventually(check, within_s=within_s)

    def metric(self, outcome: str) -> float:
        value = self.ingest.metrics.registry.get_sample_value(
            "chargewatch_command_results_total", {"outcome": outcome}
        )
        return value or 0.0


@asynccontextmanager
async def serve(
    broker: Process, data_dir: Path, catalog: Catalog, mqtt_client: str = "gmqtt", **commands: Any
) -> AsyncIterator[Served]:
    config = IngestConfig(
        broker=broker.url,
        client_id=f"ingest-{data_dir.name}",
        data_dir=data_dir,
        mqtt_client=mqtt_client,
        commands=CommandsConfig(**({"ttl_min_s": 1.0, "resend_s": 0.5} | commands)),
    )
    keys = KeyStore.in_dir(data_dir)
    _, token = keys.create("li-wei", "maintainer")
    keys.close()
    async with Ingest(config, catalog) as ingest:
        app = create_app(*read_and_act(ingest))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cw") as http:
            await eventually(lambda: _connected(ingest), within_s=10)
            yield Served(ingest, http, token)


def _connected(ingest: Ingest) -> None:
    assert ingest.source is not None
    assert ingest.source.connected
    assert ingest.commands is not None
    assert ingest.commands.publisher.connected


class HandDevice:
    """Firmware played by hand: a paho client with the device's id, birth and status
    published by the test, its ``cmd`` topic subscribed, answers published when asked."""

    def __init__(self, port: int, device_id: str, units: int = 10) -> None:
        self.id, self.units = device_id, units
        self.boot = f"hand{time.monotonic_ns() % 10**8:08d}"
        self.seq = 0
        self.client = Client(port, client_id=device_id)

    def start(self) -> None:
        assert not self.client.connect().is_failure
        assert self.client.subscribe(f"cw/v1/{self.id}/cmd") == [1]
        self.publish("state", online=True, kind="pile", ports=self.units, heartbeat_s=30)
        ports = [{"n": n, "state": "available"} for n in range(1, self.units + 1)]
        self.publish("status", kind="pile", ports=ports)

    def publish(self, channel: str, **body: Any) -> None:
        head = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": self.boot, "seq": self.seq}
        self.seq += 1
        self.client.publish(f"cw/v1/{self.id}/{channel}", json.dumps(head | body).encode())

    def answer(self, ident: str, result: str = "done", info: str = "ok") -> None:
        self.publish("event", type="command_result", cmd=ident, result=result, info=info)

    def received(self, ident: str) -> int:
        """How many times the command ``ident`` arrived (resends included)."""
        return sum(
            1
            for m in self.client.messages
            if m.topic.endswith("/cmd") and json.loads(m.payload).get("id") == ident
        )

    def close(self) -> None:
        self.client.close()


# -- the simulator: every command type ------------------------------------------------------


async def test_every_command_through_mosquitto_to_the_simulator_and_back(
    broker: Process, tmp_path: Path, catalog: Catalog
) -> None:
    fleet_cfg = FleetConfig(  # behaviour frozen: no rider takes the port or the pack meanwhile
        broker=BrokerAddress("127.0.0.1", broker.port), fault_rate=0.0, duration_s=0
    )
    async with (
        serve(broker, tmp_path / "data", catalog) as svc,
        Fleet(catalog, fleet_cfg, only=[PILE, CABINET]) as fleet,
    ):
        await fleet.ready()
        pile = fleet.device(PILE).model
        free = next(p.n for p in pile.ports if p.state == "available")  # type: ignore[attr-defined]
        cab = fleet.device(CABINET).model
        full = next(s.n for s in cab.slots if s.battery is not None)  # type: ignore[attr-defined]

        async def unit_state(device: str, kind: str, n: int, want: str) -> None:
            async def check() -> None:
                twin = (await svc.http.get(f"/v1/devices/{device}")).json()
                units = twin["ports" if kind == "pile" else "slots"]
                assert next(u for u in units if u["n"] == n)["state"] == want

            await eventually(check, within_s=10)

        steps: list[tuple[str, str, dict[str, Any], str | None]] = [
            (PILE, "disable_port", {"port": free}, "disabled"),
            (PILE, "enable_port", {"port": free}, "available"),
            (CABINET, "disable_slot", {"slot": full}, "disabled"),
            (CABINET, "enable_slot", {"slot": full}, None),
            (CABINET, "lock_battery", {"slot": full}, "reserved"),
            (CABINET, "unlock_battery", {"slot": full}, None),
            (CABINET, "open_door", {}, None),
            (PILE, "resend", {}, None),
            (CABINET, "reboot", {}, None),
        ]
        boot_before = fleet.device(CABINET).boot
        took: list[float] = []
        for device, ctype, unit, shows in steps:
            started = time.monotonic()
            r = await svc.send(device, ctype, **unit)
            assert r.status_code == 202, r.text
            asked = r.json()
            assert (asked["state"], asked["requested_by"], asked["type"]) == (
                "pending",  # stored and published; the broker's PUBACK makes it "sent"
                "li-wei",
                ctype,
            )
            assert asked["sends"] == 1
            done = await svc.state_becomes(asked["id"], "done")
            took.append(time.monotonic() - started)
            assert done["result_at"] is not None
            assert done["sent_at"] is not None  # the broker acknowledged it before the answer
            if shows is not None:
                kind = "pile" if device == PILE else "cabinet"
                await unit_state(device, kind, next(iter(unit.values())), shows)

        async def door_open() -> None:
            twin = (await svc.http.get(f"/v1/devices/{CABINET}")).json()
            assert twin["door_open"] is True, twin
            assert twin["boot"] != boot_before  # and the reboot made a new boot

        await eventually(door_open, within_s=10)
        print(f"commands: POST to done in {min(took):.3f}-{max(took):.3f}s (polled every 20 ms)")
        listed = await svc.http.get(f"/v1/devices/{CABINET}/commands", headers=svc.auth)
        assert [c["type"] for c in listed.json()["commands"]] == [
            "reboot", "open_door", "unlock_battery", "lock_battery", "enable_slot", "disable_slot",
        ]  # fmt: skip
        # every command is in the audit log, the key's owner as the actor
        audit = svc.http._transport.app.state.audit  # type: ignore[attr-defined]
        logged = audit.query(AuditQuery(action="command.create", limit=100))
        assert len(logged) == len(steps)
        assert {(e["actor"]["name"], e["actor"]["role"]) for e in logged} == {
            ("li-wei", "maintainer")
        }

        # refusals by the device: a charging port is in use
        busy = next((p.n for p in pile.ports if p.state == "charging"), None)  # type: ignore[attr-defined]
        if busy is not None:
            r = await svc.send(PILE, "disable_port", port=busy)
            refused = await svc.state_becomes(r.json()["id"], "rejected")
            assert "in use" in refused["info"]


async def test_commands_that_do_not_fit_are_refused_before_sending(
    broker: Process, tmp_path: Path, catalog: Catalog
) -> None:
    async with serve(broker, tmp_path / "data", catalog) as svc:
        cases = [
            (PILE, {"type": "disable_port", "port": 11}, 422),  # the pile has 10 ports
            (PILE, {"type": "disable_port"}, 422),
            (PILE, {"type": "disable_slot", "slot": 1}, 422),  # a pile has no slots
            (PILE, {"type": "open_door"}, 422),
            (CABINET, {"type": "reboot", "slot": 1}, 422),
            (PILE, {"type": "reboot", "ttl_s": 0.1}, 422),  # below ttl_min_s
            (PILE, {"type": "reboot", "ttl_s": 10**9}, 422),
            (PILE, {"type": "self_destruct"}, 422),
            (PILE, {"type": "disable_port", "port": 1, "slot": 1}, 422),
            ("NOPE-1", {"type": "reboot"}, 404),
        ]
        for device, body, status in cases:
            r = await svc.http.post(f"/v1/devices/{device}/commands", headers=svc.auth, json=body)
            assert r.status_code == status, (body, r.text)
        r = await svc.http.post(f"/v1/devices/{PILE}/commands", json={"type": "reboot"})
        assert r.status_code == 401
        assert (
            await svc.http.get("/v1/commands/c-doesnotexist", headers=svc.auth)
        ).status_code == 404
        nothing = await svc.http.get(f"/v1/devices/{PILE}/commands", headers=svc.auth)
        assert nothing.json() == {"commands": []}


# -- a device by hand: late, twice, never, and someone else's -------------------------------


async def test_a_plain_device_answering_late_twice_never_and_for_another(
    broker: Process, tmp_path: Path, catalog: Catalog
) -> None:
    async with serve(broker, tmp_path / "data", catalog) as svc:
        device = HandDevice(broker.port, HAND)
        other = HandDevice(broker.port, OTHER)
        await asyncio.to_thread(device.start)
        await asyncio.to_thread(other.start)
        try:
            # late: no answer for a while (resent meanwhile), then done
            late = (await svc.send(HAND, "disable_port", port=2, ttl_s=30)).json()
            await svc.state_becomes(late["id"], "sent")
            await eventually(lambda: _assert(device.received(late["id"]) >= 3), within_s=5)
            await asyncio.to_thread(device.answer, late["id"], "done", "port 2 disabled")
            done = await svc.state_becomes(late["id"], "done")
            assert (done["result"], done["info"]) == ("done", "port 2 disabled")

            # twice: the same answer repeated is one state change
            twice = (await svc.send(HAND, "enable_port", port=2)).json()
            await eventually(lambda: _assert(device.received(twice["id"]) >= 1), within_s=5)
            await asyncio.to_thread(device.answer, twice["id"], "rejected", "not now")
            first = await svc.state_becomes(twice["id"], "rejected")
            repeated = svc.metric("repeated")
            await asyncio.to_thread(device.answer, twice["id"], "done", "changed my mind")
            await eventually(lambda: _assert(svc.metric("repeated") == repeated + 1))
            again = await svc.command(twice["id"])
            assert (again["state"], again["info"], again["result_at"]) == (
                "rejected", "not now", first["result_at"],
            )  # fmt: skip
            assert again["repeats"] == 1

            # another device answering this device's command changes nothing
            theirs = (await svc.send(HAND, "reboot", ttl_s=30)).json()
            unknown = svc.metric("unknown")
            await asyncio.to_thread(other.answer, theirs["id"], "done")
            await eventually(lambda: _assert(svc.metric("unknown") == unknown + 1))
            assert (await svc.command(theirs["id"]))["state"] in ("pending", "sent")
            await asyncio.to_thread(device.answer, theirs["id"], "done")
            await svc.state_becomes(theirs["id"], "done")

            # never: expired at its time; an answer after that is kept, the state stays
            never = (await svc.send(HAND, "disable_port", port=3, ttl_s=1.5)).json()
            started = time.monotonic()
            expired = await svc.state_becomes(never["id"], "expired", within_s=5)
            assert time.monotonic() - started < 3.0
            assert expired["result"] is None
            sends = device.received(never["id"])
            assert sends >= 2  # resent while open ...
            await asyncio.sleep(1.2)
            assert device.received(never["id"]) == sends  # ... and never after it expired
            await asyncio.to_thread(device.answer, never["id"], "done", "sorry, late")

            async def kept() -> None:
                c = await svc.command(never["id"])
                assert (c["state"], c["late_result"], c["late_info"]) == (
                    "expired", "done", "sorry, late",
                )  # fmt: skip

            await eventually(kept)
            assert svc.metric("late") == 1
            listed = await svc.http.get(f"/v1/devices/{HAND}/commands", headers=svc.auth)
            states = {c["id"]: c["state"] for c in listed.json()["commands"]}
            assert states == {
                late["id"]: "done", twice["id"]: "rejected", theirs["id"]: "done",
                never["id"]: "expired",
            }  # fmt: skip
            # every answer is in the device's history too, the repeated and the late ones
            history = (await svc.http.get(f"/v1/devices/{HAND}/history")).json()
            answers = [
                (c["cmd"], c["result"]) for c in history["changes"] if c["type"] == "command_result"
            ]
            assert answers == [
                (late["id"], "done"), (twice["id"], "rejected"), (twice["id"], "done"),
                (theirs["id"], "done"), (never["id"], "done"),
            ]  # fmt: skip
        finally:
            device.close()
            other.close()


def _assert(condition: bool) -> None:
    assert condition


# -- a restart with an open command ---------------------------------------------------------


@pytest.mark.parametrize("client", ["gmqtt", "paho"])  # commands go out on its connection
async def test_an_open_command_survives_a_restart_and_completes(
    broker: Process, tmp_path: Path, catalog: Catalog, client: str
) -> None:
    data = tmp_path / "data"
    device = HandDevice(broker.port, HAND)
    try:
        async with serve(broker, data, catalog, client) as svc:
            asked = (await svc.send(HAND, "disable_port", port=4, ttl_s=60)).json()
            await svc.state_becomes(asked["id"], "sent")  # the broker has it; no device yet
        # the service is down; the device comes on line (a clean session: nothing queued)
        await asyncio.to_thread(device.start)
        assert device.received(asked["id"]) == 0
        async with serve(broker, data, catalog, client) as svc:
            await eventually(lambda: _assert(device.received(asked["id"]) >= 1), within_s=5)
            still = await svc.command(asked["id"])
            assert (still["state"], still["requested_by"]) == ("sent", "li-wei")
            await asyncio.to_thread(device.answer, asked["id"], "done", "port 4 disabled")
            done = await svc.state_becomes(asked["id"], "done")
            assert done["sends"] >= 2
        async with serve(broker, data, catalog) as svc:  # and the answer was stored
            stored = await svc.command(asked["id"])
            assert (stored["state"], stored["info"]) == ("done", "port 4 disabled")
    finally:
        device.close()


async def test_a_device_coming_back_gets_its_open_commands_at_once(
    broker: Process, tmp_path: Path, catalog: Catalog
) -> None:
    """The periodic resend is an hour away: only the device's birth can bring it now."""
    async with serve(broker, tmp_path / "data", catalog, resend_s=3600) as svc:
        asked = (await svc.send(HAND, "disable_port", port=5, ttl_s=60)).json()
        await svc.state_becomes(asked["id"], "sent")  # to the broker; nobody subscribed
        device = HandDevice(broker.port, HAND)
        try:
            await asyncio.to_thread(device.start)  # subscribe, then the birth
            started = time.monotonic()
            await eventually(lambda: _assert(device.received(asked["id"]) == 1), within_s=5)
            assert time.monotonic() - started < 3
            await asyncio.to_thread(device.answer, asked["id"])
            assert (await svc.state_becomes(asked["id"], "done"))["sends"] == 2
        finally:
            device.close()


async def test_the_commands_task_dies_and_comes_back_with_its_state(
    broker: Process, tmp_path: Path, catalog: Catalog
) -> None:
    async with serve(broker, tmp_path / "data", catalog) as svc:
        device = HandDevice(broker.port, HAND)
        await asyncio.to_thread(device.start)
        try:
            asked = (await svc.send(HAND, "disable_port", port=6, ttl_s=60)).json()
            await svc.state_becomes(asked["id"], "sent")
            supervisor = svc.ingest.supervisor
            supervisor.restart_min_s = 0.05
            task = supervisor.task("commands")
            assert task is not None
            task.cancel()  # someone else cancelling it counts as a death
            await eventually(lambda: _assert("commands" in supervisor.deaths))
            assert supervisor.deaths["commands"].deaths == 1
            assert any("commands" in p for p in svc.ingest.problems())
            await eventually(lambda: _assert(supervisor.task("commands") is not None))
            await asyncio.to_thread(device.answer, asked["id"])
            await svc.state_becomes(asked["id"], "done")
        finally:
            device.close()


async def test_a_command_body_is_small_and_open_commands_are_bounded(
    broker: Process, tmp_path: Path, catalog: Catalog
) -> None:
    async with serve(broker, tmp_path / "data", catalog, open_max_per_device=2, open_max=3) as svc:
        r = await svc.http.post(
            f"/v1/devices/{PILE}/commands",
            headers=svc.auth | {"Content-Type": "application/json"},
            content=json.dumps({"type": "reboot", "pad": "x" * 2000}),
        )
        assert r.status_code == 413, r.text
        # nobody answers HAND or OTHER: their commands stay open
        assert [(await svc.send(HAND, "resend")).status_code for _ in range(3)] == [202, 202, 429]
        assert (await svc.send(OTHER, "resend")).status_code == 202
        full = await svc.send(OTHER, "resend")  # 3 open in all
        assert (full.status_code, full.json()["error"]) == (429, "rate_limited")


async def test_commands_through_the_embedded_broker(tmp_path: Path, catalog: Catalog) -> None:
    """``chargewatch serve`` with no broker (the demo): amqtt carries commands too."""
    config = IngestConfig(broker=None, embedded_broker_port=free_port(), data_dir=tmp_path / "data")
    keys = KeyStore.in_dir(config.data_dir)
    _, token = keys.create("li-wei", "maintainer")
    keys.close()
    async with Ingest(config, catalog) as ingest:
        assert ingest.broker_url is not None
        fleet_cfg = FleetConfig(
            broker=BrokerAddress("127.0.0.1", ingest.broker_url.port), fault_rate=0.0
        )
        transport = httpx.ASGITransport(app=create_app(*read_and_act(ingest)))
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://cw") as http,
            Fleet(catalog, fleet_cfg, only=[CABINET]) as fleet,
        ):
            await fleet.ready()
            svc = Served(ingest, http, token)
            await eventually(lambda: _connected(ingest), within_s=10)
            asked = await svc.send(CABINET, "open_door")
            assert asked.status_code == 202, asked.text
            await svc.state_becomes(asked.json()["id"], "done")
