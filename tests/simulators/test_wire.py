"""On the wire against a real mosquitto: what a firmware-watching subscriber sees."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devices.catalog import Catalog
from devices.contract import Birth, CabinetStatus, Death, Event, PileStatus, decode
from simulators.cabinet import CabinetModel
from simulators.device import SimDevice
from simulators.fleet import Fleet
from simulators.truth import TruthLog
from tests.servers import Process
from tests.simulators.conftest import (
    Received,
    Subscriber,
    eventually,
    fleet_config,
    pick,
    read_truth,
    within,
)

Subscribe = Callable[[int], Subscriber]


def decoded(message: Received) -> Birth | Death | PileStatus | CabinetStatus | Event:
    return decode(message.channel, message.payload)  # type: ignore[arg-type]


async def test_payloads_decode_seq_counts_and_truth_matches_the_subscriber(
    broker: Process, catalog: Catalog, subscribe: Subscribe, tmp_path: Path
) -> None:
    sub = subscribe(broker.port)
    ids = pick(catalog, 2, 2)
    config = fleet_config(broker.port, speed=3600.0)  # an hour a second: sessions and swaps
    async with (
        TruthLog(tmp_path / "truth.jsonl") as truth,
        Fleet(catalog, config, truth=truth, only=ids) as fleet,
    ):
        await within(fleet.ready())

        def busy() -> None:
            kinds = {m.json().get("type") for m in sub.snapshot() if m.channel == "event"}
            assert {"session_started", "swap"} <= kinds

        await eventually(busy, seconds=20)
        boots = {i: fleet.device(i).boot for i in ids}
    # leaving the block stopped every device gracefully
    truth_lines = read_truth(tmp_path / "truth.jsonl")
    for device_id in ids:
        await eventually(lambda d=device_id: dead(sub, d))  # type: ignore[misc]
        received = sub.of(device_id)
        messages = [decoded(m) for m in received]
        first, *rest, last = messages
        assert isinstance(first, Birth)
        assert first.seq == 0
        assert first.boot == boots[device_id]
        assert isinstance(last, Death)
        assert last.seq == 0
        assert last.boot == boots[device_id]
        assert isinstance(rest[0], PileStatus | CabinetStatus)  # the snapshot follows the birth
        seqs = [m.seq for m in messages[:-1]]
        assert seqs == list(range(len(seqs)))  # +1 per message across state/status/event
        assert all(m.boot == boots[device_id] for m in messages)
        mine = [t for t in truth_lines if t.get("topic", "").split("/")[-2:-1] == [device_id]]
        assert [t["payload"].encode() for t in mine] == [m.payload for m in received]
        assert [t["retain"] for t in mine] == [m.channel != "event" for m in received]
        assert {t["qos"] for t in mine} == {1}


async def test_birth_and_status_are_retained(
    broker: Process, catalog: Catalog, subscribe: Subscribe
) -> None:
    ids = pick(catalog, 1, 1)
    async with Fleet(catalog, fleet_config(broker.port), only=ids) as fleet:
        await within(fleet.ready())
        await within(fleet.settle())
        late = subscribe(broker.port)  # subscribes after the fact: sees only retained ones

        def retained() -> None:
            got = {(m.device_id, m.channel) for m in late.snapshot() if m.retain}
            assert got == {(i, c) for i in ids for c in ("state", "status")}

        await eventually(retained)
        for message in late.snapshot():
            assert not isinstance(decoded(message), Death)


def last_state(sub: Subscriber, device_id: str, *, retained: bool = False) -> Birth | Death:
    """The last state message of a device (only retained deliveries when ``retained``)."""
    states = [
        decoded(m) for m in sub.of(device_id) if m.channel == "state" and (m.retain or not retained)
    ]
    assert states, f"no state message from {device_id}"
    last = states[-1]
    assert isinstance(last, Birth | Death)
    return last


def dead(sub: Subscriber, device_id: str, *, retained: bool = False) -> Death:
    last = last_state(sub, device_id, retained=retained)
    assert isinstance(last, Death), last
    return last


def born(sub: Subscriber, device_id: str) -> Birth:
    last = last_state(sub, device_id)
    assert isinstance(last, Birth), last
    return last


def offline(device: SimDevice) -> None:
    assert not device.connected


async def test_will_is_delivered_when_the_connection_drops_and_birth_takes_next_seq(
    broker: Process, catalog: Catalog, subscribe: Subscribe
) -> None:
    sub = subscribe(broker.port)
    (pile_id,) = pick(catalog, 1, 0)
    async with Fleet(catalog, fleet_config(broker.port, speed=1.0), only=[pile_id]) as fleet:
        await within(fleet.ready())
        await within(fleet.settle())
        device = fleet.device(pile_id)
        assert device.seq == 2  # birth 0 and snapshot 1 went out

        assert fleet.drop_connection(pile_id, offline_s=60)  # no goodbye: the broker speaks
        death = await eventually(lambda: dead(sub, pile_id))
        assert (death.boot, death.seq) == (device.boot, 0)  # names the birth of its connection
        late = subscribe(broker.port)
        retained = await eventually(lambda: dead(late, pile_id, retained=True))
        assert retained == death
        await eventually(lambda: offline(device))
        assert fleet.drop_connection(pile_id) is False  # already offline

        next_seq = device.seq
        fleet.restore_connection(pile_id)
        birth = await eventually(lambda: born(sub, pile_id))
        assert (birth.boot, birth.seq) == (device.boot, next_seq)  # same boot, next seq
        await within(fleet.settle())

        fleet.drop_connection(pile_id, offline_s=60)  # the new connection's Will names it
        second = await eventually(lambda: dead(sub, pile_id))
        assert (second.boot, second.seq) == (device.boot, next_seq)


async def test_graceful_stop_publishes_the_death_itself(
    broker: Process, catalog: Catalog, subscribe: Subscribe, tmp_path: Path
) -> None:
    sub = subscribe(broker.port)
    (cabinet_id,) = pick(catalog, 0, 1)
    async with (
        TruthLog(tmp_path / "truth.jsonl") as truth,
        Fleet(catalog, fleet_config(broker.port), truth=truth, only=[cabinet_id]),
    ):
        birth = await eventually(lambda: born(sub, cabinet_id))
    death = await eventually(lambda: dead(sub, cabinet_id))
    assert (death.boot, death.seq) == (birth.boot, birth.seq)
    last = read_truth(tmp_path / "truth.jsonl")[-1]  # we published it: it is in the log
    assert last["topic"] == f"cw/v1/{cabinet_id}/state"
    assert last["retain"] is True
    assert decode("state", last["payload"].encode()) == death
    late = subscribe(broker.port)
    assert await eventually(lambda: dead(late, cabinet_id, retained=True)) == death


async def test_heartbeats_carry_status_in_wall_time(
    broker: Process, catalog: Catalog, subscribe: Subscribe
) -> None:
    sub = subscribe(broker.port)
    (cabinet_id,) = pick(catalog, 0, 1)
    config = fleet_config(broker.port, speed=0.001, heartbeat_s=1)  # behaviour all but stopped
    async with Fleet(catalog, config, only=[cabinet_id]):

        def beats() -> None:
            statuses = [m for m in sub.of(cabinet_id) if m.channel == "status"]
            assert len(statuses) >= 4

        await eventually(beats, seconds=10)
    birth = next(decoded(m) for m in sub.of(cabinet_id) if m.channel == "state")
    assert isinstance(birth, Birth)
    assert birth.heartbeat_s == 1


async def test_injections_reach_the_wire(
    broker: Process, catalog: Catalog, subscribe: Subscribe
) -> None:
    sub = subscribe(broker.port)
    pile_id, cabinet_id = pick(catalog, 1, 1)
    async with Fleet(
        catalog, fleet_config(broker.port, speed=1.0), only=[pile_id, cabinet_id]
    ) as fleet:
        await within(fleet.ready())
        fleet.inject_fault(pile_id, "ground_fault", 3)
        fleet.set_smoke(cabinet_id, True)
        fleet.set_door(cabinet_id, True)
        fleet.set_temperature(cabinet_id, 2, 68.5)
        cabinet = fleet.device(cabinet_id).model
        assert isinstance(cabinet, CabinetModel)
        battery = fleet.take_battery(
            cabinet_id, next(s.n for s in cabinet.slots if s.battery is not None)
        )
        await within(fleet.settle())

        def latest(device_id: str, channel: str) -> list[Received]:
            found = [m for m in sub.of(device_id) if m.channel == channel]
            assert found, f"nothing on {device_id}/{channel} yet"
            return found

        def seen() -> None:
            pile_status = decoded(latest(pile_id, "status")[-1])
            assert isinstance(pile_status, PileStatus)
            assert pile_status.ports[2].state == "faulted"
            assert pile_status.ports[2].fault == "ground_fault"
            cab_status = decoded(latest(cabinet_id, "status")[-1])
            assert isinstance(cab_status, CabinetStatus)
            assert cab_status.smoke
            assert cab_status.door_open
            assert "smoke" in cab_status.device_faults
            assert cab_status.slots[1].temp_c == 68.5
            assert battery not in {s.battery for s in cab_status.slots}
            events = [decoded(m) for m in latest(cabinet_id, "event")]
            assert [(e.type, e.code) for e in events if isinstance(e, Event)] == [
                ("fault_raised", "smoke"),
                ("door_opened", None),
            ]
            pile_events = [decoded(m) for m in latest(pile_id, "event")]
            assert any(
                isinstance(e, Event) and e.type == "fault_raised" and e.port == 3
                for e in pile_events
            )

        await eventually(seen)


async def test_a_small_fleet_reaches_hold_and_freezes(
    broker: Process, catalog: Catalog, tmp_path: Path
) -> None:
    ids = pick(catalog, 10, 10)
    config = fleet_config(broker.port, speed=600.0, duration_s=1800.0, heartbeat_s=1)
    async with (
        TruthLog(tmp_path / "truth.jsonl") as truth,
        Fleet(catalog, config, truth=truth, only=ids) as fleet,
    ):
        await within(fleet.hold(), seconds=30)
        lines = read_truth(tmp_path / "truth.jsonl")
        end = config.start.timestamp() + 1800.0  # type: ignore[union-attr]
        assert lines[-1]["hold"] is True
        assert lines[-1]["devices"] == 20
        assert lines[-1]["sim_time"] == end
        snapshots = {d.id: d.model.snapshot() for d in fleet.devices.values()}
        assert all(d.model.t <= end for d in fleet.devices.values())
        events = [t for t in lines if t.get("topic", "").endswith("/event")]
        assert events  # half an hour of lunch peak is not quiet
        fleet.device(ids[0])._advance()  # behaviour stays frozen whatever the clock says
        assert {d.id: d.model.snapshot() for d in fleet.devices.values()} == snapshots
        assert last_status_bodies(lines) == snapshots  # the log at HOLD is the final state

        def heartbeats_after_hold() -> list[dict[str, Any]]:
            later = read_truth(tmp_path / "truth.jsonl")
            after = later[len(lines) :]
            beating = {t["topic"].split("/")[-2] for t in after if t["topic"].endswith("/status")}
            assert beating == set(ids)
            return later

        later = await eventually(heartbeats_after_hold)
        assert last_status_bodies(later) == snapshots  # heartbeats say the same, newer seq


def last_status_bodies(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last status of each device in the log, without the header (v, ts, boot, seq)."""
    last: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line.get("topic", "").endswith("/status"):
            body = json.loads(line["payload"])
            for key in ("v", "ts", "boot", "seq"):
                del body[key]
            last[line["topic"].split("/")[-2]] = body
    return last
