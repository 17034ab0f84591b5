"""Riders' endpoints: stations near a point with live counts, station and device detail.

Every answer says how fresh it is (``updated_at``, ``data_age_s``, ``stale``), carries an
``ETag`` (304 on ``If-None-Match``) and a short ``Cache-Control``. The station list pages
with ``limit``/``offset`` (``X-Total-Count``, ``Link``), syncs deltas with
``updated_since`` (stations whose ``last_updated`` is at or after it, OCPI ``date_from``
style) and, with ``arrive_in_s``, ranks stations by the chance that what the rider needs is
still there on arrival (``api.forecast``).

Public answers carry what a rider needs and nothing that follows a rider or a battery:
station and device detail give battery serials, charging session ids, firmware and boot
ids as null (``api.views.public_device_view``). A maintainer or admin key
(``Authorization: Bearer``) gets them; its answers say ``Cache-Control: private``, and
every answer that can differ by key says ``Vary: Authorization``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pydantic_core
from fastapi import APIRouter, Query, Request, Response

from api.auth import optional_maintainer
from api.caching import (
    RIDER_MAX_AGE_S,
    cached_bytes,
    cached_json,
    etag_of_bytes,
    not_modified,
    page_headers,
)
from api.errors import NotFound, invalid_query
from api.forecast import StationStats, StatsCache, arrival_estimate
from api.live import Trends
from api.schemas import DeviceView, StationDetail, StationList, answers
from api.snapshots import StationViews
from api.views import device_view, public_device_view, rfc3339, station_has
from devices.catalog import distance_m, district_tz
from ingest.readside import ReadSide, now_ms

router = APIRouter(prefix="/v1", tags=["riders"])


TIME_MAX_MS = 253_402_300_799_999
"""9999-12-31T23:59:59.999Z, the last time RFC 3339 can write."""


def parse_time(field: str, value: str | None) -> int | None:
    """RFC 3339 (with an offset) or epoch milliseconds -> epoch ms, from 1970 to 9999."""
    if value is None:
        return None
    if value.isdigit():
        ms = int(value) if len(value) <= 15 else TIME_MAX_MS + 1
    else:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "+"))
        except ValueError:
            raise invalid_query(field, f"not an RFC 3339 time: {value[:40]!r}") from None
        if dt.tzinfo is None:
            raise invalid_query(field, "needs an offset (Z or +hh:mm)")
        ms = int(dt.timestamp() * 1000)
    if not 0 <= ms <= TIME_MAX_MS:
        raise invalid_query(field, "must be from 1970 to 9999 (epoch ms 0 to 253402300799999)")
    return ms


async def audience(
    request: Request, vary: str = "Authorization", max_age_s: int = RIDER_MAX_AGE_S
) -> dict[str, str] | None:
    """The headers of an answer whose private fields only a key may see: None for the
    public (no key given), else those of a private answer, which no shared cache may keep.
    A key that admits no one is 401: a maintainer who sent a wrong key is told so."""
    key = await optional_maintainer(request)
    if key is None:
        return None
    return {"Cache-Control": f"private, max-age={max_age_s}", "Vary": vary}


# gzip adds Accept-Encoding where it compresses; the station detail is gzipped here
PUBLIC_VARY = {"Vary": "Authorization"}
DETAIL_VARY = "Authorization, Accept-Encoding"


def _app_state(request: Request) -> Any:
    """What the rider routes read, straight from the app state: FastAPI runs a plain
    ``def`` dependency in a worker thread, two thread hops per request under a busy GIL."""
    return request.app.state


@router.get("/stations", **answers(StationList, 304, 422))
async def stations(
    request: Request,
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
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Response:
    """Stations near (lat, lon) by distance, or all stations when no point is given."""
    if (lat is None) != (lon is None):
        raise invalid_query("lat" if lat is None else "lon", "give lat and lon together")
    since_ms = parse_time("updated_since", updated_since)
    now = now_ms()
    origin = (lat, lon) if lat is not None and lon is not None else None
    state = _app_state(request)
    read: ReadSide = state.read
    shared: StationViews = state.views
    chosen: list[tuple[float | None, str]] = []  # (distance, station) of those that match
    entries = {}
    for station_id, spec in read.catalog.stations.items():
        entry = shared.station(station_id, now)
        distance = None
        if origin is not None:
            distance = round(distance_m(origin[0], origin[1], spec.lat, spec.lon), 1)
            if distance > radius_m:
                continue
        if not station_has(entry.summary, kind, available):
            continue
        if since_ms is not None and (entry.last_updated_ms or 0) < since_ms:
            continue
        entries[station_id] = entry
        chosen.append((distance, station_id))
    if origin is not None:
        chosen.sort(key=lambda c: c[0] or 0.0)
    if arrive_in_s is not None:
        return await _ranked(request, state.stats, read, shared, now, chosen, kind,
                             arrive_in_s, limit, offset)  # fmt: skip
    # the common query: the kept views' JSON, with each answer's distance and age spliced in
    total = len(chosen)
    page = chosen[offset : offset + limit] if limit is not None else chosen[offset:]
    parts = [f"{i}:{entries[i].summary_etag}:{d}" for d, i in page]
    etag = etag_of_bytes(f"{total};{';'.join(parts)}".encode())
    body = b"".join(
        [
            b'{"stations":[',
            b",".join(entries[i].summary_json.fill(entries[i].data_age_s(now), d) for d, i in page),
            b'],"generated_at":',
            pydantic_core.to_json(rfc3339(now)),
            b',"total":',
            str(total).encode(),
            b"}",
        ]
    )
    return cached_bytes(request, body, etag, headers=page_headers(request, total, limit, offset))


async def _ranked(
    request: Request,
    stats: StatsCache,
    read: ReadSide,
    shared: StationViews,
    now: int,
    chosen: list[tuple[float | None, str]],
    kind: str | None,
    arrive_in_s: int,
    limit: int | None,
    offset: int,
) -> Response:
    """The ``chosen`` stations (filtered, by distance) ranked by the chance that what the
    rider needs is still there on arrival: new estimates for every request, so no ETag."""
    full = []
    for distance, station_id in chosen:
        v = shared.get(station_id, now).view
        if distance is not None:
            v["distance_m"] = distance
        full.append(v)
    hour = datetime.fromtimestamp(now / 1000, tz=UTC).astimezone(district_tz(read.catalog)).hour
    history = read.history
    for v in full:
        spec = read.catalog.stations[v["id"]]
        station_stats: StationStats | None = None
        if history is not None:
            station_stats = await asyncio.to_thread(
                stats.get, history, read.catalog, spec, now, 4, read.release_soc
            )
        v["arrival"] = arrival_estimate(v, v["devices"], station_stats, arrive_in_s, hour)
    field = {"pile": "p_port", "cabinet": "p_battery", None: "p_any"}[kind]
    full.sort(key=lambda v: (-(v["arrival"][field] or 0.0), v["distance_m"] or 0.0))
    for v in full:
        del v["devices"]
    total = len(full)
    views = full[offset : offset + limit] if limit is not None else full[offset:]
    what = "port" if kind == "pile" else "battery" if kind == "cabinet" else "port or battery"
    p_field = "port" if kind == "pile" else "battery" if kind == "cabinet" else "any"
    body: dict[str, Any] = {
        "stations": views,
        "generated_at": rfc3339(now),
        "total": total,
        "ranked_by": (
            f"chance that a {what} is still there in {arrive_in_s} s (arrival.p_{p_field}),"
            " then distance"
        ),
    }
    headers = page_headers(request, total, limit, offset)
    return cached_json(request, body, headers=headers)


@router.get("/stations/{station_id}", **answers(StationDetail, 304, 401, 404))
async def station(request: Request, station_id: str) -> Response:
    state = _app_state(request)
    read: ReadSide = state.read
    if station_id not in read.catalog.stations:
        raise NotFound("station", station_id)
    private = await audience(request, DETAIL_VARY)
    public = private is None
    headers = {"Vary": DETAIL_VARY} if public else private
    assert headers is not None
    views: StationViews = state.views
    now = now_ms()
    entry = views.station(station_id, now)
    etag = entry.public_etag if public else entry.etag
    unchanged = not_modified(request, etag, headers)
    if unchanged is not None:
        return unchanged
    if "gzip" in request.headers.get("accept-encoding", ""):
        # kept compressed; the middleware passes an answer with an encoding through
        data = views.detail_gzip(entry, now, public=public)
        return cached_bytes(request, data, etag, headers={**headers, "Content-Encoding": "gzip"})
    return cached_bytes(request, entry.detail_json(now, public=public), etag, headers=headers)


@router.get("/devices/{device_id}", **answers(DeviceView, 304, 401, 404))
async def device(request: Request, device_id: str) -> Response:
    state = _app_state(request)
    read: ReadSide = state.read
    if device_id not in read.catalog.devices:
        raise NotFound("device", device_id)
    private = await audience(request)
    trends: Trends = state.live.trends
    view = device_view(read.twins[device_id], now_ms(), trends, state.views.flagged)
    if private is None:
        return cached_json(request, public_device_view(view), headers=PUBLIC_VARY)
    return cached_json(request, view, headers=private)
