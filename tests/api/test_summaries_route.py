"""``GET /v1/summaries/stations`` in-process through the whole ASGI app: three simulated hours
of a station in the embedded store, riders' reports and a maintainer's actions through the
API on a fake clock (a real AlertEngine and SQLite), rolled up by the service's own
housekeeping rollups (the reports reach them through what ``create_app`` wires), then the
report as JSON and CSV, its key, bounds and errors."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.auth import KeyStore
from api.settings import ServeSettings
from api.summaries import CSV_COLUMNS, DEVICE_CSV_COLUMNS
from devices.catalog import Catalog
from devices.rollup import HOUR_MS
from ingest.alerts.config import AlertsConfig, ReportOptions
from ingest.alerts.engine import AlertEngine
from ingest.alerts.store import AlertStore
from ingest.config import IngestConfig
from ingest.housekeeping import Housekeeping
from ingest.inprocess import read_and_act
from ingest.rollups import HourlyRollups
from ingest.service import Ingest
from ingest.sqlite_store import SQLiteStore
from tests.alerts.helpers import Clock
from tests.ingest.test_rollups import HOURS, START_S, STATION, traffic

FIRST_HOUR = round(START_S * 1000)  # 2026-12-02T06:00:00+08:00
END_MS = FIRST_HOUR + HOURS * HOUR_MS
MINUTE = 60_000


@dataclass
class Served:
    http: httpx.AsyncClient
    clock: Clock
    store: SQLiteStore
    housekeeping: Housekeeping
    key: dict[str, str]


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    data_dir = tmp_path / "data"
    alerts = AlertsConfig(tick_s=3600, startup_grace_s=0, reports=ReportOptions(burst=50))
    config = IngestConfig(data_dir=data_dir, alerts=alerts)
    catalog = Catalog.load()
    ingest = Ingest(config, catalog)
    clock = Clock()
    async with AsyncExitStack() as stack:
        store = SQLiteStore.in_dir(data_dir)
        stack.callback(store.close)
        store.append(traffic())
        ingest.history = store
        # as ingest.service wires it for the embedded store
        ingest.housekeeping = Housekeeping(store, clock, rollups=HourlyRollups(store, catalog))
        alert_store = AlertStore.in_dir(data_dir)
        stack.callback(alert_store.close)
        await stack.enter_async_context(ingest.supervisor)  # as Ingest enters it
        engine = AlertEngine(alerts, catalog, ingest.twins, alert_store, clock=clock,
                             supervisor=ingest.supervisor)  # fmt: skip
        ingest.alerts = await stack.enter_async_context(engine)
        keys = KeyStore.in_dir(data_dir)
        token = keys.create("li-wei", "maintainer")[1]
        keys.close()
        app = create_app(*read_and_act(ingest), ServeSettings())
        ingest.count_reports_from(app.state.sentinels)  # as the composition root does
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver")
        )
        yield Served(http, clock, store, ingest.housekeeping,
                     {"Authorization": f"Bearer {token}"})  # fmt: skip


async def _post(s: Served, path: str, **body: Any) -> dict[str, Any]:
    headers = {} if path == "/v1/reports" else s.key  # riders report without a key
    r = await s.http.post(path, json=body or None, headers=headers)
    assert r.status_code in (200, 201), (path, r.text)
    answer: dict[str, Any] = r.json()
    return answer


async def a_day_of_reports(s: Served) -> None:
    """07:10 a smoke report at YGR-P01 (acknowledged after 20 minutes, resolved after an hour,
    confirmed), 07:20 a station's report (rejected), 08:05 a damage report at YGR-C01
    (expires), one report elsewhere; then the hours rolled up."""
    s.clock.ms = FIRST_HOUR + HOUR_MS + 10 * MINUTE  # 07:10 local
    smoke = await _post(s, "/v1/reports", station=STATION.id, device="YGR-P01",
                        category="smoke")  # fmt: skip
    s.clock.ms += 10 * MINUTE
    blocked = await _post(s, "/v1/reports", station=STATION.id, category="blocked")
    s.clock.ms += 10 * MINUTE  # 07:30: the smoke acknowledged after 20 minutes
    await _post(s, f"/v1/alerts/{smoke['alert_id']}/ack")
    s.clock.ms = FIRST_HOUR + 2 * HOUR_MS + 5 * MINUTE  # 08:05
    await _post(s, "/v1/reports", station=STATION.id, device="YGR-C01", category="damage")
    s.clock.ms += 5 * MINUTE  # 08:10: resolved an hour after it opened
    await _post(s, f"/v1/alerts/{smoke['alert_id']}/resolve")
    await _post(s, f"/v1/reports/{smoke['report_id']}/confirm")
    await _post(s, f"/v1/reports/{blocked['report_id']}/reject")
    await _post(s, "/v1/reports", station="ziyun-road", category="other")  # elsewhere
    s.clock.ms = END_MS + 3 * HOUR_MS  # the damage report's window is long over
    rollups = s.housekeeping.rollups
    assert rollups is not None
    assert rollups.catch_up(END_MS, max_hours=HOURS + 1) == HOURS


async def test_a_days_report_of_a_station_from_rollups_alerts_and_riders_reports(
    tmp_path: Path,
) -> None:
    async with served(tmp_path) as s:
        await a_day_of_reports(s)

        params = {"from": "2026-12-02", "to": "2026-12-03", "period": "day"}
        r = await s.http.get("/v1/summaries/stations", params=params, headers=s.key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["cache-control"] == "private, no-store"
        assert (body["from"], body["to"], body["timezone"]) == (
            "2026-12-02T00:00:00+08:00", "2026-12-03T00:00:00+08:00", "Asia/Shanghai",
        )  # fmt: skip
        assert body["rolled_through"] == "2026-12-02T01:00:00.000Z"  # 09:00 local
        rows = {row["station_id"]: row for row in body["rows"]}
        assert len(body["rows"]) == len(rows) == 7, "every station of the catalog, one day"
        row = rows[STATION.id]
        stored = s.store.rollups("station", [STATION.id], FIRST_HOUR, END_MS)
        assert len(stored) == HOURS

        def total(key: str) -> Any:
            return sum(h["data"][key] for h in stored)

        assert (row["hours"], row["hours_rolled_up"]) == (24, HOURS)
        # 06:00-07:00 is closed; 07:00-09:00 open
        assert row["open_minutes"] == 120
        assert row["port_free_share"] == round(total("minutes_port_free") / 120, 4)
        assert row["battery_ready_share"] == round(total("minutes_battery_ready") / 120, 4)
        assert 0 < row["port_free_share"] <= 1
        assert row["offline_minutes"] == total("minutes_offline") > 0
        assert (row["sessions"], row["swaps"]) == (total("sessions"), total("swaps"))
        assert row["sessions"] + row["swaps"] > 0
        assert row["energy_wh"] == round(total("energy_wh"), 1)
        assert (row["alerts"], row["acknowledged"], row["resolved"]) == (3, 1, 1)
        assert (row["mtta_s"], row["mttr_s"]) == (1200.0, 3600.0)
        assert row["reports"] == 3, "counted by the hourly rollups"
        assert [row[f"reports_{o}"] for o in ("confirmed", "rejected", "expired", "pending")] == [
            1, 1, 1, 0,
        ], "the damage report, unconfirmed, expired when the report settled it"  # fmt: skip
        assert rows["ziyun-road"]["reports"] == 1

        r = await s.http.get(
            "/v1/summaries/stations",
            params={**params, "station": STATION.id},
            headers={**s.key, "Accept": "text/csv"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "text/csv; charset=utf-8"
        assert r.headers["content-disposition"] == (
            'attachment; filename="chargewatch-stations-day-2026-12-02-2026-12-02.csv"'
        )
        table = list(csv.reader(io.StringIO(r.text, newline="")))
        assert table[0] == list(CSV_COLUMNS)
        assert len(table) == 2, "a header, one station, one day"
        got = dict(zip(table[0], table[1], strict=True))
        assert got["station_id"] == STATION.id
        assert got["name_zh"] == Catalog.load().stations[STATION.id].name.zh
        for key in ("sessions", "swaps", "alerts", "reports", "reports_expired", "open_minutes"):
            assert got[key] == str(row[key]), key
        assert (got["mtta_s"], got["port_free_share"]) == ("1200.0", str(row["port_free_share"]))


async def test_a_days_report_per_device_of_a_station(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        await a_day_of_reports(s)
        params = {"from": "2026-12-02", "to": "2026-12-03", "station": STATION.id}
        r = await s.http.get("/v1/summaries/devices", params=params, headers=s.key)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["from"], body["period"]) == ("2026-12-02T00:00:00+08:00", "day")
        rows = {row["device_id"]: row for row in body["rows"]}
        assert list(rows) == [d.id for d in STATION.devices], "the station's, in catalog order"
        for spec in STATION.devices:
            row = rows[spec.id]
            stored = s.store.rollups("device", [spec.id], FIRST_HOUR, END_MS)
            assert len(stored) == HOURS
            assert (row["kind"], row["station_id"]) == (spec.kind, STATION.id)
            assert row["hours_rolled_up"] == HOURS
            assert row["open_minutes"] == 120, "06:00-07:00 closed"
            assert row["offline_minutes"] == sum(h["data"]["minutes_offline"] for h in stored)
            for key in ("sessions", "swaps", "reports"):
                assert row[key] == sum(h["data"][key] for h in stored), (spec.id, key)
            free = "minutes_port_free" if spec.kind == "pile" else "minutes_battery_ready"
            share = "port_free_share" if spec.kind == "pile" else "battery_ready_share"
            other = "battery_ready_share" if spec.kind == "pile" else "port_free_share"
            assert row[share] == round(sum(h["data"][free] for h in stored) / 120, 4)
            assert row[other] is None
        pile, cabinet = rows["YGR-P01"], rows["YGR-C01"]
        assert pile["offline_minutes"] == 20, "dead 07:40-08:00"
        assert cabinet["swaps"] > 0
        assert (pile["alerts"], pile["mtta_s"], pile["mttr_s"]) == (1, 1200.0, 3600.0)
        assert (pile["reports"], pile["reports_confirmed"]) == (1, 1)
        assert (cabinet["alerts"], cabinet["acknowledged"], cabinet["mttr_s"]) == (1, 0, None)
        assert (cabinet["reports"], cabinet["reports_expired"]) == (1, 1)
        silent = [rows[d.id] for d in STATION.devices if d.id not in {"YGR-P01", "YGR-C01"}]
        assert sum(r["alerts"] + r["reports"] for r in silent) == 0, "the station's report"
        assert sum(r["reports"] for r in rows.values()) == 2

        r = await s.http.get(
            "/v1/summaries/devices",
            params={"from": "2026-12-02", "to": "2026-12-04", "device": "YGR-P01"},
            headers={**s.key, "Accept": "text/csv"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["content-disposition"] == (
            'attachment; filename="chargewatch-devices-day-2026-12-02-2026-12-03.csv"'
        )
        table = list(csv.reader(io.StringIO(r.text, newline="")))
        assert table[0] == list(DEVICE_CSV_COLUMNS)
        assert [row[:2] for row in table[1:]] == [["YGR-P01", "pile"]] * 2, "one device, 2 days"
        got = dict(zip(table[0], table[1], strict=True))
        assert (got["station_id"], got["mttr_s"]) == (STATION.id, "3600.0")
        assert got["sessions"] == str(pile["sessions"])


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"device": "nowhere"}, 404),
        ({"station": "ziyun-road", "device": "YGR-P01"}, 404),  # not that station's
        ({"device": "x" * 65}, 422),
        ({"from": "2026-12-03", "to": "2026-12-02"}, 422),
    ],
)
async def test_a_device_report_for_an_unknown_device_or_window_is_refused(
    tmp_path: Path, params: dict[str, str], status: int
) -> None:
    async with served(tmp_path) as s:
        r = await s.http.get("/v1/summaries/devices", params=params, headers=s.key)
        assert r.status_code == status, r.text[:300]
        assert (await s.http.get("/v1/summaries/devices")).status_code == 401


@pytest.mark.parametrize(
    ("params", "status", "field"),
    [
        ({"from": "2026-12-03", "to": "2026-12-02"}, 422, "from"),
        ({"from": "2026-12-02", "to": "2026-12-02"}, 422, "from"),
        ({"from": "2025-12-01", "to": "2026-12-03"}, 422, "from"),  # 367 days
        ({"from": "2026-13-02"}, 422, "from"),
        ({"from": "yesterday"}, 422, "from"),
        ({"to": "2026-12-02T00:00:00"}, 422, "to"),  # no offset
        ({"period": "year"}, 422, "period"),
        ({"from": "9998-11-30", "to": "9998-12-31"}, 422, "to"),
        ({"station": "nowhere"}, 404, None),
    ],
)
async def test_a_window_reversed_too_long_or_malformed_is_refused(
    tmp_path: Path, params: dict[str, str], status: int, field: str | None
) -> None:
    async with served(tmp_path) as s:
        r = await s.http.get("/v1/summaries/stations", params=params, headers=s.key)
        assert r.status_code == status, r.text[:300]
        if field is not None:
            assert field in str(r.json()), r.text


async def test_the_report_needs_a_maintainer_key(tmp_path: Path) -> None:
    async with served(tmp_path) as s:
        r = await s.http.get("/v1/summaries/stations")
        assert r.status_code == 401
        r = await s.http.get("/v1/summaries/stations", headers={"Authorization": "Bearer cwk_x"})
        assert r.status_code == 401
        r = await s.http.get("/v1/summaries/stations", params={"period": "month"}, headers=s.key)
        assert r.status_code == 200
        assert {row["period"] for row in r.json()["rows"]} == {"month"}
