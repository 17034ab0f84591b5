"""The operator report checked against the ground truth: 28 simulated hours of a station (two
piles and a cabinet in virtual time, the same models as ``chargewatch simulate``; a pile
dead for 50 minutes across midnight) stored, compacted and rolled up as the service does,
then each day's row compared with what the published messages themselves say, read here
from their JSON minute by minute (``tests.ingest.test_rollups.expected``), not through the
code under test."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from api.summaries import DeviceInfo, StationInfo, periods, summarize
from devices.catalog import district_tz
from devices.rollup import HOUR_MS
from ingest.rollups import HourlyRollups
from ingest.sqlite_store import SQLiteStore
from ingest.store import HistoryRow
from simulators.model import STEP_S
from simulators.virtualday import DAY_START_S, VirtualDevice, Wire
from tests.ingest.test_rollups import CATALOG, RELEASE, STATION, expected, stored

START_S = DAY_START_S + 6 * 3600  # 2026-12-02T06:00+08:00
HOURS = 28  # to 2026-12-03T10:00+08:00
TZ = district_tz(CATALOG)


def traffic() -> list[HistoryRow]:
    piles = [d for d in STATION.devices if d.kind == "pile"][:2]
    cabinets = [d for d in STATION.devices if d.kind == "cabinet"][:1]
    sims = [VirtualDevice(CATALOG.devices[d.id], START_S, seed=9) for d in piles + cabinets]
    wires: list[Wire] = []
    for sim in sims:
        wires += sim.birth(START_S)
    dying = sims[1]
    dead_from, dead_until = DAY_START_S + 86400 - 20 * 60, DAY_START_S + 86400 + 30 * 60
    t = START_S
    while t + STEP_S <= START_S + HOURS * 3600:
        t += STEP_S
        for sim in sims:
            if sim is dying and dead_from <= t < dead_until:
                if t - STEP_S < dead_from:
                    wires.append(sim.death(t))
                sim.skip(t)
                continue
            if sim is dying and dead_until <= t < dead_until + STEP_S:
                wires += sim.birth(t)
            wires += sim.until(t)
    return [stored(w) for w in wires]


def local_day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=TZ).date().isoformat()


def truth(rows: list[HistoryRow]) -> dict[str, dict[str, Any]]:
    """Per local day, from the messages: the station's open minutes, minutes with a free
    port / ready battery, device-minutes offline (of every device of the station: the
    silent ones too), energy, sessions, swaps and faults."""
    first = round(START_S * 1000)
    days: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    publishing = {r.device_id for r in rows}
    for h in range(HOURS):
        hour = first + h * HOUR_MS
        day = days[local_day(hour)]
        minutes = {"port": [0] * 60, "battery": [0] * 60}
        opened = 0
        for spec in STATION.devices:
            if spec.id not in publishing:
                day["offline"] += 60
                continue
            want = expected(rows, spec.id, spec.kind, hour)
            opened = want["minutes_open"]  # the same for every device of the station
            day["offline"] += 60 - want["minutes_online"]
            for unit, counts in want["by_minute"].items():
                minutes[unit] = [a + b for a, b in zip(minutes[unit], counts, strict=True)]
        day["open"] += opened
        day["port_free"] += sum(1 for n in minutes["port"] if n)
        day["battery_ready"] += sum(1 for n in minutes["battery"] if n)
    for r in rows:
        if r.type != "event":
            continue
        e = json.loads(r.payload)
        day = days[local_day(r.ts_ms)]
        if e["type"] == "session_started":
            day["sessions"] += 1
        elif e["type"] == "session_ended":
            day["energy_wh"] += e["energy_wh"]
        elif e["type"] == "swap":
            day["swaps"] += 1
        elif e["type"] == "fault_raised":
            day.setdefault("faults", defaultdict(int))
            day["faults"][e["code"]] += 1
    return days


def device_truth(rows: list[HistoryRow], device_id: str, kind: str) -> dict[str, dict[str, Any]]:
    """Per local day, from one device's messages: its open minutes, minutes with a free
    port / ready battery, minutes offline, energy, sessions, swaps and faults."""
    first = round(START_S * 1000)
    days: dict[str, dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for h in range(HOURS):
        hour = first + h * HOUR_MS
        day = days[local_day(hour)]
        want = expected(rows, device_id, kind, hour)
        day["open"] += want["minutes_open"]
        day["offline"] += 60 - want["minutes_online"]
        day["free"] += want["minutes_port_free" if kind == "pile" else "minutes_battery_ready"]
    for r in rows:
        if r.type != "event" or r.device_id != device_id:
            continue
        e = json.loads(r.payload)
        day = days[local_day(r.ts_ms)]
        day["sessions"] += e["type"] == "session_started"
        day["swaps"] += e["type"] == "swap"
        day["energy_wh"] += e["energy_wh"] if e["type"] == "session_ended" else 0
        if e["type"] == "fault_raised":
            day.setdefault("faults", defaultdict(int))
            day["faults"][e["code"]] += 1
    return days


def rolled_up(tmp_path: Path, rows: list[HistoryRow]) -> SQLiteStore:
    """The rows stored, compacted and rolled up as the service does."""
    end = round(START_S * 1000) + HOURS * HOUR_MS
    store = SQLiteStore(tmp_path / "cw.db")
    store.append(rows)
    while store.compact(end):
        pass
    assert HourlyRollups(store, CATALOG, RELEASE).catch_up(end, max_hours=HOURS + 1) == HOURS
    return store


def test_a_stations_days_match_the_ground_truth(tmp_path: Path) -> None:
    rows = traffic()
    assert sum(1 for r in rows if r.type == "death") == 1
    first = round(START_S * 1000)
    end = first + HOURS * HOUR_MS
    store = rolled_up(tmp_path, rows)
    try:
        spans = periods(first, end, "day", TZ)
        info = StationInfo(STATION.id, STATION.name.zh, STATION.name.en, piles=30, cabinets=12)
        rollups = store.rollups("station", [STATION.id], spans[0][0], spans[-1][1])
        got = summarize([info], spans, rollups, [], [], period="day", tz=TZ)
    finally:
        store.close()
    want = truth(rows)
    assert [r["start"][:10] for r in got] == sorted(want) == ["2026-12-02", "2026-12-03"]
    assert [r["hours_rolled_up"] for r in got] == [18, 10]
    for row in got:
        day = want[row["start"][:10]]
        assert row["open_minutes"] == day["open"] > 0, row["start"]
        assert row["port_free_share"] == round(day["port_free"] / day["open"], 4)
        assert row["battery_ready_share"] == round(day["battery_ready"] / day["open"], 4)
        assert row["offline_minutes"] == day["offline"]
        assert row["sessions"] == day["sessions"]
        assert row["swaps"] == day["swaps"]
        assert row["energy_wh"] == round(day["energy_wh"], 1)
        assert row["faults"] == dict(sorted(day.get("faults", {}).items()))
    # the numbers say something: riders came, ports were free, the death counted
    assert all(r["sessions"] > 0 and r["swaps"] > 0 for r in got)
    assert all(0 < r["port_free_share"] <= 1 for r in got)
    silent = 60 * (len(STATION.devices) - 3)
    assert [r["offline_minutes"] - silent * r["hours_rolled_up"] for r in got] == [20, 30]


def test_a_devices_days_match_the_ground_truth(tmp_path: Path) -> None:
    """The pile that died across midnight and the cabinet, each from its own messages."""
    rows = traffic()
    first = round(START_S * 1000)
    spans = periods(first, first + HOURS * HOUR_MS, "day", TZ)
    station = StationInfo(STATION.id, STATION.name.zh, STATION.name.en, piles=30, cabinets=12)
    pile = [d for d in STATION.devices if d.kind == "pile"][1]  # the one that dies
    cabinet = next(d for d in STATION.devices if d.kind == "cabinet")
    devices = [DeviceInfo(pile.id, "pile", station), DeviceInfo(cabinet.id, "cabinet", station)]
    store = rolled_up(tmp_path, rows)
    try:
        ids = [d.id for d in devices]
        rollups = store.rollups("device", ids, spans[0][0], spans[-1][1])
        got = summarize(devices, spans, rollups, [], [], period="day", tz=TZ)
    finally:
        store.close()
    assert [(r["device_id"], r["start"][:10]) for r in got] == [
        (pile.id, "2026-12-02"), (pile.id, "2026-12-03"),
        (cabinet.id, "2026-12-02"), (cabinet.id, "2026-12-03"),
    ]  # fmt: skip
    for row, device in zip(got, [d for d in devices for _ in range(2)], strict=True):
        day = device_truth(rows, device.id, device.kind)[row["start"][:10]]
        share = "port_free_share" if device.kind == "pile" else "battery_ready_share"
        other = "battery_ready_share" if device.kind == "pile" else "port_free_share"
        assert row["open_minutes"] == day["open"] > 0, row["start"]
        assert row[share] == round(day["free"] / day["open"], 4)
        assert row[other] is None
        assert row["offline_minutes"] == day["offline"]
        assert (row["sessions"], row["swaps"]) == (day["sessions"], day["swaps"])
        assert row["energy_wh"] == round(day["energy_wh"], 1)
        assert row["faults"] == dict(sorted(day.get("faults", {}).items()))
    # the numbers say something: the pile's death (20 + 30 minutes), riders came
    assert [r["offline_minutes"] for r in got[:2]] == [20, 30]
    assert got[0]["sessions"] + got[1]["sessions"] > 0
    assert got[2]["swaps"] + got[3]["swaps"] > 0
    assert all(0 < (r["port_free_share"] or r["battery_ready_share"]) <= 1 for r in got)
