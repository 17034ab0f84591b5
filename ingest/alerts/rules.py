"""The alert rules: pure functions from a device twin (or a station's twins) to the
conditions that are active now. No I/O; the engine diffs their output against what was
active before.

Per device, on every applied message and on the timer:

- ``fault``: every fault code, device-level or on a port/slot, from snapshots and events;
  severity from ``devices.faults``.
- ``offline``: the device was seen, and is not online per contract v1 (Will received, or
  nothing for 3 heartbeats). While offline nothing else of the device is evaluated: its
  last report is stale, and the offline alert is the root cause (port/slot alerts are
  suppressed, neither opened nor resolved).
- ``temperature_high`` / ``temperature_rise``: enclosure or slot temperature over a limit, or
  rising faster than a limit per minute (critical: fire precursors). Minutes of the rule
  clock (``rule_time``): the device's clock while it advances plausibly (simulators run
  theirs fast, and their temperatures follow it), our arrival clock for any step where the
  device's stalls, goes back or leaps: one status from year 9999 or 0 cannot stop the rule.
- ``charging_no_power``, ``energy_backwards``, ``ready_low_soc``, ``door_open_long``.

Per station, on the timer: ``station_unavailable`` (open, nothing free, for a while) and
``station_offline`` (a share of its devices offline: one incident).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from devices.availability import STALE_FACTOR, free_ports, ready_batteries
from devices.catalog import StationSpec
from devices.contract import CabinetStatus, Event, Message, PileStatus
from devices.faults import severity
from ingest.alerts.config import AlertsConfig
from ingest.alerts.model import Key, Observation
from ingest.twins import Twin

Unit = int | None


@dataclass
class DeviceMemory:
    """What the rules remember about one device between messages."""

    event_faults: dict[tuple[str, Unit], float | None] = field(default_factory=dict)
    fault_values: dict[tuple[str, Unit], float | None] = field(default_factory=dict)
    temps: dict[Unit, deque[tuple[int, float]]] = field(default_factory=dict)
    zero_power_since: dict[int, int] = field(default_factory=dict)
    door_open_since: int | None = None
    energy: dict[int, tuple[str | None, float]] = field(default_factory=dict)
    energy_drop: dict[int, float] = field(default_factory=dict)
    # (device ts, rule time, arrival) of the last status: see ``rule_time``
    clock: tuple[int, int, int] | None = None


#: how much faster than ours a device clock may run and still be followed: above every
#: simulator speed we run (14,400x in tests), far below a clock leaping by years
DEVICE_CLOCK_RATE_MAX = 100_000
#: a device step allowed between two statuses that arrive in the same instant
DEVICE_CLOCK_SLACK_MS = 60_000


def rule_time(mem: DeviceMemory, ts_ms: int, received_ms: int) -> int:
    """The time the trend rules put a status at: a clock that never goes back, advancing by
    the device's step since its last status when that step is plausible (forward, and at
    most ``DEVICE_CLOCK_RATE_MAX`` times ours plus a slack), else by our step."""
    if mem.clock is None:
        mem.clock = (ts_ms, received_ms, received_ms)
        return received_ms
    last_ts, last_rule, last_arrival = mem.clock
    ours = max(0, received_ms - last_arrival)
    theirs = ts_ms - last_ts
    plausible = 0 < theirs <= ours * DEVICE_CLOCK_RATE_MAX + DEVICE_CLOCK_SLACK_MS
    now = last_rule + (theirs if plausible else ours)
    mem.clock = (ts_ms, now, max(received_ms, last_arrival))
    return now


def observe(
    mem: DeviceMemory, twin: Twin, msg: Message, received_ms: int, cfg: AlertsConfig
) -> list[tuple[str, Unit]]:
    """Remember what ``msg`` says; returns the faults an event raised explicitly (repeats)."""
    raised: list[tuple[str, Unit]] = []
    if isinstance(msg, Event):
        unit = msg.port if msg.port is not None else msg.slot
        if msg.type == "fault_raised" and msg.code:
            mem.event_faults[(msg.code, unit)] = msg.value
            mem.fault_values[(msg.code, unit)] = msg.value
            raised.append((msg.code, unit))
        elif msg.type == "fault_cleared" and msg.code:
            mem.event_faults.pop((msg.code, unit), None)
        elif msg.type == "door_opened" and mem.door_open_since is None:
            mem.door_open_since = received_ms
        elif msg.type == "door_closed":
            mem.door_open_since = None
        return raised
    if isinstance(msg, (PileStatus, CabinetStatus)):  # a tuple: faster than a union
        limits = cfg.limits(twin.kind)
        mem.event_faults.clear()  # a snapshot lists every active fault: it is newer
        at = rule_time(mem, msg.ts, received_ms)
        _remember_temp(mem, None, at, msg.temp_c, limits.temp_rise_window_s)
        if isinstance(msg, CabinetStatus):
            if msg.door_open:
                if mem.door_open_since is None:
                    mem.door_open_since = received_ms
            else:
                mem.door_open_since = None
            # _remember_temp inline: twelve calls a cabinet status cost more than the work
            temps, oldest_ms = mem.temps, at - limits.temp_rise_window_s * 1000
            for slot in msg.slots:
                temp = slot.temp_c
                if temp is None:
                    continue
                readings = temps.get(slot.n)
                if readings is None:
                    readings = temps[slot.n] = deque()
                elif readings and at <= readings[-1][0]:
                    continue  # the same instant (the rule clock never goes back)
                readings.append((at, temp))
                while readings and readings[0][0] < oldest_ms:
                    readings.popleft()
        else:
            mem.energy_drop.clear()
            zero_since, energy = mem.zero_power_since, mem.energy
            min_w, backwards_wh = limits.charging_min_w, limits.energy_backwards_wh
            for port in msg.ports:
                n, session, energy_wh = port.n, port.session, port.energy_wh
                if port.state == "charging" and port.power_w < min_w:
                    if n not in zero_since:
                        zero_since[n] = received_ms
                elif zero_since:
                    zero_since.pop(n, None)
                before = energy.get(n)
                if (
                    before is not None
                    and session is not None
                    and before[0] == session
                    and energy_wh < before[1] - backwards_wh
                ):
                    mem.energy_drop[n] = before[1] - energy_wh
                energy[n] = (session, energy_wh)
    return raised


def _remember_temp(
    mem: DeviceMemory, unit: Unit, ts_ms: int, temp: float | None, window_s: float
) -> None:
    if temp is None:
        return
    readings = mem.temps.get(unit)
    if readings is None:  # not setdefault(unit, deque()): that builds a deque every call
        readings = mem.temps[unit] = deque()
    if readings and ts_ms <= readings[-1][0]:
        return  # the same instant (the rule clock never goes back)
    readings.append((ts_ms, temp))
    oldest_ms = ts_ms - window_s * 1000
    while readings and readings[0][0] < oldest_ms:
        readings.popleft()


def rise_per_min(readings: Sequence[tuple[int, float]], min_span_s: float) -> float | None:
    """°C per minute from the oldest to the newest reading, if they span long enough."""
    if len(readings) < 2:
        return None
    (t0, c0), (t1, c1) = readings[0], readings[-1]
    if t1 - t0 < min_span_s * 1000:
        return None
    return (c1 - c0) / ((t1 - t0) / 60_000)


def device_conditions(
    twin: Twin, mem: DeviceMemory, now_ms: int, cfg: AlertsConfig
) -> tuple[dict[Key, Observation], bool]:
    """The device's active conditions, and whether the rest is frozen (device offline)."""
    if twin.last_seen_ms is None:
        return {}, False  # never heard from: not commissioned, not offline
    unit_kind = "port" if twin.kind == "pile" else "slot"
    if not twin.online(now_ms):
        why = "Will received" if not twin.online_flag else "no message for 3 heartbeats"
        k = _key(twin, "offline")
        return {k: Observation(k, "major", info=why)}, True
    found: dict[Key, Observation] = {}
    limits = cfg.limits(twin.kind)
    status = twin.status
    faults: dict[tuple[str, Unit], float | None] = dict(mem.event_faults)
    if status is not None:
        for code in status.device_faults:
            faults.setdefault((code, None), mem.fault_values.get((code, None)))
        for u in status.units:
            if u.fault:
                faults.setdefault((u.fault, u.n), mem.fault_values.get((u.fault, u.n)))
    for (code, unit), value in faults.items():
        k = _key(twin, "fault", unit, code)
        found[k] = Observation(k, severity(code), value=value, info=_unit_info(unit_kind, unit))
    if status is not None:
        if status.temp_c is not None and status.temp_c > limits.temp_high_c:
            k = _key(twin, "temperature_high")
            found[k] = Observation(
                k, "critical", value=status.temp_c, info=f"enclosure > {limits.temp_high_c} °C"
            )
        if isinstance(status, CabinetStatus):
            unit_high_c, release_soc = limits.unit_temp_high_c, twin.release_soc
            for slot in status.slots:
                if slot.temp_c is not None and slot.temp_c > unit_high_c:
                    k = _key(twin, "temperature_high", slot.n)
                    found[k] = Observation(
                        k,
                        "critical",
                        value=slot.temp_c,
                        info=f"slot > {limits.unit_temp_high_c} °C",
                    )
                if slot.state == "ready" and slot.soc is not None and slot.soc < release_soc:
                    k = _key(twin, "ready_low_soc", slot.n)
                    found[k] = Observation(
                        k, "minor", value=slot.soc, info=f"ready below {twin.release_soc:g} %"
                    )
            if mem.door_open_since is not None:
                open_s = (now_ms - mem.door_open_since) / 1000
                if open_s >= limits.door_open_s:
                    k = _key(twin, "door_open_long")
                    found[k] = Observation(k, "major", value=round(open_s), info="seconds open")
        else:
            for n, since in mem.zero_power_since.items():
                stuck_s = (now_ms - since) / 1000
                if stuck_s >= limits.charging_no_power_s:
                    k = _key(twin, "charging_no_power", n)
                    found[k] = Observation(k, "minor", value=round(stuck_s), info="seconds at ~0 W")
            for n, drop in mem.energy_drop.items():
                k = _key(twin, "energy_backwards", n)
                found[k] = Observation(k, "warning", value=round(drop, 1), info="Wh lost")
    # rise_per_min inline (a call per slot and message was most of this loop)
    min_span_ms, rise_max = limits.temp_rise_min_span_s * 1000, limits.temp_rise_c_per_min
    for unit, readings in mem.temps.items():
        if len(readings) < 2:
            continue
        (t0, c0), (t1, c1) = readings[0], readings[-1]
        if t1 - t0 < min_span_ms:
            continue
        rate = (c1 - c0) / ((t1 - t0) / 60_000)
        if rate >= rise_max:
            k = _key(twin, "temperature_rise", unit)
            found[k] = Observation(k, "critical", value=round(rate, 2), info="°C per minute")
    return found, False


NEVER_MS = 2**62


def next_change_ms(twin: Twin, mem: DeviceMemory, cfg: AlertsConfig) -> int:
    """The first time at which the clock alone can change ``device_conditions`` of a device
    that has none now (its silence becoming offline, a door open too long, a port charging
    at ~0 W too long); ``NEVER_MS`` when only a message can. Early is safe (an evaluation
    that finds nothing new), late is not."""
    if twin.last_seen_ms is None or not twin.online_flag:
        return NEVER_MS  # never heard from, or its Will said offline: a message decides
    limits = cfg.limits(twin.kind)
    due = twin.last_seen_ms + STALE_FACTOR * twin.heartbeat_s * 1000 + 1
    if mem.door_open_since is not None:
        due = min(due, mem.door_open_since + math.ceil(limits.door_open_s * 1000))
    for since in mem.zero_power_since.values():
        due = min(due, since + math.ceil(limits.charging_no_power_s * 1000))
    return due


def _key(twin: Twin, rule: str, unit: Unit = None, code: str | None = None) -> Key:
    return Key(twin.station_id, twin.device_id, unit, rule, code or rule)


def _unit_info(unit_kind: str, unit: Unit) -> str | None:
    return None if unit is None else f"{unit_kind} {unit}"


@dataclass
class StationMemory:
    unavailable_since: int | None = None


def local_minute(now_ms: int, tz: ZoneInfo) -> int:
    local = datetime.fromtimestamp(now_ms / 1000, tz=tz)
    return local.hour * 60 + local.minute


def station_conditions(
    station: StationSpec,
    twins: list[Twin],
    mem: StationMemory,
    now_ms: int,
    cfg: AlertsConfig,
    tz: ZoneInfo,
    flagged: Collection[str] = (),
) -> dict[Key, Observation]:
    """``flagged``: serials of flagged packs (battery passports), never counted ready."""
    seen = [t for t in twins if t.last_seen_ms is not None]
    if not seen:
        mem.unavailable_since = None
        return {}
    found: dict[Key, Observation] = {}
    online = [t for t in seen if t.online(now_ms)]
    offline = len(seen) - len(online)
    share = offline / len(seen)
    if offline >= cfg.station_offline_min and share >= cfg.station_offline_share:
        k = Key(station.id, None, None, "station_offline", "station_offline")
        found[k] = Observation(
            k, "major", value=round(share, 3), info=f"{offline} of {len(seen)} devices offline"
        )
    available = 0
    for t in online:
        if isinstance(t.status, PileStatus):
            available += free_ports(t.status)
        elif isinstance(t.status, CabinetStatus):
            available += ready_batteries(t.status, t.release_soc, flagged)
    if available == 0 and station.is_open(local_minute(now_ms, tz)):
        if mem.unavailable_since is None:
            mem.unavailable_since = now_ms
        for_s = (now_ms - mem.unavailable_since) / 1000
        if for_s >= cfg.station_unavailable_s:
            k = Key(station.id, None, None, "station_unavailable", "station_unavailable")
            found[k] = Observation(
                k, "major", value=round(for_s), info="seconds with no free port or ready battery"
            )
    else:
        mem.unavailable_since = None
    return found
