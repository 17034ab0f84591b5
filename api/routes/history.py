"""History from either store: a device's downsampled series, a station's utilization and
its "best time to come" forecast.

``from``/``to`` are RFC 3339 (or epoch ms) and default to the last 24 hours (``end`` is the
old name of ``to``, still read); ``every`` is a bucket length (``300``, ``90s``, ``5m``,
``1h``, ``1d``; 1 s to 366 d), by default about 200 buckets.
A bucket shows the last status in it ("aggregation": "last"), held over later empty buckets
while the device is alive; events and online changes are listed as they happened.

Public history has no battery serials and no session ids (``battery_in``/``battery_out``
with their time and station would link one rider's swaps across stations): those fields
are left out of ``changes``, where a field is absent whenever there is nothing to say. A
maintainer or admin key gets them.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections import defaultdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from api.caching import cached_json
from api.deps import ReadDep
from api.errors import NotFound, invalid_query
from api.forecast import DEFAULT_WEEKS, StatsDep
from api.routes.riders import PUBLIC_VARY, audience, parse_time
from api.schemas import DeviceHistory, Forecast, Utilization, answers
from api.series import HOLD_MAX_MS, Held, counts, grid, load, sum_at
from api.views import rfc3339
from ingest.readside import ReadSide, now_ms
from ingest.store import HistoryStore, RollupStore

router = APIRouter(prefix="/v1", tags=["history"])

MAX_POINTS = 2000
HOUR_MS = 3_600_000
DEFAULT_SPAN_MS = 24 * 3600 * 1000
_EVERY = re.compile(r"^(\d+)(ms|s|m|h|d)?$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NICE_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
PRIVATE_EVENT_FIELDS = frozenset({"session", "battery_out", "battery_in"})
EVENT_FIELDS = (
    "code", "port", "slot", "value", "info", "session", "energy_wh",
    "slot_out", "battery_out", "soc_out", "slot_in", "battery_in", "soc_in", "cmd", "result",
)  # fmt: skip

FromQ = Annotated[str | None, Query(alias="from", description="RFC 3339; default to - 24 h")]
ToQ = Annotated[str | None, Query(description="RFC 3339; default now")]
EndQ = Annotated[str | None, Query(description="the old name of `to`", deprecated=True)]
EveryQ = Annotated[str | None, Query(description="bucket: 300, 90s, 5m, 1h, 1d; at most 366 d")]
EVERY_MAX_MS = 366 * 86_400_000


def window(
    start: str | None, to: str | None, every: str | None, *, end: str | None = None
) -> tuple[int, int, int]:
    """(since, until, step) in epoch ms. ``end`` is the first name of ``to``, still read."""
    field = "to"
    if end is not None:
        if to is not None and to != end:
            raise invalid_query("end", "the old name of 'to': give one of them")
        to, field = end, "end"
    until = parse_time(field, to) or now_ms()
    since = parse_time("from", start)
    if since is None:
        since = max(0, until - DEFAULT_SPAN_MS)
    if since >= until:
        raise invalid_query("from", f"must be before '{field}'")
    if every is None:
        want_s = (until - since) / 1000 / 200
        step = next((n for n in _NICE_S if n >= want_s), _NICE_S[-1]) * 1000
    else:
        m = _EVERY.match(every.strip())
        if m is None or len(m[1]) > 12:
            raise invalid_query("every", f"{every[:40]!r}: use seconds or 90s, 5m, 1h, 1d")
        step = int(m[1]) * _UNIT_MS[m[2] or "s"]
        if not 1000 <= step <= EVERY_MAX_MS:
            raise invalid_query("every", "from 1 s to 366 d")
    if (until - since) / step > MAX_POINTS:
        raise invalid_query("every", f"more than {MAX_POINTS} buckets; choose a longer one")
    return since, until, step


def _store(read: ReadSide) -> HistoryStore:
    if read.history is None:
        raise NotFound("history store", "(not started)")
    return read.history


def _event(row: dict[str, Any], fields: tuple[str, ...] = EVENT_FIELDS) -> dict[str, Any]:
    data = load(row["payload"])
    kind = row["type"] if row["type"] != "event" else data.get("type")
    out: dict[str, Any] = {"t": rfc3339(row["ts_ms"]), "device_id": row["device_id"], "type": kind}
    if row["type"] == "event":
        out.update({k: data[k] for k in fields if data.get(k) is not None})
    return out


PUBLIC_EVENT_FIELDS = tuple(f for f in EVENT_FIELDS if f not in PRIVATE_EVENT_FIELDS)


def device_history(
    store: HistoryStore,
    read: ReadSide,
    device_id: str,
    since: int,
    until: int,
    every: int,
    *,
    public: bool,
) -> dict[str, Any]:
    """``public``: without the private fields of events (``PRIVATE_EVENT_FIELDS``)."""
    device = read.catalog.devices[device_id]
    release = float(device.spec.release_soc or read.release_soc)
    samples = store.status_samples([device_id], since, until, every)
    happenings = store.happenings([device_id], since, until, 10_000)
    points = []
    for row in samples:
        c = counts(load(row["payload"]), release, row["bucket_ms"])
        point: dict[str, Any] = {
            "t": rfc3339(row["bucket_ms"]),
            "reported_at": rfc3339(c.ts_ms),
            "power_w": c.power_w,
            "energy_wh": c.energy_wh,
            "temp_c": c.temp_c,
            "states": c.states,
            "faults": list(c.faults),
        }
        if device.kind == "pile":
            point.update(ports_free=c.free, ports_busy=c.busy, voltage_v=c.voltage_v)
        else:
            point.update(batteries_ready=c.free, batteries_charging=c.busy, soc_mean=c.soc_mean)
        points.append(point)
    return {
        "device_id": device_id,
        "kind": device.kind,
        "station_id": device.station_id,
        "from": rfc3339(since),
        "to": rfc3339(until),
        "every_s": every / 1000,
        "aggregation": "last",
        "points": points,
        "changes": [_event(r, PUBLIC_EVENT_FIELDS if public else EVENT_FIELDS) for r in happenings],
    }


def _rolled_points(
    store: RollupStore, station_id: str, ends: list[int], every: int, ports_total: int
) -> dict[int, dict[str, Any]]:
    """Points of the buckets ending at ``ends`` from the station's hourly rollups: means
    over each bucket's minutes (free ports / ready batteries within opening hours) and the
    bucket's energy, sessions and swaps."""
    if not ends:
        return {}
    rows = store.rollups("station", [station_id], ends[0] - every, ends[-1])
    by_hour = {r["hour_ms"]: r["data"] for r in rows}
    points: dict[int, dict[str, Any]] = {}
    for t in ends:
        hours = [by_hour[h] for h in range(t - every, t, HOUR_MS) if h in by_hour]
        if not hours:
            continue
        minutes = 60 * len(hours)

        def total(key: str, hours: list[dict[str, Any]] = hours) -> float:
            return float(sum(h.get(key, 0) for h in hours))

        busy = total("busy_port_minutes") / minutes
        points[t] = {
            "devices_reporting": round(total("minutes_online") / minutes),
            "ports_busy": round(busy),
            "ports_free": round(total("port_minutes") / minutes),
            "utilization": round(busy / ports_total, 3) if ports_total else None,
            "batteries_ready": round(total("battery_minutes") / minutes),
            "batteries_charging": round(total("charging_slot_minutes") / minutes),
            "energy_wh": round(total("energy_wh"), 1),
            "sessions_started": int(total("sessions")),
            "sessions_ended": int(total("sessions_ended")),
            "swaps": int(total("swaps")),
            "from_rollups": True,
        }
    return points


def station_utilization(
    store: HistoryStore, read: ReadSide, station_id: str, since: int, until: int, every: int
) -> dict[str, Any]:
    station = read.catalog.stations[station_id]
    ids = [d.id for d in station.devices]
    release = {d.id: float(d.release_soc or read.release_soc) for d in station.devices}
    # statuses from before the window stand at its start (up to the hold limit)
    lead = HOLD_MAX_MS
    samples = store.status_samples(ids, since - lead, until, every)
    happenings = store.happenings(ids, since - lead, until)
    held = Held(samples, happenings, release, every)
    per_bucket: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in happenings:
        if row["type"] != "event" or row["ts_ms"] < since:
            continue
        data = load(row["payload"])
        end = row["ts_ms"] - row["ts_ms"] % every + every
        bucket = per_bucket[end]
        if data.get("type") == "session_started":
            bucket["sessions_started"] += 1
        elif data.get("type") == "session_ended":
            bucket["sessions_ended"] += 1
            bucket["energy_wh"] += float(data.get("energy_wh") or 0)
        elif data.get("type") == "swap":
            bucket["swaps"] += 1
    points = []
    ports_total = sum(d.units for d in station.devices if d.kind == "pile")
    # buckets of whole hours that end before the raw history kept: from the hourly rollups
    rolled: dict[int, dict[str, Any]] = {}
    if isinstance(store, RollupStore) and every % HOUR_MS == 0:
        raw_from = now_ms() - round(read.history_days * 86_400_000)
        old = [t for t in grid(since, until, every) if t <= raw_from and t % every == 0]
        rolled = _rolled_points(store, station_id, old, every, ports_total)
    for t in grid(since, until, every):
        if t in rolled:
            points.append({"t": rfc3339(t - every), "at": rfc3339(t), **rolled[t]})
            continue
        present = sum_at(held, ids, t)
        piles = [c for c in present if c.kind == "pile"]
        cabinets = [c for c in present if c.kind == "cabinet"]
        ev = per_bucket.get(t, {})
        points.append(
            {
                "t": rfc3339(t - (t - 1) % every - 1),
                "at": rfc3339(t),
                "devices_reporting": len(present),
                "ports_busy": sum(c.busy for c in piles),
                "ports_free": sum(c.free for c in piles),
                "utilization": (
                    round(sum(c.busy for c in piles) / ports_total, 3) if ports_total else None
                ),
                "batteries_ready": sum(c.free for c in cabinets),
                "batteries_charging": sum(c.busy for c in cabinets),
                "energy_wh": round(ev.get("energy_wh", 0.0), 1),
                "sessions_started": int(ev.get("sessions_started", 0)),
                "sessions_ended": int(ev.get("sessions_ended", 0)),
                "swaps": int(ev.get("swaps", 0)),
            }
        )
    return {
        "station_id": station_id,
        "from": rfc3339(since),
        "to": rfc3339(until),
        "every_s": every / 1000,
        "ports_total": ports_total,
        "slots_total": sum(d.units for d in station.devices if d.kind == "cabinet"),
        "method": (
            "counts at the end of each bucket (each device's last status held until its next"
            " one or its death); energy_wh, sessions and swaps from events within the bucket"
            " (energy of sessions that ended in it). Buckets of whole hours older than the"
            " raw history kept (from_rollups: true): means over the bucket's minutes from the"
            " hourly rollups, free ports / ready batteries within opening hours"
        ),
        "points": points,
    }


@router.get("/devices/{device_id}/history", **answers(DeviceHistory, 304, 401, 404, 422, 503))
async def device_history_route(
    request: Request,
    read: ReadDep,
    device_id: str,
    start: FromQ = None,
    to: ToQ = None,
    every: EveryQ = None,
    end: EndQ = None,
) -> Response:
    """Downsampled power, energy, temperature, soc and states; events and online changes."""
    if device_id not in read.catalog.devices:
        raise NotFound("device", device_id)
    private = await audience(request, max_age_s=10)
    since, until, step = window(start, to, every, end=end)
    body = await asyncio.to_thread(
        functools.partial(device_history, public=private is None),
        _store(read), read, device_id, since, until, step,
    )  # fmt: skip
    return cached_json(request, body, max_age_s=10, headers=private or PUBLIC_VARY)


@router.get("/stations/{station_id}/utilization", **answers(Utilization, 304, 404, 422, 503))
async def utilization_route(
    request: Request,
    read: ReadDep,
    station_id: str,
    start: FromQ = None,
    to: ToQ = None,
    every: EveryQ = None,
    end: EndQ = None,
) -> Response:
    """Busy ports, ready batteries, energy delivered and swaps per bucket."""
    if station_id not in read.catalog.stations:
        raise NotFound("station", station_id)
    since, until, step = window(start, to, every, end=end)
    body = await asyncio.to_thread(
        station_utilization, _store(read), read, station_id, since, until, step
    )
    return cached_json(request, body, max_age_s=10)


@router.get("/stations/{station_id}/forecast", **answers(Forecast, 304, 404, 422, 503))
async def forecast_route(
    request: Request,
    read: ReadDep,
    stats: StatsDep,
    station_id: str,
    weeks: Annotated[int, Query(ge=1, le=12)] = DEFAULT_WEEKS,
) -> Response:
    """Expected free ports / ready batteries by local hour (and weekday), with sample sizes."""
    spec = read.catalog.stations.get(station_id)
    if spec is None:
        raise NotFound("station", station_id)
    result = await asyncio.to_thread(
        stats.get, _store(read), read.catalog, spec, now_ms(), weeks, read.release_soc
    )
    return cached_json(request, result.forecast, max_age_s=60)
