"""Commands (contract v1.1) on the wire: a plain paho client plays the service against a
real mosquitto and the simulated devices answer every command type as the contract says."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import Catalog
from devices.contract import Birth, CabinetStatus, Death, Event, PileStatus, decode
from simulators.cabinet import CabinetModel
from simulators.fleet import Fleet
from simulators.pile import PileModel
from tests.servers import Process
from tests.simulators.conftest import Subscriber, eventually, fleet_config, pick, within

Subscribe = Callable[[int], Subscriber]


class Service:
    """The service's side, by hand: publishes commands, reads the answers."""

    def __init__(self, port: int, sub: Subscriber) -> None:
        self.sub = sub
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.n = 0

    def send(self, device: str, ctype: str, *, ttl_s: float = 60, **fields: Any) -> str:
        self.n += 1
        ident = fields.pop("id", f"test-{self.n:04d}-{time.monotonic_ns()}")
        now = time.time_ns() // 1_000_000
        body = {"v": 1, "id": ident, "ts": now, "type": ctype, "expires": now + int(ttl_s * 1000)}
        self.publish(device, json.dumps(body | fields).encode())
        return ident

    def publish(self, device: str, payload: bytes) -> None:
        self.client.publish(f"cw/v1/{device}/cmd", payload, qos=1).wait_for_publish(5)

    def results(self, device: str, ident: str) -> list[Event]:
        found = []
        for m in self.sub.of(device):
            if m.channel == "event" and m.json().get("type") == "command_result":
                event = decode("event", m.payload)
                assert isinstance(event, Event)
                if event.cmd == ident:
                    found.append(event)
        return found

    async def answer(self, device: str, ident: str) -> Event:
        def one() -> Event:
            got = self.results(device, ident)
            assert got, f"no result for {ident}"
            return got[-1]

        return await eventually(one)

    def after(self, device: str, ident: str) -> list[Any]:
        """Everything the device published after the result of ``ident``, decoded."""
        messages = [m for m in self.sub.of(device) if m.channel != "cmd"]
        for i, m in enumerate(messages):
            if m.channel == "event" and m.json().get("cmd") == ident:
                return [decode(x.channel, x.payload) for x in messages[i + 1 :]]  # type: ignore[arg-type]
        return []

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def service(broker: Process, subscribe: Subscribe) -> Any:
    svc = Service(broker.port, subscribe(broker.port))
    yield svc
    svc.close()


def status_after(svc: Service, device: str, ident: str) -> PileStatus | CabinetStatus:
    for msg in svc.after(device, ident):
        if isinstance(msg, PileStatus | CabinetStatus):
            return msg
    raise AssertionError(f"no status after the result of {ident}")


async def test_pile_ports_disable_enable_range_and_repeats(
    broker: Process, catalog: Catalog, service: Service
) -> None:
    (pile_id,) = pick(catalog, 1, 0)
    async with Fleet(
        catalog, fleet_config(broker.port, speed=1.0, duration_s=0), only=[pile_id]
    ) as fleet:
        await within(fleet.ready())
        model = fleet.device(pile_id).model
        assert isinstance(model, PileModel)
        free = next(p.n for p in model.ports if p.state == "available")

        off = service.send(pile_id, "disable_port", port=free)
        result = await service.answer(pile_id, off)
        assert (result.result, result.info) == ("done", f"port {free} disabled")
        status = await eventually(lambda: status_after(service, pile_id, off))
        assert isinstance(status, PileStatus)
        assert status.ports[free - 1].state == "disabled"  # the status that follows shows it

        on = service.send(pile_id, "enable_port", port=free)
        assert (await service.answer(pile_id, on)).result == "done"
        await eventually(
            lambda: _assert(status_after(service, pile_id, on).units[free - 1].state != "disabled")
        )

        # the same id again: the same answer, and nothing is done again (the port stays on)
        service.send(pile_id, "disable_port", port=free, id=off)
        await eventually(lambda: _assert(len(service.results(pile_id, off)) == 2))
        first, again = service.results(pile_id, off)
        assert (again.result, again.info) == (first.result, first.info)
        assert not model.ports[free - 1].disabled

        out_of_range = service.send(pile_id, "disable_port", port=model.units + 1)
        refused = await service.answer(pile_id, out_of_range)
        assert refused.result == "rejected"
        assert f"no port {model.units + 1}" in (refused.info or "")
        wrong_kind = service.send(pile_id, "disable_slot", slot=1)
        assert (await service.answer(pile_id, wrong_kind)).result == "rejected"
        door = service.send(pile_id, "open_door")
        assert (await service.answer(pile_id, door)).result == "rejected"

        busy = next((p.n for p in model.ports if p.state == "charging"), None)
        if busy is not None:  # a rider's session is not cut short
            in_use = service.send(pile_id, "disable_port", port=busy)
            answer = await service.answer(pile_id, in_use)
            assert answer.result == "rejected"
            assert "in use" in (answer.info or "")


def _assert(condition: bool) -> None:
    assert condition


async def test_expired_unreadable_and_unknown_commands(
    broker: Process, catalog: Catalog, service: Service
) -> None:
    (cabinet_id,) = pick(catalog, 0, 1)
    async with Fleet(
        catalog, fleet_config(broker.port, speed=1.0, duration_s=0), only=[cabinet_id]
    ) as fleet:
        await within(fleet.ready())
        device = fleet.device(cabinet_id)
        expired = service.send(cabinet_id, "disable_slot", slot=1, ttl_s=-1)
        service.publish(cabinet_id, b"not json at all")  # no id: nothing to answer
        unknown = service.send(cabinet_id, "self_destruct")
        answer = await service.answer(cabinet_id, unknown)  # answered in order: expired is past
        assert answer.result == "rejected"
        assert "self_destruct" in (answer.info or "")
        assert service.results(cabinet_id, expired) == []
        assert device.commands_ignored == 2
        model = device.model
        assert isinstance(model, CabinetModel)
        assert not model.slots[0].disabled


async def test_cabinet_slots_locks_and_door(
    broker: Process, catalog: Catalog, service: Service
) -> None:
    (cabinet_id,) = pick(catalog, 0, 1)
    async with Fleet(
        catalog, fleet_config(broker.port, speed=1.0, duration_s=0), only=[cabinet_id]
    ) as fleet:
        await within(fleet.ready())
        model = fleet.device(cabinet_id).model
        assert isinstance(model, CabinetModel)
        full = next(s.n for s in model.slots if s.battery is not None)
        empty = next((s.n for s in model.slots if s.battery is None), None)

        off = service.send(cabinet_id, "disable_slot", slot=full)
        assert (await service.answer(cabinet_id, off)).result == "done"
        status = await eventually(lambda: status_after(service, cabinet_id, off))
        assert status.units[full - 1].state == "disabled"
        on = service.send(cabinet_id, "enable_slot", slot=full)
        assert (await service.answer(cabinet_id, on)).result == "done"

        lock = service.send(cabinet_id, "lock_battery", slot=full)
        assert (await service.answer(cabinet_id, lock)).result == "done"
        status = await eventually(lambda: status_after(service, cabinet_id, lock))
        assert status.units[full - 1].state == "reserved"  # held: no rider gets it
        unlock = service.send(cabinet_id, "unlock_battery", slot=full)
        assert (await service.answer(cabinet_id, unlock)).result == "done"
        status = await eventually(lambda: status_after(service, cabinet_id, unlock))
        assert status.units[full - 1].state in ("ready", "charging")
        if empty is not None:
            nothing = service.send(cabinet_id, "lock_battery", slot=empty)
            assert (await service.answer(cabinet_id, nothing)).result == "rejected"
        fleet.inject_fault(cabinet_id, "lock_failure", full)
        stuck = service.send(cabinet_id, "lock_battery", slot=full)
        assert (await service.answer(cabinet_id, stuck)).result == "failed"  # tried, could not

        door = service.send(cabinet_id, "open_door")
        assert (await service.answer(cabinet_id, door)).result == "done"
        after = await eventually(lambda: _nonempty(service.after(cabinet_id, door), 2))
        assert isinstance(after[0], Event)
        assert after[0].type == "door_opened"
        assert isinstance(after[1], CabinetStatus)
        assert after[1].door_open
        fleet.set_door(cabinet_id, False)
        fleet.set_smoke(cabinet_id, True)
        unsafe = service.send(cabinet_id, "open_door")
        answer = await service.answer(cabinet_id, unsafe)
        assert answer.result == "rejected"
        assert "smoke" in (answer.info or "")


def _nonempty(items: list[Any], n: int) -> list[Any]:
    assert len(items) >= n, items
    return items


async def test_reboot_is_a_new_boot_and_resend_a_fresh_birth(
    broker: Process, catalog: Catalog, service: Service
) -> None:
    (pile_id,) = pick(catalog, 1, 0)
    async with Fleet(
        catalog, fleet_config(broker.port, speed=1.0, duration_s=0), only=[pile_id]
    ) as fleet:
        await within(fleet.ready())
        await within(fleet.settle())
        device = fleet.device(pile_id)
        old_boot = device.boot

        resend = service.send(pile_id, "resend")
        assert (await service.answer(pile_id, resend)).result == "done"
        after = await eventually(lambda: _nonempty(service.after(pile_id, resend), 2))
        birth, status = after[0], after[1]
        assert isinstance(birth, Birth)
        assert birth.boot == old_boot  # the same boot, the next seq
        assert isinstance(status, PileStatus)
        assert status.seq == birth.seq + 1
        await within(fleet.settle())
        # the new connection's Will names the fresh birth: a drop now is a death that applies
        fleet.drop_connection(pile_id, offline_s=0.5)

        def will() -> Death:
            deaths = [m for m in service.after(pile_id, resend) if isinstance(m, Death)]
            assert deaths
            return deaths[-1]

        assert (await eventually(will)).seq == birth.seq
        await eventually(lambda: _assert(device.connected))

        reboot = service.send(pile_id, "reboot")
        assert (await service.answer(pile_id, reboot)).result == "done"

        def rebooted() -> list[Any]:
            after = service.after(pile_id, reboot)
            births = [m for m in after if isinstance(m, Birth) and m.boot != old_boot]
            assert births, after
            return after

        after = await eventually(rebooted)
        death = next(m for m in after if isinstance(m, Death))
        assert death.boot == old_boot  # the old boot says goodbye first
        new_birth = next(m for m in after if isinstance(m, Birth))
        assert (new_birth.boot, new_birth.seq) == (device.boot, 0)
        assert device.reboots == 1
        # a repeated reboot id is answered again, and does not reboot again
        service.send(pile_id, "reboot", id=reboot)
        await eventually(lambda: _assert(len(service.results(pile_id, reboot)) == 2))
        await within(fleet.settle())
        assert device.reboots == 1


async def test_a_fleet_left_before_its_hold_point_stops(broker: Process, catalog: Catalog) -> None:
    """Leaving a fleet with a ``duration`` before behaviour froze: the hold waiter ends with
    it (it waited for a hold that a stopped device never reaches, and the fleet never
    stopped)."""
    (pile_id,) = pick(catalog, 1, 0)
    config = fleet_config(broker.port, speed=1.0, duration_s=3600)  # an hour away
    async with asyncio.timeout(15):
        async with Fleet(catalog, config, only=[pile_id]) as fleet:
            await within(fleet.ready())
