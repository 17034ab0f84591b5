"""What every simulated device shares: fixed-step time, events, faults, temperature overrides.

A model is pure state: ``advance_to(t)`` moves it along the simulated clock in fixed steps
of ``STEP_S`` sim seconds (so the same seed gives the same story however the wall clock
batches the steps), and ``drain()`` hands out what happened since the last call. Nothing
here does I/O or knows about MQTT.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from devices.catalog import DeviceSpec
from devices.contract import DeviceKind
from simulators.errors import UnsupportedUnit

STEP_S = 30.0
"""Length of one behaviour step in simulated seconds."""

DEFAULT_FAULT_RATE = 0.02
"""Random faults per device per simulated day (about one fault a day across 50 devices)."""

Body = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Happened:
    """An event at sim time ``at`` (epoch seconds); ``body`` is everything after the header."""

    at: float
    body: Body


@dataclass(slots=True)
class Drained:
    events: list[Happened] = field(default_factory=list)
    changed: bool = False


@dataclass(slots=True)
class _TimedFault:
    code: str
    unit: int | None
    clear_at: float


class DeviceModel:
    """Base of ``PileModel`` and ``CabinetModel``; subclasses implement ``_step``."""

    kind: ClassVar[DeviceKind]
    unit_word: ClassVar[str]  # "port" or "slot": the event field that names a unit
    unit_fault_codes: ClassVar[tuple[str, ...]]
    device_fault_codes: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        spec: DeviceSpec,
        rng: random.Random,
        start: float,
        *,
        fault_rate: float = 0.0,
    ) -> None:
        if spec.kind != self.kind:
            raise UnsupportedUnit(f"{spec.id} is a {spec.kind}, not a {self.kind}")
        self.spec = spec
        self.rng = rng
        self.t = start
        self.fault_rate = fault_rate
        self.faults: list[str] = []
        self.rssi_dbm = float(rng.randint(-88, -58))
        self.temp_override: dict[int | None, float] = {}
        self._timed_faults: list[_TimedFault] = []
        self._events: list[Happened] = []
        self._changed = True  # the first status is a change

    @property
    def units(self) -> int:
        return self.spec.units

    # -- time ---------------------------------------------------------------------------

    def advance_to(self, t: float) -> None:
        """Run every whole step up to sim time ``t``; a model never goes back in time."""
        while self.t + STEP_S <= t:
            self.t += STEP_S
            self._step(self.t)
            self._random_faults(self.t)

    def _step(self, t: float) -> None:
        raise NotImplementedError

    def drain(self) -> Drained:
        """Events since the last drain, and whether any port/slot/fault changed."""
        out = Drained(self._events, self._changed)
        self._events = []
        self._changed = False
        return out

    def _emit(self, at: float, type_: str, **fields: Any) -> None:
        body: Body = {"type": type_}
        body.update({k: v for k, v in fields.items() if v is not None})
        self._events.append(Happened(at, body))
        self._changed = True

    def _touch(self) -> None:
        self._changed = True

    # -- faults ---------------------------------------------------------------------------

    def _check_unit(self, unit: int | None) -> None:
        if unit is not None and not 1 <= unit <= self.units:
            raise UnsupportedUnit(f"{self.spec.id} has no {self.unit_word} {unit}")

    def inject_fault(self, code: str, unit: int | None, at: float) -> None:
        """Raise ``code`` on the device (``unit`` None) or on one port/slot, until cleared."""
        self._check_unit(unit)
        self._raise(code, unit, at)

    def clear_fault(self, code: str, unit: int | None, at: float) -> None:
        """Clear ``code``; clearing a fault that is not active changes nothing."""
        self._check_unit(unit)
        self._timed_faults = [
            f for f in self._timed_faults if not (f.code == code and f.unit == unit)
        ]
        self._clear(code, unit, at)

    def _raise(self, code: str, unit: int | None, at: float) -> None:
        if unit is None:
            if code in self.faults:
                return
            self.faults.append(code)
        elif not self._fault_unit(unit, code, at):
            return
        self._emit(at, "fault_raised", code=code, **{self.unit_word: unit})

    def _clear(self, code: str, unit: int | None, at: float) -> None:
        if unit is None:
            if code not in self.faults:
                return
            self.faults.remove(code)
        elif not self._unfault_unit(unit, code, at):
            return
        self._emit(at, "fault_cleared", code=code, **{self.unit_word: unit})

    def _fault_unit(self, unit: int, code: str, at: float) -> bool:
        raise NotImplementedError

    def _unfault_unit(self, unit: int, code: str, at: float) -> bool:
        raise NotImplementedError

    def _random_faults(self, t: float) -> None:
        for timed in [f for f in self._timed_faults if f.clear_at <= t]:
            self._timed_faults.remove(timed)
            self._clear(timed.code, timed.unit, t)
        if self.fault_rate <= 0 or self.rng.random() >= self.fault_rate * STEP_S / 86400:
            return
        unit: int | None = None
        if self.rng.random() < 0.2:
            code = self.rng.choice(self.device_fault_codes)
        else:
            code = self.rng.choice(self.unit_fault_codes)
            unit = self.rng.randint(1, self.units)
        before = len(self._events)
        self._raise(code, unit, t)
        if len(self._events) > before:  # the fault took; it clears itself later
            clear_at = t + self.rng.uniform(15 * 60, 3 * 3600)
            self._timed_faults.append(_TimedFault(code, unit, clear_at))

    # -- temperature ----------------------------------------------------------------------

    def set_temperature(self, unit: int | None, temp_c: float | None) -> None:
        """Pin the reported temperature (None unpins it); no fault is raised by itself."""
        self._check_unit(unit)
        if temp_c is None:
            self.temp_override.pop(unit, None)
        else:
            self.temp_override[unit] = float(temp_c)
        self._touch()

    # -- wire-facing views ------------------------------------------------------------------

    def snapshot(self) -> Body:
        """The status body (everything after the header) of the current state."""
        raise NotImplementedError

    def birth_fields(self) -> Body:
        raise NotImplementedError
