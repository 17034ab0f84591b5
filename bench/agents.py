"""Measuring agents, each run as its own process: ``python -m bench.agents NAME JSON``.

- ``publish``: contract statuses from a catalog's devices at QoS 1, as fast as the broker
  takes them or at a fixed rate; every loop is bounded by ``count`` and ``max_s``.
- ``bare``: a paho-mqtt subscriber that only counts (the library ceiling).
- ``bare_gmqtt``: the same with gmqtt (asyncio; its own acknowledgement, sent before the
  callback: this library's ceiling, not ack-after-write).
- ``pipeline``: the whole ingest pipeline (``ingest.service.Ingest``: decode, validate,
  order, twins, alert rules, batched store write, ack after write), timed from the first
  message received to the last one acknowledged.

Each prints one JSON object on stdout when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.registry import Collector

from bench.workload import Stream, specs_of

LOOPBACK = "127.0.0.1"
SUBSCRIPTION = "cw/v1/+/+"


def _client(client_id: str, *, clean: bool, manual_ack: bool = False) -> paho.Client:
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        protocol=paho.MQTTv311,
        manual_ack=manual_ack,
    )


def prime(port: int, client_ids: list[str], timeout: float = 10.0) -> None:
    """Create a persistent session subscribed to every device for each client id, then
    leave: the broker queues what is published until the client comes back."""
    for client_id in client_ids:
        done = threading.Event()
        c = _client(client_id, clean=False)
        c.on_subscribe = lambda *a, done=done: done.set()
        c.on_connect = lambda client, *a: client.subscribe(SUBSCRIPTION, qos=1)
        c.connect(LOOPBACK, port)
        c.loop_start()
        if not done.wait(timeout):
            raise RuntimeError(f"subscribing {client_id} timed out")
        c.disconnect()
        c.loop_stop()


def publish(args: dict[str, Any]) -> dict[str, Any]:
    specs = specs_of(
        Path(args["catalog"]) if args.get("catalog") else None,
        frozenset(args.get("exclude", [])),
    )
    stream = Stream(specs, seed=int(args.get("seed", 1)), births=bool(args.get("births")))
    count, rate = int(args["count"]), args.get("rate")
    max_s = float(args.get("max_s", 300))
    acked = 0
    all_acked = threading.Event()

    def on_publish(client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        nonlocal acked
        acked += 1
        if acked >= count:
            all_acked.set()

    c = _client(f"bench-pub-{args.get('seed', 1)}", clean=True)
    c.max_inflight_messages_set(int(args.get("inflight", 1000)))
    c.on_publish = on_publish
    c.connect(LOOPBACK, int(args["port"]))
    c.loop_start()
    now_ms = time.time_ns() // 1_000_000
    began = time.monotonic()
    deadline = began + max_s
    sent = 0
    if rate is None:  # as fast as the broker acknowledges; the messages are built first
        messages = list(stream.messages(count, now_ms))
        began = time.monotonic()
        for topic, payload in messages:
            c.publish(topic, payload, qos=1)
            sent += 1
            if sent % 1000 == 0:
                while sent - acked > 5000 and time.monotonic() < deadline:
                    time.sleep(0.001)  # keep paho's own queue short
    else:
        interval = 1.0 / float(rate)
        while sent < count and time.monotonic() < deadline:
            due = began + sent * interval
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            topic, payload = stream.next(time.time_ns() // 1_000_000)
            c.publish(topic, payload, qos=1)
            sent += 1
    all_acked.wait(max(0.0, deadline - time.monotonic()))
    took = time.monotonic() - began
    c.disconnect()
    c.loop_stop()
    return {"sent": sent, "acked": acked, "seconds": took, "rate": acked / took if took else 0}


class _Tally:
    """What a bare subscriber measures: messages seen, and the wall and CPU time from the
    first to the ``count``-th."""

    def __init__(self, count: int) -> None:
        self.count, self.seen = count, 0
        self.first = self.last = 0
        self.cpu = [0.0, 0.0]

    def one(self) -> bool:
        """Count a message; True at the ``count``-th."""
        self.seen += 1
        if self.seen == 1:
            self.first = time.perf_counter_ns()
            self.cpu[0] = time.process_time()
        if self.seen < self.count:
            return False
        self.last = time.perf_counter_ns()
        self.cpu[1] = time.process_time()
        return True

    def result(self) -> dict[str, Any]:
        seen, took = self.seen, (self.last - self.first) / 1e9 if self.last else 0.0
        return {
            "count": seen,
            "seconds": took,
            "rate": (seen - 1) / took if took else 0.0,
            "cpu_us_per_msg": (self.cpu[1] - self.cpu[0]) / seen * 1e6 if seen else None,
        }


def bare(args: dict[str, Any]) -> dict[str, Any]:
    """Count ``count`` messages with a plain paho subscriber (auto ack), persistent session."""
    tally, max_s = _Tally(int(args["count"])), float(args.get("max_s", 120))
    done = threading.Event()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if tally.one():
            done.set()

    c = _client(str(args["client_id"]), clean=False)
    c.on_message = on_message
    c.on_connect = lambda client, *a: client.subscribe(SUBSCRIPTION, qos=1)
    c.connect(LOOPBACK, int(args["port"]))
    c.loop_start()
    done.wait(max_s)
    c.disconnect()
    c.loop_stop()
    return tally.result()


async def _bare_gmqtt(args: dict[str, Any]) -> dict[str, Any]:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv311

    tally, max_s = _Tally(int(args["count"])), float(args.get("max_s", 120))
    done = asyncio.Event()

    def on_message(client: gmqtt.Client, topic: str, payload: bytes, qos: int, props: Any) -> int:
        if tally.one():
            done.set()
        return 0

    def on_connect(client: gmqtt.Client, flags: int, rc: int, props: Any) -> None:
        client.subscribe(SUBSCRIPTION, qos=1)

    c = gmqtt.Client(str(args["client_id"]), clean_session=False)
    c.on_message = on_message
    c.on_connect = on_connect
    await c.connect(LOOPBACK, int(args["port"]), version=MQTTv311)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), max_s)
    await c.disconnect()
    return tally.result()


def bare_gmqtt(args: dict[str, Any]) -> dict[str, Any]:
    """Count ``count`` messages with a plain gmqtt subscriber (its own ack), persistent session."""
    return asyncio.run(_bare_gmqtt(args))


def quantile(hist: Collector, q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (Prometheus-style, no interpolation)."""
    buckets: list[tuple[float, float]] = []
    for metric in hist.collect():
        for s in metric.samples:
            if s.name.endswith("_bucket"):
                buckets.append((float(s.labels["le"]), s.value))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for bound, cumulative in sorted(buckets):
        if cumulative >= q * total:
            return bound
    return None


class _Value:
    """A counter's current value through its public ``collect()`` (one metric, cheap)."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def get(self) -> float:
        return float(self.counter.collect()[0].samples[0].value)


async def _pipeline(args: dict[str, Any]) -> dict[str, Any]:
    from devices.catalog import Catalog
    from ingest.config import IngestConfig
    from ingest.gcpolicy import tune_gc
    from ingest.service import Ingest

    count, max_s = int(args["count"]), float(args.get("max_s", 300))
    catalog = Catalog.load(Path(args["catalog"]) if args.get("catalog") else None)
    config = IngestConfig(
        broker=f"mqtt://{LOOPBACK}:{args['port']}",
        client_id=str(args["client_id"]),
        data_dir=Path(args["data_dir"]),
        history=args.get("history"),
        **({"mqtt_client": args["mqtt_client"]} if args.get("mqtt_client") else {}),
    )
    async with Ingest(config, catalog) as ingest:
        tune_gc()  # as `chargewatch serve` does once it is up
        m = ingest.metrics
        received, acked, written = (_Value(c) for c in (m.received, m.acked, m.written))
        deadline = time.monotonic() + max_s
        while received.get() < 1 and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a counter
            await asyncio.sleep(0.002)
        first = time.perf_counter_ns()
        cpu0, main0 = time.process_time(), time.thread_time()  # the loop's thread: the bound
        while acked.get() < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        last = time.perf_counter_ns()
        cpu, main = time.process_time() - cpu0, time.thread_time() - main0
        took = (last - first) / 1e9
        n = int(acked.get())
        return {
            "mqtt_client": config.mqtt_client,
            "count": n,
            "written": int(written.get()),
            "seconds": took,
            "rate": n / took if took else 0.0,
            "cpu_us_per_msg": cpu / n * 1e6 if n else None,
            "loop_cpu_us_per_msg": main / n * 1e6 if n else None,
            "ack_p50_s": quantile(m.ack_latency, 0.5),
            "ack_p99_s": quantile(m.ack_latency, 0.99),
            "write_p99_s": quantile(m.write_seconds, 0.99),
            "batches": int(
                sum(
                    s.value
                    for metric in m.write_seconds.collect()
                    for s in metric.samples
                    if s.name.endswith("_count")
                )
            ),
        }


def pipeline(args: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_pipeline(args))


AGENTS = {"publish": publish, "bare": bare, "bare_gmqtt": bare_gmqtt, "pipeline": pipeline}


def main(argv: list[str]) -> int:
    name, raw = argv[0], argv[1] if len(argv) > 1 else "{}"
    result = AGENTS[name](json.loads(raw))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
