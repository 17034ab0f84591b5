"""JSON views of stations and devices, computed from the twins at one instant ``now_ms``.

Honesty rules: a device is online only per contract v1 (latest state online AND heard from
within 3 heartbeats); an offline device's last report is shown as ``stale`` and never counted
as free or ready; every object says when its data was last updated and how old it is.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from devices.availability import STALE_FACTOR, free_ports, ready_batteries, slot_is_ready
from devices.catalog import StationSpec, distance_m
from devices.contract import CabinetStatus, PileStatus, Port, Slot
from ingest.twins import Twin

if TYPE_CHECKING:
    from api.live import Trends

# OCPI 2.2.1 Connector/EVSE status per port/slot. A finished port is still occupied by the
# rider's plug (OCPP Finishing/SuspendedEV), so CHARGING; an empty cabinet slot has nothing
# to take, so BLOCKED; a device that is offline or stale says nothing now, so UNKNOWN.
OCPI_PORT = {
    "available": "AVAILABLE",
    "charging": "CHARGING",
    "finished": "CHARGING",
    "reserved": "RESERVED",
    "faulted": "OUTOFORDER",
    "disabled": "INOPERATIVE",
}
OCPI_SLOT = {
    "ready": "AVAILABLE",
    "charging": "CHARGING",
    "empty": "BLOCKED",
    "reserved": "RESERVED",
    "faulted": "OUTOFORDER",
    "disabled": "INOPERATIVE",
}
MIN_ETA_S = 60
"""An estimate is never "now": a rider needs at least a minute to get there anyway."""


def rfc3339(ms: int | None) -> str | None:
    return None if ms is None else _rfc3339(ms)


@functools.lru_cache(maxsize=16_384)
def _rfc3339(ms: int) -> str:
    """Cached: a device's times repeat in every view of it until its next message."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age_s(ms: int | None, now_ms: int) -> float | None:
    return None if ms is None else round(max(0, now_ms - ms) / 1000, 1)


def age_text(age_s: float) -> tuple[str, str]:
    """A short age in English and Chinese: "6 min", "6 分钟"."""
    if age_s < 60:
        n = int(age_s)
        return f"{n} s", f"{n} 秒"
    if age_s < 3600:
        n = int(age_s // 60)
        return f"{n} min", f"{n} 分钟"
    if age_s < 86400:
        n = int(age_s // 3600)
        return f"{n} h", f"{n} 小时"
    n = int(age_s // 86400)
    return f"{n} d", f"{n} 天"


def last_known_text(
    ports_free: int | None, batteries_ready: int | None, age_s: float
) -> dict[str, str]:
    en_age, zh_age = age_text(age_s)
    en, zh = [], []
    if ports_free is not None:
        en.append(f"{ports_free} free port{'s' if ports_free != 1 else ''}")
        zh.append(f"{ports_free} 个空闲充电口")
    if batteries_ready is not None:
        en.append(f"{batteries_ready} ready")
        zh.append(f"{batteries_ready} 块满电电池")
    return {
        "en": f"last known: {', '.join(en)}, {en_age} ago",
        "zh": f"最后已知：{'，'.join(zh)}，{zh_age}前",
    }


def last_updated_ms(twin: Twin, now_ms: int) -> int | None:
    """When what we say about the device last changed (OCPI ``last_updated``): its last
    message, or the moment it went stale for lack of messages."""
    last = twin.last_seen_ms
    if last is None:
        return twin.changed_ms
    stale_at = last + STALE_FACTOR * twin.heartbeat_s * 1000
    newest = max(last, twin.changed_ms or last)
    if twin.online_flag and stale_at <= now_ms:
        newest = max(newest, stale_at)
    return newest


def _elapsed_s(twin: Twin, now_ms: int) -> float:
    """Seconds since the current status was applied (our clock)."""
    return max(0.0, (now_ms - (twin.changed_ms or now_ms)) / 1000)


def _slot_eta(twin: Twin, slot: Slot, trends: Trends | None) -> tuple[float | None, str | None]:
    """Seconds from the status until ``slot``'s battery reaches the release level."""
    if slot.state != "charging" or slot.fault or slot.battery is None or slot.soc is None:
        return None, None
    missing = twin.release_soc - slot.soc
    if missing <= 0:
        return 0.0, "charge_rate"
    rate = trends.charge_rate(twin.device_id, slot.n) if trends is not None else None
    if rate is not None:
        return missing / rate, "charge_rate"
    if slot.power_w > 0:
        from api.live import NOMINAL_PACK_WH

        per_s = slot.power_w / NOMINAL_PACK_WH * 100 / 3600
        return missing / per_s, "power_w"
    return None, None


def _port_eta(
    twin: Twin, port: Port, status_ts: int, trends: Trends | None
) -> tuple[float | None, str | None]:
    """Seconds from the status until the port is expected to be free: a finished port when
    its rider unplugs; a charging one, only near its end, when it finishes and is unplugged."""
    if port.state == "charging" and not port.fault and port.power_w > 0 and trends is not None:
        from api.live import NEAR_END_S

        session_wh, energy_basis = trends.session_energy()
        to_full_s = max(0.0, session_wh - port.energy_wh) / port.power_w * 3600
        if to_full_s > NEAR_END_S:
            return None, None  # far from its end: no honest estimate
        dwell, dwell_basis = trends.finished_dwell()
        return to_full_s + dwell, (
            f"charging at {port.power_w:.0f} W, {energy_basis}; then {dwell_basis}"
        )
    if port.state != "finished" or port.fault:
        return None, None
    if trends is None:
        from api.live import DEFAULT_FINISHED_DWELL_S

        return float(DEFAULT_FINISHED_DWELL_S), "assumed 30 min until unplugged"
    dwell, basis = trends.finished_dwell()
    since = trends.finished_since(twin.device_id, port.n)
    spent = (status_ts - since) / 1000 if since is not None else 0.0
    return max(0.0, dwell - spent), basis


def _at(twin: Twin, value: float | None) -> str | None:
    """When an estimate made at the status falls due: stable until the next status."""
    if value is None or twin.changed_ms is None:
        return None
    return rfc3339(twin.changed_ms + max(MIN_ETA_S, round(value)) * 1000)


def _eta(value: float | None, elapsed_s: float) -> int | None:
    return None if value is None else max(MIN_ETA_S, round(value - elapsed_s))


PRIVATE_DEVICE_FIELDS = ("firmware", "boot")
"""What a rider has no use for and an attacker could: firmware versions to pick a target,
boot ids that say when a device restarted."""
PRIVATE_PORT_FIELDS = ("session",)
"""A charging session's id follows one rider's charge from start to end."""
PRIVATE_SLOT_FIELDS = ("battery", "flagged")
"""A battery's serial follows it from rider to rider, swap after swap; whether the pack in
a slot is flagged (battery passports) is for maintainers (riders see it out of order)."""


def public_device_view(view: dict[str, Any]) -> dict[str, Any]:
    """``view`` (``device_view``) as the public sees it: the same fields, the private ones
    null (each is null already when there is nothing to say, so clients keep one shape).
    Maintainer and admin keys get ``view`` itself."""
    out = dict(view)
    for name in PRIVATE_DEVICE_FIELDS:
        out[name] = None
    if "ports" in out:
        out["ports"] = [{**p, **dict.fromkeys(PRIVATE_PORT_FIELDS)} for p in out["ports"]]
    if "slots" in out:
        out["slots"] = [{**s, **dict.fromkeys(PRIVATE_SLOT_FIELDS)} for s in out["slots"]]
    return out


def device_view(
    twin: Twin, now_ms: int, trends: Trends | None = None, flagged: Collection[str] = ()
) -> dict[str, Any]:
    """``flagged``: serials of flagged packs (battery passports), never counted ready."""
    online = twin.online(now_ms)
    status = twin.status
    elapsed = _elapsed_s(twin, now_ms)
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
        faulted = bool(status.device_faults) if status else False
        port_views = []
        next_free: int | None = None
        next_at: str | None = None
        next_basis: str | None = None
        for p in ports:
            eta, basis = (None, None)
            if online and status is not None:
                eta, basis = _port_eta(twin, p, status.ts, trends)
            expected = _eta(eta, elapsed)
            if expected is not None and (next_free is None or expected < next_free):
                next_free, next_basis, next_at = expected, basis, _at(twin, eta)
            ocpi = OCPI_PORT[p.state]
            if not online:
                ocpi = "UNKNOWN"
            elif faulted and p.state == "available":
                ocpi = "OUTOFORDER"
            port_views.append(
                {
                    "n": p.n,
                    "state": p.state,
                    "power_w": p.power_w,
                    "energy_wh": p.energy_wh,
                    "fault": p.fault,
                    "session": p.session,
                    "ocpi_status": ocpi,
                    "expected_free_in_s": expected,
                    "expected_free_basis": basis if expected is not None else None,
                }
            )
        view["ports"] = port_views
        view["ports_free"] = free_ports(status) if online and isinstance(status, PileStatus) else 0
        if view["ports_free"] > 0:
            next_free, next_basis, next_at = 0, "free now", None
        view["next_free_in_s"] = next_free
        view["next_free_at"] = next_at
        view["next_free_basis"] = next_basis
        if isinstance(status, PileStatus):
            view["voltage_v"] = status.voltage_v
            view["temp_c"] = status.temp_c
    else:
        slots = status.slots if isinstance(status, CabinetStatus) else []
        faulted = bool(status.device_faults) if status else False
        slot_views = []
        next_ready: int | None = None
        ready_at: str | None = None
        next_basis = None
        for s in slots:
            is_flagged = s.battery is not None and s.battery in flagged
            # a flagged pack is never ready: no countdown to it either
            eta, basis = _slot_eta(twin, s, trends) if online and not is_flagged else (None, None)
            ready_in = _eta(eta, elapsed)
            if ready_in is not None and (next_ready is None or ready_in < next_ready):
                next_ready, next_basis, ready_at = ready_in, basis, _at(twin, eta)
            ready = slot_is_ready(s, twin.release_soc, flagged)
            ocpi = OCPI_SLOT[s.state]
            if not online:
                ocpi = "UNKNOWN"
            elif s.state == "ready" and (not ready or faulted):
                ocpi = "OUTOFORDER" if faulted or is_flagged else "CHARGING"
            slot_views.append(
                {
                    "n": s.n,
                    "state": s.state,
                    "battery": s.battery,
                    "soc": s.soc,
                    "temp_c": s.temp_c,
                    "power_w": s.power_w,
                    "fault": s.fault,
                    "ready": ready,
                    "ocpi_status": ocpi,
                    "ready_in_s": ready_in,
                    "flagged": is_flagged,
                }
            )
        view["slots"] = slot_views
        view["next_ready_in_s"] = next_ready
        view["next_ready_at"] = ready_at
        view["next_ready_basis"] = next_basis
        view["release_soc"] = twin.release_soc
        view["batteries_ready"] = (
            ready_batteries(status, twin.release_soc, flagged)
            if online and isinstance(status, CabinetStatus)
            else 0
        )
        if isinstance(status, CabinetStatus):
            view["temp_c"] = status.temp_c
            view["smoke"] = status.smoke
            view["door_open"] = status.door_open
    view["last_updated"] = rfc3339(last_updated_ms(twin, now_ms))
    view["last_known"] = None
    if not online and status is not None and twin.last_seen_ms is not None:
        known = _last_known(twin, flagged)
        age = (now_ms - twin.last_seen_ms) / 1000
        view["last_known"] = {
            "ports_free" if twin.kind == "pile" else "batteries_ready": known,
            "at": rfc3339(twin.last_seen_ms),
            "age_s": round(age, 1),
            "text": last_known_text(
                known if twin.kind == "pile" else None,
                known if twin.kind == "cabinet" else None,
                age,
            ),
        }
    return view


def _last_known(twin: Twin, flagged: Collection[str] = ()) -> int:
    """What an offline device last said it had free/ready (for "last known: ..." texts)."""
    status = twin.status
    if isinstance(status, PileStatus):
        return free_ports(status)
    if isinstance(status, CabinetStatus):
        return ready_batteries(status, twin.release_soc, flagged)
    return 0


def _min(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What a station's view takes from one device, as of the instant its view was
    computed (so a cached device view and its station's counts always agree)."""

    kind: str
    units: int
    online: bool
    last_seen_ms: int | None
    last_updated_ms: int | None
    has_status: bool
    known: int  # free ports / ready batteries it reports (last known, when offline)
    next_in_s: int | None  # next_free_in_s (pile) or next_ready_in_s (cabinet)
    charging: int  # slots charging (cabinet)


def device_facts(
    twin: Twin, view: dict[str, Any], now_ms: int, flagged: Collection[str] = ()
) -> DeviceFacts:
    """``view`` is ``device_view(twin, now_ms, ..., flagged)``."""
    pile = twin.kind == "pile"
    return DeviceFacts(
        kind=twin.kind,
        units=twin.units,
        online=view["online"],
        last_seen_ms=twin.last_seen_ms,
        last_updated_ms=last_updated_ms(twin, now_ms),
        has_status=twin.status is not None,
        known=_last_known(twin, flagged),
        next_in_s=view["next_free_in_s"] if pile else view["next_ready_in_s"],
        charging=0 if pile else sum(1 for s in view["slots"] if s["state"] == "charging"),
    )


def station_view(
    station: StationSpec,
    twins: Mapping[str, Twin],
    now_ms: int,
    *,
    origin: tuple[float, float] | None = None,
    trends: Trends | None = None,
    with_devices: bool = False,
    flagged: Collection[str] = (),
) -> dict[str, Any]:
    views = [device_view(twins[spec.id], now_ms, trends, flagged) for spec in station.devices]
    facts = [
        device_facts(twins[spec.id], view, now_ms, flagged)
        for spec, view in zip(station.devices, views, strict=True)
    ]
    out = station_summary(station, facts, now_ms, origin=origin)
    if with_devices:
        out["devices"] = views
    return out


def station_summary(
    station: StationSpec,
    devices: Sequence[DeviceFacts],
    now_ms: int,
    *,
    origin: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A station's view (without ``devices``) from its devices' facts, in catalog order."""
    piles: dict[str, Any] = {
        "devices": 0,
        "online": 0,
        "ports_total": 0,
        "ports_free": 0,
        "last_known_free": 0,
    }
    cabinets: dict[str, Any] = {
        "devices": 0,
        "online": 0,
        "slots_total": 0,
        "batteries_ready": 0,
        "last_known_ready": 0,
    }
    updated: int | None = None
    changed: int | None = None
    stale_seen: int | None = None  # newest report among the devices that are not online
    next_free: list[int | None] = []
    next_ready: list[int | None] = []
    charging = 0
    for f in devices:
        online = f.online
        if f.last_seen_ms is not None and (updated is None or f.last_seen_ms > updated):
            updated = f.last_seen_ms
        last = f.last_updated_ms
        if last is not None and (changed is None or last > changed):
            changed = last
        if not online and f.last_seen_ms is not None and f.has_status:
            stale_seen = max(stale_seen or 0, f.last_seen_ms)
        if f.kind == "pile":
            piles["devices"] += 1
            piles["ports_total"] += f.units
            if online:
                piles["online"] += 1
                piles["ports_free"] += f.known
                next_free.append(f.next_in_s)
            else:
                piles["last_known_free"] += f.known
        else:
            cabinets["devices"] += 1
            cabinets["slots_total"] += f.units
            if online:
                cabinets["online"] += 1
                cabinets["batteries_ready"] += f.known
                next_ready.append(f.next_in_s)
                charging += f.charging
            else:
                cabinets["last_known_ready"] += f.known
    cabinets["batteries_charging"] = charging
    any_online = piles["online"] + cabinets["online"] > 0
    last_known = None
    if not any_online and stale_seen is not None:
        age = (now_ms - stale_seen) / 1000
        known_free: int | None = piles["last_known_free"] if piles["devices"] else None
        known_ready: int | None = cabinets["last_known_ready"] if cabinets["devices"] else None
        last_known = {
            "ports_free": known_free,
            "batteries_ready": known_ready,
            "at": rfc3339(stale_seen),
            "age_s": round(age, 1),
            "text": last_known_text(known_free, known_ready, age),
        }
    out: dict[str, Any] = {
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
        "partly_stale": any_online
        and piles["online"] + cabinets["online"] < piles["devices"] + cabinets["devices"],
        "last_known": last_known,
        "last_updated": rfc3339(changed),
        # soonest over the online devices (seconds from now; ``*_at`` stay put between
        # statuses). Top level, so that the count objects change only when counts do.
        "next_free_in_s": _min(next_free),
        "next_ready_in_s": _min(next_ready),
    }
    return out


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
