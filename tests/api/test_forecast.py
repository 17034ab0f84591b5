"""Forecast and arrival estimates on two simulated days of history: a station's devices
run from two days ago to now at high speed through the real broker and service; the
forecast's numbers are recomputed here from the simulator's ground-truth log."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from devices.catalog import Catalog
from devices.contract import parse_ts
from tests.api.district import FleetThread, mini_catalog, running_fleet
from tests.servers import Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

STATION = "wanguo-south"
DAYS = 2
SPEED = 14_400  # two simulated days in 12 s
EVERY_MS = 15 * 60 * 1000
HOLD_MS = 24 * 3600 * 1000
CST = timezone(timedelta(hours=8))
SINCE = (datetime.now(UTC) - timedelta(days=DAYS + 1)).isoformat()


@dataclass
class History:
    service: Service
    catalog: Catalog
    truth: Path
    fleet: FleetThread


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    tmp = tmp_path_factory.mktemp("forecast")
    catalog = mini_catalog(tmp / "catalog.json", hand=False, per_station=2)
    devices = [d.id for d in catalog.devices.values() if d.station_id == STATION]
    start = datetime.now(UTC) - timedelta(days=DAYS)
    with (
        mosquitto(tmp / "mosquitto") as broker,
        chargewatch_serve(tmp / "serve", broker.url, "--catalog", str(tmp / "catalog.json")) as svc,
        running_fleet(
            catalog, broker.port, only=devices, start=start, speed=SPEED,
            duration_s=DAYS * 86400, truth=tmp / "truth.jsonl", seed=11,
        ) as fleet,
    ):  # fmt: skip
        fleet.settle()
        yield History(svc, catalog, tmp / "truth.jsonl", fleet)


def truth_statuses(path: Path) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    statuses: dict[str, list[dict[str, Any]]] = defaultdict(list)
    events = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("hold"):
            continue
        device, channel = entry["topic"].split("/")[2:4]
        payload = json.loads(entry["payload"])
        payload["ts"] = parse_ts(payload["ts"])
        if channel == "status":
            statuses[device].append(payload)
        elif channel == "event":
            events.append(payload)
    return statuses, events


def free_of(status: dict[str, Any]) -> int:
    if status.get("faults") or status.get("smoke"):
        return 0
    if status["kind"] == "pile":
        return sum(1 for p in status["ports"] if p["state"] == "available" and not p.get("fault"))
    return sum(
        1
        for s in status["slots"]
        if s["state"] == "ready" and not s.get("fault") and s.get("soc", 0) >= 90
    )


def wait_for_history(h: History) -> None:
    """Every device shows the last status the simulator logged (bounded wait)."""
    statuses, _ = truth_statuses(h.truth)
    last = {d: max(s["ts"] for s in lst) for d, lst in statuses.items()}
    assert len(last) == 4

    def caught_up() -> None:
        for device, ts in last.items():
            view = h.service.get(f"/v1/devices/{device}").json()
            seen = datetime.fromisoformat(view["reported_at"].replace("Z", "+00:00"))
            assert seen.timestamp() * 1000 >= ts, device

    eventually(caught_up, timeout=20)


def test_forecast_by_hour_matches_the_ground_truth(history: History) -> None:
    statuses, _ = truth_statuses(history.truth)
    wait_for_history(history)
    fc = history.service.get(f"/v1/stations/{STATION}/forecast").json()
    to_ms = int(datetime.fromisoformat(fc["to"].replace("Z", "+00:00")).timestamp() * 1000)
    since_ms = to_ms - 4 * 7 * 86400 * 1000
    series = {
        d: sorted(((s["ts"], free_of(s), s["kind"]) for s in lst), key=lambda x: x[0])
        for d, lst in statuses.items()
    }
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    days: dict[int, set[str]] = defaultdict(set)
    instants = 0
    grid = list(range(since_ms - since_ms % EVERY_MS + EVERY_MS, to_ms + 1, EVERY_MS))
    if grid[-1] < to_ms:
        grid.append(to_ms)
    for t in grid:
        present = []
        for points in series.values():
            before = [p for p in points if p[0] < t]
            if before and t - before[-1][0] <= HOLD_MS:
                present.append(before[-1])
        if not present:
            continue
        instants += 1
        local = datetime.fromtimestamp(t / 1000, tz=UTC).astimezone(CST)
        bucket = sums[local.hour]
        bucket[0] += sum(p[1] for p in present if p[2] == "pile")
        bucket[1] += sum(p[1] for p in present if p[2] == "cabinet")
        bucket[2] += 1
        days[local.hour].add(local.date().isoformat())
    assert fc["samples"] == instants
    assert instants >= DAYS * 96 - 2, "two days of 15-minute instants"
    # DAYS + 1 calendar days, or DAYS when the window starts in the last minutes of a day
    # (local): its first instants then come before any status (it failed 23:45-24:00 CST)
    assert fc["days"] == len(set().union(*days.values())) in (DAYS, DAYS + 1)
    for row in fc["by_hour"]:
        want = sums[row["hour"]]
        assert row["samples"] == int(want[2]), row
        assert row["days"] == len(days[row["hour"]])
        assert row["ports_free"] == round(want[0] / want[2], 2), row
        assert row["batteries_ready"] == round(want[1] / want[2], 2), row
    assert sum(r["samples"] for r in fc["by_hour"]) == instants
    assert sum(r["samples"] for r in fc["by_weekday_hour"]) == instants
    best = sorted(fc["by_hour"], key=lambda r: (-r["batteries_ready"], r["hour"]))[:3]
    assert fc["best_hours"]["cabinet"] == [r["hour"] for r in best]
    assert fc["ports_total"] == 20
    assert fc["slots_total"] == 24
    again = history.service.get(f"/v1/stations/{STATION}/forecast", headers=None)
    assert (
        again.headers["etag"]
        == history.service.get(f"/v1/stations/{STATION}/forecast").headers["etag"]
    )


def test_arrival_chance_uses_the_hour_s_demand(history: History) -> None:
    _, events = truth_statuses(history.truth)
    wait_for_history(history)
    body = history.service.get("/v1/stations", arrive_in_s=600).json()
    ranked = body["stations"]
    chances = [s["arrival"]["p_any"] for s in ranked]
    assert chances == sorted(chances, reverse=True)
    ours = next(s for s in ranked if s["id"] == STATION)
    assert ranked[0]["id"] == STATION, "the only station with live devices comes first"
    arrival = ours["arrival"]
    hour = int(arrival["method"].split("local hour ")[1][:2])
    rates = arrival["rates_per_h"]
    days = rates["days_observed"]
    assert days >= DAYS - 1
    now = datetime.now(UTC)

    def count(kind: str) -> int:
        return sum(
            1
            for e in events
            if e["type"] == kind
            and datetime.fromtimestamp(e["ts"] / 1000, tz=UTC).astimezone(CST).hour == hour
            and e["ts"] >= (now - timedelta(days=7)).timestamp() * 1000
        )

    assert rates["pile_sessions_started"] == round(count("session_started") / days, 3)
    assert rates["pile_sessions_ended"] == round(count("session_ended") / days, 3)
    assert rates["cabinet_swaps"] == round(count("swap") / days, 3)
    for p in (arrival["p_port"], arrival["p_battery"]):
        assert 0.0 <= p <= 1.0
    if ours["piles"]["ports_free"] == 0 and rates["pile_sessions_ended"] == 0:
        assert arrival["p_port"] == 0.0
    stale = [s for s in ranked if s["stale"]]
    assert all(s["arrival"]["p_any"] == 0.0 for s in stale), (
        "nothing is promised where nothing is known"
    )
    # arriving now: the chance is 1 exactly when something is there now
    now_body = history.service.get("/v1/stations", arrive_in_s=0, kind="cabinet").json()
    for s in now_body["stations"]:
        assert s["arrival"]["p_battery"] == (
            1.0 if s["cabinets"]["batteries_ready"] else s["arrival"]["p_battery"]
        )
