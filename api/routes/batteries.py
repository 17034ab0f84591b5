"""Maintainers' battery passports (ingest.passports): one pack's passport, the list of
packs (flagged ones first of all), and clearing a flag with a note. Every route needs a
maintainer key; the actor of a clearance is the key's owner, and it is in the audit log.
Serials never appear in public answers (api.views.PRIVATE_SLOT_FIELDS)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from api.audit import audit
from api.auth import KeyFirstRoute, Maintainer
from api.deps import ActionsDep, ReadDep
from api.errors import NotFound
from api.limits import KiB, body_max
from api.schemas import answers
from api.views import rfc3339
from ingest.readside import SERIAL_PATTERN, ReadSide

router = APIRouter(prefix="/v1", tags=["batteries"], route_class=KeyFirstRoute)

Serial = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=SERIAL_PATTERN,
        description="1 to 64 printable ASCII characters",
    ),
]
SMALL_BODY = body_max(16 * KiB)  # a note of 2,000 characters is at most 12 KiB of JSON


class Place(BaseModel):
    device_id: str
    station_id: str | None
    slot: int
    since: str | None


class Stay(BaseModel):
    device_id: str
    slot: int
    since: str | None
    until: str | None = Field(description="null while the pack is there")


class SafetyEvent(BaseModel):
    kind: str = Field(
        description="temperature_rise, temperature_high, a fault code (battery_fault,"
        " thermal_runaway, over_temperature, smoke), or appeared (a flagged pack in a slot)"
    )
    alert_id: int | None
    at: str | None
    device_id: str | None
    slot: int | None
    detail: str | None


class Clearance(BaseModel):
    at: str | None
    by: str
    key_id: str
    note: str
    flagged_at: str | None
    flag_reason: str | None


class BatterySummary(BaseModel):
    serial: str
    flagged: bool
    flagged_at: str | None
    flag_reason: str | None
    max_temp_c: float | None
    max_rise_c_per_min: float | None
    first_seen: str | None
    current: Place | None = Field(description="where the pack is now; null: in no slot")


class Passport(BatterySummary):
    stays: list[Stay] = Field(description="newest first (at most 200)")
    events: list[SafetyEvent] = Field(description="newest first (at most 200)")
    clearances: list[Clearance] = Field(description="newest first")


class BatteryPage(BaseModel):
    batteries: list[BatterySummary]
    next_cursor: str | None = Field(description="pass as cursor for the next page")


class ClearIn(BaseModel):
    note: Annotated[str, Field(min_length=1, max_length=2000, description="why it is safe")]


def _summary(read: ReadSide, row: dict[str, Any]) -> dict[str, Any]:
    current = None
    if row["device_id"] is not None:
        spec = read.catalog.devices.get(row["device_id"])
        current = {
            "device_id": row["device_id"],
            "station_id": spec.station_id if spec is not None else None,
            "slot": row["slot"],
            "since": rfc3339(row["since_ms"]),
        }
    return {
        "serial": row["serial"],
        "flagged": row["flagged"],
        "flagged_at": rfc3339(row["flagged_at_ms"]),
        "flag_reason": row["flag_reason"],
        "max_temp_c": row["max_temp_c"],
        "max_rise_c_per_min": row["max_rise_c_per_min"],
        "first_seen": rfc3339(row["first_seen_ms"]),
        "current": current,
    }


async def _passport(read: ReadSide, serial: str) -> Passport:
    row = await read.battery(serial)
    if row is None:
        raise NotFound("battery", serial)
    return Passport(
        **_summary(read, row),
        stays=[
            Stay(
                device_id=s["device_id"],
                slot=s["slot"],
                since=rfc3339(s["from_ms"]),
                until=rfc3339(s["to_ms"]),
            )
            for s in row["stays"]
        ],
        events=[
            SafetyEvent(
                kind=e["kind"],
                alert_id=e["alert_id"],
                at=rfc3339(e["at_ms"]),
                device_id=e["device_id"],
                slot=e["slot"],
                detail=e["detail"],
            )
            for e in row["events"]
        ],
        clearances=[
            Clearance(
                at=rfc3339(c["at_ms"]),
                by=c["actor_name"],
                key_id=c["actor_id"],
                note=c["note"],
                flagged_at=rfc3339(c["flagged_at_ms"]),
                flag_reason=c["flag_reason"],
            )
            for c in row["clearances"]
        ],
    )


@router.get("/batteries", **answers(BatteryPage, 401, 422, 503))
async def list_batteries(
    read: ReadDep,
    key: Maintainer,
    flagged: Annotated[bool | None, Query(description="true: flagged only; false: others")] = None,
    cursor: Annotated[
        str | None,
        Query(min_length=1, max_length=64, pattern=SERIAL_PATTERN, description="next_cursor"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> BatteryPage:
    """Packs ever seen, by serial; ``next_cursor`` pages on."""
    rows = await read.batteries(flagged=flagged, after=cursor, limit=limit)
    return BatteryPage(
        batteries=[BatterySummary(**_summary(read, r)) for r in rows],
        next_cursor=rows[-1]["serial"] if len(rows) == limit else None,
    )


@router.get("/batteries/{serial}", **answers(Passport, 401, 404, 422, 503))
async def battery(read: ReadDep, key: Maintainer, serial: Serial) -> Passport:
    """One pack's passport: where it is, where it has been, its safety events."""
    return await _passport(read, serial)


@router.post(
    "/batteries/{serial}/clear",
    openapi_extra=SMALL_BODY,
    **answers(Passport, 400, 401, 404, 409, 413, 422, 503),
)
async def clear(
    request: Request,
    read: ReadDep,
    actions: ActionsDep,
    key: Maintainer,
    serial: Serial,
    body: ClearIn,
) -> Passport:
    """Clear the pack's flag with a note (recorded with who cleared it). It counts as a
    ready battery again; its next safety event flags it again."""
    actor = key.actor
    if not await actions.clear_battery(serial, actor.id, actor.name, body.note):
        await _passport(read, serial)  # 404 when never seen
        raise HTTPException(409, f"battery {serial!r} is not flagged")
    await audit(request, actor, "battery.clear", serial, chars=len(body.note))
    return await _passport(read, serial)
