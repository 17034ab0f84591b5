"""Pure behaviour: no broker, just the models moved along the sim clock."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest

from devices.catalog import Catalog, DeviceSpec
from simulators.cabinet import CabinetModel
from simulators.daycycle import HOURLY_DEMAND, LOCAL_TZ, local_hour
from simulators.errors import UnsupportedUnit
from simulators.model import STEP_S, DeviceModel, Happened
from simulators.pile import PileModel
from simulators.rng import device_rng
from tests.simulators.conftest import START

T0 = START.timestamp()
HOUR = 3600.0


def spec_of(catalog: Catalog, kind: str, index: int = 0) -> DeviceSpec:
    return [d.spec for d in catalog.devices.values() if d.kind == kind][index]


def pile(catalog: Catalog, seed: int = 1, index: int = 0, **kw: Any) -> PileModel:
    spec = spec_of(catalog, "pile", index)
    return PileModel(spec, device_rng(seed, spec.id), T0, **kw)


def cabinet(catalog: Catalog, seed: int = 1, index: int = 0, **kw: Any) -> CabinetModel:
    spec = spec_of(catalog, "cabinet", index)
    return CabinetModel(spec, device_rng(seed, spec.id), T0, **kw)


def run(model: DeviceModel, hours: float) -> list[tuple[float, list[Happened], dict[str, Any]]]:
    """Step by step: the time, the events of each step and the snapshot after it."""
    model.drain()
    out = []
    end = model.t + hours * HOUR
    while model.t + STEP_S <= end:
        model.advance_to(model.t + STEP_S)
        out.append((model.t, model.drain().events, model.snapshot()))
    return out


def test_pile_sessions_charge_finish_then_free_the_port(catalog: Catalog) -> None:
    model = pile(catalog)
    transitions: collections.Counter[tuple[str, str]] = collections.Counter()
    started: dict[str, float] = {}
    charge_hours: list[float] = []
    previous = {p["n"]: p for p in model.snapshot()["ports"]}
    for t, events, snap in run(model, 36):
        for event in events:
            body = event.body
            if body["type"] == "session_started":
                started[body["session"]] = event.at
            elif body["type"] == "session_ended":
                assert body["energy_wh"] > 0
                assert previous[body["port"]]["session"] == body["session"]
        for port in snap["ports"]:
            before = previous[port["n"]]
            if before["state"] != port["state"]:
                transitions[(before["state"], port["state"])] += 1
                if (before["state"], port["state"]) == ("charging", "finished") and (
                    port["session"] in started
                ):
                    charge_hours.append((t - started[port["session"]]) / HOUR)
            if port["state"] == "charging":
                assert 70 <= port["power_w"] <= 415
                assert port["session"]
            elif port["state"] == "finished":
                assert port["power_w"] == 0
                assert port["energy_wh"] > 0
                assert port["session"]
            else:
                assert port["state"] == "available"
                assert port["power_w"] == port["energy_wh"] == 0
                assert "session" not in port
        previous = {p["n"]: p for p in snap["ports"]}
    assert transitions[("available", "charging")] >= 10
    assert transitions[("charging", "finished")] >= 5
    assert transitions[("finished", "available")] >= 5
    assert transitions[("available", "finished")] == 0
    assert len(charge_hours) >= 5
    assert all(1.9 <= h <= 8.3 for h in charge_hours), charge_hours


def test_cabinet_swap_trades_the_fullest_ready_pack_for_a_depleted_one(catalog: Catalog) -> None:
    model = cabinet(catalog)
    release = model.release_soc
    slots = {s["n"]: s for s in model.snapshot()["slots"]}
    packs = {s["battery"] for s in slots.values() if "battery" in s}
    assert 9 <= len(packs) <= 11
    swaps = 0
    for _t, events, snap in run(model, 24):
        after = {s["n"]: s for s in snap["slots"]}
        for event in events:
            body = event.body
            assert body["type"] == "swap"
            swaps += 1
            out, into = slots[body["slot_out"]], slots[body["slot_in"]]
            assert out["state"] == "ready"
            assert out["battery"] == body["battery_out"]
            assert out["soc"] <= body["soc_out"] <= 100  # it charged on during the step
            others = [s for n, s in after.items() if n not in (body["slot_out"], body["slot_in"])]
            assert all(s["soc"] <= body["soc_out"] for s in others if s["state"] == "ready")
            assert into["state"] == "empty"
            assert 5 <= body["soc_in"] <= 30
            assert after[body["slot_out"]]["state"] == "empty"
            assert after[body["slot_in"]]["battery"] == body["battery_in"]
            packs = (packs - {body["battery_out"]}) | {body["battery_in"]}
        assert {s["battery"] for s in after.values() if "battery" in s} == packs
        for slot in after.values():
            if slot["state"] == "ready":
                assert release <= slot["soc"] <= 100
            elif slot["state"] == "charging":
                assert 0 <= slot["soc"] < release
                assert slot["power_w"] > 0
            else:
                assert slot["state"] == "empty"
                assert "battery" not in slot
        slots = after
    assert swaps >= 10
    assert model.swaps == swaps


def test_soc_rises_at_a_charger_rate(catalog: Catalog) -> None:
    model = cabinet(catalog)
    model.rng.seed(0)
    slot = next(s for s in model.slots if s.battery is not None)
    slot.soc = 20.0
    model.advance_to(model.t + HOUR)
    assert 15 <= slot.soc - 20.0 <= 30  # ~300 W into a 1.2-1.7 kWh pack


def test_same_seed_same_story_other_seed_other_story(catalog: Catalog) -> None:
    def story(seed: int) -> list[Any]:
        out: list[Any] = []
        for model in (pile(catalog, seed), cabinet(catalog, seed)):
            for hours in (0.3, 5, 7.7):  # uneven batches must not matter
                model.advance_to(model.t + hours * HOUR)
                drained = model.drain()
                out += [(e.at, e.body) for e in drained.events] + [model.snapshot()]
        return out

    assert story(3) == story(3)
    assert story(3) != story(4)


def test_batching_of_steps_does_not_change_the_story(catalog: Catalog) -> None:
    a, b = pile(catalog, 5), pile(catalog, 5)
    a.advance_to(a.t + 10 * HOUR)
    target = b.t
    while b.t < a.t:
        target += 17.3  # like an uneven wall tick
        b.advance_to(target)
    assert [e.body for e in a.drain().events] == [e.body for e in b.drain().events]
    assert a.snapshot() == b.snapshot()


def test_riders_come_at_lunch_and_dinner_not_at_night(catalog: Catalog) -> None:
    peaks = [HOURLY_DEMAND[h] for h in (11, 12, 17, 18, 19)]
    night = [HOURLY_DEMAND[h] for h in (1, 2, 3, 4)]
    assert min(peaks) > 3 * max(night)
    assert math.isclose(sum(HOURLY_DEMAND) / 24, 1.0)
    by_hour: collections.Counter[int] = collections.Counter()
    for index in range(12):
        model = pile(catalog, index=index)
        model.advance_to(model.t + 48 * HOUR)
        for event in model.drain().events:
            if event.body["type"] == "session_started":
                by_hour[int(local_hour(event.at))] += 1
    peak = sum(by_hour[h] for h in (11, 12, 17, 18, 19)) / 5
    quiet = sum(by_hour[h] for h in (1, 2, 3, 4)) / 4
    assert peak > 3 * quiet, by_hour


def test_local_hour_is_shanghai_time() -> None:
    assert START.tzinfo is not None
    assert START.utcoffset() == LOCAL_TZ.utcoffset(None)
    assert local_hour(T0) == 11.0


def test_random_faults_raise_and_clear_with_codes(catalog: Catalog) -> None:
    quiet = pile(catalog, fault_rate=0.0)
    quiet.advance_to(quiet.t + 48 * HOUR)
    assert not [e for e in quiet.drain().events if e.body["type"].startswith("fault")]

    model = cabinet(catalog, fault_rate=40.0)
    raised = cleared = 0
    for _t, events, snap in run(model, 24):
        for event in events:
            if event.body["type"] == "fault_raised":
                raised += 1
                assert event.body["code"] in model.unit_fault_codes + model.device_fault_codes
            elif event.body["type"] == "fault_cleared":
                cleared += 1
        for slot in snap["slots"]:
            assert (slot["state"] == "faulted") == ("fault" in slot)
    assert raised >= 5
    assert cleared >= 1


def test_injected_port_fault_ends_the_session_and_clears(catalog: Catalog) -> None:
    model = pile(catalog)
    model.drain()
    port = next(p for p in model.ports if p.state == "charging")
    session, at = port.session, model.t + 1
    model.inject_fault("over_current", port.n, at)
    drained = model.drain()
    assert [e.body["type"] for e in drained.events] == ["session_ended", "fault_raised"]
    assert drained.events[0].body["session"] == session
    assert drained.events[1].body == {
        "type": "fault_raised",
        "code": "over_current",
        "port": port.n,
    }
    snap = next(p for p in model.snapshot()["ports"] if p["n"] == port.n)
    assert snap == {
        "n": port.n,
        "state": "faulted",
        "power_w": 0,
        "energy_wh": 0,
        "fault": "over_current",
    }
    model.clear_fault("over_current", port.n, at)
    assert [e.body["type"] for e in model.drain().events] == ["fault_cleared"]
    assert model.ports[port.n - 1].state == "available"
    with pytest.raises(UnsupportedUnit):
        model.inject_fault("over_current", 11, at)
    with pytest.raises(UnsupportedUnit):
        model.set_temperature(1, 80.0)


def test_cabinet_injections(catalog: Catalog) -> None:
    model = cabinet(catalog)
    model.drain()
    at = model.t
    model.set_smoke(True, at)
    model.set_smoke(True, at)  # no second event
    model.set_door(True, at)
    model.set_temperature(3, 71.5)
    full = next(s for s in model.slots if s.battery is not None)
    battery = model.take_battery(full.n)
    types = [(e.body["type"], e.body.get("code")) for e in model.drain().events]
    assert types == [("fault_raised", "smoke"), ("door_opened", None)]
    snap = model.snapshot()
    assert snap["smoke"] is True
    assert snap["door_open"] is True
    assert snap["slots"][2]["temp_c"] == 71.5
    assert snap["slots"][full.n - 1] == {"n": full.n, "state": "empty"}
    assert battery not in {s.battery for s in model.slots}
    inserted = model.insert_battery(full.n, 95, "B-TEST")
    assert inserted == "B-TEST"
    assert model.slots[full.n - 1].state == "ready"
