"""A charging pile: riders plug in by hour of day, charge for hours, unplug when done.

Ports move ``available -> charging -> finished -> available`` (OCPP 1.6 Available,
Charging, Finishing). A session charges a 48/60 V pack at about 150-400 W for 2-8 h; the
session ends (``session_ended`` with its energy) when the rider unplugs, minutes to an hour
after the charger finished, or earlier when a rider leaves before the pack is full.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from devices.catalog import DeviceSpec
from simulators.daycycle import ambient_c, arrival_probability
from simulators.errors import UnsupportedUnit
from simulators.model import STEP_S, Body, DeviceModel

ARRIVALS_PER_HOUR = 0.8
"""Riders plugging into one 10-port pile per hour, averaged over the day."""

MIN_SESSION_H, MAX_SESSION_H = 2.0, 8.0
EARLY_LEAVE_P = 0.1
TAPER_TIME = 0.85 + 0.15 / 0.5


@dataclass(slots=True)
class PortSim:
    n: int
    state: str = "available"
    fault: str | None = None
    power_w: float = 0.0
    energy_wh: float = 0.0
    session: str | None = None
    target_wh: float = 0.0
    rated_w: float = 0.0
    unplug_at: float | None = None
    power_pin: float | None = None  # set_port_power: the power reported while charging
    disabled: bool = False  # out of service by command: reads "disabled", takes no rider

    def end_session(self) -> None:
        self.state = "available"
        self.power_w = self.energy_wh = self.target_wh = self.rated_w = 0.0
        self.session = None
        self.unplug_at = None
        self.power_pin = None  # a pin belongs to the session it was set in

    def as_json(self) -> Body:
        port: Body = {
            "n": self.n,
            # a fault shows through: disabling a port never hides it from the service
            "state": "disabled" if self.disabled and self.state != "faulted" else self.state,
            "power_w": round(self.power_w, 1),
            "energy_wh": round(self.energy_wh, 1),
        }
        if self.session is not None:
            port["session"] = self.session
        if self.fault is not None:
            port["fault"] = self.fault
        return port


class PileModel(DeviceModel):
    kind = "pile"
    unit_word = "port"
    unit_fault_codes: ClassVar[tuple[str, ...]] = (
        "over_temperature",
        "relay_stuck",
        "meter_failure",
        "over_current",
        "ground_fault",
    )
    device_fault_codes: ClassVar[tuple[str, ...]] = ("comm_error", "under_voltage")

    def __init__(
        self, spec: DeviceSpec, rng: random.Random, start: float, *, fault_rate: float = 0.0
    ) -> None:
        super().__init__(spec, rng, start, fault_rate=fault_rate)
        self.ports = [PortSim(n) for n in range(1, self.units + 1)]
        self.voltage_v = 229.0
        self.temp_c = ambient_c(start) + 3.0
        self.model_name = spec.model or "CW-P10"
        self.firmware = "2.4.1"
        # Start mid-day, not empty: some riders are already charging or done.
        for port in self.ports:
            roll = rng.random()
            if roll < 0.3:
                self._start_session(port, start)
                port.energy_wh = port.target_wh * rng.uniform(0.05, 0.8)
            elif roll < 0.38:
                self._start_session(port, start)
                port.energy_wh = port.target_wh
                port.state, port.power_w = "finished", 0.0
                port.unplug_at = start + rng.uniform(60, 3600)
        self._events.clear()

    def _start_session(self, port: PortSim, t: float) -> None:
        rng = self.rng
        port.session = f"s-{rng.getrandbits(40):010x}"
        port.state = "charging"
        port.energy_wh = 0.0
        port.target_wh = rng.uniform(450.0, 1500.0)
        rated = rng.uniform(150.0, 400.0)
        # The last 15 % goes at half power, so the whole charge takes 1.15 x energy / power.
        hours = min(max(TAPER_TIME * port.target_wh / rated, MIN_SESSION_H), MAX_SESSION_H)
        port.rated_w = TAPER_TIME * port.target_wh / hours
        port.power_w = port.rated_w
        port.unplug_at = None
        if rng.random() < EARLY_LEAVE_P:  # this rider will leave before the pack is full
            port.unplug_at = t + rng.uniform(0.5, hours) * 3600
        self._emit(t, "session_started", port=port.n, session=port.session)

    def _end_session(self, port: PortSim, t: float) -> None:
        self._emit(
            t,
            "session_ended",
            port=port.n,
            session=port.session,
            energy_wh=round(port.energy_wh, 1),
        )
        port.end_session()

    def _step(self, t: float) -> None:
        rng = self.rng
        for port in self.ports:
            if port.state == "charging":
                taper = 0.5 if port.energy_wh > 0.85 * port.target_wh else 1.0
                port.power_w = port.rated_w * taper * rng.uniform(0.97, 1.03)
                if port.power_pin is not None:  # the draw above keeps the rng stream as is
                    port.power_w = port.power_pin
                port.energy_wh += port.power_w * STEP_S / 3600
                if port.unplug_at is not None and t >= port.unplug_at:
                    self._end_session(port, t)
                elif port.energy_wh >= port.target_wh:
                    port.state, port.power_w = "finished", 0.0
                    port.unplug_at = t + rng.uniform(5 * 60, 60 * 60)
                    self._touch()
            elif port.state == "finished" and port.unplug_at is not None and t >= port.unplug_at:
                self._end_session(port, t)
        arrives = rng.random() < arrival_probability(ARRIVALS_PER_HOUR, t, STEP_S)
        free = [p for p in self.ports if p.state == "available" and not p.disabled]
        if arrives and free and not self.faults:  # otherwise the rider rides on
            self._start_session(rng.choice(free), t)
        charging = sum(1 for p in self.ports if p.state == "charging")
        self.voltage_v = 229.0 - 0.4 * charging + rng.uniform(-1.5, 1.5)
        self.temp_c = ambient_c(t) + 3.0 + 0.9 * charging + rng.uniform(-0.3, 0.3)

    def _fault_unit(self, unit: int, code: str, at: float) -> bool:
        port = self.ports[unit - 1]
        if port.state == "faulted":
            return False
        if port.session is not None:
            self._end_session(port, at)
        port.end_session()
        port.state, port.fault = "faulted", code
        return True

    def _unfault_unit(self, unit: int, code: str, at: float) -> bool:
        port = self.ports[unit - 1]
        if port.fault != code:
            return False
        port.state, port.fault = "available", None
        return True

    # -- injections -------------------------------------------------------------------------

    def _charging_port(self, unit: int) -> PortSim:
        self._check_unit(unit)
        port = self.ports[unit - 1]
        if port.state != "charging":
            raise UnsupportedUnit(f"{self.spec.id} port {unit} is {port.state}, not charging")
        return port

    def set_port_power(self, unit: int, watts: float | None) -> None:
        """Pin the power a charging port reports (and delivers) for the rest of its session;
        None unpins. 0 W while ``charging`` is a stuck session."""
        if watts is None:
            self._check_unit(unit)
            port = self.ports[unit - 1]
            if port.power_pin is not None:
                port.power_pin = None
                if port.state == "charging":
                    port.power_w = port.rated_w
                self._touch()
            return
        if watts < 0:
            raise UnsupportedUnit(f"power {watts} W is negative")
        port = self._charging_port(unit)
        port.power_pin = port.power_w = float(watts)
        self._touch()

    def rewind_energy(self, unit: int, wh: float) -> None:
        """The meter of a charging port loses ``wh`` (down to 0): the next snapshot reports
        less energy than the previous one within the same session."""
        if not wh > 0:
            raise UnsupportedUnit(f"rewind by {wh} Wh: must be > 0")
        port = self._charging_port(unit)
        port.energy_wh = max(0.0, port.energy_wh - wh)
        self._touch()

    def set_port_enabled(self, unit: int, enabled: bool) -> str:
        """Take a port out of service (``disable_port``) or back (``enable_port``); returns
        what happened. A port in use (a rider's pack plugged in) is not disabled: refused
        with UnsupportedUnit, like a charger that will not cut a session short."""
        self._check_unit(unit)
        port = self.ports[unit - 1]
        if not enabled:
            if not port.disabled and port.state in ("charging", "finished"):
                raise UnsupportedUnit(f"port {unit} is in use ({port.state}): not disabled")
            port.disabled = True
        else:
            port.disabled = False
        self._touch()
        done = f"port {unit} {'enabled' if enabled else 'disabled'}"
        if port.state == "faulted":
            return f"{done}; it reads faulted ({port.fault}) until the fault clears"
        return done

    def set_temperature(self, unit: int | None, temp_c: float | None) -> None:
        if unit is not None:
            raise UnsupportedUnit("a pile reports one temperature for the device: use unit=None")
        super().set_temperature(unit, temp_c)

    def snapshot(self) -> Body:
        return {
            "kind": "pile",
            "voltage_v": round(self.voltage_v, 1),
            "temp_c": round(self.temp_override.get(None, self.temp_c), 1),
            "rssi_dbm": self.rssi_dbm,
            "faults": list(self.faults),
            "ports": [p.as_json() for p in self.ports],
        }

    def birth_fields(self) -> Body:
        return {
            "kind": "pile",
            "model": self.model_name,
            "firmware": self.firmware,
            "ports": self.units,
        }
