"""Retained garbage on the broker reaches ingest again on every subscribe (each start, each
reconnect): it is one rejected message, not one more dead letter per restart. Real
mosquitto, ``chargewatch serve`` started three times on the same data dir."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

TOPIC = "cw/v1/SVC-P04/status"


def publish(broker: Process, payload: bytes, *, retain: bool) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="garbage-test")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        client.publish(TOPIC, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def dead_letters(service: Service) -> tuple[dict[str, int], list[str]]:
    body = maintainer_get(service, "/v1/deadletters").json()
    return body["counts"], [d["payload_excerpt"] for d in body["dead_letters"]]


def repeats(service: Service) -> float:
    for line in service.get("/metrics").text.splitlines():
        if line.startswith("chargewatch_dead_letters_retained_repeats_total "):
            return float(line.split()[1])
    raise AssertionError("chargewatch_dead_letters_retained_repeats_total is not exposed")


def test_retained_garbage_is_dead_lettered_once_across_restarts(
    broker: Process, tmp_path: Path
) -> None:
    publish(broker, b"{retained garbage", retain=True)
    data_dir = tmp_path / "data"
    with chargewatch_serve(tmp_path / "serve1", broker.url, data_dir=data_dir) as svc:

        def first() -> None:
            assert dead_letters(svc) == ({"not_json": 1}, ["{retained garbage"])

        eventually(first)
        # the same bytes sent live (not a replay) are a new rejected message each time
        publish(broker, b"{live garbage", retain=False)
        publish(broker, b"{live garbage", retain=False)
        eventually(lambda: _count(svc, 3))
    for run in (2, 3):
        with chargewatch_serve(tmp_path / f"serve{run}", broker.url, data_dir=data_dir) as svc:
            eventually(lambda: _repeated(svc))
            assert dead_letters(svc)[0] == {"not_json": 3}


def _count(service: Service, n: int) -> None:
    assert dead_letters(service)[0] == {"not_json": n}


def _repeated(service: Service) -> None:
    assert repeats(service) == 1
