"""Hourly rollups of an InfluxDB history, computed by the service (``ingest.influxrollups``).

The read path against a real influxd 1.6.7: three simulated hours of a station written
through the v1 ``/write``, rolled up by ``HourlyRollups`` reading them back over InfluxQL,
written to the ``rollups`` policy and read back: the same rollups as the embedded store
computes from the same messages. The 2.x/3.x write path (``/api/v2/write``) against
VictoriaMetrics, the way the rest of the influx code is tested: no InfluxDB 2.x/3.x server
package exists here (shared/architecture.md), so the bucket ``<bucket>_rollups`` and its DBRP
mapping are not exercised against a real 2.x."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from api.summaries import StationInfo, periods, summarize
from devices.rollup import HOUR_MS
from ingest.influx import InfluxHistory
from ingest.influxrollups import InfluxRollupStore
from ingest.rollups import HourlyRollups, district_tz
from ingest.sqlite_store import SQLiteStore
from tests.e2e.test_influx import series
from tests.influx_servers import influxd, victoria_metrics, vm_export
from tests.ingest.test_rollups import CATALOG, HOURS, RELEASE, START_S, STATION, traffic

FIRST = round(START_S * 1000)
END = FIRST + HOURS * HOUR_MS
IDS = [d.id for d in STATION.devices]

pytestmark = pytest.mark.e2e


def test_rollups_computed_from_influxd_match_the_embedded_stores(tmp_path: Path) -> None:
    rows = traffic()
    embedded = SQLiteStore(tmp_path / "cw.db")
    try:
        embedded.append(rows)
        assert HourlyRollups(embedded, CATALOG, RELEASE).catch_up(END, max_hours=9) == HOURS
        want = {
            scope: embedded.rollups(scope, ids, FIRST, END)
            for scope, ids in (("device", IDS), ("station", [STATION.id]))
        }
    finally:
        embedded.close()
    with influxd(tmp_path / "influxd") as server:
        url = f"influx1://127.0.0.1:{server.port}?db=cw"
        setup = subprocess.run(
            [sys.executable, "-m", "api.cli", "influx", "setup", "--history", url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert setup.returncode == 0, setup.stdout + setup.stderr  # the rollups policy
        history = InfluxHistory(url)
        try:
            history.append(rows)
            store = InfluxRollupStore(history)
            assert store.rolled_through() is None
            assert store.first_ts() == min(r.ts_ms for r in rows)
            rollups = HourlyRollups(store, CATALOG, RELEASE)
            assert rollups.catch_up(END, max_hours=2) == 2, "a few hours per call"
            assert rollups.catch_up(END, max_hours=9) == HOURS - 2
            assert rollups.catch_up(END, max_hours=9) == 0, "up to date"
            assert store.rolled_through() == END
            got = {scope: store.rollups(scope, ids, FIRST, END) for scope, ids in
                   (("device", IDS), ("station", [STATION.id]))}  # fmt: skip
            rollups.roll(FIRST)  # again: the points overwrite themselves
            again = store.rollups("station", [STATION.id], FIRST, END)
            assert rollups.undecodable == 0
            # what the summaries read, through the RollupStore protocol
            tz = district_tz(CATALOG)
            info = StationInfo(STATION.id, STATION.name.zh, STATION.name.en, 30, 12)
            spans = periods(FIRST, END, "day", tz)
            [day] = summarize([info], spans, again, [], [], period="day", tz=tz)
        finally:
            history.close()
    assert len(got["device"]) == len(IDS) * HOURS
    assert got == want
    assert again == want["station"]
    data = [h["data"] for h in got["station"]]
    assert sum(d["minutes_offline"] for d in data) > 0
    assert sum(d["swaps"] for d in data) > 0
    assert any(d["minutes_port_free"] for d in data)
    assert day["swaps"] == sum(d["swaps"] for d in data)
    assert day["hours_rolled_up"] == HOURS


def test_rollups_written_through_the_v2_write_api(tmp_path: Path) -> None:
    with victoria_metrics(tmp_path / "vm") as vm:
        history = InfluxHistory(
            f"influx2://127.0.0.1:{vm.port}?org=chargewatch&bucket=history&token=secret"
        )
        try:
            store = InfluxRollupStore(history)
            assert store.rollup_bucket == "history_rollups"
            data = (
                '{"devices": 2, "minutes_online": 110, "minutes_offline": 10,'
                ' "energy_wh": 812.5, "faults": {"smoke": 1},'
                ' "reports_by_category": {"blocked": 2}, "reports": 2}'
            )
            store.save_rollups(
                [("device", "YGR-P01", FIRST, data), ("station", STATION.id, FIRST, data)],
                FIRST + HOUR_MS,
            )
            assert history.points_written == 3
        finally:
            history.close()
        got = series(vm_export(vm, '{__name__=~"rollup.*"}'))
    at = [FIRST]
    for who in ("id=YGR-P01,scope=device", f"id={STATION.id},scope=station"):
        tags = tuple(who.split(","))
        assert got[("rollup_minutes_online", *tags)] == ([110], at)
        assert got[("rollup_energy_wh", *tags)] == ([812.5], at)
        assert got[("rollup_faults.smoke", *tags)] == ([1], at)
        assert got[("rollup_reports_by_category.blocked", *tags)] == ([2], at)
    assert got[("rollup_mark_through_ms",)] == ([FIRST + HOUR_MS], [FIRST + HOUR_MS])
    assert len(got) == 2 * 7 + 1, "seven fields per rollup, one mark"
