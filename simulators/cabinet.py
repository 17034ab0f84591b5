"""A battery-swap cabinet: 12 slots, about 10 packs charging, riders swapping by hour of day.

A slot is ``empty``, ``charging`` or ``ready`` (soc at or above the cabinet's release level
from the catalog), or ``faulted``. A pack charges at about 300 W, tapering above 80 %, so
it gains about 20 soc points an hour. A rider puts a depleted pack (soc 5-30) into an empty
slot and takes the fullest ready one (a ``swap`` event); with no ready pack the rider
leaves, counted in ``missed_swaps``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

from devices.catalog import DEFAULT_RELEASE_SOC, DeviceSpec
from simulators.daycycle import ambient_c, arrival_probability
from simulators.errors import LockFailed, UnsupportedUnit
from simulators.model import STEP_S, Body, DeviceModel

SWAPS_PER_HOUR = 2.0
"""Riders arriving at one cabinet per hour, averaged over the day."""

CHARGER_W = 300.0


def charger_power(soc: float) -> float:
    """Constant current up to 80 % soc, then tapering (constant voltage) to 20 % power."""
    if soc >= 100:
        return 0.0
    return CHARGER_W * (1.0 if soc < 80 else max(0.2, 1.0 - (soc - 80) / 25))


@dataclass(slots=True)
class SlotSim:
    n: int
    release_soc: float
    fault: str | None = None
    battery: str | None = None
    soc: float = 0.0
    capacity_wh: float = 0.0
    power_w: float = 0.0
    temp_c: float = 0.0
    state: str = "empty"
    soc_pin: int | None = None  # set_slot_soc: reported instead of the pack's own soc
    disabled: bool = False  # out of service by command: no charging, no rider
    locked: bool = False  # lock_battery: the pack is held (reads "reserved")

    @property
    def soc_reported(self) -> int:
        return math.floor(self.soc)

    def derive_state(self) -> bool:
        """Recompute ``state`` from battery, soc and fault; True when it changed."""
        if self.fault is not None:  # a fault shows through a disabled slot
            state = "faulted"
        elif self.disabled:
            state = "disabled"
        elif self.battery is None:
            state = "empty"
        elif self.locked:
            state = "reserved"
        elif self.soc_reported >= self.release_soc:
            state = "ready"
        else:
            state = "charging"
        changed, self.state = state != self.state, state
        return changed

    def as_json(self, temp_override: float | None) -> Body:
        slot: Body = {"n": self.n, "state": self.state}
        if self.battery is not None:
            slot["battery"] = self.battery
            slot["soc"] = self.soc_reported if self.soc_pin is None else self.soc_pin
            slot["temp_c"] = round(self.temp_c if temp_override is None else temp_override, 1)
            if self.power_w > 0:
                slot["power_w"] = round(self.power_w, 1)
        elif temp_override is not None:
            slot["temp_c"] = round(temp_override, 1)
        if self.fault is not None:
            slot["fault"] = self.fault
        return slot


class CabinetModel(DeviceModel):
    kind = "cabinet"
    unit_word = "slot"
    unit_fault_codes: ClassVar[tuple[str, ...]] = (
        "lock_failure",
        "battery_fault",
        "over_temperature",
    )
    device_fault_codes: ClassVar[tuple[str, ...]] = ("door_fault", "comm_error")

    def __init__(
        self, spec: DeviceSpec, rng: random.Random, start: float, *, fault_rate: float = 0.0
    ) -> None:
        super().__init__(spec, rng, start, fault_rate=fault_rate)
        self.release_soc = float(spec.release_soc or DEFAULT_RELEASE_SOC)
        self.slots = [SlotSim(n, self.release_soc) for n in range(1, self.units + 1)]
        self.smoke = False
        self.door_open = False
        self.missed_swaps = 0
        self.swaps = 0
        self.model_name = spec.model or "CW-S12"
        self.firmware = "1.9.3"
        ambient = ambient_c(start)
        self.temp_c = ambient + 4.0
        count = min(self.units, max(1, round(self.units * rng.uniform(0.75, 0.92))))
        for slot in rng.sample(self.slots, count):
            self._put(slot, self._new_battery_id(), rng.uniform(15.0, 100.0))
            slot.temp_c = ambient + 2.0
        for slot in self.slots:
            slot.derive_state()

    def _new_battery_id(self) -> str:
        taken = {s.battery for s in self.slots}
        while True:
            battery = f"B-{self.rng.getrandbits(32):08X}"
            if battery not in taken:
                return battery

    def _put(self, slot: SlotSim, battery: str, soc: float) -> None:
        slot.battery, slot.soc = battery, soc
        slot.power_w = charger_power(soc) if slot.fault is None else 0.0
        slot.capacity_wh = self.rng.uniform(1150.0, 1700.0)  # 48-60 V x 20-30 Ah

    def _step(self, t: float) -> None:
        rng = self.rng
        ambient = ambient_c(t)
        for slot in self.slots:
            charges = slot.fault is None and not slot.disabled
            if slot.battery is not None and charges and slot.soc < 100:
                slot.power_w = charger_power(slot.soc) * rng.uniform(0.97, 1.03)
                gained = slot.power_w * STEP_S / 3600 / slot.capacity_wh * 100
                slot.soc = min(100.0, slot.soc + gained)
            else:
                slot.power_w = 0.0
            if slot.battery is not None:
                slot.temp_c = (
                    ambient + 2.0 + 7.0 * slot.power_w / CHARGER_W + rng.uniform(-0.3, 0.3)
                )
            if slot.derive_state():
                self._touch()
        charging = sum(1 for s in self.slots if s.power_w > 0)
        self.temp_c = ambient + 4.0 + 0.5 * charging + rng.uniform(-0.3, 0.3)
        if rng.random() < arrival_probability(SWAPS_PER_HOUR, t, STEP_S):
            self._rider_swaps(t)

    def _rider_swaps(self, t: float) -> None:
        rng = self.rng
        ready = [s for s in self.slots if s.state == "ready"]
        empty = [s for s in self.slots if s.state == "empty"]
        if not ready or not empty or self.faults or self.smoke or self.door_open:
            self.missed_swaps += 1
            return
        out = max(ready, key=lambda s: (s.soc_reported, -s.n))
        into = rng.choice(empty)
        battery_in, soc_in = self._new_battery_id(), rng.randint(5, 30)
        battery_out, soc_out = out.battery, out.soc_reported
        out.battery, out.soc, out.power_w, out.soc_pin = None, 0.0, 0.0, None
        self._put(into, battery_in, float(soc_in))
        into.temp_c = ambient_c(t) + 6.0  # a pack fresh off the road is warm
        out.derive_state()
        into.derive_state()
        self.swaps += 1
        self._emit(
            t,
            "swap",
            slot_out=out.n,
            battery_out=battery_out,
            soc_out=soc_out,
            slot_in=into.n,
            battery_in=battery_in,
            soc_in=soc_in,
        )

    # -- faults and injections ----------------------------------------------------------------

    def _fault_unit(self, unit: int, code: str, at: float) -> bool:
        slot = self.slots[unit - 1]
        if slot.fault is not None:
            return False
        slot.fault, slot.power_w = code, 0.0
        slot.derive_state()
        return True

    def _unfault_unit(self, unit: int, code: str, at: float) -> bool:
        slot = self.slots[unit - 1]
        if slot.fault != code:
            return False
        slot.fault = None
        slot.derive_state()
        return True

    def set_smoke(self, on: bool, at: float) -> None:
        """The smoke detector (reported as ``smoke: true`` and a ``smoke`` fault event)."""
        if on == self.smoke:
            return
        self.smoke = on
        self._emit(at, "fault_raised" if on else "fault_cleared", code="smoke")

    def set_door(self, open_: bool, at: float) -> None:
        """The maintenance door."""
        if open_ == self.door_open:
            return
        self.door_open = open_
        self._emit(at, "door_opened" if open_ else "door_closed")

    def take_battery(self, unit: int) -> str:
        """Someone pulls the pack out of ``unit`` (maintenance, theft); returns its id."""
        self._check_unit(unit)
        slot = self.slots[unit - 1]
        if slot.battery is None:
            raise UnsupportedUnit(f"{self.spec.id} slot {unit} holds no battery")
        battery = slot.battery
        slot.battery, slot.soc, slot.power_w, slot.soc_pin = None, 0.0, 0.0, None
        slot.locked = False
        slot.derive_state()
        self._touch()
        return battery

    def insert_battery(self, unit: int, soc: float, battery: str | None = None) -> str:
        """A pack goes into the empty slot ``unit``; returns its id."""
        self._check_unit(unit)
        slot = self.slots[unit - 1]
        if slot.battery is not None:
            raise UnsupportedUnit(f"{self.spec.id} slot {unit} is not empty")
        if not 0 <= soc <= 100:
            raise UnsupportedUnit(f"soc {soc} is outside 0..100")
        battery = battery or self._new_battery_id()
        self._put(slot, battery, float(soc))
        slot.temp_c = ambient_c(self.t) + 2.0
        slot.derive_state()
        self._touch()
        return battery

    def set_slot_soc(self, unit: int, soc: float | None) -> None:
        """Force the soc a slot reports (None unpins); its state still follows the pack's
        own soc, so a ``ready`` slot can report less than the release level."""
        self._check_unit(unit)
        slot = self.slots[unit - 1]
        if soc is None:
            if slot.soc_pin is not None:
                slot.soc_pin = None
                self._touch()
            return
        if slot.battery is None:
            raise UnsupportedUnit(f"{self.spec.id} slot {unit} holds no battery")
        if not 0 <= soc <= 100:
            raise UnsupportedUnit(f"soc {soc} is outside 0..100")
        slot.soc_pin = math.floor(soc)
        self._touch()

    # -- commands ---------------------------------------------------------------------------

    def set_slot_enabled(self, unit: int, enabled: bool) -> str:
        """``disable_slot`` / ``enable_slot``: a disabled slot stops charging and serves no
        rider; it reads ``disabled`` until enabled, unless it is faulted: disabling never
        hides a fault from the service (it reads ``faulted`` until the fault clears)."""
        self._check_unit(unit)
        slot = self.slots[unit - 1]
        slot.disabled = not enabled
        if not enabled:
            slot.power_w = 0.0
        slot.derive_state()
        self._touch()
        done = f"slot {unit} {'enabled' if enabled else 'disabled'}"
        if slot.fault is not None:
            return f"{done}; it reads faulted ({slot.fault}) until the fault clears"
        return done

    def set_battery_locked(self, unit: int, locked: bool) -> str:
        """``lock_battery`` holds the pack in ``unit`` (no rider gets it: the slot reads
        ``reserved``); ``unlock_battery`` releases it. An empty slot is refused
        (UnsupportedUnit); a slot whose lock is faulty cannot do it (LockFailed)."""
        self._check_unit(unit)
        slot = self.slots[unit - 1]
        if slot.battery is None:
            raise UnsupportedUnit(f"slot {unit} holds no battery")
        if slot.fault == "lock_failure":
            raise LockFailed(f"slot {unit}: lock_failure, the latch did not move")
        slot.locked = locked
        slot.derive_state()
        self._touch()
        return f"battery {slot.battery} in slot {unit} {'locked' if locked else 'released'}"

    def open_door(self, at: float) -> str:
        """``open_door``: refused while there is smoke (air feeds a fire); a faulty door
        cannot open (LockFailed)."""
        if self.smoke:
            raise UnsupportedUnit("smoke in the cabinet: the door stays shut")
        if "door_fault" in self.faults:
            raise LockFailed("door_fault: the door did not open")
        self.set_door(True, at)
        self._touch()
        return "door open"

    def snapshot(self) -> Body:
        return {
            "kind": "cabinet",
            "temp_c": round(self.temp_override.get(None, self.temp_c), 1),
            "smoke": self.smoke,
            "door_open": self.door_open,
            "rssi_dbm": self.rssi_dbm,
            "faults": list(self.faults),
            "slots": [s.as_json(self.temp_override.get(s.n)) for s in self.slots],
        }

    def birth_fields(self) -> Body:
        return {
            "kind": "cabinet",
            "model": self.model_name,
            "firmware": self.firmware,
            "slots": self.units,
        }
