"""Operator reports (``api.summaries``): ``GET /v1/summaries/stations`` with a maintainer key,
as JSON, or as CSV for ``Accept: text/csv`` (a file to hand to the community office).

``from``/``to``: a date (``2026-12-01``: local midnight in the district's time zone), an
RFC 3339 time or epoch ms; ``to`` is exclusive, defaults to now, ``from`` to ``to`` - 30 d;
at most 366 days apart. Every whole day, ISO week or calendar month the window touches is a
period. Reads through four plain inputs (the station rollups, the alerts' timings, the
riders' reports, the catalog), each from where the service keeps it today.
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
    SPAN_MAX_DAYS,
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
    "per station and whole period (district time zone; week = ISO week from Monday) from the"
    " hourly rollups: port_free_share / battery_ready_share = minutes within opening hours"
    " with at least one free port / ready battery over the station's open minutes rolled up;"
    " offline_minutes in device-minutes; energy_wh of sessions ended, sessions started, swaps,"
    " faults raised by code, riders' reports made. alerts opened in the period with mtta_s"
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


class StationSummaries(BaseModel):
    period: Period
    from_: str = Field(alias="from")
    to: str
    timezone: str
    rolled_through: str | None = Field(description="every hour before it is rolled up")
    method: str
    rows: list[StationPeriod]


_ANSWERS = answers(StationSummaries, 401, 404, 422, 503)
_ANSWERS["responses"][200]["content"] = {CSV_TYPE.split(";")[0]: {"schema": {"type": "string"}}}


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


async def _outcomes(
    request: Request, read: ReadSide, since: int, until: int
) -> list[ReportOutcome]:
    """The outcomes of the reports made in [since, until); pending ones are settled first
    (telemetry decides them when someone looks: ``api.routes.sentinels.settle``)."""
    store = sentinel_store(request)
    reports = await asyncio.to_thread(store.made_between, since, until)
    if await settle(request, read, reports):
        reports = await asyncio.to_thread(store.made_between, since, until)
    return [ReportOutcome(r.station_id, r.at_ms, r.outcome) for r in reports]


@router.get("/summaries/stations", **_ANSWERS)
async def station_summaries(
    request: Request,
    read: ReadDep,
    key: Maintainer,
    from_: Annotated[
        str | None, Query(alias="from", description="date, RFC 3339 or epoch ms; to - 30 d")
    ] = None,
    to: Annotated[str | None, Query(description="exclusive; default now")] = None,
    period: Period = "day",
    station: Annotated[str | None, Query(max_length=64, description="one station")] = None,
) -> Response:
    """Per station and day, week or month: availability within opening hours, offline
    minutes, faults by code, time to acknowledge and repair, energy, sessions, swaps and
    riders' reports with their outcome. JSON, or CSV with ``Accept: text/csv``."""
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
    stations = _stations(read, station)
    store = _rollup_store(read)
    spans = periods(since, until, period, tz)
    first, last = spans[0][0], spans[-1][1]
    ids = [s.id for s in stations]
    rollups = await asyncio.to_thread(store.rollups, "station", ids, first, last)
    timings = await read.alert_timings(first, last)
    outcomes = await _outcomes(request, read, first, last)
    through = await asyncio.to_thread(store.rolled_through)
    rows = summarize(stations, spans, rollups, timings, outcomes, period=period, tz=tz)
    headers = {"Cache-Control": "private, no-store", "Vary": "Accept, Authorization"}
    if "text/csv" in request.headers.get("accept", ""):
        name = f"chargewatch-stations-{period}-{_day(first, tz)}-{_day(last - 1, tz)}.csv"
        headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(to_csv(rows), media_type=CSV_TYPE, headers=headers)
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
