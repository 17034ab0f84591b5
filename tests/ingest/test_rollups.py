"""Hourly rollups from the embedded store, checked against the ground truth: three simulated
hours of a district station (piles and a cabinet, opening at 07:00 local), stored,
compacted, rolled up, and compared minute by minute with what the published messages
themselves say (read here from their JSON, not through the code under test)."""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.forecast import compute_stats
from api.routes.history import station_utilization
from bench.historyday import history_row
from devices.catalog import Catalog
from devices.rollup import HOUR_MS
from ingest.rollups import HourlyRollups
from ingest.sqlite_store import SQLiteStore
from ingest.store import HistoryRow
from simulators.model import STEP_S
from simulators.virtualday import DAY_START_S, VirtualDevice, Wire

CATALOG = Catalog.load()
STATION = CATALOG.stations["yungu-road"]
START_S = DAY_START_S + 6 * 3600  # 06:00 local: the station opens at 07:00
HOURS = 3
RELEASE = 90.0


def stored(w: Wire) -> HistoryRow:
    device = CATALOG.devices[w.device_id]
    return history_row(
        w.device_id, device.station_id, device.kind, w.channel, w.at, w.boot, w.seq, w.text
    )


def traffic() -> list[HistoryRow]:
    """What two piles and a cabinet of the station publish (the others stay silent); the first
    pile dies for 20 minutes at 07:40."""
    piles = [d for d in STATION.devices if d.kind == "pile"][:2]
    cabinets = [d for d in STATION.devices if d.kind == "cabinet"][:1]
    sims = [VirtualDevice(CATALOG.devices[d.id], START_S, seed=5) for d in piles + cabinets]
    wires: list[Wire] = []
    for sim in sims:
        wires += sim.birth(START_S)
    t = START_S
    dying = sims[0]
    dead_from, dead_until = START_S + 100 * 60, START_S + 120 * 60
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


def expected(rows: list[HistoryRow], device_id: str, kind: str, hour_ms: int) -> dict[str, Any]:
    mine = sorted((r for r in rows if r.device_id == device_id), key=lambda r: r.ts_ms)
    times = [r.ts_ms for r in mine]
    out: dict[str, Any] = defaultdict(int)
    out["faults"] = {}
    by_minute = {"port": [0] * 60, "battery": [0] * 60}
    for k in range(60):
        t = hour_ms + k * 60_000 + 30_000
        before = mine[: bisect.bisect_right(times, t)]
        states = [json.loads(r.payload) for r in before if r.type in ("birth", "death")][-1:]
        online = bool(states) and states[-1]["online"] and t - before[-1].ts_ms <= 90_000
        local_minute = ((t // 60_000) + 8 * 60) % 1440
        opened = 7 * 60 <= local_minute < 21 * 60
        out["minutes_open"] += opened
        out["minutes_online"] += online
        statuses = [r for r in before if r.type == "status"][-1:]
        if not (online and statuses):
            continue
        s = json.loads(statuses[-1].payload)
        if kind == "pile":
            out["busy_port_minutes"] += sum(
                p["state"] in ("charging", "finished") for p in s["ports"]
            )
        else:
            out["charging_slot_minutes"] += sum(u["state"] == "charging" for u in s["slots"])
        if not opened:
            continue
        if s.get("faults") or s.get("smoke"):
            free = 0
        elif kind == "pile":
            free = sum(1 for p in s["ports"] if p["state"] == "available" and "fault" not in p)
        else:
            free = sum(1 for u in s["slots"] if u["state"] == "ready" and "fault" not in u
                       and u.get("soc", 0) >= RELEASE)  # fmt: skip
        unit = "port" if kind == "pile" else "battery"
        out[f"{unit}_minutes"] += free
        out["minutes_port_free" if kind == "pile" else "minutes_battery_ready"] += free > 0
        by_minute[unit][k] = free
    for r in mine:
        if r.type != "event" or not hour_ms <= r.ts_ms < hour_ms + HOUR_MS:
            continue
        e = json.loads(r.payload)
        if e["type"] == "session_started":
            out["sessions"] += 1
        elif e["type"] == "session_ended":
            out["sessions_ended"] += 1
            out["energy_wh"] += e["energy_wh"]
        elif e["type"] == "swap":
            out["swaps"] += 1
        elif e["type"] == "fault_raised":
            out["faults"][e["code"]] = out["faults"].get(e["code"], 0) + 1
    for field in ("port_minutes", "battery_minutes", "minutes_port_free", "minutes_battery_ready",
                  "busy_port_minutes", "charging_slot_minutes"):  # fmt: skip
        out[field] += 0
    return {**out, "by_minute": by_minute}


def test_rollups_of_a_simulated_station_match_the_published_messages(tmp_path: Path) -> None:
    rows = traffic()
    assert sum(1 for r in rows if r.type == "death") == 1
    store = SQLiteStore(tmp_path / "cw.db")
    try:
        store.append(rows)
        end_ms = round((START_S + HOURS * 3600) * 1000)
        while store.compact(end_ms):  # the rollups read compacted blocks too
            pass
        rollups = HourlyRollups(store, CATALOG, RELEASE)
        assert rollups.catch_up(end_ms, max_hours=HOURS + 5) == HOURS
        assert rollups.catch_up(end_ms) == 0, "up to date"
        first_hour = round(START_S * 1000)
        ids = [d.id for d in STATION.devices]
        got = store.rollups("device", ids, first_hour, end_ms)
        assert len(got) == HOURS * len(ids)
        totals: dict[str, int] = defaultdict(int)
        station_minutes: dict[int, dict[str, list[int]]] = {}
        for row in got:
            kind = CATALOG.devices[row["id"]].kind
            want = expected(rows, row["id"], kind, row["hour_ms"])
            minutes = station_minutes.setdefault(
                row["hour_ms"], {"port": [0] * 60, "battery": [0] * 60}
            )
            for unit, counts in want.pop("by_minute").items():
                minutes[unit] = [a + b for a, b in zip(minutes[unit], counts, strict=True)]
            have = {k: row["data"][k] for k in want}
            have["energy_wh"] = round(have.get("energy_wh", 0.0), 1)
            want["energy_wh"] = round(want.get("energy_wh", 0.0), 1)
            assert have == want, (row["id"], row["hour_ms"])
            for k in ("minutes_online", "port_minutes", "battery_minutes", "sessions", "swaps"):
                totals[k] += row["data"][k]
        dead = [r for r in got if r["id"] == STATION.devices[0].id]
        assert [r["data"]["minutes_offline"] for r in dead] == [0, 20, 0]
        assert totals["sessions"] + totals["swaps"] > 0, "the hours saw riders"
        assert totals["port_minutes"] > 0
        assert totals["battery_minutes"] > 0
        assert sum(r["data"]["busy_port_minutes"] for r in got) > 0
        stations = store.rollups("station", [STATION.id], first_hour, end_ms)
        assert [s["data"]["minutes_online"] for s in stations] == [
            sum(r["data"]["minutes_online"] for r in got if r["hour_ms"] == s["hour_ms"])
            for s in stations
        ]
        assert [s["data"]["minutes_open"] for s in stations] == [0] + [60 * len(ids)] * (HOURS - 1)
        for s in stations:  # minutes in which any pile had a free port, any cabinet a battery
            minutes = station_minutes[s["hour_ms"]]
            assert s["data"]["minutes_port_free"] == sum(1 for n in minutes["port"] if n)
            assert s["data"]["minutes_battery_ready"] == sum(1 for n in minutes["battery"] if n)
            assert s["data"]["port_minutes"] == sum(minutes["port"])
        assert any(s["data"]["minutes_port_free"] for s in stations)
        # idempotent: rolling an hour again changes nothing
        rollups.roll(first_hour + HOUR_MS)
        assert store.rollups("device", ids, first_hour, end_ms) == got
    finally:
        store.close()


def test_the_forecast_reads_rollups_instead_of_raw_statuses(tmp_path: Path) -> None:
    rows = traffic()
    store = SQLiteStore(tmp_path / "cw.db")
    try:
        store.append(rows)
        end_ms = round((START_S + HOURS * 3600) * 1000)
        raw = compute_stats(store, CATALOG, STATION, end_ms, release_soc=RELEASE)
        HourlyRollups(store, CATALOG, RELEASE).catch_up(end_ms, max_hours=HOURS + 5)
        rolled = compute_stats(store, CATALOG, STATION, end_ms, release_soc=RELEASE)
    finally:
        store.close()
    assert raw.forecast["statuses_read"] >= 3 * 4 * (HOURS - 1), "3 devices, 4 buckets an hour"
    # only the last rolled hour's, to hold what stands into the hour still open
    assert rolled.forecast["statuses_read"] <= 3 * 4
    assert rolled.forecast["rollup_hours_read"] == HOURS
    assert rolled.rates == raw.rates, "sessions and swaps per hour: the same events"
    assert rolled.forecast["days"] == raw.forecast["days"]
    # open hours: the hour's mean over its minutes vs four instants; close, not equal
    compared = 0
    for a, b in zip(raw.forecast["by_hour"], rolled.forecast["by_hour"], strict=True):
        if 7 <= a["hour"] < 6 + HOURS:  # rolled up and open
            assert b["samples"] == 4
            assert abs(a["ports_free"] - b["ports_free"]) <= 2.0, (a, b)
            assert abs(a["batteries_ready"] - b["batteries_ready"]) <= 2.0, (a, b)
            compared += 1
    assert compared == HOURS - 1


@dataclass
class _Service:
    """What ``station_utilization`` reads of the read side: catalog and options."""

    catalog: Catalog
    history_days: float
    release_soc: float = RELEASE


def test_utilization_older_than_the_raw_window_comes_from_rollups(tmp_path: Path) -> None:
    rows = traffic()
    store = SQLiteStore(tmp_path / "cw.db")
    first_hour = round(START_S * 1000)
    end_ms = first_hour + HOURS * HOUR_MS
    try:
        store.append(rows)
        HourlyRollups(store, CATALOG, RELEASE).catch_up(end_ms, max_hours=HOURS + 5)

        def utilization(history_days: float) -> dict[str, Any]:
            service = _Service(CATALOG, history_days)
            return station_utilization(
                store,
                service,
                STATION.id,
                first_hour,
                end_ms,
                HOUR_MS,  # type: ignore[arg-type]
            )

        raw = utilization(36_500)["points"]  # everything in the raw window
        # the data ended over half a day ago: with half a day of raw history it is all old
        old = utilization(0.5)["points"]
    finally:
        store.close()
    assert not any(p.get("from_rollups") for p in raw)
    assert [p["from_rollups"] for p in old] == [True] * HOURS
    assert [p["t"] for p in old] == [p["t"] for p in raw]
    for a, b in zip(raw, old, strict=True):
        for key in ("energy_wh", "sessions_started", "sessions_ended", "swaps"):
            assert a[key] == b[key], key  # the same events, counted the same way
        assert abs(a["ports_busy"] - b["ports_busy"]) <= 3  # an instant vs the hour's mean
        assert abs(a["batteries_charging"] - b["batteries_charging"]) <= 3
    assert sum(p["ports_busy"] for p in old) > 0


def test_rollups_count_riders_reports_of_the_hour_per_device_and_station(
    tmp_path: Path,
) -> None:
    """Reports kept by the API's sentinel store (the same SQLite file) count in the hour
    they were made: a device's in its rollup and its station's, a station's in the
    station's only; a silent device's report is its own (silent devices share a rollup)."""
    from api.sentinels import SentinelStore
    from ingest.sqlite_db import SQLiteDB

    rows = traffic()
    store = SQLiteStore(tmp_path / "cw.db")
    sentinels = SentinelStore(SQLiteDB(tmp_path / "cw.db"))
    first_hour = round(START_S * 1000)
    end_ms = first_hour + HOURS * HOUR_MS
    live, silent, other_silent = STATION.devices[0].id, STATION.devices[5].id, STATION.devices[6].id
    try:
        store.append(rows)
        made = [  # (station, device, category, at)
            (STATION.id, live, "smoke", first_hour + HOUR_MS + 5 * 60_000),
            (STATION.id, live, "damage", first_hour + HOUR_MS + 59 * 60_000),
            (STATION.id, None, "blocked", first_hour + HOUR_MS + 1),
            (STATION.id, silent, "not_working", first_hour + 2 * HOUR_MS),
            ("ziyun-road", None, "other", first_hour + HOUR_MS),
            (STATION.id, live, "smoke", end_ms),  # the next hour: not rolled up yet
        ]
        for i, (station, device, category, at) in enumerate(made):
            sentinels.add_report(None, station, device, None, None, category, "", i + 1, at)
        HourlyRollups(store, CATALOG, RELEASE, reports=sentinels).catch_up(end_ms, max_hours=9)

        def reports(scope: str, ident: str) -> list[tuple[int, dict[str, int]]]:
            got = store.rollups(scope, [ident], first_hour, end_ms + HOUR_MS)
            return [(r["data"]["reports"], r["data"]["reports_by_category"]) for r in got]

        assert reports("device", live) == [(0, {}), (2, {"smoke": 1, "damage": 1}), (0, {})]
        assert reports("device", silent) == [(0, {}), (0, {}), (1, {"not_working": 1})]
        assert reports("device", other_silent) == [(0, {})] * HOURS
        assert reports("station", STATION.id) == [
            (0, {}),
            (3, {"smoke": 1, "damage": 1, "blocked": 1}),
            (1, {"not_working": 1}),
        ]
        assert reports("station", "ziyun-road") == [(0, {}), (1, {"other": 1}), (0, {})]
    finally:
        sentinels.close()
        store.close()
