"""Riders' endpoints: stations near a point with live counts, station and device detail."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from api.deps import IngestDep
from api.errors import NotFound, invalid_query
from api.views import device_view, rfc3339, station_has, station_view
from ingest.service import now_ms

router = APIRouter(prefix="/v1", tags=["riders"])


@router.get("/stations")
async def stations(
    ingest: IngestDep,
    lat: Annotated[float | None, Query(ge=-90, le=90)] = None,
    lon: Annotated[float | None, Query(ge=-180, le=180)] = None,
    radius_m: Annotated[float, Query(gt=0, le=100_000)] = 2000,
    kind: Literal["pile", "cabinet"] | None = None,
    available: bool = False,
) -> dict[str, Any]:
    """Stations near (lat, lon) by distance, or all stations when no point is given."""
    if (lat is None) != (lon is None):
        raise invalid_query("lat" if lat is None else "lon", "give lat and lon together")
    now = now_ms()
    origin = (lat, lon) if lat is not None and lon is not None else None
    views = [
        station_view(s, ingest.twins, now, origin=origin) for s in ingest.catalog.stations.values()
    ]
    if origin is not None:
        views = [v for v in views if v["distance_m"] <= radius_m]
        views.sort(key=lambda v: v["distance_m"])
    views = [v for v in views if station_has(v, kind, available)]
    return {"stations": views, "generated_at": rfc3339(now)}


@router.get("/stations/{station_id}")
async def station(ingest: IngestDep, station_id: str) -> dict[str, Any]:
    spec = ingest.catalog.stations.get(station_id)
    if spec is None:
        raise NotFound("station", station_id)
    now = now_ms()
    view = station_view(spec, ingest.twins, now)
    view["devices"] = [device_view(ingest.twins[d.id], now) for d in spec.devices]
    return view


@router.get("/devices/{device_id}")
async def device(ingest: IngestDep, device_id: str) -> dict[str, Any]:
    if device_id not in ingest.catalog.devices:
        raise NotFound("device", device_id)
    return device_view(ingest.twins[device_id], now_ms())
