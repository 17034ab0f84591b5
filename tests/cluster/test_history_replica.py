"""The history of a cluster whose workers write it to InfluxDB (``chargewatch ingest
--history``), as processes on real mosquitto, PostgreSQL and influxd 1.6.7: a replica given
the same InfluxDB (``CHARGEWATCH_HISTORY``) answers a device's history with what the device
published; one started without it answers /readyz 503 naming the fix rather than an empty
history (the workers record where the history goes in ``facts``). One set of servers for
both."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ingest.influx import InfluxHistory
from tests.cluster.processes import api_replica, db_upgrade, ingest_worker, new_database
from tests.cluster.test_worker_alerts_e2e import CATALOG, DEVICES, online, publish
from tests.influx_servers import influxd
from tests.pg_server import PgServer
from tests.servers import eventually, mosquitto

pytestmark = pytest.mark.e2e


def test_a_replica_reads_the_history_where_the_workers_write_it(
    pg_session: PgServer, tmp_path: Path
) -> None:
    db = new_database(pg_session, "t_history_replica")
    db_upgrade(db, None)
    device = DEVICES[0]
    with influxd(tmp_path / "influxd") as server, mosquitto(tmp_path / "mosquitto") as broker:
        url = f"influx1://127.0.0.1:{server.port}?db=cw"
        setup = InfluxHistory(url)
        setup.create_database()  # as an operator does (chargewatch influx setup)
        setup.close()
        with (
            ingest_worker("w1", broker.url, db, tmp_path, history=url) as worker,
            api_replica("a", db, tmp_path, history=url) as replica,
            api_replica("b", db, tmp_path, ready=False) as blind,
        ):

            def subscribed() -> None:
                assert worker.gauge("chargewatch_ingest_partitions_subscribed") >= 7

            eventually(subscribed, timeout=30)
            publish(broker.port, online(device))

            def answered() -> None:
                r = httpx.get(f"{replica.base_url}/v1/devices/{device}/history", timeout=10)
                assert r.status_code == 200, r.text
                body = r.json()
                assert [c["type"] for c in body["changes"]] == ["birth"], body
                assert body["points"], body
                states = {k: n for k, n in body["points"][-1]["states"].items() if n}
                assert states == {"available": CATALOG.devices[device].spec.units}

            eventually(answered, timeout=20, interval=0.2)
            r = httpx.get(f"{blind.base_url}/readyz", timeout=10)
            assert r.status_code == 503, r.text
            assert [p for p in r.json()["problems"] if "history" in p] == [
                "history not served: the ingest workers write it to InfluxDB and this replica"
                " reads PostgreSQL; start `chargewatch api` with --history URL (or"
                " CHARGEWATCH_HISTORY), the workers' InfluxDB"
            ]
