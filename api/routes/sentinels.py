"""Sentinels over HTTP (``api.sentinels``): riders register, read their own reports and
points with their token (``Authorization: Rider <token>``); maintainers (API key) list
reports, confirm or reject them and reverse awards, each action in the audit log.

A rider's reports and points are seen with that rider's token or a maintainer's key, never
in a public answer. 401: no rider token, or one that admits no one (a wrong token is
refused, never taken for anonymous); 404: no such report, entry or rider; 409: the report
or entry does not allow the change; 429: too many registrations from this address.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from api.audit import audit
from api.auth import KeyFirstRoute, Maintainer
from api.deps import ReadDep, get_read
from api.errors import NotFound
from api.limits import ID_MAX, KiB, body_max
from api.schemas import answers
from api.sentinels import (
    OUTCOMES,
    Conflict,
    Entry,
    Report,
    Rider,
    RiderRefused,
    SentinelStore,
    confirming_alert,
    nickname_problem,
)
from api.sentinels import NotFound as SentinelNotFound
from api.text import plain_text
from api.views import rfc3339
from ingest import StoreError
from ingest.alerts.model import Alert, AlertQuery
from ingest.readside import ReadSide

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from api.routes.reports import RateLimiter

router = APIRouter(prefix="/v1", tags=["sentinels"], route_class=KeyFirstRoute)

SMALL_BODY = body_max(4 * KiB)
ReportId = Annotated[int, Path(ge=1, le=ID_MAX)]
EntryId = Annotated[int, Path(ge=1, le=ID_MAX)]
RiderId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}$", description="8 hex digits")]
Cursor = Annotated[int | None, Query(ge=1, le=ID_MAX, description="next_cursor of a page")]
Limit = Annotated[int, Query(ge=1, le=500)]
ALERTS_PER_SETTLE = 1000
"""Alerts of one station read to settle its pending reports (newest first)."""


# -- who is asking -------------------------------------------------------------------------


def sentinel_store(request: Request) -> SentinelStore:
    store: SentinelStore = request.app.state.sentinels
    return store


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Rider"})


async def optional_rider(request: Request) -> Rider | None:
    """None without an ``Authorization`` header (anonymous); the rider of a good token;
    401 for anything else: a rider who sent a wrong token hears so."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "rider" or not token.strip():
        raise _unauthorized("use Authorization: Rider <token> (from POST /v1/riders)")
    try:
        return await asyncio.to_thread(sentinel_store(request).check, token.strip())
    except RiderRefused as exc:
        raise _unauthorized(str(exc)) from None


async def require_rider(request: Request) -> Rider:
    rider = await optional_rider(request)
    if rider is None:
        raise _unauthorized("a rider token is required: Authorization: Rider <token>")
    return rider


RiderDep = Annotated[Rider, Depends(require_rider)]


def _private(response: Response) -> None:
    """A rider's data: kept by no cache, shared or not, and one per credential."""
    response.headers["Cache-Control"] = "no-store"
    response.headers["Vary"] = "Authorization"


# -- answers -------------------------------------------------------------------------------


class ReportOut(BaseModel):
    id: int
    rider_id: str | None = Field(description="maintainers only; null for the rider's own view")
    station: str
    device: str | None
    port: int | None
    slot: int | None
    category: str
    text: str
    at: str
    outcome: str = Field(description="pending, confirmed, rejected or expired")
    decided_at: str | None
    decided_by: str | None = Field(
        description="telemetry or maintainer (maintainers see the key's name)"
    )
    decision_note: str | None
    alert_id: int = Field(description="the alert the report joined or opened")
    confirmed_by_alert: int | None = Field(description="the telemetry alert that confirmed it")
    points: int = Field(description="what it earned, net of reversals")
    duplicate_of: int | None = Field(
        description="confirmed, but the rider earned for this incident with that report"
    )
    no_points: str | None = Field(
        description="why a confirmed report earned nothing: duplicate (see duplicate_of), or"
        " known (it joined an alert of the rules opened longer than the window before it)"
    )


class ReportsOut(BaseModel):
    reports: list[ReportOut]
    next_cursor: int | None


class EntryOut(BaseModel):
    id: int
    delta: int
    reason: str = Field(description="confirmed_by_telemetry, confirmed_by_maintainer, reversed")
    note: str | None = Field(description="the maintainer's reason of a reversal")
    report_id: int | None
    alert_id: int | None
    at: str
    by: str = Field(description="telemetry or maintainer (maintainers see the key's name)")
    reverses: int | None = Field(description="the entry this one takes back")
    reversed_by: int | None = Field(description="the entry that took this one back")


class RiderOut(BaseModel):
    rider_id: str
    nickname: str
    station_id: str
    registered_at: str
    points: int = Field(description="the ledger's sum")
    ledger: list[EntryOut] = Field(description="newest first")
    next_cursor: int | None


class RiderCreated(BaseModel):
    rider_id: str
    nickname: str
    station_id: str
    registered_at: str
    token: str = Field(description="shown this once: send it as Authorization: Rider <token>")


def _by(role: str | None, name: str | None, private: bool) -> str | None:
    if role is None:
        return None
    if role == "system":
        return "telemetry"
    return name if private else "maintainer"


def report_out(r: Report, *, private: bool) -> ReportOut:
    return ReportOut(
        id=r.id,
        rider_id=r.rider_id if private else None,
        station=r.station_id,
        device=r.device_id,
        port=r.unit if r.unit_kind == "port" else None,
        slot=r.unit if r.unit_kind == "slot" else None,
        category=r.category,
        text=r.text,
        at=rfc3339(r.at_ms) or "",
        outcome=r.outcome,
        decided_at=rfc3339(r.decided_at_ms),
        decided_by=_by(r.decided_role, r.decided_by, private),
        decision_note=r.decision_note,
        alert_id=r.alert_id,
        confirmed_by_alert=r.confirmed_by_alert,
        points=r.points,
        duplicate_of=r.duplicate_of,
        no_points=r.no_points,
    )


def entry_out(e: Entry, *, private: bool) -> EntryOut:
    return EntryOut(
        id=e.id,
        delta=e.delta,
        reason=e.reason,
        note=e.note,
        report_id=e.report_id,
        alert_id=e.alert_id,
        at=rfc3339(e.at_ms) or "",
        by=_by(e.actor_role, e.actor, private) or "",
        reverses=e.reverses,
        reversed_by=e.reversed_by,
    )


# -- outcomes ------------------------------------------------------------------------------


def _points(read: ReadSide, category: str) -> int:
    config = read.alerts_config
    rate: int = getattr(config.sentinels.points, category, 0) if config is not None else 0
    return rate


async def record_report(
    request: Request,
    read: ReadSide,
    rider: Rider | None,
    alert: Alert,
    *,
    device_id: str | None,
    unit: int | None,
    category: str,
    text: str,
) -> Report:
    """Keep a report that ``Actions.report`` took: confirmed by telemetry at once when it
    joined an alert of the rules or one already opened at its place (within the window).
    Joining an alert that opened longer than the window before earns nothing: the page
    shows offline devices to everyone, and reporting them is not news."""
    store = sentinel_store(request)
    unit_kind = None
    if unit is not None and device_id is not None:
        spec = read.catalog.devices.get(device_id)
        unit_kind = "port" if spec is not None and spec.kind == "pile" else "slot"
    now = read.clock_ms()
    report = await asyncio.to_thread(
        store.add_report, rider.id if rider else None, alert.station_id, device_id, unit,
        unit_kind, category, text, alert.id, now,
    )  # fmt: skip
    config = read.alerts_config
    if alert.rule != "rider_report" and config is not None:
        window_ms = config.sentinels.confirm_window_s * 1000
        decide = functools.partial(
            store.decide, report.id, "confirmed", now, confirmed_by_alert=alert.id,
            points=_points(read, category), known=now - alert.opened_at_ms > window_ms,
        )  # fmt: skip
        report = await asyncio.to_thread(decide)
    elif await settle(request, read, [report]):
        settled = await asyncio.to_thread(store.report, report.id)
        report = settled if settled is not None else report
    return report


async def settle(request: Request, read: ReadSide, reports: list[Report]) -> bool:
    """Decide what telemetry decides of ``reports`` that are pending: confirmed by an
    alert of the rules at their place within the window, expired once the window passed
    without one. True when any changed."""
    pending = [r for r in reports if r.outcome == "pending"]
    config = read.alerts_config
    if config is None or not pending:
        return False
    store = sentinel_store(request)
    window_ms = int(config.sentinels.confirm_window_s * 1000)
    now = read.clock_ms()
    by_station: dict[str, list[Report]] = defaultdict(list)
    for r in pending:
        by_station[r.station_id].append(r)
    changed = False
    for station, group in by_station.items():
        since = min(r.at_ms for r in group) - window_ms
        try:
            alerts = await read.alerts(
                AlertQuery(station=station, since_ms=since, limit=ALERTS_PER_SETTLE)
            )
        except StoreError as exc:  # the alert store is out: they stay pending, for now
            log.warning("sentinels: cannot settle reports at %s: %s", station, exc)
            continue
        for r in group:
            found = confirming_alert(r, alerts, window_ms)
            try:
                if found is not None:
                    decide = functools.partial(
                        store.decide, r.id, "confirmed", now, confirmed_by_alert=found.id,
                        points=_points(read, r.category),
                    )  # fmt: skip
                    await asyncio.to_thread(decide)
                    changed = True
                elif now - r.at_ms > window_ms:
                    await asyncio.to_thread(store.decide, r.id, "expired", now)
                    changed = True
            except Conflict:
                changed = True  # decided meanwhile (another request, a maintainer)
    return changed


async def _settled_reports(request: Request, **query: Any) -> list[Report]:
    store = sentinel_store(request)
    reports = await asyncio.to_thread(lambda: store.reports(**query))
    if await settle(request, get_read(request), reports):
        reports = await asyncio.to_thread(lambda: store.reports(**query))
    return reports


async def _rider_out(request: Request, rider: Rider, cursor: int | None, limit: int, *,
                     private: bool) -> RiderOut:  # fmt: skip
    store = sentinel_store(request)
    await _settled_reports(request, rider_id=rider.id, outcome="pending", limit=500)
    balance = await asyncio.to_thread(store.balance, rider.id)
    entries = await asyncio.to_thread(store.ledger, rider.id, cursor, limit)
    return RiderOut(
        rider_id=rider.id,
        nickname=rider.nickname,
        station_id=rider.station_id,
        registered_at=rfc3339(rider.created_at_ms) or "",
        points=balance,
        ledger=[entry_out(e, private=private) for e in entries],
        next_cursor=entries[-1].id if len(entries) == limit else None,
    )


# -- riders --------------------------------------------------------------------------------


class RiderIn(BaseModel):
    station_id: Annotated[str, Field(max_length=64, description="where the rider registers")]
    nickname: Annotated[
        str, Field(min_length=1, max_length=100, description="1-24 characters, no phone number")
    ]


def _register_limit(request: Request, read: ReadSide) -> RateLimiter:
    from api.routes.reports import RateLimiter  # here: reports imports this module

    limiter: RateLimiter | None = getattr(request.app.state, "register_limit", None)
    if limiter is None:
        config = read.alerts_config
        opts = config.sentinels if config is not None else None
        burst, per_hour = (opts.register_burst, opts.register_per_hour) if opts else (10, 30.0)
        limiter = request.app.state.register_limit = RateLimiter(burst, per_hour)
    return limiter


@router.post(
    "/riders",
    openapi_extra=SMALL_BODY,
    **answers(RiderCreated, 400, 404, 413, 422, 429, 503, status=201),
)
async def register(
    request: Request, response: Response, read: ReadDep, body: RiderIn
) -> RiderCreated:
    """Register a rider at a station: the answer's ``token`` is shown this once (only its
    hash is kept). No phone numbers or names: a nickname that looks like one is refused."""
    _private(response)
    if read.catalog.stations.get(body.station_id) is None:
        raise NotFound("station", body.station_id)
    problem = nickname_problem(body.nickname)
    if problem is not None:
        raise RequestValidationError(
            [{"loc": ("body", "nickname"), "msg": problem, "type": "value_error"}]
        )
    client = request.client.host if request.client is not None else "unknown"
    limiter = _register_limit(request, read)
    now = time.monotonic()
    wait = limiter.wait(client, now)
    if wait > 0:
        raise HTTPException(
            429, "too many registrations from this address; try again later",
            headers={"Retry-After": str(int(wait) + 1)},
        )  # fmt: skip
    limiter.take(client, now)
    store = sentinel_store(request)
    rider, token = await asyncio.to_thread(
        store.register, body.station_id, body.nickname, time.time_ns() // 1_000_000
    )
    return RiderCreated(
        rider_id=rider.id,
        nickname=rider.nickname,
        station_id=rider.station_id,
        registered_at=rfc3339(rider.created_at_ms) or "",
        token=token,
    )


@router.get("/riders/me", **answers(RiderOut, 401, 422, 503))
async def me(request: Request, response: Response, rider: RiderDep, cursor: Cursor = None,
             limit: Limit = 100) -> RiderOut:  # fmt: skip
    """The rider's points: the balance (the ledger's sum) and the ledger, newest first."""
    _private(response)
    return await _rider_out(request, rider, cursor, limit, private=False)


@router.get("/riders/me/reports", **answers(ReportsOut, 401, 422, 503))
async def my_reports(request: Request, response: Response, rider: RiderDep,
                     cursor: Cursor = None, limit: Limit = 100) -> ReportsOut:  # fmt: skip
    """The rider's reports, newest first, each with its outcome and the points it earned."""
    _private(response)
    reports = await _settled_reports(request, rider_id=rider.id, before_id=cursor, limit=limit)
    return ReportsOut(
        reports=[report_out(r, private=False) for r in reports],
        next_cursor=reports[-1].id if len(reports) == limit else None,
    )


@router.get("/riders/{rider_id}", **answers(RiderOut, 401, 404, 422, 503))
async def rider_detail(request: Request, response: Response, key: Maintainer,
                       rider_id: RiderId, cursor: Cursor = None,
                       limit: Limit = 100) -> RiderOut:  # fmt: skip
    """A rider's points and ledger, for maintainers (the actors by name)."""
    _private(response)
    rider = await asyncio.to_thread(sentinel_store(request).rider, rider_id)
    if rider is None:
        raise NotFound("rider", rider_id)
    return await _rider_out(request, rider, cursor, limit, private=True)


# -- maintainers ---------------------------------------------------------------------------


@router.get("/reports", **answers(ReportsOut, 401, 422, 503))
async def list_reports(
    request: Request,
    response: Response,
    key: Maintainer,
    rider: Annotated[str | None, Query(pattern=r"^[0-9a-f]{8}$")] = None,
    outcome: Annotated[str | None, Query(description=", ".join(OUTCOMES))] = None,
    station: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> ReportsOut:
    """Rider reports (anonymous ones too), newest first, with their rider and outcome."""
    _private(response)
    if outcome is not None and outcome not in OUTCOMES:
        raise RequestValidationError(
            [{"loc": ("query", "outcome"), "msg": f"one of {', '.join(OUTCOMES)}",
              "type": "value_error"}]
        )  # fmt: skip
    query = {"rider_id": rider, "outcome": outcome, "station_id": station, "before_id": cursor}
    reports = await _settled_reports(request, **query, limit=limit)
    return ReportsOut(
        reports=[report_out(r, private=True) for r in reports],
        next_cursor=reports[-1].id if len(reports) == limit else None,
    )


class DecisionIn(BaseModel):
    note: Annotated[str | None, Field(max_length=500, description="shown to the rider")] = None


class ReverseIn(BaseModel):
    reason: Annotated[
        str, Field(min_length=1, max_length=500, description="why: kept in the ledger")
    ]


async def _decide(
    request: Request, key: Any, report_id: int, outcome: str, body: DecisionIn | None
) -> ReportOut:
    store = sentinel_store(request)
    read = get_read(request)
    report = await asyncio.to_thread(store.report, report_id)
    if report is None:
        raise NotFound("report", str(report_id))
    await settle(request, read, [report])  # telemetry may have decided it already
    note = plain_text(body.note) if body is not None and body.note else None
    points = _points(read, report.category)
    now = read.clock_ms()
    try:
        decided = await asyncio.to_thread(
            lambda: store.decide(
                report_id, outcome, now, actor=key.name, role=key.role, note=note,  # type: ignore[arg-type]
                points=points if outcome == "confirmed" else 0,
                allowed=("pending", "expired"),
            )
        )  # fmt: skip
    except SentinelNotFound:
        raise NotFound("report", str(report_id)) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    action = "report.confirm" if outcome == "confirmed" else "report.reject"
    await audit(
        request, key.actor, action, str(report_id),
        rider=decided.rider_id, points=decided.points, note_chars=len(note or ""),
    )  # fmt: skip
    return report_out(decided, private=True)


@router.post(
    "/reports/{report_id}/confirm",
    openapi_extra=SMALL_BODY,
    **answers(ReportOut, 400, 401, 404, 409, 413, 422, 503),
)
async def confirm(request: Request, key: Maintainer, report_id: ReportId,
                  body: DecisionIn | None = None) -> ReportOut:  # fmt: skip
    """Confirm a pending or expired report: its rider earns the category's points, once
    per incident. 409 when it is confirmed or rejected already."""
    return await _decide(request, key, report_id, "confirmed", body)


@router.post(
    "/reports/{report_id}/reject",
    openapi_extra=SMALL_BODY,
    **answers(ReportOut, 400, 401, 404, 409, 413, 422, 503),
)
async def reject(request: Request, key: Maintainer, report_id: ReportId,
                 body: DecisionIn | None = None) -> ReportOut:  # fmt: skip
    """Reject a pending or expired report: it earns nothing, and telemetry no longer
    confirms it. A confirmed report's points are taken back by reversing its entry."""
    return await _decide(request, key, report_id, "rejected", body)


@router.post(
    "/points/{entry_id}/reverse",
    openapi_extra=SMALL_BODY,
    **answers(EntryOut, 400, 401, 404, 409, 413, 422, 503, status=201),
)
async def reverse(request: Request, key: Maintainer, entry_id: EntryId,
                  body: ReverseIn) -> EntryOut:  # fmt: skip
    """Take back an award: a negative entry with the reason, once per award; in the audit
    log. 409 for an entry reversed already, or one that is itself a reversal."""
    reason = plain_text(body.reason)
    if not reason:
        raise RequestValidationError(
            [{"loc": ("body", "reason"), "msg": "say why", "type": "value_error"}]
        )
    store = sentinel_store(request)
    now = time.time_ns() // 1_000_000
    try:
        entry = await asyncio.to_thread(store.reverse, entry_id, reason, now, key.name, key.role)
    except SentinelNotFound:
        raise NotFound("ledger entry", str(entry_id)) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    await audit(
        request, key.actor, "points.reverse", str(entry_id),
        rider=entry.rider_id, delta=entry.delta, reason_chars=len(reason),
    )  # fmt: skip
    return entry_out(entry, private=True)
