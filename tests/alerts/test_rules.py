"""Each rule opens the right alert (rule, severity, target) and clears when it should."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devices.faults import FAULT_CODES, severity
from ingest.alerts.rules import rise_per_min
from tests.alerts.helpers import Clock, Device, active, config, running

PILE, CABINET = "WGS-P01", "WGS-C01"


@pytest.mark.parametrize("code", sorted(FAULT_CODES | {"vendor_x42"}))
async def test_every_fault_code_device_and_unit(tmp_path: Path, code: str) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth()
        cabinet.cabinet({5: {"state": "faulted", "fault": code}}, faults=[code])
        got = sorted((a.unit or 0, a.code, a.severity) for a in active(engine))
        assert got == [(0, code, severity(code)), (5, code, severity(code))]
        assert severity("vendor_x42") == "major"


async def test_temperature_high_and_rise(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth()
        for temp in (30.0, 31.0, 33.0):  # +1.5 °C/min over 2 minutes: normal charging is slower
            cabinet.cabinet({2: {"temp_c": temp}})
            clock.advance(60)
        assert active(engine) == []
        cabinet.cabinet({2: {"temp_c": 37.0}})  # 30 -> 37 in 3 min: 2.33 °C/min
        [rise] = active(engine)
        assert (rise.rule, rise.severity, rise.unit, rise.last_value) == (
            "temperature_rise", "critical", 2, 2.33,
        )  # fmt: skip
        clock.advance(1)
        cabinet.cabinet({2: {"temp_c": 61.0}})
        [high] = active(engine, rule="temperature_high")
        assert (high.severity, high.unit, high.last_value) == ("critical", 2, 61.0)
        cabinet.cabinet(temp_c=65.0)  # the enclosure too
        assert {a.unit for a in active(engine, rule="temperature_high")} == {2, None}


YEAR_9999_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z, the last ts the contract takes


@pytest.mark.parametrize(
    "device_ts",
    [
        # one status from a clock in year 9999 once disabled the rule for the device until
        # restart (later readings looked older); then real statuses
        lambda i, now: YEAR_9999_MS if i == 0 else now,
        # the same from ts 0, in the middle of the trend
        lambda i, now: 0 if i == 1 else now,
        # a clock that never advances (no RTC: always 0), or stuck in 9999
        lambda i, now: 0,
        lambda i, now: YEAR_9999_MS,
        # a clock that runs backwards by a second a minute
        lambda i, now: now - i * 61_000,
    ],
    ids=["9999-then-real", "0-mid-trend", "stuck-at-0", "stuck-in-9999", "runs-backwards"],
)
async def test_rise_fires_whatever_the_device_clock_says(tmp_path: Path, device_ts: Any) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth()
        for i, temp in enumerate((30.0, 31.0, 33.0)):
            cabinet.cabinet({2: {"temp_c": temp}}, ts=device_ts(i, clock()))
            clock.advance(60)
        assert active(engine) == []  # +1.5 °C/min over 2 minutes: normal
        cabinet.cabinet({2: {"temp_c": 37.0}}, ts=device_ts(3, clock()))  # 2.33 °C/min
        [rise] = active(engine)
        assert (rise.rule, rise.unit, rise.last_value) == ("temperature_rise", 2, 2.33)


async def test_rise_is_per_minute_of_a_fast_device_clock(tmp_path: Path) -> None:
    # the simulators run their clock fast (the demo 60x, tests up to 14,400x), and their
    # temperatures change per simulated minute: the rate is taken on the device clock while it
    # advances plausibly, or a demo would raise fire alerts for normal charging
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth()
        device_ms = clock()
        for temp in (30.0, 31.0, 32.0, 33.0, 34.0, 35.0):  # 1 °C per simulated minute
            cabinet.cabinet({2: {"temp_c": temp}}, ts=device_ms)
            clock.advance(1)
            device_ms += 60_000
        assert active(engine) == []
        cabinet.cabinet({2: {"temp_c": 45.0}}, ts=device_ms)  # 10 °C in a simulated minute
        [rise] = active(engine)
        assert rise.rule == "temperature_rise"


def test_rise_needs_a_span() -> None:
    assert rise_per_min([(0, 30.0), (10_000, 35.0)], 60) is None
    assert rise_per_min([(0, 30.0), (120_000, 36.0)], 60) == 3.0


async def test_charging_without_power_energy_backwards(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(pile={"charging_no_power_s": 120})
    async with running(tmp_path, clock, cfg) as engine:
        pile = Device(engine, clock, PILE)
        pile.birth(heartbeat_s=600)  # stays online through the wait
        port = {"n": 1, "state": "charging", "power_w": 0.5, "energy_wh": 300.0, "session": "s-1"}
        pile.pile_ports([port])
        clock.advance(119)
        engine.tick()
        assert active(engine) == []
        clock.advance(1)
        engine.tick()
        [stuck] = active(engine)
        assert (stuck.rule, stuck.unit, stuck.severity) == ("charging_no_power", 1, "minor")
        pile.pile_ports([{**port, "power_w": 180.0, "energy_wh": 250.0}])  # counter went back
        [back] = active(engine, rule="energy_backwards")
        assert (back.unit, back.severity, back.last_value) == (1, "warning", 50.0)
        assert stuck.clearing_since_ms == clock()
        new_session = {**port, "power_w": 180.0, "energy_wh": 0.0, "session": "s-2"}
        pile.pile_ports([new_session])  # a new session starts at 0: not backwards
        assert back.clearing_since_ms == clock()


async def test_ready_low_soc_and_door_open(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(cabinet={"door_open_s": 300})
    async with running(tmp_path, clock, cfg) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth(heartbeat_s=600)  # stays online through the wait
        cabinet.cabinet({7: {"soc": 62}})
        [low] = active(engine)
        assert (low.rule, low.unit, low.last_value, low.severity) == (
            "ready_low_soc",
            7,
            62,
            "minor",
        )
        cabinet.event("door_opened")
        cabinet.cabinet({7: {"soc": 62}}, door_open=True)
        clock.advance(299)
        engine.tick()
        assert active(engine, rule="door_open_long") == []
        clock.advance(1)
        engine.tick()
        [door] = active(engine, rule="door_open_long")
        assert (door.severity, door.unit, door.last_value) == ("major", None, 300)
        cabinet.event("door_closed")
        assert door.clearing_since_ms == clock()


async def test_station_without_anything_available_while_open(tmp_path: Path) -> None:
    clock = Clock()  # 12:00 Shanghai; yungu-road is open 07:00-21:00
    async with running(tmp_path, clock, config(station_unavailable_s=600)) as engine:
        pile = Device(engine, clock, "YGR-P01")
        pile.birth(heartbeat_s=600)
        busy = [{"n": n, "state": "charging", "power_w": 150.0} for n in range(1, 11)]
        pile.pile_ports(busy)
        engine.tick()
        clock.advance(600)
        engine.tick()
        [turned_away] = active(engine, rule="station_unavailable")
        assert (turned_away.station_id, turned_away.severity) == ("yungu-road", "major")
        clock.advance(9 * 3600 + 1)  # 21:10: closed, so the condition is clear
        engine.tick()
        assert turned_away.clearing_since_ms == clock()


async def test_a_flagged_pack_is_no_ready_battery_for_the_station(tmp_path: Path) -> None:
    """The station's only "ready" pack is flagged (battery passports): nothing to take."""
    clock = Clock()  # 12:00 Shanghai; yungu-road is open 07:00-21:00
    async with running(tmp_path, clock, config(station_unavailable_s=600)) as engine:
        engine.flagged_batteries = {"B-1"}
        cabinet = Device(engine, clock, "YGR-C01")
        cabinet.birth(heartbeat_s=600)
        empty = {n: {"state": "empty", "battery": None, "soc": None} for n in range(2, 13)}
        cabinet.cabinet({1: {"soc": 100}, **empty})
        engine.tick()
        clock.advance(600)
        engine.tick()
        [turned_away] = active(engine, rule="station_unavailable")
        assert turned_away.station_id == "yungu-road"
        engine.flagged_batteries = set()  # cleared: the pack counts again
        engine.tick()
        assert turned_away.clearing_since_ms == clock()
