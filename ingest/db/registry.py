"""The device registry in the database: the catalog (``devices.catalog``), stations and
their devices, imported from its JSON and read back as the same ``Catalog``.

``import_catalog`` makes the registry equal to a catalog in one transaction (stations and
devices no longer in it are removed); ``chargewatch db upgrade`` seeds an empty registry
from the catalog it is given (the shipped district by default). The district itself (name,
position, time zone) is kept as the fact ``registry.district``.
"""

from __future__ import annotations

import json

from sqlalchemy import Connection, delete, func, insert, select

from devices.catalog import Catalog, CatalogError, DeviceSpec
from ingest.db.schema import devices, facts, stations

DISTRICT_FACT = "registry.district"
CHANNEL = "cw_registry"
"""On PostgreSQL every change to the registry is announced on this LISTEN/NOTIFY channel (in
the changing transaction, so a listener reads it committed); ingest workers follow it."""


def count(conn: Connection) -> int:
    """Stations in the registry."""
    return int(conn.execute(select(func.count()).select_from(stations)).scalar_one())


def import_catalog(conn: Connection, catalog: Catalog) -> tuple[int, int]:
    """Make the registry ``catalog`` (in the caller's transaction); (stations, devices)."""
    conn.execute(delete(devices))
    conn.execute(delete(stations))
    conn.execute(delete(facts).where(facts.c.name == DISTRICT_FACT))
    station_rows, device_rows = [], []
    for i, station in enumerate(catalog.data.stations):
        spec = station.model_dump(mode="json", exclude={"devices"})
        station_rows.append({"id": station.id, "position": i, "spec": json.dumps(spec)})
        for j, device in enumerate(station.devices):
            device_rows.append(
                {
                    "id": device.id,
                    "station_id": station.id,
                    "position": j,
                    "kind": device.kind,
                    "spec": device.model_dump_json(exclude_none=True),
                }
            )
    conn.execute(insert(stations), station_rows)
    conn.execute(insert(devices), device_rows)
    district = catalog.data.district.model_dump_json(exclude_none=True)
    conn.execute(insert(facts), [{"name": DISTRICT_FACT, "value": district}])
    _announce(conn, "catalog")
    return len(station_rows), len(device_rows)


def add_device(conn: Connection, station_id: str, spec: DeviceSpec) -> None:
    """Add a device to a station of the registry (in the caller's transaction), after the
    station's others; announced on ``CHANNEL`` (ingest workers subscribe to it at once)."""
    if conn.execute(select(stations.c.id).where(stations.c.id == station_id)).first() is None:
        raise CatalogError(f"station {station_id!r} is not in the registry")
    if conn.execute(select(devices.c.id).where(devices.c.id == spec.id)).first() is not None:
        raise CatalogError(f"device {spec.id!r} is already in the registry")
    last = conn.execute(
        select(func.coalesce(func.max(devices.c.position), -1)).where(
            devices.c.station_id == station_id
        )
    ).scalar_one()
    conn.execute(
        insert(devices),
        [
            {
                "id": spec.id,
                "station_id": station_id,
                "position": int(last) + 1,
                "kind": spec.kind,
                "spec": spec.model_dump_json(exclude_none=True),
            }
        ],
    )
    _announce(conn, spec.id)


def _announce(conn: Connection, what: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(CHANNEL, what)))


def load_catalog(conn: Connection, source: str = "registry") -> Catalog | None:
    """The registry as a ``Catalog`` (None: empty); invalid contents raise ``CatalogError``."""
    district = conn.execute(select(facts.c.value).where(facts.c.name == DISTRICT_FACT)).scalar()
    if district is None:
        return None
    by_station: dict[str, list[object]] = {}
    for station_id, spec in conn.execute(
        select(devices.c.station_id, devices.c.spec).order_by(
            devices.c.station_id, devices.c.position
        )
    ):
        by_station.setdefault(station_id, []).append(json.loads(spec))
    listed = []
    for station_id, spec in conn.execute(
        select(stations.c.id, stations.c.spec).order_by(stations.c.position)
    ):
        listed.append({**json.loads(spec), "devices": by_station.get(station_id, [])})
    text = json.dumps({"district": json.loads(district), "stations": listed})
    return Catalog.from_json(text, source)
