"""The site catalog: the shipped district, and errors that say where and what to fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from devices.catalog import Catalog, CatalogError, distance_m

CENTRE = (31.742, 117.296)


@pytest.fixture(scope="module")
def district() -> Catalog:
    return Catalog.load()


def minimal() -> dict[str, Any]:
    return {
        "district": {"name": {"zh": "测试区", "en": "Test district"}, "lat": 31.7, "lon": 117.3},
        "stations": [
            {
                "id": "north-gate",
                "name": {"zh": "北门", "en": "North gate"},
                "lat": 31.74,
                "lon": 117.29,
                "address": {"zh": "北门路1号", "en": "1 North Gate Rd"},
                "hours": "07:00-22:00",
                "site_kind": "rest_corner",
                "devices": [
                    {"id": "NG-P01", "kind": "pile", "ports": 10},
                    {"id": "NG-C01", "kind": "cabinet", "slots": 12, "release_soc": 95},
                ],
            },
            {
                "id": "south-gate",
                "name": {"zh": "南门", "en": "South gate"},
                "lat": 31.73,
                "lon": 117.29,
                "address": {"zh": "南门路2号", "en": "2 South Gate Rd"},
                "site_kind": "roadside",
                "devices": [{"id": "SG-P01", "kind": "pile", "ports": 4}],
            },
        ],
    }


def load_error(data: dict[str, Any]) -> str:
    with pytest.raises(CatalogError) as info:
        Catalog.from_json(json.dumps(data, indent=1), "test.json")
    return str(info.value)


# -- the shipped district --------------------------------------------------------------------


def test_district_stations_near_the_centre(district: Catalog) -> None:
    assert len(district.stations) == 7
    for station in district.stations.values():
        assert distance_m(*CENTRE, station.lat, station.lon) < 1500, station.id


def test_district_devices(district: Catalog) -> None:
    specs = [d for s in district.data.stations for d in s.devices]
    assert len(specs) >= 400
    assert len({d.id for d in specs}) == len(specs) == len(district.devices)
    piles = [d for d in specs if d.kind == "pile"]
    cabinets = [d for d in specs if d.kind == "cabinet"]
    assert piles
    assert cabinets
    assert {(d.ports, d.slots, d.units) for d in piles} == {(10, None, 10)}
    assert {(d.slots, d.ports, d.units) for d in cabinets} == {(12, None, 12)}


def test_district_every_station_has_both_kinds(district: Catalog) -> None:
    for station in district.stations.values():
        assert {d.kind for d in station.devices} == {"pile", "cabinet"}, station.id


def test_district_names_in_both_languages(district: Catalog) -> None:
    assert district.data.district.name.zh
    assert district.data.district.name.en
    for station in district.stations.values():
        assert station.name.zh.strip(), station.id
        assert station.name.en.strip(), station.id
        assert station.address.zh.strip(), station.id
        assert station.address.en.strip(), station.id
        # the Chinese name is in Chinese
        assert any("\u4e00" <= ch <= "\u9fff" for ch in station.name.zh), station.id


def test_district_device_station_lookup(district: Catalog) -> None:
    for station_id, station in district.stations.items():
        devices = district.station_devices(station_id)
        assert [d.id for d in devices] == [spec.id for spec in station.devices]
        for device in devices:
            assert district.devices[device.id].station_id == station_id


def test_load_from_path_matches_shipped(tmp_path: Path, district: Catalog) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(minimal(), ensure_ascii=False), encoding="utf-8")
    catalog = Catalog.load(path)
    assert catalog.source == str(path)
    assert list(catalog.devices) == ["NG-P01", "NG-C01", "SG-P01"]
    assert catalog.devices["NG-C01"].spec.release_soc == 95
    assert catalog.devices["SG-P01"].station_id == "south-gate"
    assert catalog.stations["south-gate"].hours == "00:00-24:00"  # the default
    assert district.source == "devices/data/district.json"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(CatalogError, match="cannot read catalog") as info:
        Catalog.load(path)
    assert str(path) in str(info.value)


# -- errors ----------------------------------------------------------------------------------


def test_json_syntax_error_names_the_line() -> None:
    text = json.dumps(minimal(), indent=1).splitlines()
    line = next(i for i, t in enumerate(text) if '"NG-P01"' in t)
    text[line] = text[line].rstrip(",")  # drop the comma after the id
    with pytest.raises(CatalogError) as info:
        Catalog.from_json("\n".join(text), "test.json")
    assert f"test.json: line {line + 2}," in str(info.value)  # the next line is unexpected


def test_json_syntax_error_on_first_line() -> None:
    with pytest.raises(CatalogError, match=r"^x\.json: line 1, column 1:"):
        Catalog.from_json("not json", "x.json")


def _mutate(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(minimal())
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def _drop(path: tuple[Any, ...]) -> dict[str, Any]:
    data = copy.deepcopy(minimal())
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (_mutate(("stations", 1, "devices", 0, "id"), "NG-P01"), "duplicate device id 'NG-P01'"),
        (_mutate(("stations", 1, "devices", 0, "id"), "NG-P01"), "stations[1].devices[0].id"),
        (_mutate(("stations", 1, "id"), "north-gate"), "stations[1].id: duplicate station id"),
        (
            _mutate(("stations", 0, "devices", 0), {"id": "X", "kind": "pile", "slots": 12}),
            "stations[0].devices[0]: Value error, a pile has 'ports'",
        ),
        (
            _mutate(
                ("stations", 0, "devices", 0), {"id": "X", "kind": "pile", "ports": 2, "slots": 2}
            ),
            "stations[0].devices[0]: Value error, a pile has 'ports'",
        ),
        (
            _mutate(("stations", 0, "devices", 1), {"id": "X", "kind": "cabinet", "ports": 12}),
            "stations[0].devices[1]: Value error, a cabinet has 'slots'",
        ),
        (_mutate(("stations", 0, "hours"), "7:00-22:00"), "stations[0].hours"),
        (_mutate(("stations", 0, "hours"), "07:00-25:00"), "stations[0].hours"),
        (_mutate(("stations", 0, "hours"), "24:00-06:00"), "stations[0].hours"),
        (_mutate(("stations", 0, "hours"), "07:60-22:00"), "stations[0].hours"),
        (_mutate(("stations", 0, "hours"), "07:00-24:30"), "stations[0].hours"),
        (_mutate(("stations", 0, "hours"), "07:00"), "stations[0].hours"),
        (_mutate(("stations", 1, "hours"), "all day"), "stations[1].hours"),
        (_mutate(("stations", 0, "devices", 0, "id"), "-bad"), "stations[0].devices[0].id"),
        (_mutate(("stations", 0, "devices", 0, "id"), "a b"), "stations[0].devices[0].id"),
        (_mutate(("stations", 0, "devices", 0, "kind"), "charger"), "stations[0].devices[0].kind"),
        (_mutate(("stations", 0, "devices", 0, "ports"), 0), "stations[0].devices[0].ports"),
        (
            _mutate(("stations", 0, "devices", 1, "release_soc"), 101),
            "stations[0].devices[1].release_soc",
        ),
        (_mutate(("stations", 0, "devices"), []), "stations[0].devices"),
        (_mutate(("stations", 0, "lat"), 91), "stations[0].lat"),
        (_mutate(("stations", 0, "site_kind"), "mall"), "stations[0].site_kind"),
        (_mutate(("stations", 0, "id"), "North-Gate"), "stations[0].id"),
        (_mutate(("stations", 0, "name"), {"zh": "北门"}), "stations[0].name.en"),
        (_mutate(("stations", 0, "name", "zh"), ""), "stations[0].name.zh"),
        (_mutate(("stations", 0, "colour"), "red"), "stations[0].colour"),  # typos are caught
        (_drop(("stations", 0, "address")), "stations[0].address"),
        (_mutate(("stations",), []), "stations"),
        (_drop(("district",)), "district"),
    ],
)
def test_schema_errors_name_the_field(data: dict[str, Any], where: str) -> None:
    message = load_error(data)
    assert message.startswith("test.json: invalid catalog\n")
    assert where in message


def test_error_lists_several_problems() -> None:
    data = _mutate(("stations", 0, "hours"), "bad")
    data["stations"][1]["lat"] = 200
    message = load_error(data)
    assert "stations[0].hours" in message
    assert "stations[1].lat" in message


# -- opening hours and distance --------------------------------------------------------------


def _open(hours: str, hhmm: str) -> bool:
    data = _mutate(("stations", 0, "hours"), hours)
    station = Catalog.from_json(json.dumps(data)).stations["north-gate"]
    h, m = hhmm.split(":")
    return station.is_open(int(h) * 60 + int(m))


@pytest.mark.parametrize(
    ("hours", "at", "is_open"),
    [
        ("07:00-22:00", "06:59", False),
        ("07:00-22:00", "07:00", True),
        ("07:00-22:00", "12:00", True),
        ("07:00-22:00", "21:59", True),
        ("07:00-22:00", "22:00", False),
        ("00:00-24:00", "00:00", True),
        ("00:00-24:00", "23:59", True),
        ("22:00-06:00", "21:59", False),
        ("22:00-06:00", "22:00", True),
        ("22:00-06:00", "23:59", True),
        ("22:00-06:00", "00:00", True),
        ("22:00-06:00", "05:59", True),
        ("22:00-06:00", "06:00", False),
        ("22:00-06:00", "12:00", False),
        ("18:30-02:15", "02:14", True),
        ("18:30-02:15", "02:15", False),
    ],
)
def test_is_open(hours: str, at: str, is_open: bool) -> None:
    assert _open(hours, at) is is_open


@pytest.mark.parametrize(
    ("a", "b", "metres", "tolerance"),
    [
        ((31.742, 117.296), (31.742, 117.296), 0.0, 1e-6),
        ((31.742, 117.296), (31.751, 117.296), 1000.8, 1.0),  # 0.009 deg of latitude
        ((0.0, 0.0), (0.0, 1.0), 111_195.0, 1.0),  # one degree on the equator
        ((0.0, 0.0), (0.0, 180.0), 20_015_087.0, 10.0),  # half the globe
        ((31.742, 117.296), (31.742, 117.306), 946.3, 1.0),  # cos(lat) shrinks longitude
    ],
)
def test_distance_m(
    a: tuple[float, float], b: tuple[float, float], metres: float, tolerance: float
) -> None:
    assert distance_m(*a, *b) == pytest.approx(metres, abs=tolerance)
    assert distance_m(*b, *a) == pytest.approx(metres, abs=tolerance)  # symmetric
