"""``chargewatch influx setup`` against a real influxd 1.6.7: the retention policies and the
continuous queries it creates, run twice (harmless) and with a new retention, and the
hourly rollups those queries compute from history written by the service's store."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from ingest.influx import InfluxHistory
from ingest.influxsetup import hourly_selects
from tests.api.test_history_stores import HOUR, T0, story
from tests.influx_servers import influxd
from tests.servers import chargewatch_argv

pytestmark = pytest.mark.e2e


def setup(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = chargewatch_argv("influx", "setup", "--history", url, *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_setup_creates_retention_and_hourly_rollups_on_influxd_1_6(tmp_path: Path) -> None:
    with influxd(tmp_path / "influxd") as server:
        url = f"influx1://127.0.0.1:{server.port}?db=cw"
        done = setup(url)
        assert done.returncode == 0, done.stdout + done.stderr
        history = InfluxHistory(url)
        try:
            policies = {p["name"]: p for p in history.query('SHOW RETENTION POLICIES ON "cw"')}
            assert policies["raw"]["duration"] == "2160h0m0s"
            assert policies["raw"]["default"] is True
            assert policies["rollups"]["duration"] == "0s"  # kept forever
            cqs = [q["name"] for q in history.query("SHOW CONTINUOUS QUERIES")]
            assert sorted(cqs) == sorted(f"cw_{n}" for n in hourly_selects("cw"))

            again = setup(url, "--raw-days", "30")
            assert again.returncode == 0, again.stdout + again.stderr
            policies = {p["name"]: p for p in history.query('SHOW RETENTION POLICIES ON "cw"')}
            assert policies["raw"]["duration"] == "720h0m0s"
            assert len(history.query("SHOW CONTINUOUS QUERIES")) == len(cqs)

            rows = story()  # ten hours of two devices, written as serve would
            history.append(rows)
            where = f"time >= {T0 - HOUR}ms AND time < {T0 + 12 * HOUR}ms"
            for select in hourly_selects("cw", where).values():  # the queries, over the past
                history.execute(select)
            got = history.query('SELECT * FROM "cw"."rollups"."message_hourly"')
            per_type = Counter[str]()
            for r in got:
                per_type[r["type"]] += r["messages"]
            assert per_type == Counter(r.type for r in rows)
            hours = {r["time"] for r in got}
            assert len(hours) >= 10, "hourly points"
            events = history.query('SELECT * FROM "cw"."rollups"."event_hourly"')
            assert sum(e["events"] for e in events) == sum(1 for r in rows if r.type == "event")
            ports = history.query('SELECT * FROM "cw"."rollups"."port_hourly"')
            free = sum(p["free_samples"] for p in ports)
            assert free == sum(r.payload.count('"available"') for r in rows if r.type == "status")
        finally:
            history.close()

        bad = setup(f"influx1://127.0.0.1:{server.port}?db=cw&rp=other")
        assert bad.returncode == 1
        assert "retention policy 'other'" in bad.stdout
