"""Pure model tests of the alert-scenario injections: set_port_power, rewind_energy and
set_slot_soc (no broker; the wire side is tests/e2e/test_alerts_scenarios.py)."""

from __future__ import annotations

from typing import Any

import pytest

from devices.catalog import Catalog
from simulators.cabinet import CabinetModel
from simulators.errors import UnsupportedUnit
from simulators.model import STEP_S
from simulators.pile import PileModel
from simulators.rng import device_rng
from tests.simulators.conftest import START

T0 = START.timestamp()


def pile(catalog: Catalog) -> PileModel:
    spec = next(d.spec for d in catalog.devices.values() if d.kind == "pile")
    model = PileModel(spec, device_rng(1, spec.id), T0)
    model.drain()
    return model


def cabinet(catalog: Catalog) -> CabinetModel:
    spec = next(d.spec for d in catalog.devices.values() if d.kind == "cabinet")
    model = CabinetModel(spec, device_rng(1, spec.id), T0)
    model.drain()
    return model


def port_of(model: PileModel, n: int) -> dict[str, Any]:
    port: dict[str, Any] = model.snapshot()["ports"][n - 1]
    return port


def charging_port(model: PileModel) -> int:
    return next(p.n for p in model.ports if p.state == "charging" and p.unplug_at is None)


def test_pinned_power_is_reported_while_charging_and_unpins(catalog: Catalog) -> None:
    model = pile(catalog)
    n = charging_port(model)
    model.set_port_power(n, 0.0)
    assert model.drain().changed  # the injection publishes a status
    energy = port_of(model, n)["energy_wh"]
    for step in range(1, 5):
        model.advance_to(T0 + step * STEP_S)
        assert port_of(model, n)["state"] == "charging"
        assert port_of(model, n)["power_w"] == 0.0  # stuck: charging, nothing delivered
        assert port_of(model, n)["energy_wh"] == energy
    model.set_port_power(n, 42.0)
    assert port_of(model, n)["power_w"] == 42.0
    model.set_port_power(n, None)
    assert model.drain().changed
    assert port_of(model, n)["power_w"] > 100  # back to the session's own rate
    model.advance_to(model.t + STEP_S)
    assert port_of(model, n)["energy_wh"] > energy


def test_a_pin_ends_with_its_session(catalog: Catalog) -> None:
    model = pile(catalog)
    n = charging_port(model)
    model.set_port_power(n, 0.0)
    model.inject_fault("relay_stuck", n, T0)  # ends the session
    assert model.ports[n - 1].power_pin is None


def test_port_power_needs_a_charging_port(catalog: Catalog) -> None:
    model = pile(catalog)
    idle = next(p.n for p in model.ports if p.state != "charging")
    with pytest.raises(UnsupportedUnit, match="not charging"):
        model.set_port_power(idle, 0.0)
    with pytest.raises(UnsupportedUnit, match="not charging"):
        model.rewind_energy(idle, 5.0)
    with pytest.raises(UnsupportedUnit, match="no port 11"):
        model.set_port_power(11, 0.0)
    with pytest.raises(UnsupportedUnit, match="negative"):
        model.set_port_power(charging_port(model), -1.0)
    model.set_port_power(idle, None)  # unpinning an unpinned port changes nothing
    assert not model.drain().changed


def test_rewind_energy_goes_back_once_then_counts_on(catalog: Catalog) -> None:
    model = pile(catalog)
    n = charging_port(model)
    before = port_of(model, n)
    model.rewind_energy(n, 50.0)
    assert model.drain().changed
    after = port_of(model, n)
    assert after["session"] == before["session"]
    assert after["energy_wh"] == pytest.approx(max(0.0, before["energy_wh"] - 50.0), abs=0.11)
    model.advance_to(T0 + STEP_S)
    assert port_of(model, n)["energy_wh"] > after["energy_wh"]  # counting up again
    model.rewind_energy(n, 1e9)
    assert port_of(model, n)["energy_wh"] == 0.0  # never below zero
    with pytest.raises(UnsupportedUnit, match="must be > 0"):
        model.rewind_energy(n, 0.0)


def test_forced_slot_soc_keeps_the_slot_ready(catalog: Catalog) -> None:
    model = cabinet(catalog)
    slot = next(s.n for s in model.slots if s.battery is not None)
    model.take_battery(slot)
    model.insert_battery(slot, 100.0, "B-FULL")
    model.drain()
    model.set_slot_soc(slot, 40.0)
    assert model.drain().changed
    reported = model.snapshot()["slots"][slot - 1]
    assert (reported["state"], reported["soc"], reported["battery"]) == ("ready", 40, "B-FULL")
    model.set_door(True, T0)  # no rider swaps the pack out meanwhile
    model.advance_to(T0 + 4 * STEP_S)
    reported = model.snapshot()["slots"][slot - 1]
    assert (reported["battery"], reported["state"], reported["soc"]) == ("B-FULL", "ready", 40)
    model.set_slot_soc(slot, None)
    assert model.drain().changed
    assert model.snapshot()["slots"][slot - 1]["soc"] == 100


def test_slot_soc_pin_leaves_with_the_battery(catalog: Catalog) -> None:
    model = cabinet(catalog)
    slot = next(s.n for s in model.slots if s.battery is not None)
    model.set_slot_soc(slot, 10.0)
    model.take_battery(slot)
    model.insert_battery(slot, 95.0)
    assert model.snapshot()["slots"][slot - 1]["soc"] == 95
    empty = slot
    model.take_battery(empty)
    with pytest.raises(UnsupportedUnit, match="holds no battery"):
        model.set_slot_soc(empty, 50.0)
    model.insert_battery(empty, 50.0)
    with pytest.raises(UnsupportedUnit, match="outside"):
        model.set_slot_soc(empty, 101.0)
