"""Alert latency: a status carrying a safety fault is published -> its webhook arrives.

A ``chargewatch serve`` with an admin key subscribes a local receiver (``http.server`` on a
loopback port) for ``opened`` alerts; each probe raises ``smoke`` on another district
device while a background publisher keeps the district's normal rate.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import contains
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import procs
from bench.workload import Stream, specs_of


class _Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__((procs.LOOPBACK, 0), _Handler)
        self.arrivals: dict[str, float] = {}
        self.got = threading.Condition()


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        now = time.perf_counter()
        self.send_response(204)
        self.end_headers()
        try:
            alert = json.loads(body).get("alert", {})
        except ValueError:
            return
        with self.server.got:
            self.server.arrivals.setdefault(str(alert.get("device")), now)
            self.server.got.notify_all()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def alert_latency(work: Path, probes: int) -> dict[str, Any] | None:
    work.mkdir(parents=True, exist_ok=True)
    data = work / "serve" / "data"
    token = subprocess.run(
        procs.python_argv("-m", "api.cli", "keys", "--data-dir", str(data), "create",
                          "--name", "bench", "--role", "admin"),
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()[0]  # fmt: skip
    receiver = _Receiver()
    threading.Thread(target=receiver.serve_forever, name="bench-webhooks", daemon=True).start()
    piles = [s for s in specs_of(None) if s.kind == "pile"][-probes:]
    latencies: list[float] = []
    try:
        with procs.running(procs.mosquitto(work / "mosquitto")) as mq:
            url = f"mqtt://{procs.LOOPBACK}:{mq.port}"
            with procs.running(procs.serve(work / "serve", url, None), timeout=60) as serve:
                base = f"http://{procs.LOOPBACK}:{serve.port}"
                procs.wait_ready(base)
                hook = f"http://{procs.LOOPBACK}:{receiver.server_address[1]}/hook"
                r = httpx.post(
                    base + "/v1/webhooks",
                    json={"url": hook, "events": ["opened"], "rules": []},
                    headers={"Authorization": f"Bearer {token}"},
                )
                if r.status_code != 201:
                    return {"error": f"webhook refused: {r.status_code} {r.text[:200]}"}
                stream = Stream(piles, seed=77, births=True)
                client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-alerts")
                client.connect(procs.LOOPBACK, int(mq.port or 0))
                client.loop_start()
                try:
                    for _ in piles:  # births: the devices are online, no offline alert
                        topic, payload = stream.next(time.time_ns() // 1_000_000)
                        client.publish(topic, payload, qos=1).wait_for_publish(5)
                    time.sleep(1)
                    for spec in piles:
                        if len(latencies) < 3 <= piles.index(spec):
                            break  # none arrive: stop instead of waiting out every probe
                        topic, payload = stream.next(time.time_ns() // 1_000_000)
                        body = json.loads(payload)
                        body["faults"] = ["smoke"]
                        t0 = time.perf_counter()
                        client.publish(topic, json.dumps(body).encode(), qos=1)
                        with receiver.got:
                            receiver.got.wait_for(partial(contains, receiver.arrivals, spec.id), 5)
                        if spec.id in receiver.arrivals:
                            latencies.append(receiver.arrivals[spec.id] - t0)
                finally:
                    client.disconnect()
                    client.loop_stop()
    finally:
        receiver.shutdown()
        receiver.server_close()
    if not latencies:
        return {"error": "no webhook arrived"}
    ordered = sorted(latencies)
    return {
        "probes": len(latencies),
        "p50_ms": ordered[len(ordered) // 2] * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }
