"""A rider's report confirmed by telemetry, across processes: a real mosquitto, a real
``chargewatch serve`` and a cabinet that is a plain MQTT client (not our simulator). The
rider reports smoke, the cabinet's sensor then reports it too: the report is confirmed and
the rider earns the configured points, once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

CABINET, STATION, SLOTS = "WGS-C01", "wanguo-south", 12
SMOKE_POINTS = 9  # not the default (20): the setting reaches the served process


@pytest.fixture
def service(broker: Process, tmp_path: Path) -> Iterator[Service]:
    env = {"CHARGEWATCH_INGEST__ALERTS__SENTINELS__POINTS__SMOKE": str(SMOKE_POINTS)}
    with chargewatch_serve(tmp_path / "serve", broker.url, env=env) as svc:
        yield svc


def publish(client: paho.Client, channel: str, payload: dict[str, Any]) -> None:
    info = client.publish(f"cw/v1/{CABINET}/{channel}", json.dumps(payload), qos=1)
    info.wait_for_publish(5)
    assert info.is_published()


def cabinet_status(seq: int, *, smoke: bool) -> dict[str, Any]:
    slots = [{"n": n, "state": "ready", "battery": f"B{n}", "soc": 96} for n in range(1, SLOTS + 1)]
    ts = time.time_ns() // 1_000_000
    return {"v": 1, "ts": ts, "boot": "sent1", "seq": seq, "kind": "cabinet", "slots": slots,
            "smoke": smoke}  # fmt: skip


def test_a_report_confirmed_by_the_cabinet_earns_the_points_once(
    broker: Process, service: Service
) -> None:
    http = httpx.Client(base_url=service.base_url, timeout=10)
    r = http.post("/v1/riders", json={"station_id": STATION, "nickname": "哨兵小张"})
    assert r.status_code == 201, r.text
    rider = {"Authorization": f"Rider {r.json()['token']}"}

    cabinet = paho.Client(CallbackAPIVersion.VERSION2, client_id=CABINET)
    cabinet.connect("127.0.0.1", broker.port)
    cabinet.loop_start()
    try:
        ts = time.time_ns() // 1_000_000
        publish(cabinet, "state", {"v": 1, "ts": ts, "boot": "sent1", "seq": 0, "online": True,
                                   "kind": "cabinet", "model": "t", "firmware": "1",
                                   "heartbeat_s": 30, "slots": SLOTS})  # fmt: skip
        publish(cabinet, "status", cabinet_status(1, smoke=False))
        eventually(
            lambda: _assert(maintainer_get(service, f"/v1/devices/{CABINET}").json()["online"])
        )

        report = {"station": STATION, "device": CABINET, "slot": 4, "category": "smoke",
                  "text": "4号仓冒烟"}  # fmt: skip
        r = http.post("/v1/reports", json=report, headers=rider)
        assert r.status_code == 201, r.text
        first = r.json()
        assert (first["outcome"], first["points"], first["attached"]) == ("pending", 0, False)

        publish(cabinet, "status", cabinet_status(2, smoke=True))  # the cabinet's own sensor

        def confirmed() -> dict[str, Any]:
            r = http.get("/v1/riders/me/reports", headers=rider)
            assert r.status_code == 200, r.text
            (mine,) = r.json()["reports"]
            assert mine["outcome"] == "confirmed", mine
            return dict(mine)

        mine = eventually(confirmed, timeout=15)
        assert (mine["decided_by"], mine["points"]) == ("telemetry", SMOKE_POINTS)
        alerts = maintainer_get(service, "/v1/alerts", station=STATION).json()["alerts"]
        fault = next(a for a in alerts if a["rule"] != "rider_report")
        assert (fault["code"], fault["device"]) == ("smoke", CABINET)
        assert mine["confirmed_by_alert"] == fault["id"]

        # the rider reports the same smoke again: confirmed at once by the cabinet's alert,
        # and it earns nothing more
        r = http.post("/v1/reports", json={**report, "text": "还在冒烟"}, headers=rider)
        assert r.status_code == 201, r.text
        again = r.json()
        assert (again["outcome"], again["points"]) == ("confirmed", 0)
        r = http.get("/v1/riders/me/reports", headers=rider)
        latest = r.json()["reports"][0]
        assert (latest["id"], latest["duplicate_of"], latest["confirmed_by_alert"]) == (
            again["report_id"], first["report_id"], fault["id"],
        )  # fmt: skip
        me = http.get("/v1/riders/me", headers=rider).json()
        assert me["points"] == SMOKE_POINTS
        assert [(e["delta"], e["reason"]) for e in me["ledger"]] == [
            (SMOKE_POINTS, "confirmed_by_telemetry"),
        ]
        # and none of it is public: no token, no rider
        assert http.get("/v1/riders/me").status_code == 401
        assert http.get("/v1/reports").status_code == 401
    finally:
        cabinet.loop_stop()
        cabinet.disconnect()
        http.close()


def _assert(value: object) -> None:
    assert value
