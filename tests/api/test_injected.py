"""Route tests with no broker: a device message injected in-process, the HTTP answer
asserted (tests/api/injected.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ingest.alerts.config import AlertsConfig
from ingest.config import IngestConfig
from ingest.inprocess import read_and_act
from tests.api.injected import header, service

STATION = "yungu-road"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_station_availability_follows_an_injected_status(tmp_path: Path) -> None:
    async with service(tmp_path) as s:
        pile = next(d for d in s.ingest.catalog.stations[STATION].devices if d.kind == "pile")
        before = (await s.http.get(f"/v1/devices/{pile.id}")).json()
        assert before["online"] is False
        listed = (await s.http.get("/v1/stations")).json()["stations"]  # the views kept now
        assert next(x for x in listed if x["id"] == STATION)["piles"]["online"] == 0
        await s.fire(pile.id, "state", {**header(0), "online": True, "kind": "pile",
                                        "ports": pile.units, "heartbeat_s": 30})  # fmt: skip
        ports = [{"n": 1, "state": "charging", "power_w": 150.0}]
        ports += [{"n": n, "state": "available"} for n in range(2, pile.units + 1)]
        await s.fire(pile.id, "status", {**header(1), "kind": "pile", "ports": ports})

        r = await s.http.get(f"/v1/devices/{pile.id}")
        assert r.status_code == 200, r.text
        device = r.json()
        assert device["online"] is True
        assert [p["state"] for p in device["ports"]][:2] == ["charging", "available"]

        def ours(stations: Any) -> Any:
            return next(x for x in stations["stations"] if x["id"] == STATION)

        # the kept station views follow the change within REFRESH_MS (0.25 s) because the
        # read side tells them (else only when they fall due, seconds later)
        listed = await s.get_until(
            "/v1/stations", lambda b: ours(b)["piles"]["online"] == 1, within_s=1.0
        )
        station = ours(listed)
        detail = await s.get_until(
            f"/v1/stations/{STATION}",
            lambda b: any(d["id"] == pile.id and d["online"] for d in b["devices"]),
            within_s=1.0,
        )
        assert detail["piles"]["online"] == 1
        assert station["piles"]["ports_free"] == pile.units - 1


async def test_a_smoke_event_opens_an_alert_that_is_acknowledged_over_http(
    tmp_path: Path,
) -> None:
    config = IngestConfig(alerts=AlertsConfig(startup_grace_s=0))
    async with service(tmp_path, config) as s:
        key = bearer(s.key())
        cabinet = next(d for d in s.ingest.catalog.stations[STATION].devices if d.kind == "cabinet")
        await s.fire(cabinet.id, "state", {**header(0), "online": True, "kind": "cabinet",
                                           "slots": cabinet.units, "heartbeat_s": 30})  # fmt: skip
        r = await s.http.get("/v1/alerts", params={"status": "active"}, headers=key)
        assert r.status_code == 200, r.text
        assert [a for a in r.json()["alerts"] if a["device"] == cabinet.id] == []

        await s.fire(cabinet.id, "event", {**header(1), "type": "fault_raised", "code": "smoke"})

        r = await s.http.get("/v1/alerts", params={"status": "active"}, headers=key)
        assert r.status_code == 200, r.text
        smoke = [a for a in r.json()["alerts"] if a["device"] == cabinet.id]
        assert len(smoke) == 1, smoke
        alert = smoke[0]
        assert (alert["severity"], alert["status"], alert["station"]) == (
            "critical",
            "open",
            STATION,
        )
        assert alert["code"] == "smoke"

        r = await s.http.post(f"/v1/alerts/{alert['id']}/ack", json={"note": "on my way"},
                              headers=key)  # fmt: skip
        assert r.status_code == 200, r.text
        acked = r.json()
        assert acked["status"] == "acknowledged"
        assert acked["acknowledged_by"] == "li-wei"
        assert [n["text"] for n in acked["notes"]] == ["on my way"]
        r = await s.http.post(f"/v1/alerts/{alert['id']}/resolve", headers=key)
        assert (r.status_code, r.json()["status"]) == (200, "resolved"), r.text
        late = await s.http.post(f"/v1/alerts/{alert['id']}/ack", headers=key)
        assert late.status_code == 409, late.text
        unknown = await s.http.post("/v1/alerts/999999/ack", headers=key)
        assert unknown.status_code == 404, unknown.text


async def test_alert_routes_say_503_when_alerts_are_disabled(tmp_path: Path) -> None:
    config = IngestConfig(alerts=AlertsConfig(enabled=False))
    async with service(tmp_path, config) as s:
        key = bearer(s.key())
        for path in ("/v1/alerts", "/v1/work-orders", "/v1/notifications"):
            r = await s.http.get(path, headers=key)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"] == "unavailable"
            assert "alerts" in r.json()["detail"]


async def test_the_read_side_tells_its_listeners_which_twins_changed(tmp_path: Path) -> None:
    async with service(tmp_path) as s:
        read, _ = read_and_act(s.ingest)
        heard: list[list[str]] = []
        read.on_twins_changed(lambda twins: heard.append([t.device_id for t in twins]))
        pile = next(d for d in s.ingest.catalog.stations[STATION].devices if d.kind == "pile")
        await s.fire(pile.id, "state", {**header(0), "online": True, "kind": "pile",
                                        "ports": pile.units, "heartbeat_s": 30})  # fmt: skip
        assert heard == [[pile.id]]
        assert read.twins[pile.id].online_flag is True
