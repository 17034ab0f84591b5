"""Ingest that loses nothing: faults injected into real processes mid-stream.

Each test publishes a known stream of contract messages with a plain MQTT client (the
ground truth is what the broker acknowledged to it), injects a fault, and ends by comparing
the store with the stream: nothing accepted may be missing, nothing may be duplicated.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ingest.influx import InfluxHistory
from tests.alerts.keys import maintainer_get
from tests.influx_servers import influxd
from tests.servers import Process, Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

DEVICES = [f"SVC-P{n:02d}" for n in range(1, 21)]  # 20 piles of the shipped catalog
Key = tuple[str, str, int, str]  # device, boot, seq, type


def ports(seq: int) -> list[dict[str, Any]]:
    busy = seq % 11
    return [
        {"n": n, "state": "charging" if n <= busy else "available", "power_w": 180.0 * (n <= busy)}
        for n in range(1, 11)
    ]


@dataclass
class Stream:
    """Publishes births, then statuses round-robin over DEVICES at ``rate`` msg/s."""

    port: int
    rate: float = 400.0
    boot: str = "boot0001"
    acked: set[Key] = field(default_factory=set)
    last: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="stream-publisher")
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        self._pending: list[tuple[int, Key]] = []
        self._pubacked: set[int] = set()
        self._lock = threading.Lock()
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any
    ) -> None:
        # PUBACK from the broker; a message queued while disconnected is sent after the
        # reconnect and acknowledged here too (MQTTMessageInfo.is_published raises for it)
        with self._lock:
            self._pubacked.add(mid)

    def publish(self, device: str, payload: dict[str, Any], kind: str) -> None:
        channel = "state" if kind in ("birth", "death") else kind
        info = self.client.publish(
            f"cw/v1/{device}/{channel}", json.dumps(payload), qos=1, retain=channel != "event"
        )
        key = (device, payload["boot"], payload["seq"], kind)
        with self._lock:
            self._pending.append((info.mid, key))
        if kind == "status":
            self.last[device] = payload["seq"]

    @property
    def sent(self) -> int:
        with self._lock:
            return len(self._pending)

    def births(self) -> None:
        for device in DEVICES:
            self.publish(device, birth(device, self.boot, 0), "birth")

    def _run(self, count: int) -> None:
        seq = 1
        sent = 0
        start = time.monotonic()
        while sent < count and not self._stop.is_set():
            for device in DEVICES:
                self.publish(device, status(self.boot, seq), "status")
                sent += 1
            seq += 1
            ahead = sent / self.rate - (time.monotonic() - start)
            if ahead > 0:
                self._stop.wait(ahead)

    def start(self, count: int) -> None:
        self.births()
        self._thread = threading.Thread(target=self._run, args=(count,), daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 60) -> set[Key]:
        """Wait for the stream and every PUBACK; the acked keys are the ground truth."""
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._pending)
        for mid, key in pending:
            while mid not in self._pubacked and time.monotonic() < deadline:
                time.sleep(0.05)
            if mid in self._pubacked:
                self.acked.add(key)
        assert len(self.acked) == len(pending), "the broker acknowledged every message"
        self.client.loop_stop()
        self.client.disconnect()
        return self.acked


def birth(device: str, boot: str, seq: int) -> dict[str, Any]:
    return {
        "v": 1,
        "ts": int(time.time() * 1000),
        "boot": boot,
        "seq": seq,
        "online": True,
        "kind": "pile",
        "ports": 10,
        "heartbeat_s": 30,
    }


def status(boot: str, seq: int, *, ts_ms: int | None = None) -> dict[str, Any]:
    return {
        "v": 1,
        "ts": ts_ms if ts_ms is not None else int(time.time() * 1000),
        "boot": boot,
        "seq": seq,
        "kind": "pile",
        "ports": ports(seq),
    }


def stored_keys(data_dir: Path) -> list[Key]:
    db = sqlite3.connect(data_dir / "chargewatch.db")
    try:
        rows = db.execute("SELECT device_id, boot, seq, type FROM messages").fetchall()
    finally:
        db.close()
    return [(d, b, int(s), t) for d, b, s, t in rows]


def assert_stored_exactly(service: Service, acked: set[Key]) -> None:
    def complete() -> None:
        stored = stored_keys(service.data_dir)
        assert len(stored) == len(set(stored)), "nothing stored twice"
        missing = acked - set(stored)
        assert not missing, (
            f"{len(missing)} acknowledged messages missing, e.g. {sorted(missing)[:3]}"
        )

    eventually(complete, timeout=60, interval=0.25)


def assert_state_is_last(service: Service, stream: Stream) -> None:
    for device, seq in stream.last.items():
        view = service.get(f"/v1/devices/{device}").json()
        assert view["status_seq"] == seq, device
        charging = sum(1 for p in view["ports"] if p["state"] == "charging")
        assert charging == seq % 11, device


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Process]:
    with mosquitto(tmp_path / "mosquitto") as proc:
        yield proc


def test_kill_9_ingestor_mid_stream_loses_nothing(broker: Process, tmp_path: Path) -> None:
    data = tmp_path / "data"
    stream = Stream(broker.port)
    with chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data) as service:
        stream.start(count=3000)
        eventually(lambda: _assert_some_stored(data, 300), timeout=20)
        service.process.kill()  # SIGKILL: no flush, no goodbye
    # the stream goes on while nobody listens: the broker keeps it in our persistent session
    eventually(lambda: _assert_stream_progressed(stream, 1500), timeout=20)
    with chargewatch_serve(tmp_path / "serve2", broker.url, data_dir=data) as service:
        acked = stream.finish()
        assert_stored_exactly(service, acked)
        eventually(lambda: assert_state_is_last(service, stream), timeout=20)
        dead = maintainer_get(service, "/v1/deadletters").json()
        assert dead["counts"] == {}


def _assert_some_stored(data: Path, count: int) -> None:
    assert (data / "chargewatch.db").exists()
    assert len(stored_keys(data)) >= count


def _assert_stream_progressed(stream: Stream, count: int) -> None:
    assert stream.sent >= count


def test_broker_restart_mid_stream_ingest_resumes(tmp_path: Path) -> None:
    with mosquitto(tmp_path / "mosquitto") as broker:
        stream = Stream(broker.port, rate=300)
        with chargewatch_serve(tmp_path / "serve", broker.url) as service:
            stream.start(count=2400)
            eventually(lambda: _assert_some_stored(service.data_dir, 300), timeout=20)
            broker.stop()  # graceful: mosquitto saves its persistence file
            eventually(lambda: _assert_not_ready(service), timeout=20)
            broker.start()  # same port, same persistence file
            eventually(lambda: _assert_ready(service), timeout=30)
            acked = stream.finish()
            assert_stored_exactly(service, acked)
            eventually(lambda: assert_state_is_last(service, stream), timeout=20)
            assert _metric(service, "chargewatch_broker_connected") == 1


def _assert_ready(service: Service) -> None:
    assert service.get("/readyz").status_code == 200


def _assert_not_ready(service: Service) -> None:
    response = service.get("/readyz")
    assert response.status_code == 503
    assert "broker" in response.json()["problems"][0]


def _metric(service: Service, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in service.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_influxd_down_30s_mid_stream_loses_nothing(broker: Process, tmp_path: Path) -> None:
    with influxd(tmp_path / "influxd") as influx:
        url = f"influx1://127.0.0.1:{influx.port}?db=chargewatch"
        store = InfluxHistory(url)
        store.create_database()
        stream = Stream(broker.port, rate=100)
        with chargewatch_serve(tmp_path / "serve", broker.url, "--history", url) as service:
            stream.start(count=4000)
            eventually(lambda: _assert_influx_has(store, DEVICES[0], 5), timeout=20)
            influx.stop()
            eventually(lambda: _assert_store_unhealthy(service), timeout=30)
            down_until = time.monotonic() + 30
            while time.monotonic() < down_until:
                assert service.get("/healthz").status_code == 200  # the process stays up
                time.sleep(1)
            influx.start()
            acked = stream.finish(timeout=90)
            eventually(lambda: _assert_ready(service), timeout=60)

            def complete() -> None:
                for device in DEVICES:
                    rows = store.messages(device, limit=10_000)
                    keys = [(device, r["boot"], r["seq"], r["type"]) for r in rows]
                    assert len(keys) == len(set(keys)), f"{device}: stored twice"
                    want = sorted(k for k in acked if k[0] == device)
                    assert sorted(keys) == want, f"{device}: {len(want) - len(keys)} missing"
                    seqs = [r["seq"] for r in rows if r["type"] == "status"]
                    assert seqs == sorted(seqs), f"{device}: order not kept"

            eventually(complete, timeout=60, interval=1)
            assert _metric(service, "chargewatch_store_write_errors_total") > 0
        store.close()


def _assert_influx_has(store: InfluxHistory, device: str, count: int) -> None:
    assert len(store.messages(device)) >= count


def _assert_store_unhealthy(service: Service) -> None:
    assert _metric(service, "chargewatch_store_healthy") == 0
    assert service.get("/readyz").status_code == 503
