"""JSON views of stations and devices, computed from the twins at one instant ``now_ms``.

Honesty rules: a device is online only per contract v1 (latest state online AND heard from
within 3 heartbeats); an offline device's last report is shown as ``stale`` and never counted
as free or ready; every object says when its data was last updated and how old it is.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from devices.availability import free_ports, ready_batteries, slot_is_ready
from devices.catalog import StationSpec, distance_m
from devices.contract import CabinetStatus, PileStatus
from ingest.pipeline import Twins
from ingest.twins import Twin


def rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age_s(ms: int | None, now_ms: int) -> float | None:
    return None if ms is None else round(max(0, now_ms - ms) / 1000, 1)


def device_view(twin: Twin, now_ms: int) -> dict[str, Any]:
    online = twin.online(now_ms)
    status = twin.status
    view: dict[str, Any] = {
        "id": twin.device_id,
        "kind": twin.kind,
        "station_id": twin.station_id,
        "online": online,
        "stale": not online,
        "last_seen": rfc3339(twin.last_seen_ms),
        "updated_at": rfc3339(twin.last_seen_ms),
        "data_age_s": _age_s(twin.last_seen_ms, now_ms),
        "state_online": twin.online_flag,
        "heartbeat_s": twin.heartbeat_s,
        "model": twin.model,
        "firmware": twin.firmware,
        "boot": twin.boot,
        "status_seq": twin.status_seq if twin.status_seq >= 0 else None,
        "reported_at": rfc3339(twin.status_ts_ms),
        "faults": status.device_faults if status else [],
        "lost_messages": twin.lost_messages,
    }
    if twin.kind == "pile":
        ports = status.ports if isinstance(status, PileStatus) else []
        view["ports"] = [
            {
                "n": p.n,
                "state": p.state,
                "power_w": p.power_w,
                "energy_wh": p.energy_wh,
                "fault": p.fault,
                "session": p.session,
            }
            for p in ports
        ]
        view["ports_free"] = free_ports(status) if online and isinstance(status, PileStatus) else 0
        if isinstance(status, PileStatus):
            view["voltage_v"] = status.voltage_v
            view["temp_c"] = status.temp_c
    else:
        slots = status.slots if isinstance(status, CabinetStatus) else []
        view["slots"] = [
            {
                "n": s.n,
                "state": s.state,
                "battery": s.battery,
                "soc": s.soc,
                "temp_c": s.temp_c,
                "power_w": s.power_w,
                "fault": s.fault,
                "ready": slot_is_ready(s, twin.release_soc),
            }
            for s in slots
        ]
        view["release_soc"] = twin.release_soc
        view["batteries_ready"] = (
            ready_batteries(status, twin.release_soc)
            if online and isinstance(status, CabinetStatus)
            else 0
        )
        if isinstance(status, CabinetStatus):
            view["temp_c"] = status.temp_c
            view["smoke"] = status.smoke
            view["door_open"] = status.door_open
    return view


def _last_known(twin: Twin) -> int:
    """What an offline device last said it had free/ready (for "last known: ..." texts)."""
    status = twin.status
    if isinstance(status, PileStatus):
        return free_ports(status)
    if isinstance(status, CabinetStatus):
        return ready_batteries(status, twin.release_soc)
    return 0


def station_view(
    station: StationSpec,
    twins: Twins,
    now_ms: int,
    *,
    origin: tuple[float, float] | None = None,
) -> dict[str, Any]:
    piles = {"devices": 0, "online": 0, "ports_total": 0, "ports_free": 0, "last_known_free": 0}
    cabinets = {
        "devices": 0,
        "online": 0,
        "slots_total": 0,
        "batteries_ready": 0,
        "last_known_ready": 0,
    }
    updated: int | None = None
    for spec in station.devices:
        twin = twins[spec.id]
        online = twin.online(now_ms)
        if twin.last_seen_ms is not None and (updated is None or twin.last_seen_ms > updated):
            updated = twin.last_seen_ms
        if twin.kind == "pile":
            piles["devices"] += 1
            piles["ports_total"] += twin.units
            if online:
                piles["online"] += 1
                piles["ports_free"] += _last_known(twin)
            else:
                piles["last_known_free"] += _last_known(twin)
        else:
            cabinets["devices"] += 1
            cabinets["slots_total"] += twin.units
            if online:
                cabinets["online"] += 1
                cabinets["batteries_ready"] += _last_known(twin)
            else:
                cabinets["last_known_ready"] += _last_known(twin)
    any_online = piles["online"] + cabinets["online"] > 0
    return {
        "id": station.id,
        "name": station.name.zh,
        "name_en": station.name.en,
        "names": station.name.model_dump(),
        "address": station.address.model_dump(),
        "hours": station.hours,
        "site_kind": station.site_kind,
        "lat": station.lat,
        "lon": station.lon,
        "distance_m": (
            round(distance_m(origin[0], origin[1], station.lat, station.lon), 1)
            if origin is not None
            else None
        ),
        "piles": piles,
        "cabinets": cabinets,
        "updated_at": rfc3339(updated),
        "data_age_s": _age_s(updated, now_ms),
        "stale": not any_online,
    }


def station_has(view: dict[str, Any], kind: str | None, available: bool) -> bool:
    """Filter for ``kind`` and ``available`` query parameters."""
    piles, cabinets = view["piles"], view["cabinets"]
    want_piles = kind in (None, "pile")
    want_cabinets = kind in (None, "cabinet")
    if available:
        return (want_piles and piles["ports_free"] > 0) or (
            want_cabinets and cabinets["batteries_ready"] > 0
        )
    return (want_piles and piles["devices"] > 0) or (want_cabinets and cabinets["devices"] > 0)
