"""The shared station views (``api.snapshots``) against views computed from scratch: what a
cached answer says must be what computing it at that instant says (ages excepted, at most
``MAX_AGE_MS`` old), a device goes stale at the exact millisecond without a new message, and
a changed device is recomputed alone. Pure: twins fed in-process, times given explicitly."""

from __future__ import annotations

import json
from typing import Any

import pydantic_core
import pytest

from api.live import Trends
from api.snapshots import MAX_AGE_MS, REFRESH_MS, StationViews
from api.views import station_view
from devices.availability import STALE_FACTOR
from devices.catalog import Catalog
from devices.contract import Birth, CabinetStatus, PileStatus
from ingest.pipeline import Twins

T0 = 1_800_000_000_000
STATION = "yungu-road"
ORIGIN = (31.742, 117.296)


def _birth(kind: str, units: int) -> Birth:
    return Birth.of(
        {"v": 1, "ts": T0, "boot": "boot-a", "seq": 0, "online": True, "kind": kind,
         "ports" if kind == "pile" else "slots": units}
    )  # fmt: skip


def _status(kind: str, units: int, seq: int, ts: int, busy: int) -> PileStatus | CabinetStatus:
    """``busy`` ports charging / slots empty, the others available / ready."""
    head = {"v": 1, "ts": ts, "boot": "boot-a", "seq": seq, "kind": kind}
    if kind == "pile":
        ports = [
            {"n": n, "state": "charging" if n <= busy else "available", "power_w": 150.0,
             "energy_wh": 200.0} if n <= busy else {"n": n, "state": "available"}
            for n in range(1, units + 1)
        ]  # fmt: skip
        return PileStatus.of({**head, "ports": ports})
    slots = [
        {"n": n, "state": "empty"} if n <= busy
        else {"n": n, "state": "ready", "battery": f"B{n}", "soc": 95.0}
        for n in range(1, units + 1)
    ]  # fmt: skip
    return CabinetStatus.of({**head, "slots": slots})


@pytest.fixture
def world() -> tuple[Catalog, Twins, StationViews]:
    catalog = Catalog.load()
    twins = Twins(catalog)
    for spec in catalog.stations[STATION].devices:
        twin = twins[spec.id]
        twin.apply(_birth(twin.kind, twin.units), T0)
        twin.apply(_status(twin.kind, twin.units, 1, T0, busy=1), T0)
    views = StationViews(catalog, twins, Trends())
    return catalog, twins, views


def _fresh(catalog: Catalog, twins: Twins, views: StationViews, at: int) -> dict[str, Any]:
    return station_view(
        catalog.stations[STATION], twins, at, trends=views.trends, with_devices=True
    )


def _without_device_ages(view: dict[str, Any]) -> dict[str, Any]:
    out = dict(view)
    out["devices"] = [{k: v for k, v in d.items() if k != "data_age_s"} for d in view["devices"]]
    return out


def test_cached_json_is_what_computing_now_would_serialise(world: Any) -> None:
    catalog, twins, views = world
    entry = views.station(STATION, T0 + 100)
    assert entry.detail_json(T0 + 100, public=False) == pydantic_core.to_json(
        _fresh(catalog, twins, views, T0 + 100)
    )
    summary = station_view(catalog.stations[STATION], twins, T0 + 100, origin=ORIGIN)
    assert entry.summary_json.fill(entry.data_age_s(T0 + 100), summary["distance_m"]) == (
        pydantic_core.to_json(summary)
    )
    # later, from the cache: the station's own age is exact, devices' ages at most MAX_AGE old
    later = T0 + 400
    cached = json.loads(views.station(STATION, later).detail_json(later, public=False))
    now = _fresh(catalog, twins, views, later)
    assert cached["data_age_s"] == now["data_age_s"] == 0.4
    assert _without_device_ages(cached) == _without_device_ages(now)
    assert all(
        0 <= n["data_age_s"] - c["data_age_s"] <= MAX_AGE_MS / 1000
        for c, n in zip(cached["devices"], now["devices"], strict=True)
    )


def test_a_silent_device_goes_stale_at_the_exact_millisecond(world: Any) -> None:
    catalog, twins, views = world
    quiet = catalog.stations[STATION].devices[0].id
    others = [s.id for s in catalog.stations[STATION].devices[1:]]
    late = T0 + 60_000
    for i, device_id in enumerate(others):  # everyone else keeps reporting
        twin = twins[device_id]
        twin.apply(_status(twin.kind, twin.units, 2, late, busy=1), late + i)
    views.on_change([twins[d] for d in others])
    # fresh while heard from within 3 heartbeats, that instant included
    stale_at = T0 + STALE_FACTOR * twins[quiet].heartbeat_s * 1000 + 1
    before = views.get(STATION, stale_at - 1).view
    assert next(d for d in before["devices"] if d["id"] == quiet)["online"] is True
    assert before["partly_stale"] is False
    after = views.get(STATION, stale_at).view  # no message, no on_change: only time passed
    device = next(d for d in after["devices"] if d["id"] == quiet)
    assert (device["online"], device["stale"]) == (False, True)
    assert after["partly_stale"] is True
    assert after["piles"]["online"] == before["piles"]["online"] - 1
    assert after == _fresh(catalog, twins, views, stale_at) | {"data_age_s": after["data_age_s"]}


def test_a_change_recomputes_that_device_alone_and_shows_in_the_counts(world: Any) -> None:
    catalog, twins, views = world
    first = views.get(STATION, T0).view
    computed = views.device_computations
    assert computed == len(catalog.stations[STATION].devices)
    pile = next(s.id for s in catalog.stations[STATION].devices if s.kind == "pile")
    twin = twins[pile]
    twin.apply(_status("pile", twin.units, 2, T0 + 10, busy=twin.units), T0 + 10)
    views.on_change([twin])
    # within REFRESH_MS the kept view is served (counts at most this late) ...
    assert views.get(STATION, T0 + REFRESH_MS - 1).view["piles"] == first["piles"]
    # ... then only the changed device is computed again
    after = views.get(STATION, T0 + REFRESH_MS).view
    assert views.device_computations == computed + 1
    assert after["piles"]["ports_free"] == first["piles"]["ports_free"] - (twin.units - 1)
    assert after == _fresh(catalog, twins, views, T0 + REFRESH_MS) | {"devices": after["devices"]}
    fresh_devices = _fresh(catalog, twins, views, T0 + REFRESH_MS)["devices"]
    assert (
        _without_device_ages(after)["devices"]
        == _without_device_ages({"devices": fresh_devices})["devices"]
    )


def test_etags_change_with_counts_not_with_the_clock(world: Any) -> None:
    catalog, twins, views = world
    first = views.station(STATION, T0)
    aged = views.station(STATION, T0 + 3 * MAX_AGE_MS)  # every device recomputed, ages moved
    assert aged is not first
    assert (aged.etag, aged.summary_etag) == (first.etag, first.summary_etag)
    cabinet = next(s.id for s in catalog.stations[STATION].devices if s.kind == "cabinet")
    twin = twins[cabinet]
    at = T0 + 3 * MAX_AGE_MS + 1
    twin.apply(_status("cabinet", twin.units, 2, at, busy=2), at)
    views.on_change([twin])
    changed = views.station(STATION, at, fresh=True)
    assert changed.summary_etag != first.summary_etag
    assert changed.etag != first.etag
    assert changed.summary["cabinets"]["batteries_ready"] == (
        first.summary["cabinets"]["batteries_ready"] - 1
    )
