"""What commands do to the pure models (no broker): disabled ports and slots serve no rider,
a held battery is not handed out, a fault shows through a disabled unit."""

from __future__ import annotations

import pytest

from devices.catalog import Catalog
from simulators.errors import LockFailed, UnsupportedUnit
from tests.simulators.test_behaviour import cabinet, pile, run


def test_no_rider_plugs_into_a_disabled_port(catalog: Catalog) -> None:
    model = pile(catalog, seed=3)
    for port in model.ports:
        if port.state == "available":
            model.set_port_enabled(port.n, False)
    disabled = {p.n for p in model.ports if p.disabled}
    assert disabled
    steps = run(model, 24)
    started = [e.body["port"] for _, events, _ in steps for e in events
               if e.body["type"] == "session_started"]  # fmt: skip
    assert started  # riders came, to the ports that were in use before
    assert not disabled & set(started)
    last = steps[-1][2]["ports"]
    assert all(last[n - 1]["state"] == "disabled" for n in disabled)


def test_a_port_in_use_is_not_disabled_and_a_fault_shows_through(catalog: Catalog) -> None:
    model = pile(catalog, seed=3)
    busy = next(p.n for p in model.ports if p.state == "charging")
    with pytest.raises(UnsupportedUnit, match="in use"):
        model.set_port_enabled(busy, False)
    free = next(p.n for p in model.ports if p.state == "available")
    with pytest.raises(UnsupportedUnit):
        model.set_port_enabled(model.units + 1, False)
    assert model.set_port_enabled(free, False) == f"port {free} disabled"
    model.inject_fault("relay_stuck", free, model.t)
    assert model.snapshot()["ports"][free - 1]["state"] == "faulted"
    model.clear_fault("relay_stuck", free, model.t)
    assert model.snapshot()["ports"][free - 1]["state"] == "disabled"
    model.set_port_enabled(free, True)
    assert model.snapshot()["ports"][free - 1]["state"] == "available"


def test_disabled_slots_and_held_batteries_serve_no_rider(catalog: Catalog) -> None:
    model = cabinet(catalog, seed=5)
    held = {s.n for s in model.slots if s.state == "ready"}
    empty = {s.n for s in model.slots if s.state == "empty"}
    for n in held:
        model.set_battery_locked(n, True)
    for n in empty:
        model.set_slot_enabled(n, False)
    assert held
    assert {s.n for s in model.slots if s.state == "reserved"} == held
    assert {s.n for s in model.slots if s.state == "disabled"} == empty
    steps = run(model, 12)
    swaps = [e.body for _, events, _ in steps for e in events if e.body["type"] == "swap"]
    assert not {s["slot_out"] for s in swaps} & held  # a held pack is never handed out
    assert not {s["slot_in"] for s in swaps} & empty  # nor a disabled slot filled
    final = {s["n"]: s for s in steps[-1][2]["slots"]}
    assert all(final[n]["state"] == "reserved" for n in held)
    assert all(final[n]["state"] == "disabled" for n in empty)
    for n in held:
        model.set_battery_locked(n, False)
        assert model.slots[n - 1].state in ("ready", "charging")


def test_a_disabled_slot_stops_charging(catalog: Catalog) -> None:
    model = cabinet(catalog, seed=5)
    slot = next(s for s in model.slots if s.battery is not None and s.soc < 80)
    soc = slot.soc
    model.set_slot_enabled(slot.n, False)
    run(model, 2)
    assert (slot.soc, slot.power_w, slot.state) == (soc, 0.0, "disabled")
    model.set_slot_enabled(slot.n, True)
    run(model, 1)
    assert slot.soc > soc


def test_locks_and_the_door_refuse_or_fail(catalog: Catalog) -> None:
    model = cabinet(catalog, seed=5)
    empty = next((s.n for s in model.slots if s.battery is None), None)
    if empty is not None:
        with pytest.raises(UnsupportedUnit, match="no battery"):
            model.set_battery_locked(empty, True)
    full = next(s.n for s in model.slots if s.battery is not None)
    model.inject_fault("lock_failure", full, model.t)
    with pytest.raises(LockFailed):
        model.set_battery_locked(full, True)
    model.inject_fault("door_fault", None, model.t)
    with pytest.raises(LockFailed):
        model.open_door(model.t)
    model.clear_fault("door_fault", None, model.t)
    model.set_smoke(True, model.t)
    with pytest.raises(UnsupportedUnit, match="smoke"):
        model.open_door(model.t)
    model.set_smoke(False, model.t)
    assert model.open_door(model.t) == "door open"
    assert model.snapshot()["door_open"] is True
