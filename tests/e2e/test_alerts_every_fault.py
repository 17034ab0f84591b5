"""Every contract fault code, and the simulator's other hazards, end to end: simulated devices
-> real mosquitto -> ``chargewatch serve`` (a process) -> ``GET /v1/alerts``.

Each of the 16 fault codes of devices/faults.py is raised once device-level and once on a
port or slot, spread over two piles and two cabinets so that all of them run at once, with
smoke (``set_smoke``), a hot slot (``set_temperature``) and a door left open (``set_door``).
For each condition: the right alert (rule, code, severity, station, device, port/slot) within
2 s, one alert however many heartbeats repeat it, and auto-resolution only after the
verification window once cleared. Then: a dropped device gets one ``offline`` alert, and
neither a status of a boot without birth nor faults raised meanwhile open port alerts while it
is offline.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiomqtt
import httpx
import pytest

from devices.catalog import Catalog
from devices.faults import FAULT_CODES, severity
from simulators.config import BrokerAddress, FleetConfig
from simulators.fleet import Fleet
from tests.alerts.helpers import eventually
from tests.alerts.keys import maintainer_key
from tests.servers import Process, Service, chargewatch_serve

pytestmark = pytest.mark.e2e
T = TypeVar("T")

STATION = "wanguo-south"
PILE_A, PILE_B, CAB_A, CAB_B = "WGS-P01", "WGS-P02", "WGS-C01", "WGS-C02"
LATE, BACK = "WGS-P03", "WGS-P04"  # dropped: one sends a late status, one comes back
VERIFY_S = 2.0
DOOR_OPEN_S = 0.5
HOT_SLOT, HOT_C = 10, 72.0  # above the cabinet's 60 °C slot limit
ENV = {
    "CHARGEWATCH_INGEST__ALERTS__VERIFY_S": str(VERIFY_S),
    "CHARGEWATCH_INGEST__ALERTS__TICK_S": "0.1",
    "CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0",
    "CHARGEWATCH_INGEST__ALERTS__CABINET__DOOR_OPEN_S": str(DOOR_OPEN_S),
    # the pinned slot temperature is a step, not a trend: keep temperature_rise out of it
    "CHARGEWATCH_INGEST__ALERTS__CABINET__TEMP_RISE_MIN_SPAN_S": "3600",
}

CODES = sorted(FAULT_CODES)
assert len(CODES) == 16


@dataclass(frozen=True)
class Cond:
    """One expected alert: its key as the API shows it, and its severity."""

    device: str
    rule: str
    code: str
    port: int | None = None
    slot: int | None = None
    severity: str = "major"

    @property
    def unit(self) -> int | None:
        return self.port if self.port is not None else self.slot


def fault(device: str, code: str, *, port: int | None = None, slot: int | None = None) -> Cond:
    return Cond(device, "fault", code, port, slot, severity(code))


# Each code device-level on one kind and on a port/slot of the other half of the fleet.
DEVICE_LEVEL = [fault(PILE_A, c) for c in CODES[:8]] + [fault(CAB_A, c) for c in CODES[8:]]
ON_UNITS = [fault(CAB_B, c, slot=n) for n, c in enumerate(CODES[:8], 1)] + [
    fault(PILE_B, c, port=n) for n, c in enumerate(CODES[8:], 1)
]
SMOKE = fault(CAB_B, "smoke")  # the detector: smoke: true in status, a smoke fault event
HOT = Cond(CAB_B, "temperature_high", "temperature_high", slot=HOT_SLOT, severity="critical")
DOOR = Cond(CAB_B, "door_open_long", "door_open_long", severity="major")
EXPECTED = [*DEVICE_LEVEL, *ON_UNITS, SMOKE, HOT, DOOR]
assert {c.code for c in DEVICE_LEVEL} == {c.code for c in ON_UNITS} == FAULT_CODES
assert len(set(EXPECTED)) == 35


def key(alert: dict[str, Any]) -> Cond:
    return Cond(
        alert["device"],
        alert["rule"],
        alert["code"],
        alert["port"],
        alert["slot"],
        alert["severity"],
    )


def one(grouped: dict[Cond, list[dict[str, Any]]], cond: Cond) -> dict[str, Any]:
    """The single alert of ``cond`` (an AssertionError otherwise, so that polling goes on)."""
    alerts = grouped.get(cond, [])
    assert len(alerts) == 1, (cond, alerts)
    return alerts[0]


def ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def served(broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    data_dir = tmp_path / "serve" / "data"
    maintainer_key(data_dir)  # before start: the key store lives in the data dir
    with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as svc:
        yield svc


async def until(check: Callable[[], Awaitable[T]], within_s: float) -> T:
    """tests.alerts.helpers.eventually (bounded polling on the loop) for async checks, typed;
    the sync tests.servers.eventually would block the loop the simulated fleet runs on."""
    return cast(T, await eventually(cast(Callable[[], Any], check), within_s))


async def holds(check: Callable[[], Awaitable[None]], for_s: float) -> None:
    """Bounded polling of an invariant: ``check`` passes on every poll for ``for_s``."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        await check()
        await asyncio.sleep(0.05)


class Api:
    def __init__(self, http: httpx.AsyncClient, token: str) -> None:
        self.http, self.headers = http, {"Authorization": f"Bearer {token}"}

    async def alerts(self, **params: Any) -> list[dict[str, Any]]:
        r = await self.http.get(
            "/v1/alerts", headers=self.headers, params={"limit": 1000, **params}
        )
        assert r.status_code == 200, r.text
        body: list[dict[str, Any]] = r.json()["alerts"]
        assert r.json()["next_cursor"] is None  # everything on one page
        return body

    async def device(self, device_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/devices/{device_id}", headers=self.headers)  # boot too
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def by_key(self, devices: set[str]) -> dict[Cond, list[dict[str, Any]]]:
        """Every alert (any status) of ``devices``, grouped by condition."""
        grouped: dict[Cond, list[dict[str, Any]]] = {}
        for a in await self.alerts(station=STATION):
            if a["device"] in devices:
                grouped.setdefault(key(a), []).append(a)
        return grouped


async def test_every_fault_code_and_hazard_alerts_once_and_resolves(
    broker: Process, served: Service
) -> None:
    fleet_cfg = FleetConfig(
        broker=BrokerAddress("127.0.0.1", broker.port), heartbeat_s=1, fault_rate=0.0
    )
    token = maintainer_key(served.data_dir)
    devices = {PILE_A, PILE_B, CAB_A, CAB_B}
    async with (
        httpx.AsyncClient(base_url=served.base_url, timeout=10) as http,
        Fleet(Catalog.load(), fleet_cfg, only=[*devices, LATE, BACK]) as fleet,
    ):
        api = Api(http, token)
        await fleet.ready()

        async def all_seen() -> None:
            for d in (*devices, LATE, BACK):
                assert (await api.device(d))["online"], d

        await until(all_seen, within_s=10)
        assert await api.alerts(station=STATION) == []  # a quiet fleet starts with nothing

        # -- raise everything at once --------------------------------------------------------
        injected_ms, started = wall_ms(), time.monotonic()
        for c in DEVICE_LEVEL + ON_UNITS:
            fleet.inject_fault(c.device, c.code, c.unit)
        fleet.set_smoke(CAB_B, True)
        fleet.set_temperature(CAB_B, HOT_SLOT, HOT_C)
        fleet.set_door(CAB_B, True)

        first: dict[Cond, tuple[float, dict[str, Any]]] = {}

        async def all_opened() -> None:
            alerts = await api.alerts(station=STATION)
            now = time.monotonic()
            for a in alerts:
                first.setdefault(key(a), (now - started, a))
            missing = [c for c in EXPECTED if c not in first]
            assert not missing, missing

        await until(all_opened, within_s=8)
        late = {c: round(t, 2) for c, (t, _) in first.items() if t > 2.0}
        assert not late, f"seen more than 2 s after the injection: {late}"
        for c in EXPECTED:
            a = first[c][1]
            assert (a["station"], a["status"]) == (STATION, "open"), a
            opened = ms(a["opened_at"]) - injected_ms
            assert 0 <= opened <= 2000, (c, opened)
        door_opened = ms(first[DOOR][1]["opened_at"]) - injected_ms
        assert door_opened >= DOOR_OPEN_S * 1000  # the door rule waits for door_open_s
        assert first[HOT][1]["last_value"] == HOT_C
        ids = {c: first[c][1]["id"] for c in EXPECTED}
        assert len(set(ids.values())) == len(EXPECTED)

        # -- heartbeats repeat every condition: still one alert each, the same id -------------
        seqs = {d: (await api.device(d))["status_seq"] for d in devices}
        counts = {key(a): a["count"] for a in await api.alerts(station=STATION)}

        async def two_heartbeats() -> None:
            for d in devices:
                assert (await api.device(d))["status_seq"] >= seqs[d] + 2, d

        await until(two_heartbeats, within_s=6)
        grouped = await api.by_key(devices)
        assert set(grouped) == set(EXPECTED)  # nothing else opened on these devices
        for c, alerts in grouped.items():
            [a] = alerts
            assert (a["id"], a["status"]) == (ids[c], "open"), c
            # a repeated snapshot is no new occurrence: count stays (docs/alerts.md)
            assert a["count"] == counts[c], c
            assert a["clearing_since"] is None
            assert ms(a["last_seen_at"]) > ms(a["opened_at"]), c  # the repeats were seen

        # -- clear everything: clearing first, resolved only after the window -----------------
        cleared_ms = wall_ms()
        for c in DEVICE_LEVEL + ON_UNITS:
            fleet.clear_fault(c.device, c.code, c.unit)
        fleet.set_smoke(CAB_B, False)
        fleet.set_temperature(CAB_B, HOT_SLOT, None)
        fleet.set_door(CAB_B, False)

        async def all_clearing() -> None:
            grouped = await api.by_key(devices)
            for c in EXPECTED:
                a = one(grouped, c)
                assert a["clearing_since"] is not None, c
                assert a["status"] == "open", c  # not before the verification window

        await until(all_clearing, within_s=VERIFY_S)

        async def all_resolved() -> None:
            grouped = await api.by_key(devices)
            for c in EXPECTED:
                a = one(grouped, c)
                assert a["status"] == "resolved", c

        await until(all_resolved, within_s=VERIFY_S + 4)
        grouped = await api.by_key(devices)
        assert set(grouped) == set(EXPECTED)  # clearing opened nothing new
        for c, [a] in grouped.items():
            assert a["id"] == ids[c]
            assert (a["resolved_how"], a["resolved_by"]) == ("auto", "chargewatch"), c
            clearing, resolved = ms(a["clearing_since"]), ms(a["resolved_at"])
            assert clearing >= cleared_ms, c
            assert resolved - clearing >= VERIFY_S * 1000, c
            assert resolved - cleared_ms <= (VERIFY_S + 3) * 1000, c

        # -- offline: one alert, and nothing of the device opens meanwhile --------------------
        await offline_phase(api, fleet, broker)


async def offline_phase(api: Api, fleet: Fleet, broker: Process) -> None:
    late_before = await api.device(LATE)
    dropped_ms = wall_ms()
    assert fleet.drop_connection(LATE, offline_s=600)
    assert fleet.drop_connection(BACK, offline_s=600)

    async def offline_alerts() -> dict[str, dict[str, Any]]:
        grouped = await api.by_key({LATE, BACK})
        found: dict[str, dict[str, Any]] = {}
        for d in (LATE, BACK):
            found[d] = one(grouped, Cond(d, "offline", "offline"))
        return found

    offline = await until(offline_alerts, within_s=3)
    for d, a in offline.items():
        assert (a["station"], a["status"], a["port"], a["slot"]) == (STATION, "open", None, None)
        assert ms(a["opened_at"]) - dropped_ms <= 2000, d
        assert not (await api.device(d))["online"], d

    # BACK: a fault raised while offline is queued on the device (nothing reaches the service)
    fleet.inject_fault(BACK, "ground_fault", 6)
    # LATE: a status of its next boot arrives before that boot's birth: applied, it lists
    # faults, yet the device is offline (online needs the boot's birth). A status of the same
    # boot newer than everything seen would prove a live connection and disprove the Will
    # (docs/protocol.md), so that is not what a dropped device can send late.
    late_seq = 1
    ports = [{"n": n, "state": "available", "power_w": 0, "energy_wh": 0} for n in range(1, 11)]
    ports[1] = {"n": 2, "state": "faulted", "fault": "relay_stuck"}
    status = {
        "v": 1,
        "ts": wall_ms(),
        "boot": late_before["boot"] + "x",
        "seq": late_seq,
        "kind": "pile",
        "temp_c": 99.0,
        "faults": ["over_voltage"],
        "ports": ports,
    }
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="late-redelivery") as mqtt:
        await mqtt.publish(f"cw/v1/{LATE}/status", json.dumps(status), qos=1, retain=True)

    async def late_applied() -> None:
        view = await api.device(LATE)
        assert view["status_seq"] == late_seq  # it reached the twin: not lost, suppressed
        assert view["faults"] == ["over_voltage"]
        assert not view["online"]

    await until(late_applied, within_s=3)

    async def only_offline() -> None:
        grouped = await api.by_key({LATE, BACK})
        assert set(grouped) == {Cond(d, "offline", "offline") for d in (LATE, BACK)}
        for d in (LATE, BACK):
            a = one(grouped, Cond(d, "offline", "offline"))
            assert (a["id"], a["status"]) == (offline[d]["id"], "open"), d

    await holds(only_offline, for_s=1.5)  # 15 ticks of the alert timer

    # BACK returns: the offline alert clears and resolves, the queued fault opens only now
    restored_ms = wall_ms()
    fleet.restore_connection(BACK)
    port_fault = fault(BACK, "ground_fault", port=6)

    async def back() -> dict[str, Any]:
        grouped = await api.by_key({BACK})
        a = one(grouped, port_fault)
        gone = one(grouped, Cond(BACK, "offline", "offline"))
        assert gone["id"] == offline[BACK]["id"]
        assert gone["clearing_since"] is not None
        return a

    opened = await until(back, within_s=3)
    assert ms(opened["opened_at"]) >= restored_ms  # not while it was offline
    assert ms(opened["opened_at"]) - restored_ms <= 2000

    async def back_resolved() -> None:
        gone = one(await api.by_key({BACK}), Cond(BACK, "offline", "offline"))
        assert (gone["status"], gone["resolved_how"]) == ("resolved", "auto")

    await until(back_resolved, within_s=VERIFY_S + 3)
    # LATE stays offline with its single alert and nothing else
    grouped = await api.by_key({LATE})
    assert list(grouped) == [Cond(LATE, "offline", "offline")]
    assert [a["id"] for a in grouped[Cond(LATE, "offline", "offline")]] == [offline[LATE]["id"]]
