"""Hourly rollups: what one hour of a device's history says, in minutes and counts.

Each minute of the hour is judged at its midpoint (``hour + 30 s + k min``) by the
availability rules (``devices.availability``): *online* when the last birth/death said
online and a message arrived within ``STALE_FACTOR`` heartbeats; then, within the station's
opening hours, ``minutes_port_free`` / ``minutes_battery_ready`` count the minutes with a
free port / a ready battery, and ``port_minutes`` / ``battery_minutes`` sum how many
(unit-minutes: / 60 is the hour's mean). Events count in the hour they happened (device time),
riders' reports in the hour they were made (service time; ``Rollup.add_reports``). A
station's rollup is the sum of its devices' (``Rollup.add``), except its minutes with a free
port / a ready battery: minutes in which any of its piles / cabinets had one. Its
``minutes_open`` is summed too: ``devices`` x the station's open minutes of the hour (every
device of a station keeps the station's hours), so a reader divides by ``devices`` for the
station's own open minutes (``api.summaries`` does) and compares ``minutes_port_free``
(station minutes, not summed) with that quotient.

Pure: decoded messages in, numbers out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from devices.availability import free_ports, is_fresh, ready_batteries
from devices.contract import (
    DEFAULT_HEARTBEAT_S,
    Birth,
    CabinetStatus,
    Death,
    Event,
    Message,
    PileStatus,
)

HOUR_MS = 3_600_000
MINUTE_MS = 60_000


class RiderReport(NamedTuple):
    """A rider's report, counted in the hour it was made (the API keeps them)."""

    station_id: str
    device_id: str | None
    category: str
    at_ms: int


@dataclass(slots=True)
class Rollup:
    devices: int = 1
    minutes_online: int = 0
    minutes_open: int = 0  # minutes of the hour within the station's opening hours (a
    # station's: summed over its devices, devices x its own open minutes)
    minutes_port_free: int = 0  # open minutes in which a pile (of the station) had a free port
    minutes_battery_ready: int = 0  # ... in which a cabinet had a ready battery
    port_minutes: int = 0  # free ports summed over the open minutes (/ 60: the hour's mean)
    battery_minutes: int = 0  # ready batteries summed over the open minutes
    busy_port_minutes: int = 0  # ports charging or finished, summed over the online minutes
    charging_slot_minutes: int = 0  # slots charging, summed over the online minutes
    energy_wh: float = 0.0  # of sessions that ended in the hour
    sessions: int = 0  # sessions started
    sessions_ended: int = 0
    swaps: int = 0
    faults: dict[str, int] = field(default_factory=dict)  # fault_raised, by code
    reports: int = 0  # riders' reports made in the hour (its device's, or the station's)
    reports_by_category: dict[str, int] = field(default_factory=dict)
    # free ports (piles) / ready batteries (cabinets) in each minute: how a station's
    # minutes with a free port are counted (not stored)
    ports_by_minute: list[int] = field(default_factory=lambda: [0] * 60, repr=False)
    batteries_by_minute: list[int] = field(default_factory=lambda: [0] * 60, repr=False)

    @property
    def minutes_offline(self) -> int:
        return 60 * self.devices - self.minutes_online

    def add(self, other: Rollup) -> None:
        self.devices += other.devices
        self.minutes_online += other.minutes_online
        self.minutes_open += other.minutes_open
        self.port_minutes += other.port_minutes
        self.busy_port_minutes += other.busy_port_minutes
        self.charging_slot_minutes += other.charging_slot_minutes
        self.battery_minutes += other.battery_minutes
        self.ports_by_minute = [
            a + b for a, b in zip(self.ports_by_minute, other.ports_by_minute, strict=True)
        ]
        self.batteries_by_minute = [
            a + b for a, b in zip(self.batteries_by_minute, other.batteries_by_minute, strict=True)
        ]
        self.minutes_port_free = sum(1 for n in self.ports_by_minute if n)
        self.minutes_battery_ready = sum(1 for n in self.batteries_by_minute if n)
        self.energy_wh = round(self.energy_wh + other.energy_wh, 1)
        self.sessions += other.sessions
        self.sessions_ended += other.sessions_ended
        self.swaps += other.swaps
        for code, n in other.faults.items():
            self.faults[code] = self.faults.get(code, 0) + n
        self.add_reports(other.reports_by_category)

    def add_reports(self, by_category: dict[str, int]) -> None:
        """Count riders' reports (how many of each category)."""
        for category, n in by_category.items():
            self.reports += n
            self.reports_by_category[category] = self.reports_by_category.get(category, 0) + n

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["ports_by_minute"], data["batteries_by_minute"]
        return {**data, "minutes_offline": self.minutes_offline}

    @classmethod
    def of(cls, data: dict[str, Any]) -> Rollup:
        """A stored rollup (without its minutes)."""
        return cls(**{k: v for k, v in data.items() if k != "minutes_offline"})


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message: its device time (a death's arrival time) and what it says."""

    ts_ms: int
    message: Message


def device_hour(
    hour_ms: int,
    history: Iterable[Stored],
    *,
    release_soc: float,
    is_open: Callable[[int], bool],
    online: bool = False,
    heartbeat_s: int = DEFAULT_HEARTBEAT_S,
) -> Rollup:
    """The rollup of [hour_ms, hour_ms + 1 h). ``history``: the device's messages up to the
    hour's end, by device time, starting early enough to hold the status that stands at the
    hour's start (a message within the stale window before it, and the last status);
    ``online``/``heartbeat_s``: what the last birth/death before ``history`` said."""
    items = sorted(history, key=lambda s: s.ts_ms)
    out = Rollup()
    status: PileStatus | CabinetStatus | None = None
    last_seen: int | None = None
    i = 0
    for k in range(60):
        t = hour_ms + k * MINUTE_MS + MINUTE_MS // 2
        while i < len(items) and items[i].ts_ms <= t:
            s = items[i]
            msg = s.message
            if isinstance(msg, Birth):
                online, heartbeat_s = True, msg.heartbeat_s
            elif isinstance(msg, Death):
                online = False
            elif isinstance(msg, PileStatus | CabinetStatus):
                status = msg
            last_seen = s.ts_ms
            i += 1
        opened = is_open(t)
        out.minutes_open += opened
        if not (online and is_fresh(last_seen, heartbeat_s, t)):
            continue
        out.minutes_online += 1
        if status is None:
            continue
        if isinstance(status, PileStatus):
            out.busy_port_minutes += sum(p.state in ("charging", "finished") for p in status.ports)
        else:
            out.charging_slot_minutes += sum(u.state == "charging" for u in status.slots)
        if not opened:
            continue
        if isinstance(status, PileStatus):
            free = free_ports(status)
            out.port_minutes += free
            out.minutes_port_free += free > 0
            out.ports_by_minute[k] = free
        else:
            ready = ready_batteries(status, release_soc)
            out.battery_minutes += ready
            out.minutes_battery_ready += ready > 0
            out.batteries_by_minute[k] = ready
    for s in items:
        msg = s.message
        if not (hour_ms <= s.ts_ms < hour_ms + HOUR_MS) or not isinstance(msg, Event):
            continue
        if msg.type == "session_started":
            out.sessions += 1
        elif msg.type == "session_ended":
            out.sessions_ended += 1
            out.energy_wh = round(out.energy_wh + (msg.energy_wh or 0.0), 1)
        elif msg.type == "swap":
            out.swaps += 1
        elif msg.type == "fault_raised" and msg.code is not None:
            out.faults[msg.code] = out.faults.get(msg.code, 0) + 1
    return out
