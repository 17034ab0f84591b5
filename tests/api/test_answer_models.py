"""The declared answer models describe what the routes return with devices reporting
(ports, slots, sessions, batteries), for the public and for a key: the schemathesis run
serves a district no device speaks in, so these shapes are checked here, in-process."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from api.schemas import DeviceView, StationDetail, StationList
from tests.security.inprocess import BATTERY, SESSION, STATION, bearer, feed_station, in_process


def _strict(model: type[BaseModel], data: object) -> BaseModel:
    return model.model_validate(data, strict=True)


async def test_rider_answers_match_their_models(tmp_path: Path) -> None:
    async with in_process(tmp_path) as ip:
        pile, cabinet = feed_station(ip.ingest)
        key = bearer(ip.key())
        for headers in ({}, key):
            r = await ip.http.get(f"/v1/stations/{STATION}", headers=headers)
            detail = _strict(StationDetail, r.json())
            assert isinstance(detail, StationDetail)
            assert {d.kind for d in detail.devices} == {"pile", "cabinet"}
            ports = [p for d in detail.devices for p in d.ports or []]
            slots = [s for d in detail.devices for s in d.slots or []]
            assert ports
            assert slots
            private = bool(headers)
            assert any(p.session == SESSION for p in ports) is private
            assert any(s.battery == BATTERY for s in slots) is private
            for device_id in (pile, cabinet):
                r = await ip.http.get(f"/v1/devices/{device_id}", headers=headers)
                assert _strict(DeviceView, r.json()).id == device_id
        for params in ({}, {"lat": "31.742", "lon": "117.296", "arrive_in_s": "600"}):
            r = await ip.http.get("/v1/stations", params=params)
            page = _strict(StationList, r.json())
            assert isinstance(page, StationList)
            assert page.total == len(page.stations) > 0
            assert (page.ranked_by is not None) is ("arrive_in_s" in params)
