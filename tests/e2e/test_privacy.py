"""Riders' privacy and the service's guards against a real ``chargewatch serve`` and a real
mosquitto, devices published by hand: public answers (station, device, history) carry no
battery serials, session ids, boot ids or firmware, a maintainer key gets them all; the
pages carry their CSP; /metrics answers loopback only; the data dir is private on disk."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.alerts.keys import maintainer_key
from tests.api.district import HAND_CABINET, HAND_PILE, HAND_STATION, Publisher, mini_catalog
from tests.servers import Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

SESSION, BATTERY_IN, BATTERY_OUT, STAYS = "SESS-77-abc", "BAT-IN-0001", "BAT-OUT-0002", "BAT-3"
FIRMWARE = "fw-1.2.3-private"
SECRETS = (SESSION, BATTERY_IN, BATTERY_OUT, STAYS, FIRMWARE, "hand0001")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("privacy")
    mini_catalog(tmp / "catalog.json")  # only the hand station reports
    with (
        mosquitto(tmp / "mosquitto") as broker,
        chargewatch_serve(tmp / "serve", broker.url, "--catalog", str(tmp / "catalog.json")) as svc,
    ):
        pile, cab = Publisher(broker.port, HAND_PILE), Publisher(broker.port, HAND_CABINET)
        try:
            t0 = int(time.time() * 1000)
            birth = {
                "ts": t0,
                "online": True,
                "model": "M",
                "firmware": FIRMWARE,
                "heartbeat_s": 30,
            }
            pile.send("state", {**birth, "kind": "pile", "ports": 4})
            ports = [{"n": 1, "state": "charging", "power_w": 200.0, "session": SESSION}]
            ports += [{"n": n, "state": "available"} for n in (2, 3, 4)]
            pile.send("status", {"ts": t0, "kind": "pile", "ports": ports})
            pile.send("event", {"ts": t0, "type": "session_started", "port": 1, "session": SESSION})
            cab.send("state", {**birth, "kind": "cabinet", "slots": 4})
            cab.send("event", {"ts": t0, "type": "swap", "slot_out": 1, "battery_out": BATTERY_OUT,
                               "soc_out": 96, "slot_in": 2, "battery_in": BATTERY_IN,
                               "soc_in": 12})  # fmt: skip
            slots = [{"n": 1, "state": "ready", "battery": STAYS, "soc": 97},
                     {"n": 2, "state": "charging", "battery": BATTERY_IN, "soc": 12},
                     {"n": 3, "state": "empty"}, {"n": 4, "state": "empty"}]  # fmt: skip
            cab.send("status", {"ts": t0, "kind": "cabinet", "slots": slots})

            def arrived() -> None:
                key = {"Authorization": f"Bearer {maintainer_key(svc.data_dir)}"}
                r = httpx.get(f"{svc.base_url}/v1/devices/{HAND_CABINET}/history",
                              headers=key, timeout=10)  # fmt: skip
                assert BATTERY_OUT in r.text, r.text
                r = httpx.get(f"{svc.base_url}/v1/devices/{HAND_PILE}/history",
                              headers=key, timeout=10)  # fmt: skip
                assert SESSION in r.text, r.text
                r = httpx.get(f"{svc.base_url}/v1/stations/{HAND_STATION}", headers=key, timeout=10)
                assert STAYS in r.text, r.text
                assert f'"session":"{SESSION}"' in r.text, r.text

            eventually(arrived, timeout=15)
            yield svc
        finally:
            pile.close()
            cab.close()


def test_public_answers_carry_nothing_that_follows_a_rider(served: Service) -> None:
    key = {"Authorization": f"Bearer {maintainer_key(served.data_dir)}"}
    paths = [
        f"/v1/stations/{HAND_STATION}",
        f"/v1/devices/{HAND_PILE}",
        f"/v1/devices/{HAND_CABINET}",
        f"/v1/devices/{HAND_PILE}/history",
        f"/v1/devices/{HAND_CABINET}/history",
    ]
    seen_private = ""
    for path in paths:
        public = served.get(path)
        assert public.status_code == 200, (path, public.text)
        for secret in SECRETS:
            assert secret not in public.text, (path, secret)
        private = httpx.get(served.base_url + path, headers=key, timeout=10)
        assert private.status_code == 200, (path, private.text)
        assert private.headers["cache-control"].startswith("private"), path
        seen_private += private.text
    for secret in SECRETS:
        assert secret in seen_private, secret
    # the swap is still there for the public, without the batteries
    history = served.get(f"/v1/devices/{HAND_CABINET}/history").json()
    swaps = [c for c in history["changes"] if c["type"] == "swap"]
    assert swaps == [{"t": swaps[0]["t"], "device_id": HAND_CABINET, "type": "swap",
                      "slot_out": 1, "soc_out": 96, "slot_in": 2, "soc_in": 12}]  # fmt: skip


def test_pages_metrics_and_data_dir_are_guarded(served: Service) -> None:
    page = served.get("/console")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]
    assert served.get("/docs").status_code == 404  # serve: no CDN scripts
    assert served.get("/metrics").status_code == 200  # from loopback
    relayed = httpx.get(served.base_url + "/metrics", headers={"X-Forwarded-For": "198.51.100.7"})
    assert relayed.status_code == 403
    data: Path = served.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("chargewatch.db", "chargewatch.db-wal", "chargewatch.db-shm"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
