"""Riders' endpoints: stations near a point with live counts, station and device detail.

Every answer says how fresh it is (``updated_at``, ``data_age_s``, ``stale``), carries an
``ETag`` (304 on ``If-None-Match``) and a short ``Cache-Control``. The station list pages
with ``limit``/``offset`` (``X-Total-Count``, ``Link``), syncs deltas with
``updated_since`` (stations whose ``last_updated`` is at or after it, OCPI ``date_from``
style) and, with ``arrive_in_s``, ranks stations by the chance that what the rider needs is
still there on arrival (``api.forecast``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from api.caching import cached_json, etag_of_bytes, page_headers
from api.deps import IngestDep
from api.errors import NotFound, invalid_query
from api.forecast import StationStats, StatsDep, arrival_estimate, district_tz
from api.live import LiveDep
from api.snapshots import StationViews
from api.views import device_view, rfc3339, station_has
from devices.catalog import distance_m
from ingest.service import now_ms

router = APIRouter(prefix="/v1", tags=["riders"])


def parse_time(field: str, value: str | None) -> int | None:
    """RFC 3339 (with an offset) or epoch milliseconds -> epoch ms."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise invalid_query(field, f"not an RFC 3339 time: {value!r}") from None
    if dt.tzinfo is None:
        raise invalid_query(field, "needs an offset (Z or +hh:mm)")
    return int(dt.timestamp() * 1000)


@router.get("/stations")
async def stations(
    request: Request,
    ingest: IngestDep,
    stats: StatsDep,
    lat: Annotated[float | None, Query(ge=-90, le=90)] = None,
    lon: Annotated[float | None, Query(ge=-180, le=180)] = None,
    radius_m: Annotated[float, Query(gt=0, le=100_000)] = 2000,
    kind: Literal["pile", "cabinet"] | None = None,
    available: bool = False,
    arrive_in_s: Annotated[
        int | None,
        Query(ge=0, le=7200, description="rank by the chance that it is still there then"),
    ] = None,
    updated_since: Annotated[
        str | None, Query(description="RFC 3339: only stations whose last_updated >= this")
    ] = None,
    limit: Annotated[int | None, Query(ge=1, le=500)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Stations near (lat, lon) by distance, or all stations when no point is given."""
    if (lat is None) != (lon is None):
        raise invalid_query("lat" if lat is None else "lon", "give lat and lon together")
    since_ms = parse_time("updated_since", updated_since)
    now = now_ms()
    origin = (lat, lon) if lat is not None and lon is not None else None
    shared: StationViews = request.app.state.views
    snapshots = [shared.get(station_id, now) for station_id in ingest.catalog.stations]
    summary_etags = {s.view["id"]: s.summary_etag for s in snapshots}
    full = [s.view for s in snapshots]
    if origin is not None:
        for v in full:
            v["distance_m"] = round(distance_m(origin[0], origin[1], v["lat"], v["lon"]), 1)
        full = [v for v in full if v["distance_m"] <= radius_m]
        full.sort(key=lambda v: v["distance_m"])
    full = [v for v in full if station_has(v, kind, available)]
    if since_ms is not None:
        full = [v for v in full if (parse_time("", v["last_updated"]) or 0) >= since_ms]
    if arrive_in_s is not None:
        hour = (
            datetime.fromtimestamp(now / 1000, tz=UTC).astimezone(district_tz(ingest.catalog)).hour
        )
        history = ingest.history
        for v in full:
            spec = ingest.catalog.stations[v["id"]]
            station_stats: StationStats | None = None
            if history is not None:
                station_stats = await asyncio.to_thread(
                    stats.get, history, ingest.catalog, spec, now, 4, ingest.config.release_soc
                )
            v["arrival"] = arrival_estimate(v, v["devices"], station_stats, arrive_in_s, hour)
        field = {"pile": "p_port", "cabinet": "p_battery", None: "p_any"}[kind]
        full.sort(key=lambda v: (-(v["arrival"][field] or 0.0), v["distance_m"] or 0.0))
    for v in full:
        del v["devices"]
    total = len(full)
    views = full[offset : offset + limit] if limit is not None else full[offset:]
    body: dict[str, Any] = {"stations": views, "generated_at": rfc3339(now), "total": total}
    if arrive_in_s is not None:
        body["ranked_by"] = (
            f"chance that a {'port' if kind == 'pile' else 'battery' if kind == 'cabinet' else 'port or battery'}"
            f" is still there in {arrive_in_s} s (arrival.p_"
            f"{'port' if kind == 'pile' else 'battery' if kind == 'cabinet' else 'any'}), then distance"
        )
    etag = None
    if arrive_in_s is None:  # else the estimates are new for every request
        parts = [f"{v['id']}:{summary_etags[v['id']]}:{v['distance_m']}" for v in views]
        etag = etag_of_bytes(f"{total};{';'.join(parts)}".encode())
    headers = page_headers(request, total, limit, offset)
    return cached_json(request, body, headers=headers, etag=etag)


@router.get("/stations/{station_id}")
async def station(request: Request, ingest: IngestDep, station_id: str) -> Response:
    spec = ingest.catalog.stations.get(station_id)
    if spec is None:
        raise NotFound("station", station_id)
    views: StationViews = request.app.state.views
    snapshot = views.get(station_id, now_ms())
    return cached_json(request, snapshot.view, etag=snapshot.etag)


@router.get("/devices/{device_id}")
async def device(request: Request, ingest: IngestDep, live: LiveDep, device_id: str) -> Response:
    if device_id not in ingest.catalog.devices:
        raise NotFound("device", device_id)
    return cached_json(request, device_view(ingest.twins[device_id], now_ms(), live.trends))
