"""The alert rules that are not fault codes, end to end: simulated devices -> real mosquitto
-> ``chargewatch serve`` (a process) -> ``GET /v1/alerts``.

Each scenario is injected through the simulator (``set_port_power``, ``rewind_energy``,
``set_slot_soc``, ``take_battery``, ``drop_connection``) on its own station, with the alert
windows shortened by env: the right alert (rule, code, severity, station, device, port/slot)
opens exactly once however many heartbeats repeat it, and once the condition clears it
resolves itself only after the verification window. ``station_offline`` groups the device
``offline`` alerts under the incident (``parent_id``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest

from devices.catalog import DEFAULT_RELEASE_SOC, Catalog
from simulators.cabinet import CabinetModel
from simulators.config import BrokerAddress, FleetConfig
from simulators.fleet import Fleet
from simulators.pile import PileModel
from tests.alerts.helpers import eventually
from tests.alerts.keys import maintainer_key
from tests.servers import Process, chargewatch_serve

pytestmark = pytest.mark.e2e
T = TypeVar("T")

VERIFY_S = 2.0
BASE_ENV = {
    "CHARGEWATCH_INGEST__ALERTS__VERIFY_S": str(VERIFY_S),
    "CHARGEWATCH_INGEST__ALERTS__TICK_S": "0.1",
    "CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0",
}
NO_POWER_S = 1.0
UNAVAILABLE_S = 1.0

PILES = "guanhu-garden"  # charging_no_power, energy_backwards (24 h)
PILE = "GHY-P01"
SOC = "yungu-road"  # ready_low_soc (a cabinet's own rule: the station's hours do not matter)
CABINET = "YGR-C01"
EMPTY = "huizhou-avenue"  # station_unavailable: open 24 h, only one cabinet of it is run
EMPTY_CABINET = "HZA-C01"
DARK = "tsinghua-garden"  # station_offline: 3 of the 4 piles run drop off
DARK_PILES = ["THG-P01", "THG-P02", "THG-P03", "THG-P04"]


@dataclass(frozen=True)
class Cond:
    """One expected alert as the API shows it."""

    station: str
    device: str | None
    rule: str
    severity: str
    port: int | None = None
    slot: int | None = None

    def matches(self, alert: dict[str, Any]) -> bool:
        return (
            alert["station"],
            alert["device"],
            alert["rule"],
            alert["code"],
            alert["port"],
            alert["slot"],
        ) == (self.station, self.device, self.rule, self.rule, self.port, self.slot)


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def until(check: Callable[[], Awaitable[T]], within_s: float) -> T:
    """tests.alerts.helpers.eventually (bounded polling on the loop) for async checks, typed."""
    return cast(T, await eventually(cast(Callable[[], Any], check), within_s))


class Api:
    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http, self.headers = http, {"Authorization": f"Bearer {token}"}

    async def alerts(self, station: str) -> list[dict[str, Any]]:
        r = await self.http.get(
            "/v1/alerts", headers=self.headers, params={"limit": 1000, "station": station}
        )
        assert r.status_code == 200, r.text
        assert r.json()["next_cursor"] is None  # everything on one page
        body: list[dict[str, Any]] = r.json()["alerts"]
        return body

    async def online(self, device_id: str) -> bool:
        r = await self.http.get(f"/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        return bool(r.json()["online"])

    async def status_seq(self, device_id: str) -> int:
        r = await self.http.get(f"/v1/devices/{device_id}")
        assert r.status_code == 200, r.text
        return int(r.json()["status_seq"])

    async def one(self, cond: Cond) -> dict[str, Any]:
        """The single alert (any status) of ``cond``; AssertionError otherwise (polling on)."""
        found = [a for a in await self.alerts(cond.station) if cond.matches(a)]
        assert len(found) == 1, (cond, found)
        return found[0]


@asynccontextmanager
async def scenario(
    broker: Process,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    devices: list[str],
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[Api, Fleet]]:
    """A served process with shortened alert windows, and a fleet of ``devices`` it saw."""
    for name, value in {**BASE_ENV, **(env or {})}.items():
        monkeypatch.setenv(name, value)
    data_dir = tmp_path / "serve" / "data"
    token = maintainer_key(data_dir)  # before start: the key store lives in the data dir
    config = FleetConfig(
        broker=BrokerAddress("127.0.0.1", broker.port), heartbeat_s=1, fault_rate=0.0
    )
    with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as served:
        async with (
            httpx.AsyncClient(base_url=served.base_url, timeout=10) as http,
            Fleet(Catalog.load(), config, only=devices) as fleet,
        ):
            api = Api(http, token)
            await fleet.ready()

            async def all_seen() -> None:
                for d in devices:
                    assert await api.online(d), d

            await until(all_seen, within_s=10)
            yield api, fleet


async def opens_once(api: Api, cond: Cond, within_s: float, devices: list[str]) -> dict[str, Any]:
    """``cond`` opens within ``within_s``, then stays one open alert over two heartbeats of
    each of ``devices``."""

    async def opened() -> dict[str, Any]:
        alert = await api.one(cond)
        assert alert["status"] == "open", alert
        return alert

    alert = await until(opened, within_s)
    assert alert["severity"] == cond.severity, alert
    seqs = {d: await api.status_seq(d) for d in devices}

    async def two_heartbeats() -> None:
        for d in devices:
            assert await api.status_seq(d) >= seqs[d] + 2, d

    await until(two_heartbeats, within_s=6)
    again = await api.one(cond)  # repeated snapshots: the same alert, not a second one
    assert (again["id"], again["status"], again["count"]) == (alert["id"], "open", 1), again
    return again


async def resolves(api: Api, cond: Cond, alert_id: int, cleared_ms: int) -> dict[str, Any]:
    """Cleared at ``cleared_ms``: clearing first, resolved (auto) only after the window."""

    async def resolved() -> dict[str, Any]:
        alert = await api.one(cond)
        assert alert["status"] == "resolved", alert
        return alert

    alert = await until(resolved, within_s=VERIFY_S + 4)
    assert alert["id"] == alert_id
    assert (alert["resolved_how"], alert["resolved_by"]) == ("auto", "chargewatch"), alert
    clearing, resolved_at = ms(alert["clearing_since"]), ms(alert["resolved_at"])
    assert clearing >= cleared_ms - 1000, alert  # not before the condition went
    assert resolved_at - clearing >= VERIFY_S * 1000, alert
    return alert


def steady_port(fleet: Fleet, device_id: str) -> int:
    """A charging port whose rider stays (no early unplug) and whose pack is far from full."""
    model = fleet.device(device_id).model
    assert isinstance(model, PileModel)
    return next(
        p.n
        for p in model.ports
        if p.state == "charging" and p.unplug_at is None and p.energy_wh < 0.5 * p.target_wh
    )


async def test_charging_no_power(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"CHARGEWATCH_INGEST__ALERTS__PILE__CHARGING_NO_POWER_S": str(NO_POWER_S)}
    async with scenario(broker, tmp_path, monkeypatch, [PILE], env) as (api, fleet):
        port = steady_port(fleet, PILE)
        cond = Cond(PILES, PILE, "charging_no_power", "minor", port=port)
        await asyncio.sleep(NO_POWER_S + 0.5)  # charging at full power: nothing opens
        assert await api.alerts(PILES) == []
        stuck_ms = wall_ms()
        fleet.set_port_power(PILE, port, 0.0)
        alert = await opens_once(api, cond, within_s=NO_POWER_S + 2, devices=[PILE])
        assert ms(alert["opened_at"]) - stuck_ms >= NO_POWER_S * 1000  # waited for the window
        cleared_ms = wall_ms()
        fleet.set_port_power(PILE, port, None)
        await resolves(api, cond, alert["id"], cleared_ms)
        assert [a["rule"] for a in await api.alerts(PILES)] == ["charging_no_power"]


async def test_energy_backwards(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with scenario(broker, tmp_path, monkeypatch, [PILE]) as (api, fleet):
        port = steady_port(fleet, PILE)
        model = fleet.device(PILE).model
        assert isinstance(model, PileModel)
        rewind = min(50.0, model.ports[port - 1].energy_wh)
        assert rewind > 5.0
        cond = Cond(PILES, PILE, "energy_backwards", "warning", port=port)
        rewound_ms = wall_ms()
        fleet.rewind_energy(PILE, port, rewind)

        alert = await until(lambda: api.one(cond), within_s=2)
        assert alert["severity"] == "warning"
        # the Wh lost: what was reported before minus at most one 30 s step of charging
        assert rewind - 5.0 <= alert["last_value"] <= rewind + 0.2, alert
        # one glitch: the next snapshot counts up again, so the condition clears by itself
        await resolves(api, cond, alert["id"], rewound_ms)
        [only] = await api.alerts(PILES)
        assert (only["id"], only["count"]) == (alert["id"], 1)


async def test_ready_low_soc(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with scenario(broker, tmp_path, monkeypatch, [CABINET]) as (api, fleet):
        model = fleet.device(CABINET).model
        assert isinstance(model, CabinetModel)
        # a ready pack in slot 1 (95 %), every other slot holding a fuller one: a simulated
        # rider swapping takes the fullest, never slot 1, so its pinned soc stays put
        slot = 1
        if model.slots[0].battery is not None:
            fleet.take_battery(CABINET, slot)
        fleet.insert_battery(CABINET, slot, 95.0, "B-PINNED")
        for s in model.slots:
            if s.battery is None:
                fleet.insert_battery(CABINET, s.n, 100.0)
        cond = Cond(SOC, CABINET, "ready_low_soc", "minor", slot=slot)
        low = int(DEFAULT_RELEASE_SOC) - 30
        fleet.set_slot_soc(CABINET, slot, low)
        alert = await opens_once(api, cond, within_s=2, devices=[CABINET])
        assert alert["last_value"] == low
        cleared_ms = wall_ms()
        fleet.set_slot_soc(CABINET, slot, None)
        await resolves(api, cond, alert["id"], cleared_ms)
        assert [a["rule"] for a in await api.alerts(SOC)] == ["ready_low_soc"]


async def test_station_unavailable(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"CHARGEWATCH_INGEST__ALERTS__STATION_UNAVAILABLE_S": str(UNAVAILABLE_S)}
    async with scenario(broker, tmp_path, monkeypatch, [EMPTY_CABINET], env) as (api, fleet):
        model = fleet.device(EMPTY_CABINET).model
        assert isinstance(model, CabinetModel)
        assert any(s.state == "ready" for s in model.slots)  # a rider gets a pack now
        await asyncio.sleep(UNAVAILABLE_S + 0.5)
        assert await api.alerts(EMPTY) == []
        cond = Cond(EMPTY, None, "station_unavailable", "major")
        emptied_ms = wall_ms()
        for s in model.slots:
            if s.battery is not None:
                fleet.take_battery(EMPTY_CABINET, s.n)
        alert = await opens_once(api, cond, within_s=UNAVAILABLE_S + 2, devices=[EMPTY_CABINET])
        assert ms(alert["opened_at"]) - emptied_ms >= UNAVAILABLE_S * 1000
        cleared_ms = wall_ms()
        fleet.insert_battery(EMPTY_CABINET, 1, 100.0)  # one ready pack: riders served again
        await resolves(api, cond, alert["id"], cleared_ms)
        assert [a["rule"] for a in await api.alerts(EMPTY)] == ["station_unavailable"]


async def test_station_offline_groups_device_offline_alerts(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dropped, staying = DARK_PILES[:3], DARK_PILES[3]  # 3 of 4: min 3 and share 0.5 met
    async with scenario(broker, tmp_path, monkeypatch, DARK_PILES) as (api, fleet):
        incident_cond = Cond(DARK, None, "station_offline", "major")
        offline = [Cond(DARK, d, "offline", "major") for d in dropped]
        dropped_ms = wall_ms()
        for d in dropped:
            assert fleet.drop_connection(d, offline_s=600)

        async def grouped() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            incident = await api.one(incident_cond)
            children = [await api.one(c) for c in offline]
            for child in children:
                assert child["parent_id"] == incident["id"], child
            return incident, children

        incident, children = await until(grouped, within_s=3)
        assert (incident["severity"], incident["status"]) == ("major", "open"), incident
        assert ms(incident["opened_at"]) - dropped_ms <= 2000
        assert incident["parent_id"] is None
        assert {c["status"] for c in children} == {"open"}
        await asyncio.sleep(1.0)  # ten ticks later: still one incident, the same children
        again, children_again = await grouped()
        assert again["id"] == incident["id"]
        assert [c["id"] for c in children_again] == [c["id"] for c in children]
        assert await api.online(staying)
        rules = sorted((a["rule"], a["device"] or "") for a in await api.alerts(DARK))
        assert rules == sorted([("station_offline", ""), *(("offline", d) for d in dropped)])

        restored_ms = wall_ms()
        for d in dropped:
            fleet.restore_connection(d)
        await resolves(api, incident_cond, incident["id"], restored_ms)
        for cond, child in zip(offline, children, strict=True):
            await resolves(api, cond, child["id"], restored_ms)
        assert len(await api.alerts(DARK)) == 4  # nothing new opened on the way back
