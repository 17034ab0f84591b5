"""The operator reports page in headless chromium: ``chargewatch serve`` on a data dir
holding three rolled-up hours of a station; the page draws one SVG chart per metric and a
table from ``/v1/summaries/stations``, switches to one device's rows
(``/v1/summaries/devices``), under the console's CSP (nothing refused), and downloads the
CSV with the key; the console links to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from devices.rollup import HOUR_MS
from ingest.rollups import HourlyRollups
from ingest.sqlite_store import SQLiteStore
from tests.alerts.keys import maintainer_key
from tests.e2e.test_pages import TIMEOUT_MS, csp_violations
from tests.ingest.test_rollups import CATALOG, HOURS, RELEASE, START_S, STATION, traffic
from tests.servers import chargewatch_serve

DAY = "2026-12-02"
CABINET = "YGR-C01"


def test_the_reports_page_charts_a_stations_days(tmp_path: Path, browser: Any) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteStore.in_dir(data)
    try:
        store.append(traffic())
        end = round(START_S * 1000) + HOURS * HOUR_MS
        assert HourlyRollups(store, CATALOG, RELEASE).catch_up(end, max_hours=9) == HOURS
    finally:
        store.close()
    key = maintainer_key(data)
    with chargewatch_serve(tmp_path / "serve", None, data_dir=data) as svc:
        r = httpx.get(
            svc.base_url + "/v1/summaries/stations",
            params={"from": DAY, "to": "2026-12-03", "station": STATION.id},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        [row] = r.json()["rows"]
        assert row["energy_wh"] > 0, str(row)
        assert row["swaps"] > 0, str(row)

        context = browser.new_context(
            viewport={"width": 1200, "height": 900}, accept_downloads=True
        )
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        refused = csp_violations(page)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(svc.base_url + "/console/summaries")
        page.wait_for_selector("#status:has-text('log in at the console')")
        page.evaluate("k => localStorage.setItem('cw-key', k)", key)  # as the console's login
        page.reload()
        page.wait_for_selector("body[data-state='shown']")
        page.fill("#from", DAY)
        page.fill("#to", "2026-12-03")
        page.select_option("#period", "day")
        page.click("#filters button[type=submit]")
        page.wait_for_selector(f"#station option[value='{STATION.id}']", state="attached")
        page.select_option("#station", STATION.id)
        tr = page.wait_for_selector(f"#rows tbody tr[data-start='{DAY}']")
        assert tr is not None
        cells = [c.inner_text() for c in tr.query_selector_all("td")]
        assert cells[0] == DAY
        assert cells[1] == f"{row['port_free_share'] * 100:.1f}%"
        assert (cells[5], cells[6]) == (str(row["sessions"]), str(row["swaps"]))
        assert cells[3] == str(row["offline_minutes"])
        assert len(page.query_selector_all("#charts figure svg")) == 9, "a chart per metric"
        bars = page.query_selector_all("#charts figure[data-metric='swaps'] rect")
        assert [b.get_attribute("data-value") for b in bars] == [str(row["swaps"])]
        share = page.query_selector("#charts figure[data-metric='port_free_share'] rect")
        assert share is not None
        assert float(share.get_attribute("data-value") or "nan") == row["port_free_share"]
        assert float(share.get_attribute("height") or "0") > 0
        with page.expect_download() as download:
            page.click("#csv")
        csv_path = tmp_path / "got.csv"
        download.value.save_as(csv_path)
        assert (
            download.value.suggested_filename
            == "chargewatch-stations-day-2026-12-02-2026-12-02.csv"
        )
        lines = csv_path.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("station_id,name_zh,name_en,period,start,end")
        assert len(lines) == 1 + len(CATALOG.stations), "every station, one day"

        # by device: the station's devices, one chosen; its own numbers
        r = httpx.get(
            svc.base_url + "/v1/summaries/devices",
            params={"from": DAY, "to": "2026-12-03", "device": CABINET},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        [mine] = r.json()["rows"]
        assert 0 < mine["swaps"] == row["swaps"], "the station's one cabinet publishing"
        assert mine["offline_minutes"] < row["offline_minutes"]
        assert page.is_hidden("#device-box")
        page.select_option("#scope", "devices")
        page.wait_for_selector(f"#device option[value='{CABINET}']", state="attached")
        assert page.is_visible("#device-box")
        options = page.eval_on_selector_all("#device option", "os => os.map(o => o.value)")
        assert options == [d.id for d in STATION.devices]
        page.select_option("#device", CABINET)
        page.wait_for_function(
            "m => document.querySelector('#rows tbody td:nth-child(4)')?.textContent === m",
            arg=str(mine["offline_minutes"]),
        )
        cells = [c.inner_text() for c in page.query_selector_all("#rows tbody tr td")]
        assert cells[2] == f"{mine['battery_ready_share'] * 100:.1f}%"
        assert cells[1] == "–", "a cabinet has no port share"
        bars = page.query_selector_all("#charts figure[data-metric='offline_minutes'] rect")
        assert [b.get_attribute("data-value") for b in bars] == [str(mine["offline_minutes"])]
        with page.expect_download() as download:
            page.click("#csv")
        assert download.value.suggested_filename == (
            "chargewatch-devices-day-2026-12-02-2026-12-02.csv"
        )
        download.value.save_as(csv_path)
        lines = csv_path.read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("device_id,kind,station_id,name_zh")
        assert len(lines) == 1 + len(STATION.devices), "the station's devices, one day"

        page.goto(svc.base_url + "/console")
        page.click("#reports-link")
        page.wait_for_url("**/console/summaries")
        context.close()
    assert refused == [], refused
    assert errors == [], errors
