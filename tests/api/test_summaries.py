"""Operator reports, the pure part: calendar periods in the district's time zone, what a
station's period adds up to from hourly rollups, alert timings and report outcomes, and
the CSV (read back with the csv module)."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from api.summaries import (
    CSV_COLUMNS,
    DEVICE_CSV_COLUMNS,
    DeviceInfo,
    ReportOutcome,
    StationInfo,
    periods,
    summarize,
    to_csv,
)
from ingest.alerts.repair import Timing

TZ = ZoneInfo("Asia/Shanghai")
H = 3_600_000


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.mark.parametrize(
    ("period", "since", "until", "want"),
    [
        (
            "day",
            "2026-12-31T23:30:00+08:00",
            "2027-01-01T00:30:00+08:00",
            [("2026-12-31T00:00:00+08:00", "2027-01-01T00:00:00+08:00"),
             ("2027-01-01T00:00:00+08:00", "2027-01-02T00:00:00+08:00")],
        ),
        (  # 2026-12-28 is a Monday; 16:00Z on Jan 3 is Jan 4 00:00 local: the next week
            "week",
            "2026-12-30T10:00:00+08:00",
            "2027-01-03T16:00:00.001+00:00",
            [("2026-12-28T00:00:00+08:00", "2027-01-04T00:00:00+08:00"),
             ("2027-01-04T00:00:00+08:00", "2027-01-11T00:00:00+08:00")],
        ),
        (  # to is exclusive: a window ending at local midnight does not touch the next day
            "month",
            "2026-11-30T16:00:00+00:00",
            "2027-01-01T00:00:00+08:00",
            [("2026-12-01T00:00:00+08:00", "2027-01-01T00:00:00+08:00")],
        ),
        (
            "month",
            "2026-11-15T00:00:00+08:00",
            "2027-02-01T00:00:01+08:00",
            [("2026-11-01T00:00:00+08:00", "2026-12-01T00:00:00+08:00"),
             ("2026-12-01T00:00:00+08:00", "2027-01-01T00:00:00+08:00"),
             ("2027-01-01T00:00:00+08:00", "2027-02-01T00:00:00+08:00"),
             ("2027-02-01T00:00:00+08:00", "2027-03-01T00:00:00+08:00")],
        ),
    ],
)  # fmt: skip
def test_periods_are_whole_local_calendar_periods(
    period: str, since: str, until: str, want: list[tuple[str, str]]
) -> None:
    got = periods(ms(since), ms(until), period, TZ)  # type: ignore[arg-type]
    assert got == [(ms(a), ms(b)) for a, b in want]


def test_periods_follow_a_zone_with_daylight_saving() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    [(start, end)] = periods(ms("2026-03-29T12:00:00+02:00"), ms("2026-03-29T13:00:00+02:00"),
                             "day", berlin)  # fmt: skip
    assert (end - start) // H == 23, "the day the clocks go forward"


STATIONS = [
    StationInfo("a", "甲站", 'Station A, "north"', piles=2, cabinets=1),
    StationInfo("b", "乙站", "Station B", piles=1, cabinets=0),
]
DAY1 = ms("2026-12-02T00:00:00+08:00")
DAY2 = DAY1 + 24 * H


def hour(devices: int, **data: object) -> dict[str, object]:
    return {"devices": devices, **data}


def test_a_stations_period_adds_up_its_hours_alerts_and_reports() -> None:
    rollups = [
        {"id": "a", "hour_ms": DAY1 + 9 * H, "data": hour(
            3, minutes_open=180, minutes_port_free=45, minutes_battery_ready=60,
            minutes_offline=20, energy_wh=1000.3, sessions=4, swaps=2,
            faults={"over_current": 1}, reports=1)},
        {"id": "a", "hour_ms": DAY1 + 10 * H, "data": hour(
            3, minutes_open=180, minutes_port_free=60, minutes_battery_ready=30,
            minutes_offline=0, energy_wh=500.1, sessions=1, swaps=0,
            faults={"over_current": 2, "vendor_x": 1}, reports=2)},
        {"id": "a", "hour_ms": DAY1 + 2 * H, "data": hour(  # closed: no open minutes
            3, minutes_open=0, minutes_port_free=0, minutes_offline=180)},
        {"id": "a", "hour_ms": DAY2 + 9 * H, "data": hour(3, minutes_open=180,
            minutes_port_free=6, minutes_battery_ready=0, energy_wh=7.0)},
        {"id": "b", "hour_ms": DAY1 + 9 * H, "data": hour(1, minutes_open=60,
            minutes_port_free=15)},
        {"id": "zzz", "hour_ms": DAY1 + 9 * H, "data": hour(1, sessions=99)},  # not asked
        {"id": "a", "hour_ms": DAY2 + 24 * H, "data": hour(1, sessions=99)},  # after the window
    ]  # fmt: skip
    timings = [
        Timing("a", "over_current", DAY1 + 9 * H, DAY1 + 9 * H + 60_000, DAY1 + 10 * H),
        Timing("a", "comm_error", DAY1 + 11 * H, DAY1 + 11 * H + 180_000, None),
        Timing("a", "smoke", DAY1 + 12 * H, None, None),
        Timing("a", "rider_report", DAY2 + H, None, DAY2 + 2 * H),
        Timing("service", "store_unavailable", DAY1 + H, DAY1 + 2 * H, DAY1 + 3 * H),
    ]
    outcomes = [
        ReportOutcome("a", DAY1 + 9 * H, "confirmed"),
        ReportOutcome("a", DAY1 + 10 * H, "rejected"),
        ReportOutcome("a", DAY1 + 10 * H + 1, "pending"),
        ReportOutcome("a", DAY2, "expired"),
        ReportOutcome("b", DAY1 - 1, "confirmed"),  # the day before
    ]
    rows = summarize(STATIONS, [(DAY1, DAY2), (DAY2, DAY2 + 24 * H)], rollups, timings,
                     outcomes, period="day", tz=TZ)  # fmt: skip
    assert [(r["station_id"], r["start"]) for r in rows] == [
        ("a", "2026-12-02T00:00:00+08:00"),
        ("a", "2026-12-03T00:00:00+08:00"),
        ("b", "2026-12-02T00:00:00+08:00"),
        ("b", "2026-12-03T00:00:00+08:00"),
    ]
    a1, a2, b1, b2 = rows
    assert a1 | {} == {
        "station_id": "a", "name_zh": "甲站", "name_en": 'Station A, "north"', "period": "day",
        "start": "2026-12-02T00:00:00+08:00", "end": "2026-12-03T00:00:00+08:00",
        "hours": 24, "hours_rolled_up": 3, "open_minutes": 120,
        "port_free_share": round(105 / 120, 4), "battery_ready_share": 0.75,
        "offline_minutes": 200, "energy_wh": 1500.4, "sessions": 5, "swaps": 2,
        "faults": {"over_current": 3, "vendor_x": 1},
        "alerts": 3, "acknowledged": 2, "resolved": 1, "mtta_s": 120.0, "mttr_s": 3600.0,
        "reports": 3, "reports_confirmed": 1, "reports_rejected": 1, "reports_expired": 0,
        "reports_pending": 1,
    }  # fmt: skip
    assert (a2["open_minutes"], a2["port_free_share"], a2["battery_ready_share"]) == (60, 0.1, 0.0)
    assert (a2["alerts"], a2["mtta_s"], a2["mttr_s"]) == (1, None, 3600.0)
    assert a2["reports_expired"] == 1
    assert a2["sessions"] == 0
    assert b1["port_free_share"] == 0.25
    assert b1["battery_ready_share"] is None, "no cabinet at b"
    assert b1["reports_confirmed"] == 0
    assert (b2["hours_rolled_up"], b2["port_free_share"], b2["alerts"]) == (0, None, 0)


def test_csv_has_a_header_then_one_row_per_station_and_period() -> None:
    rows = summarize(
        STATIONS,
        [(DAY1, DAY2)],
        [{"id": "a", "hour_ms": DAY1 + 9 * H, "data": hour(
            3, minutes_open=180, minutes_port_free=30, energy_wh=1234.5,
            faults={"smoke": 2, "vendor_x": 3})}],
        [Timing("a", "smoke", DAY1 + 9 * H, DAY1 + 9 * H + 1500, None)],
        [],
        period="day",
        tz=TZ,
    )  # fmt: skip
    text = to_csv(rows)
    table = list(csv.reader(io.StringIO(text, newline="")))
    assert table[0] == list(CSV_COLUMNS)
    assert len(table) == 1 + len(STATIONS)
    a = dict(zip(table[0], table[1], strict=True))
    assert a["name_en"] == 'Station A, "north"'  # quoted: a comma and quotes inside
    assert '"Station A, ""north"""' in text
    assert (a["energy_wh"], a["port_free_share"], a["open_minutes"]) == ("1234.5", "0.5", "60")
    assert (a["faults_smoke"], a["faults_other"], a["faults_total"]) == ("2", "3", "5")
    assert (a["mtta_s"], a["mttr_s"]) == ("1.5", "")  # never resolved: no value, not 0
    assert a["alerts"] == "1"
    b = dict(zip(table[0], table[2], strict=True))
    assert (b["battery_ready_share"], b["hours_rolled_up"]) == ("", "0")
    datetime.fromisoformat(a["start"])  # RFC 3339 with the district's offset
    assert datetime.fromisoformat(a["start"]).utcoffset() == timedelta(hours=8)


DEVICES = [
    DeviceInfo("a-p1", "pile", STATIONS[0]),
    DeviceInfo("a-c1", "cabinet", STATIONS[0]),
]


def test_a_devices_period_adds_up_its_own_hours_alerts_and_reports() -> None:
    rollups = [  # a device's rollup: devices=1, its own minutes
        {"id": "a-p1", "hour_ms": DAY1 + 9 * H, "data": hour(
            1, minutes_open=60, minutes_port_free=45, minutes_offline=10, energy_wh=800.0,
            sessions=3, faults={"over_current": 1}, reports=1)},
        {"id": "a-c1", "hour_ms": DAY1 + 9 * H, "data": hour(
            1, minutes_open=60, minutes_battery_ready=30, swaps=2, reports=2)},
        {"id": "a", "hour_ms": DAY1 + 9 * H, "data": hour(2, sessions=99)},  # the station
    ]  # fmt: skip
    timings = [
        Timing("a", "over_current", DAY1 + 9 * H, DAY1 + 9 * H + 60_000, DAY1 + 10 * H, "a-p1"),
        Timing("a", "door_fault", DAY1 + 9 * H, DAY1 + 9 * H + 120_000, None, "a-c1"),
        Timing("a", "rider_report", DAY1 + 9 * H, DAY1 + 10 * H, None),  # the station's own
        Timing("b", "smoke", DAY1 + 9 * H, None, None, "a-p1"),  # a device moved? counted
    ]
    outcomes = [
        ReportOutcome("a", DAY1 + 9 * H, "confirmed", "a-p1"),
        ReportOutcome("a", DAY1 + 9 * H, "rejected", "a-c1"),
        ReportOutcome("a", DAY1 + 9 * H, "expired", "a-c1"),
        ReportOutcome("a", DAY1 + 9 * H, "pending"),  # the station's: no device's
    ]
    rows = summarize(DEVICES, [(DAY1, DAY2)], rollups, timings, outcomes, period="day", tz=TZ)
    pile, cabinet = rows
    assert pile == {
        "device_id": "a-p1", "kind": "pile", "station_id": "a", "name_zh": "甲站",
        "name_en": 'Station A, "north"', "period": "day",
        "start": "2026-12-02T00:00:00+08:00", "end": "2026-12-03T00:00:00+08:00",
        "hours": 24, "hours_rolled_up": 1, "open_minutes": 60,
        "port_free_share": 0.75, "battery_ready_share": None,
        "offline_minutes": 10, "energy_wh": 800.0, "sessions": 3, "swaps": 0,
        "faults": {"over_current": 1},
        "alerts": 2, "acknowledged": 1, "resolved": 1, "mtta_s": 60.0, "mttr_s": 3600.0,
        "reports": 1, "reports_confirmed": 1, "reports_rejected": 0, "reports_expired": 0,
        "reports_pending": 0,
    }  # fmt: skip
    assert (cabinet["port_free_share"], cabinet["battery_ready_share"]) == (None, 0.5)
    assert (cabinet["alerts"], cabinet["mtta_s"], cabinet["mttr_s"]) == (1, 120.0, None)
    assert (cabinet["reports"], cabinet["reports_rejected"], cabinet["reports_expired"]) == (
        2, 1, 1,
    )  # fmt: skip
    assert cabinet["swaps"] == 2

    table = list(csv.reader(io.StringIO(to_csv(rows, DEVICE_CSV_COLUMNS), newline="")))
    assert table[0] == list(DEVICE_CSV_COLUMNS)
    assert table[0][:5] == ["device_id", "kind", "station_id", "name_zh", "name_en"]
    assert table[0][5:] == list(CSV_COLUMNS)[3:], "the same metrics as a station's"
    got = dict(zip(table[0], table[1], strict=True))
    assert (got["device_id"], got["faults_over_current"], got["mtta_s"]) == ("a-p1", "1", "60.0")
