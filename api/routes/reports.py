"""Riders' hazard reports ("sentinels"): public, rate-limited per client, text kept as
plain text (control characters dropped, length limited, never rendered as markup)."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from api.deps import IngestDep
from api.errors import NotFound
from api.limits import KiB, body_max
from api.routes.alerts import engine_of
from ingest.alerts.engine import REPORT_CATEGORIES

router = APIRouter(prefix="/v1", tags=["riders"])

_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
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
    """Token bucket per client: ``burst`` at once, then ``per_hour``."""

    def __init__(self, burst: int, per_hour: float) -> None:
        self.burst = burst
        self.rate = per_hour / 3600
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str, now: float) -> float:
        """0 when allowed, else the seconds until the next report is."""
        tokens, at = self.buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1, now)
        while len(self.buckets) > _BUCKETS_MAX:
            del self.buckets[next(iter(self.buckets))]
        return 0.0


def _limiter(request: Request, burst: int, per_hour: float) -> RateLimiter:
    limiter: RateLimiter | None = getattr(request.app.state, "report_limiter", None)
    if limiter is None:
        limiter = request.app.state.report_limiter = RateLimiter(burst, per_hour)
    return limiter


@router.post("/reports", status_code=201, openapi_extra=body_max(64 * KiB))
async def report(request: Request, ingest: IngestDep, body: ReportIn) -> dict[str, Any]:
    """Report a hazard: attaches to the matching open alert, or opens a ``rider_report``."""
    engine = engine_of(ingest)
    opts = engine.config.reports
    text = _CONTROL.sub("", body.text).strip()
    if len(text) > opts.text_max:
        raise _invalid("text", f"at most {opts.text_max} characters")
    station = ingest.catalog.stations.get(body.station)
    if station is None:
        raise NotFound("station", body.station)
    if body.port is not None and body.slot is not None:
        raise _invalid("slot", "give a port or a slot, not both")
    unit = body.port if body.port is not None else body.slot
    if body.device is not None:
        device = ingest.catalog.devices.get(body.device)
        if device is None or device.station_id != station.id:
            raise NotFound("device at this station", body.device)
        if unit is not None:
            want = "port" if device.kind == "pile" else "slot"
            given = "port" if body.port is not None else "slot"
            if want != given or unit > device.spec.units:
                raise _invalid(given, f"{device.id} has {want}s 1..{device.spec.units}")
    elif unit is not None:
        raise _invalid("device", "a port or slot needs its device")
    client = request.client.host if request.client is not None else "unknown"
    wait = _limiter(request, opts.burst, opts.per_hour).take(client, time.monotonic())
    if wait > 0:
        raise HTTPException(
            429, "too many reports from this client", headers={"Retry-After": str(int(wait) + 1)}
        )
    assert body.category in REPORT_CATEGORIES
    alert, attached = await engine.report(station.id, body.device, unit, body.category, text)
    return {"alert_id": alert.id, "attached": attached, "severity": alert.severity}
