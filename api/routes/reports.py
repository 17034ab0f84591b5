"""Riders' hazard reports ("sentinels"): public, rate-limited per client address, per
station and in total, text kept as plain text (``plain_text``: control, format and
bidi characters dropped, so a report cannot reorder or hide what a maintainer reads; length
limited; never rendered as markup). The client address is the peer's, or the one a configured proxy
forwards (``trusted_proxies``): a client cannot choose its own bucket."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from api.deps import ActionsDep, ReadDep
from api.errors import NotFound
from api.limits import KiB, body_max
from api.routes.alerts import alerts_config
from api.routes.sentinels import optional_rider, record_report
from api.schemas import ReportAccepted, answers
from api.text import plain_text
from ingest.alerts.config import ReportOptions
from ingest.alerts.model import REPORT_CATEGORIES

router = APIRouter(prefix="/v1", tags=["riders"])


_BUCKETS_MAX = 10_000  # distinct clients remembered; the oldest are forgotten first


class ReportIn(BaseModel):
    station: Annotated[str, Field(max_length=64)]
    device: Annotated[str | None, Field(max_length=64)] = None
    port: Annotated[int | None, Field(ge=1, le=256)] = None
    slot: Annotated[int | None, Field(ge=1, le=256)] = None
    category: Literal["smoke", "fire", "water", "heat", "damage", "not_working", "blocked", "other"]
    text: Annotated[str, Field(max_length=20_000)] = ""


def _invalid(field: str, problem: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": problem, "type": "value_error"}])


class RateLimiter:
    """Token bucket per key: ``burst`` at once, then ``per_hour``."""

    def __init__(self, burst: int, per_hour: float) -> None:
        self.burst = burst
        self.rate = per_hour / 3600
        self.buckets: dict[str, tuple[float, float]] = {}

    def wait(self, key: str, now: float) -> float:
        """0 when one more is allowed now, else the seconds until it is."""
        tokens, at = self.buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def take(self, key: str, now: float) -> None:
        tokens, at = self.buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        self.buckets[key] = (tokens - 1, now)
        while len(self.buckets) > _BUCKETS_MAX:
            del self.buckets[next(iter(self.buckets))]


class ReportLimits:
    """Per client address, per station and for the whole service: a report passes only
    when all three allow it, and only then takes from each."""

    def __init__(self, opts: ReportOptions) -> None:
        self.rider = RateLimiter(opts.rider_burst, opts.rider_per_hour)
        self.client = RateLimiter(opts.burst, opts.per_hour)
        self.station = RateLimiter(opts.station_burst, opts.station_per_hour)
        self.total = RateLimiter(opts.total_burst, opts.total_per_hour)

    def take(self, client: str, station: str, now: float, rider: str | None = None) -> None:
        """Take one report, or raise 429 saying which limit and when to come back. A
        registered rider's report also takes from the rider's own bucket."""
        riders = [(self.rider, rider)] if rider is not None else []
        for limiter, key, why in (
            *((r, k, "too many reports from this rider") for r, k in riders),
            (self.client, client, "too many reports from this client"),
            (
                self.station,
                station,
                "many reports about this station already; they are with its maintainers",
            ),
            (self.total, "", "too many reports right now; try again later"),
        ):
            wait = limiter.wait(key, now)
            if wait > 0:
                raise HTTPException(429, why, headers={"Retry-After": str(int(wait) + 1)})
        for limiter, key in (
            *riders,
            (self.client, client),
            (self.station, station),
            (self.total, ""),
        ):
            limiter.take(key, now)


def _limits(request: Request, opts: ReportOptions) -> ReportLimits:
    limits: ReportLimits | None = getattr(request.app.state, "report_limits", None)
    if limits is None:
        limits = request.app.state.report_limits = ReportLimits(opts)
    return limits


@router.post(
    "/reports",
    openapi_extra=body_max(64 * KiB),
    **answers(ReportAccepted, 400, 401, 404, 413, 422, 429, 503, status=201),
)
async def report(
    request: Request, read: ReadDep, actions: ActionsDep, body: ReportIn
) -> dict[str, Any]:
    """Report a hazard: attaches to the matching open alert, or opens a ``rider_report``.
    With ``Authorization: Rider <token>`` it is that rider's (``/v1/riders/me/reports``);
    a token that admits no one is refused (401), never taken for anonymous."""
    rider = await optional_rider(request)
    opts = alerts_config(read).reports
    text = plain_text(body.text)
    if len(text) > opts.text_max:
        raise _invalid("text", f"at most {opts.text_max} characters")
    station = read.catalog.stations.get(body.station)
    if station is None:
        raise NotFound("station", body.station)
    if body.port is not None and body.slot is not None:
        raise _invalid("slot", "give a port or a slot, not both")
    unit = body.port if body.port is not None else body.slot
    if body.device is not None:
        device = read.catalog.devices.get(body.device)
        if device is None or device.station_id != station.id:
            raise NotFound("device at this station", body.device)
        if unit is not None:
            want = "port" if device.kind == "pile" else "slot"
            given = "port" if body.port is not None else "slot"
            if want != given or unit > device.spec.units:
                raise _invalid(given, f"{device.id} has {want}s 1..{device.spec.units}")
    elif unit is not None:
        raise _invalid("device", "a port or slot needs its device")
    # the peer's address, or X-Forwarded-For's when the peer is a configured proxy
    client = request.client.host if request.client is not None else "unknown"
    _limits(request, opts).take(
        client, station.id, time.monotonic(), rider.id if rider is not None else None
    )
    assert body.category in REPORT_CATEGORIES
    alert, attached = await actions.report(station.id, body.device, unit, body.category, text)
    kept = await record_report(
        request, read, rider, alert, device_id=body.device, unit=unit,
        category=body.category, text=text,
    )  # fmt: skip
    return {
        "alert_id": alert.id,
        "attached": attached,
        "severity": alert.severity,
        # the report's own record: outcome and points at /v1/riders/me/reports
        "report_id": kept.id,
        "outcome": kept.outcome,
        "points": kept.points,
    }
