"""The service with an InfluxDB history rolls the hours up itself, in the background, and the
summaries read those rollups (issue 15 part 1): an in-process ``Ingest`` (no broker) with its
history in a real influxd 1.6.7, set up by ``chargewatch influx setup``; three simulated hours
of a station written through the service's history, a housekeeping pass woken, then
``GET /v1/summaries/stations`` through the whole ASGI app. The expected numbers are the
embedded store's rollups of the same messages (``tests/ingest/test_rollups.py`` checks those
against the messages themselves)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.auth import KeyStore
from api.settings import ServeSettings
from devices.catalog import Catalog
from devices.rollup import HOUR_MS
from ingest.config import IngestConfig
from ingest.influx import InfluxHistory
from ingest.influxrollups import InfluxRollupStore
from ingest.influxsetup import setup_v1
from ingest.inprocess import read_and_act
from ingest.rollups import HourlyRollups
from ingest.service import HOUSEKEEPING, Ingest
from ingest.sqlite_store import SQLiteStore
from ingest.store import RollupStore
from tests.influx_servers import influxd
from tests.ingest.test_rollups import CATALOG, HOURS, RELEASE, START_S, STATION, traffic

FIRST = round(START_S * 1000)  # 2026-12-02T06:00:00+08:00
END = FIRST + HOURS * HOUR_MS

pytestmark = pytest.mark.e2e


async def test_serve_with_influx_history_rolls_up_hours_and_the_summaries_read_them(
    tmp_path: Path,
) -> None:
    rows = traffic()
    embedded = SQLiteStore(tmp_path / "embedded.db")
    try:
        embedded.append(rows)
        assert HourlyRollups(embedded, CATALOG, RELEASE).catch_up(END, max_hours=9) == HOURS
        want = embedded.rollups("station", [STATION.id], FIRST, END)
    finally:
        embedded.close()
    with influxd(tmp_path / "influxd") as server:
        url = f"influx1://127.0.0.1:{server.port}?db=cw"
        config = IngestConfig(
            data_dir=tmp_path / "data", history=url, housekeeping_s=3600, release_soc=RELEASE
        )
        admin = InfluxHistory(url)
        try:
            # the rollups policy; raw points kept 100 years: the traffic is dated 2026-12-02,
            # and a 90-day policy would refuse it from March 2027 on
            await asyncio.to_thread(setup_v1, admin, 36_500)
        finally:
            admin.close()
        async with Ingest(config, Catalog.load(), connect=False) as ingest:
            assert HOUSEKEEPING in ingest.supervisor.names, "supervised, like the embedded one"
            assert ingest.housekeeping is not None
            history = ingest.history
            assert isinstance(history, InfluxRollupStore)
            await asyncio.to_thread(history.append, rows)  # what the pipeline writes through
            read, act = read_and_act(ingest)
            assert isinstance(read.history, RollupStore), "the read side hands out the rollups"
            assert history.rolled_through() is None, "nothing rolled before the pass"
            # the service's clock: the traffic's hours are over (grace included)
            ingest.housekeeping.clock_ms = lambda: END + round(config.compact_grace_s * 1000)
            ingest.housekeeping.wake()
            deadline = time.monotonic() + 30
            while ingest.housekeeping.passes == 0:
                assert time.monotonic() < deadline, "no housekeeping pass within 30 s"
                await asyncio.sleep(0.05)
            assert ingest.housekeeping.hours_rolled_up == HOURS
            assert history.rolled_through() == END

            app = create_app(read, act, ServeSettings())
            keys = KeyStore.in_dir(config.data_dir)
            token = keys.create("li-wei", "maintainer")[1]
            keys.close()
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                r = await http.get(
                    "/v1/summaries/stations",
                    params={"from": "2026-12-02", "to": "2026-12-03", "station": STATION.id},
                    headers={"Authorization": f"Bearer {token}"},
                )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rolled_through"] == "2026-12-02T01:00:00.000Z"  # 09:00 local
    [row] = body["rows"]
    assert row["hours_rolled_up"] == HOURS
    data = [h["data"] for h in want]
    assert row["offline_minutes"] == sum(d["minutes_offline"] for d in data) > 0
    assert row["swaps"] == sum(d["swaps"] for d in data)
    assert row["sessions"] == sum(d["sessions"] for d in data)
    assert row["sessions"] + row["swaps"] > 0
    assert row["port_free_share"] == round(sum(d["minutes_port_free"] for d in data) / 120, 4)
