"""The site catalog: stations and the devices at each, loaded from a JSON file.

The district we model ships with the package (``devices/data/district.json``); users point
``--catalog`` at their own file of the same shape. Loading validates everything and fails
with a ``CatalogError`` that names the line (for JSON syntax) or the field path.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import timedelta, timezone, tzinfo
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from devices.contract import DeviceKind
from devices.topics import DEVICE_ID_PATTERN

DEFAULT_RELEASE_SOC = 90.0
# "HH:MM-HH:MM" local time; the end may be 24:00 (and no later)
_HOURS_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-(?:([01]\d|2[0-3]):([0-5]\d)|(24):(00))$")


class CatalogError(ValueError):
    """The catalog file cannot be used; the message says where and what to fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Text(_Strict):
    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)


class DeviceSpec(_Strict):
    id: Annotated[str, Field(pattern=rf"^{DEVICE_ID_PATTERN}$")]
    kind: DeviceKind
    ports: Annotated[int, Field(ge=1, le=256)] | None = None
    slots: Annotated[int, Field(ge=1, le=256)] | None = None
    # None: the service's configured release level (default 90)
    release_soc: Annotated[float, Field(ge=1, le=100)] | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _units(self) -> Self:
        if self.kind == "pile" and (self.ports is None or self.slots is not None):
            raise ValueError("a pile has 'ports' (and no 'slots')")
        if self.kind == "cabinet" and (self.slots is None or self.ports is not None):
            raise ValueError("a cabinet has 'slots' (and no 'ports')")
        return self

    @property
    def units(self) -> int:
        count = self.ports if self.kind == "pile" else self.slots
        assert count is not None
        return count


class StationSpec(_Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")]
    name: Text
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    address: Text
    hours: Annotated[str, Field(pattern=_HOURS_RE.pattern)] = "00:00-24:00"
    site_kind: Literal["rest_corner", "warm_station", "compound_gate", "roadside"]
    devices: list[DeviceSpec] = Field(min_length=1)

    def is_open(self, minute_of_day: int) -> bool:
        """Whether the station is open at local ``minute_of_day`` (0..1439)."""
        m = _HOURS_RE.match(self.hours)
        assert m is not None
        start = int(m[1]) * 60 + int(m[2])
        end = int(m[3] or m[5]) * 60 + int(m[4] or m[6])
        if start <= end:
            return start <= minute_of_day < end
        return minute_of_day >= start or minute_of_day < end  # open across midnight


class District(_Strict):
    name: Text
    lat: float
    lon: float
    timezone: str = "Asia/Shanghai"
    note: str | None = None


class CatalogFile(_Strict):
    district: District
    stations: list[StationSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        seen_stations: set[str] = set()
        seen_devices: set[str] = set()
        for i, station in enumerate(self.stations):
            if station.id in seen_stations:
                raise ValueError(f"stations[{i}].id: duplicate station id {station.id!r}")
            seen_stations.add(station.id)
            for j, device in enumerate(station.devices):
                if device.id in seen_devices:
                    raise ValueError(
                        f"stations[{i}].devices[{j}].id: duplicate device id {device.id!r}"
                    )
                seen_devices.add(device.id)
        return self


@dataclass(frozen=True, slots=True)
class Device:
    """A catalog device with the station it stands at."""

    spec: DeviceSpec
    station_id: str

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def kind(self) -> DeviceKind:
        return self.spec.kind


class Catalog:
    """Stations and devices by id, in file order."""

    def __init__(self, data: CatalogFile, source: str = "<memory>") -> None:
        self.data = data
        self.source = source
        self.stations: dict[str, StationSpec] = {s.id: s for s in data.stations}
        self.devices: dict[str, Device] = {
            d.id: Device(d, s.id) for s in data.stations for d in s.devices
        }

    @classmethod
    def from_json(cls, text: str, source: str = "<memory>") -> Catalog:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CatalogError(
                f"{source}: line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        try:
            return cls(CatalogFile.model_validate(raw), source)
        except ValidationError as exc:
            problems = []
            for err in exc.errors(include_url=False)[:10]:
                where = "".join(
                    f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]
                ).lstrip(".")
                problems.append(f"  {where or '(top level)'}: {err['msg']}")
            raise CatalogError(f"{source}: invalid catalog\n" + "\n".join(problems)) from None

    @classmethod
    def load(cls, path: str | Path | None = None) -> Catalog:
        """Load ``path``, or the district shipped with the package when None."""
        if path is None:
            ref = resources.files("devices") / "data" / "district.json"
            return cls.from_json(ref.read_text(encoding="utf-8"), "devices/data/district.json")
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise CatalogError(f"{p}: cannot read catalog: {exc.strerror}") from None
        return cls.from_json(text, str(p))

    def station_devices(self, station_id: str) -> list[Device]:
        return [Device(d, station_id) for d in self.stations[station_id].devices]


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine; plenty for a district)."""
    r = 6_371_000.0
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * r * math.asin(math.sqrt(a))


def district_tz(catalog: Catalog) -> tzinfo:
    """The district's time zone (opening hours, days, reports); China Standard Time when the
    catalog names one this machine does not know."""
    try:
        return ZoneInfo(catalog.data.district.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return timezone(timedelta(hours=8), "Asia/Shanghai")
