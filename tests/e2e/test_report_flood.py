"""A flood of rider reports from one local process against a real ``chargewatch serve``:
a forged ``X-Forwarded-For`` buys no new rate-limit bucket unless the peer is a configured
proxy, reports are capped per station and in total, and what gets through becomes one
alert (one webhook) per station and category, however the reports vary device and slot.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import KeyStore
from devices.catalog import Catalog
from tests.alerts.receiver import Receiver, receiver
from tests.servers import Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

FLOOD = 150
HAZARDS = ("smoke", "fire")  # critical: each would page someone


@dataclass
class Served:
    service: Service
    hook: Receiver
    maintainer: str

    def detail(self, alert_id: int) -> dict[str, Any]:
        r = httpx.get(
            f"{self.service.base_url}/v1/alerts/{alert_id}",
            headers={"Authorization": f"Bearer {self.maintainer}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        detail: dict[str, Any] = r.json()
        return detail

    def alerts(self) -> list[dict[str, Any]]:
        r = httpx.get(
            self.service.base_url + "/v1/alerts",
            params={"rule": "rider_report", "limit": 1000},
            headers={"Authorization": f"Bearer {self.maintainer}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        alerts: list[dict[str, Any]] = r.json()["alerts"]
        return alerts


@pytest.fixture
def serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``serve(**env)``: a served process with these CHARGEWATCH_ settings and a webhook
    subscription to a local receiver."""

    @contextmanager
    def start(env: dict[str, str]) -> Iterator[Served]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__BACKOFF_S", "0.05")
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        store = KeyStore.in_dir(data_dir)
        try:
            admin = store.create("ops", "admin")[1]
            maintainer = store.create("li-wei", "maintainer")[1]
        finally:
            store.close()
        with receiver() as hook, chargewatch_serve(tmp_path, None, data_dir=data_dir) as svc:
            r = httpx.post(
                svc.base_url + "/v1/webhooks",
                json={"url": hook.url},
                headers={"Authorization": f"Bearer {admin}"},
                timeout=10,
            )
            assert r.status_code == 201, r.text
            yield Served(svc, hook, maintainer)

    return start


def flood(service: Service, stations: list[str]) -> list[tuple[str, str, int]]:
    """A report to each of ``stations`` in turn, each from a different claimed address,
    smoke or fire, at random devices and ports/slots. (station, category, status) each."""
    catalog = Catalog.load(None)
    rng = random.Random(11)
    out = []
    with httpx.Client(base_url=service.base_url, timeout=10) as http:
        for i, station in enumerate(stations):
            category = HAZARDS[i % 2]
            device = rng.choice(catalog.stations[station].devices)
            report: dict[str, Any] = {"station": station, "category": category, "text": f"#{i}"}
            if rng.random() < 0.8:
                report["device"] = device.id
                unit = "port" if device.kind == "pile" else "slot"
                report[unit] = rng.randint(1, device.units)
            forged = {"X-Forwarded-For": f"198.51.100.{i % 250 + 1}"}
            r = http.post("/v1/reports", json=report, headers=forged)
            assert r.status_code in (201, 429), r.text
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) > 0
            out.append((station, category, r.status_code))
    return out


def one_incident_each(served: Served, accepted: Counter[tuple[str, str]]) -> None:
    """At most one alert per station and category, holding every accepted report between
    them (a report joins a critical alert of its place, whatever its category), and each
    alert sent once."""
    alerts = served.alerts()
    by_kind = Counter((a["station"], a["code"]) for a in alerts)
    assert set(by_kind) <= set(accepted), (by_kind, accepted)
    assert max(by_kind.values()) == 1, by_kind
    for station in {s for s, _ in accepted}:
        held = sum(a["reports"] for a in alerts if a["station"] == station)
        assert held == sum(n for (s, _), n in accepted.items() if s == station), alerts
    for alert in alerts:  # every report is a note; one from another place says where
        notes = [n for n in served.detail(alert["id"])["notes"] if n["source"] == "rider"]
        assert len(notes) == alert["reports"], notes
        places = {n["text"].split(") ")[0] for n in notes[1:] if "(" in n["text"]}
        assert len(notes) == 1 or places, notes
    ids = sorted(a["id"] for a in alerts)

    def sent() -> None:
        opened = sorted(i for event, i in served.hook.events() if event == "opened")
        assert opened == ids, (opened, ids)

    eventually(sent, timeout=15)


def test_a_forged_forwarded_for_buys_nothing_by_default(serve: Any) -> None:
    with serve({}) as served:
        results = flood(served.service, ["wanguo-south"] * FLOOD)
        statuses = [status for _, _, status in results]
        # the per-client burst (3), then 429: every report came from 127.0.0.1
        assert statuses == [201] * 3 + [429] * (FLOOD - 3), Counter(statuses)
        accepted = Counter((s, c) for s, c, status in results if status == 201)
        one_incident_each(served, accepted)


def test_behind_a_trusted_proxy_a_flood_is_capped_and_one_incident(serve: Any) -> None:
    env = {
        "CHARGEWATCH_TRUSTED_PROXIES": "127.0.0.1,::1",
        "CHARGEWATCH_INGEST__ALERTS__REPORTS__STATION_BURST": "10",
        "CHARGEWATCH_INGEST__ALERTS__REPORTS__STATION_PER_HOUR": "1",
        "CHARGEWATCH_INGEST__ALERTS__REPORTS__TOTAL_BURST": "25",
        "CHARGEWATCH_INGEST__ALERTS__REPORTS__TOTAL_PER_HOUR": "1",
    }
    with serve(env) as served:
        others = ["service-centre", "tsinghua-garden", "guanhu-garden"]
        results = flood(served.service, ["wanguo-south"] * 60 + others * 30)
        accepted = Counter((s, c) for s, c, status in results if status == 201)
        per_station = Counter(s for s, _, status in results if status == 201)
        # each claimed address has its own bucket behind the proxy; the caps still hold:
        # 10 for the first station, then 5 each for the others until 25 in total
        assert per_station == {"wanguo-south": 10, **dict.fromkeys(others, 5)}, per_station
        statuses = [status for _, _, status in results]
        assert statuses == [201] * 10 + [429] * 50 + [201] * 15 + [429] * 75
        assert {c for _, c in accepted} == set(HAZARDS)
        one_incident_each(served, accepted)
