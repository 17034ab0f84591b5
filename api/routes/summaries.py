"""Operator reports (``api.summaries``): ``GET /v1/summaries/stations`` and
``GET /v1/summaries/devices`` with a maintainer key, as JSON, or as CSV for
``Accept: text/csv`` (a file to hand to the community office).

``from``/``to``: a date (``2026-12-01``: local midnight in the district's time zone), an
RFC 3339 time or epoch ms; ``to`` is exclusive, defaults to now, ``from`` to ``to`` - 30 d;
at most 366 days apart. Every whole day, ISO week or calendar month the window touches is a
period. Reads through four plain inputs (the station's or device's rollups, the alerts'
timings, the riders' reports, the catalog), each from where the service keeps it today.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.auth import Maintainer
from api.deps import ReadDep
from api.errors import NotFound, invalid_query
from api.routes.riders import parse_time
from api.routes.sentinels import sentinel_store, settle
from api.schemas import answers
from api.summaries import (
    CSV_COLUMNS,
    DEVICE_CSV_COLUMNS,
    SPAN_MAX_DAYS,
    DeviceInfo,
    Period,
    ReportOutcome,
    StationInfo,
    periods,
    summarize,
    to_csv,
)
from api.views import rfc3339
from devices.catalog import district_tz
from ingest.readside import ReadSide, now_ms
from ingest.store import RollupStore

router = APIRouter(prefix="/v1", tags=["summaries"])

DAY_MS = 86_400_000
DEFAULT_SPAN_MS = 30 * DAY_MS
# the last period's end is still a date
UNTIL_MAX_MS = int(datetime(9998, 12, 1, tzinfo=UTC).timestamp() * 1000)
CSV_TYPE = "text/csv; charset=utf-8"
METHOD = (
    "per station (or device) and whole period (district time zone; week = ISO week from"
    " Monday) from the hourly rollups: port_free_share / battery_ready_share = minutes within opening hours"
    " with at least one free port / ready battery over the station's open minutes rolled up"
    " (a device's: its own, a pile has no battery share, a cabinet no port share);"
    " offline_minutes in device-minutes; energy_wh of sessions ended, sessions started, swaps,"
    " faults raised by code, riders' reports made (a device's: naming it). alerts opened in"
    " the period (a device's: its own) with mtta_s"
    " (opened -> acknowledged) and mttr_s (opened -> resolved); reports_<outcome> of the"
    " reports made in the period, as decided now. hours_rolled_up < hours: part of the"
    " period is not rolled up (not over yet, or before the history)"
)


class StationPeriod(BaseModel):
    station_id: str
    name_zh: str
    name_en: str
    period: Period
    start: str = Field(description="RFC 3339, the district's offset")
    end: str = Field(description="exclusive")
    hours: int
    hours_rolled_up: int
    open_minutes: int = Field(description="the station's minutes within opening hours, rolled")
    port_free_share: float | None = Field(description="None: no pile, or no open minute")
    battery_ready_share: float | None = Field(description="None: no cabinet, or no open minute")
    offline_minutes: int = Field(description="device-minutes offline")
    energy_wh: float
    sessions: int
    swaps: int
    faults: dict[str, int]
    alerts: int
    acknowledged: int
    resolved: int
    mtta_s: float | None
    mttr_s: float | None
    reports: int
    reports_confirmed: int
    reports_rejected: int
    reports_expired: int
    reports_pending: int


class DevicePeriod(StationPeriod):
    """A device's period: the station's columns for one device (of ``station_id``)."""

    device_id: str
    kind: str = Field(description="pile or cabinet")


class StationSummaries(BaseModel):
    period: Period
    from_: str = Field(alias="from")
    to: str
    timezone: str
    rolled_through: str | None = Field(description="every hour before it is rolled up")
    method: str
    rows: list[StationPeriod]


class DeviceSummaries(StationSummaries):
    rows: list[DevicePeriod]  # type: ignore[assignment]


def _answers(model: type[BaseModel]) -> dict[str, Any]:
    out = answers(model, 401, 404, 422, 503)
    out["responses"][200]["content"] = {CSV_TYPE.split(";")[0]: {"schema": {"type": "string"}}}
    return out


def _bound(field: str, value: str | None, tz: Any) -> int | None:
    if value is not None and len(value) == 10 and value[4] == "-":
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise invalid_query(field, f"not a date (YYYY-MM-DD): {value!r}") from None
        return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)
    return parse_time(field, value)


def _rollup_store(read: ReadSide) -> RollupStore:
    store = read.history
    if not isinstance(store, RollupStore):
        raise NotFound("hourly rollups", "(this history store keeps none)")
    return store


def _stations(read: ReadSide, station: str | None) -> list[StationInfo]:
    """The catalog's stations (or the one asked), in catalog order."""
    catalog = read.catalog
    specs = list(catalog.stations.values())
    if station is not None:
        if station not in catalog.stations:
            raise NotFound("station", station)
        specs = [catalog.stations[station]]
    return [
        StationInfo(
            s.id,
            s.name.zh,
            s.name.en,
            piles=sum(d.kind == "pile" for d in s.devices),
            cabinets=sum(d.kind == "cabinet" for d in s.devices),
        )
        for s in specs
    ]


def _devices(read: ReadSide, station: str | None, device: str | None) -> list[DeviceInfo]:
    """The devices of the stations (or of the one asked), in catalog order; or the one
    device asked (404 when unknown, or not the station's)."""
    if device is not None and device not in read.catalog.devices:
        raise NotFound("device", device)
    if device is not None and station is None:
        station = read.catalog.devices[device].station_id
    out: list[DeviceInfo] = []
    for info in _stations(read, station):
        for spec in read.catalog.stations[info.id].devices:
            if device is None or spec.id == device:
                out.append(DeviceInfo(spec.id, spec.kind, info))
    if not out:
        raise NotFound("device", f"{device} at {station}")
    return out


async def _outcomes(
    request: Request, read: ReadSide, since: int, until: int
) -> list[ReportOutcome]:
    """The outcomes of the reports made in [since, until); pending ones are settled first
    (telemetry decides them when someone looks: ``api.routes.sentinels.settle``)."""
    store = sentinel_store(request)
    reports = await asyncio.to_thread(store.made_between, since, until)
    if await settle(request, read, reports):
        reports = await asyncio.to_thread(store.made_between, since, until)
    return [ReportOutcome(r.station_id, r.at_ms, r.outcome, r.device_id) for r in reports]


FromQuery = Annotated[
    str | None, Query(alias="from", description="date, RFC 3339 or epoch ms; to - 30 d")
]
ToQuery = Annotated[str | None, Query(description="exclusive; default now")]
StationQuery = Annotated[str | None, Query(max_length=64, description="one station")]


@router.get("/summaries/stations", **_answers(StationSummaries))
async def station_summaries(
    request: Request,
    read: ReadDep,
    key: Maintainer,
    from_: FromQuery = None,
    to: ToQuery = None,
    period: Period = "day",
    station: StationQuery = None,
) -> Response:
    """Per station and day, week or month: availability within opening hours, offline
    minutes, faults by code, time to acknowledge and repair, energy, sessions, swaps and
    riders' reports with their outcome. JSON, or CSV with ``Accept: text/csv``."""
    return await _summaries(request, read, from_, to, period, _stations(read, station))


@router.get("/summaries/devices", **_answers(DeviceSummaries))
async def device_summaries(
    request: Request,
    read: ReadDep,
    key: Maintainer,
    from_: FromQuery = None,
    to: ToQuery = None,
    period: Period = "day",
    station: StationQuery = None,
    device: Annotated[str | None, Query(max_length=64, description="one device")] = None,
) -> Response:
    """Per device and day, week or month: the station report's columns from each device's
    own rollups, alerts and riders' reports (those naming it); every device of the
    district, of one ``station``, or one ``device``. JSON, or CSV with ``Accept: text/csv``."""
    devices = _devices(read, station, device)
    return await _summaries(request, read, from_, to, period, devices)


async def _summaries(
    request: Request,
    read: ReadSide,
    from_: str | None,
    to: str | None,
    period: Period,
    subjects: list[StationInfo] | list[DeviceInfo],
) -> Response:
    scope = "device" if subjects and isinstance(subjects[0], DeviceInfo) else "station"
    tz = district_tz(read.catalog)
    until = _bound("to", to, tz) or now_ms()
    since = _bound("from", from_, tz)
    if since is None:
        since = max(0, until - DEFAULT_SPAN_MS)
    if since >= until:
        raise invalid_query("from", "must be before 'to'")
    if until - since > SPAN_MAX_DAYS * DAY_MS:
        raise invalid_query("from", f"a window of at most {SPAN_MAX_DAYS} days")
    if until > UNTIL_MAX_MS:
        raise invalid_query("to", "must be before 9998-12-01")
    store = _rollup_store(read)
    spans = periods(since, until, period, tz)
    first, last = spans[0][0], spans[-1][1]
    ids = [s.id for s in subjects]
    rollups = await asyncio.to_thread(store.rollups, scope, ids, first, last)
    timings = await read.alert_timings(first, last)
    outcomes = await _outcomes(request, read, first, last)
    through = await asyncio.to_thread(store.rolled_through)
    rows = summarize(subjects, spans, rollups, timings, outcomes, period=period, tz=tz)
    headers = {"Cache-Control": "private, no-store", "Vary": "Accept, Authorization"}
    if "text/csv" in request.headers.get("accept", ""):
        name = f"chargewatch-{scope}s-{period}-{_day(first, tz)}-{_day(last - 1, tz)}.csv"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        columns = DEVICE_CSV_COLUMNS if scope == "device" else CSV_COLUMNS
        return Response(to_csv(rows, columns), media_type=CSV_TYPE, headers=headers)
    body = {
        "period": period,
        "from": datetime.fromtimestamp(first / 1000, tz=tz).isoformat(),
        "to": datetime.fromtimestamp(last / 1000, tz=tz).isoformat(),
        "timezone": str(tz),
        "rolled_through": rfc3339(through) if through is not None else None,
        "method": METHOD,
        "rows": rows,
    }
    return JSONResponse(body, headers=headers)


def _day(ms: int, tz: Any) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=tz).date().isoformat()
