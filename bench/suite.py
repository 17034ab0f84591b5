"""The benchmarks. Each returns plain dicts (JSON-able) that ``report`` renders.

Every throughput figure is a ratio to a ceiling measured in the same run, on the same broker,
with the same messages, because the machines are small and shared:

- the subscribers drain a *preloaded persistent session*: each subscriber's client id first
  subscribes and leaves, then ``count`` statuses are published once (QoS 1), and the broker
  queues them for every session; each subscriber then connects and is timed from its first
  message to its last (``mosquitto_sub``), or to its last acknowledgement (the pipeline,
  which acknowledges only after the store has the batch).
- latency is publish -> visible in ``GET /v1/devices/{id}`` of a ``chargewatch serve``
  process while a separate publisher keeps a background rate.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, get_args

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import agents, procs, stages
from bench.workload import Stream, birth_payload, specs_of, status_sizes, write_catalog
from devices.catalog import Catalog, Device
from ingest.config import IngestConfig

MQTT_CLIENTS: tuple[str, ...] = get_args(IngestConfig.model_fields["mqtt_client"].annotation)
DEFAULT_MQTT_CLIENT: str = IngestConfig.model_fields["mqtt_client"].default
BARE_OF = {"paho": "bare", "gmqtt": "bare_gmqtt"}  # each client library's bare subscriber
DISTRICT_RATE = 400 / 30  # 400 devices, one status per 30 s each
SUBSCRIPTION = agents.SUBSCRIPTION


@dataclass
class Plan:
    """Sizes of one run; ``short`` is the CI regression check (< 60 s)."""

    devices: int = 10_000
    messages: int = 60_000
    rounds: int = 2
    influx: bool = True
    scale: tuple[int, ...] = (400, 2_000, 10_000, 50_000)
    latency_rates: tuple[float, ...] = (DISTRICT_RATE, 10 * DISTRICT_RATE, 100 * DISTRICT_RATE)
    probes: int = 150
    footprint: tuple[int, ...] = (1_000, 10_000, 50_000)
    api_seconds: float = 5.0
    simulator_devices: int = 10_000
    simulator_processes: int = 1
    history_devices: int | None = None  # devices of the district day (None: all 412)
    cluster_devices: int = 2_000  # the cluster part: workers, PostgreSQL, an API replica
    cluster_messages: int = 30_000  # per configuration and round
    cluster_rounds: int = 2
    cluster_api_seconds: float = 20.0  # the open-loop rider query on the replica
    cluster_idle_seconds: float = 10.0  # the workers' CPU doing nothing (no scrapes either)
    cluster_modes: tuple[str, ...] = ("drain", "serial", "live")  # bench.cluster._measure
    # the workers' CHARGEWATCH_LEASE_TIMEOUT_S: the default; a partition taken waits 35% of
    # it (ingest.leases grace_s) before it counts as owned, which is most of a short run
    cluster_lease_s: float = 10.0
    parts: frozenset[str] = field(default_factory=lambda: frozenset(PARTS))  # all of them

    @classmethod
    def short(cls) -> Plan:
        return cls(messages=20_000, rounds=1, influx=False, parts=frozenset({"throughput"}))

    @classmethod
    def cluster_short(cls) -> Plan:
        """The cluster part small enough for a test (< 60 s): it cannot rot. Its workers'
        2 s lease (as tests/cluster's) settles them in about a second instead of five."""
        return cls(
            cluster_devices=400, cluster_messages=2_000, cluster_rounds=1,
            cluster_api_seconds=3.0, cluster_idle_seconds=1.0, cluster_lease_s=2.0, parts=frozenset({"cluster"}),
            cluster_modes=("serial", "live"),  # serial runs all of drain's code and more
        )  # fmt: skip


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


# -- throughput -----------------------------------------------------------------------------


def _publish(
    work: Path, port: int, catalog: Path | None, count: int, **extra: Any
) -> dict[str, Any]:
    pub = procs.agent(work, "publish", port=port, catalog=catalog, count=count, **extra).start()
    pub.wait(600)
    return procs.agent_result(pub)


def _mosquitto_sub(work: Path, port: int, client_id: str, count: int) -> dict[str, Any]:
    out = work / f"{client_id}.txt"
    argv = [
        procs.binary("mosquitto_sub"), "-h", procs.LOOPBACK, "-p", str(port), "-i", client_id,
        "-c", "-q", "1", "-t", SUBSCRIPTION, "-F", "%U", "-C", str(count), "-W", "120",
    ]  # fmt: skip
    with open(out, "wb") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.DEVNULL, timeout=180, check=False)
    stamps = [float(line) for line in out.read_text().split()]
    out.unlink()
    took = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"count": len(stamps), "seconds": took, "rate": (len(stamps) - 1) / took if took else 0}


def _drain(
    work: Path, kind: str, port: int, client_id: str, count: int, catalog: Path,
    history: str | None = None, mqtt_client: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Drain ``client_id``'s preloaded session with ``kind`` (mosquitto_sub, bare,
    bare_gmqtt, or a pipeline; ``mqtt_client`` None: the config's default client)."""
    if kind == "mosquitto_sub":
        return _mosquitto_sub(work, port, client_id, count)
    if kind in ("bare", "bare_gmqtt"):
        proc = procs.agent(work, kind, port=port, client_id=client_id, count=count).start()
    else:
        data = work / f"data-{client_id}"
        proc = procs.agent(
            work, "pipeline", port=port, client_id=client_id, count=count, catalog=catalog,
            data_dir=data, history=history, mqtt_client=mqtt_client,
        ).start()  # fmt: skip
    proc.wait(600)
    result = procs.agent_result(proc)
    if kind.startswith("pipeline"):
        result["disk_bytes"] = procs.dir_bytes(work / f"data-{client_id}")
    return result


def throughput(work: Path, plan: Plan) -> dict[str, Any]:
    """Ingest msgs/s vs mosquitto_sub and vs a bare paho subscriber, per store; the
    embedded-store pipeline with the default MQTT client (``pipeline_sqlite``) and with the
    other one (``pipeline_sqlite_<client>``), and a bare gmqtt subscriber alongside."""
    catalog = write_catalog(work / "catalog.json", plan.devices)
    log(
        "statuses of the district's shapes, mean bytes: "
        + ", ".join(f"{k} {v:,.0f}" for k, v in status_sizes(specs_of(catalog)).items())
    )
    alt = next(c for c in MQTT_CLIENTS if c != DEFAULT_MQTT_CLIENT)
    kinds = ["mosquitto_sub", "bare", "bare_gmqtt", "pipeline_sqlite", f"pipeline_sqlite_{alt}"]
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    publisher: list[dict[str, Any]] = []
    influx_disk: int | None = None
    with contextlib.ExitStack() as stack:
        mq = stack.enter_context(procs.running(procs.mosquitto(work / "mosquitto")))
        influx_url = None
        if plan.influx and procs.have("influxd", "/usr/bin/influxd"):
            influx = stack.enter_context(procs.running(procs.influxd(work / "influxd")))
            procs.influx_create_db(int(influx.port or 0), "bench")
            influx_url = f"influx1://{procs.LOOPBACK}:{influx.port}?db=bench"
            kinds.append("pipeline_influx")
            results["pipeline_influx"] = []
        for r in range(plan.rounds):
            ids = {k: f"bench-{k}-{r}" for k in kinds}
            agents.prime(int(mq.port or 0), list(ids.values()))
            log(
                f"throughput round {r + 1}: publishing {plan.messages} statuses of {plan.devices} devices"
            )
            publisher.append(
                _publish(work, int(mq.port or 0), catalog, plan.messages, births=True, seed=r + 1)
            )
            for k in kinds:
                res = _drain(
                    work, k, int(mq.port or 0), ids[k], plan.messages, catalog,
                    influx_url if k == "pipeline_influx" else None,
                    alt if k == f"pipeline_sqlite_{alt}" else None,
                )  # fmt: skip
                log(f"  {k}: {res['rate']:.0f} msg/s")
                results[k].append(res)
        if influx_url is not None:
            time.sleep(3)  # the cache goes to TSM after 1 s cold
            influx_disk = procs.dir_bytes(work / "influxd" / "data") + procs.dir_bytes(
                work / "influxd" / "wal"
            )
    best = {k: max(v, key=lambda x: x["rate"]) for k, v in results.items()}
    med = {k: statistics.median(x["rate"] for x in v) for k, v in results.items()}
    ceiling = med["mosquitto_sub"]

    def own_bare(kind: str) -> float:
        """The bare subscriber of the client library this pipeline run used."""
        client = alt if kind == f"pipeline_sqlite_{alt}" else DEFAULT_MQTT_CLIENT
        return float(med[BARE_OF[client]])

    out: dict[str, Any] = {
        "devices": plan.devices,
        "messages": plan.messages,
        "rounds": plan.rounds,
        "mqtt_client": DEFAULT_MQTT_CLIENT,
        "rates": med,
        "runs": results,
        "publisher_rate": statistics.median(p["rate"] for p in publisher),
        "status_bytes": status_sizes(specs_of(catalog)),
        "ratios": {
            k: {"vs_mosquitto_sub": med[k] / ceiling, "vs_bare": med[k] / own_bare(k)}
            for k in med
            if k.startswith("pipeline")
        },
        "ack_p99_s": {k: best[k].get("ack_p99_s") for k in best if k.startswith("pipeline")},
    }
    total_msgs = plan.messages * plan.rounds
    sqlite_bytes = statistics.median(x["disk_bytes"] for x in results["pipeline_sqlite"])
    out["disk_bytes_per_message"] = {"sqlite": sqlite_bytes / plan.messages}
    if influx_disk is not None:
        out["disk_bytes_per_message"]["influx"] = influx_disk / total_msgs
    return out


def scale(work: Path, plan: Plan) -> list[dict[str, Any]]:
    """Pipeline msgs/s and arrival->ack p99 as the fleet grows (mosquitto_sub alongside)."""
    rows = []
    with procs.running(procs.mosquitto(work / "mosquitto")) as mq:
        port = int(mq.port or 0)
        for devices in plan.scale:
            catalog = write_catalog(work / f"catalog-{devices}.json", devices)
            count = max(20_000, 2 * devices)
            ids = [f"scale-sub-{devices}", f"scale-pipe-{devices}"]
            agents.prime(port, ids)
            _publish(work, port, catalog, count, births=True, seed=devices)
            sub = _drain(work, "mosquitto_sub", port, ids[0], count, catalog)
            pipe = _drain(work, "pipeline_sqlite", port, ids[1], count, catalog)
            shutil.rmtree(work / f"data-{ids[1]}", ignore_errors=True)
            rows.append(
                {
                    "devices": devices,
                    "messages": count,
                    "rate": pipe["rate"],
                    "ceiling": sub["rate"],
                    "ratio": pipe["rate"] / sub["rate"] if sub["rate"] else 0,
                    "ack_p99_s": pipe.get("ack_p99_s"),
                    "write_p99_s": pipe.get("write_p99_s"),
                }
            )
            log(
                f"scale {devices}: {pipe['rate']:.0f} msg/s ({rows[-1]['ratio']:.0%} of mosquitto_sub)"
            )
    return rows


def profile(work: Path, plan: Plan, seconds: float = 5.0) -> dict[str, Any] | None:
    """py-spy over the pipeline draining 10,000 devices' statuses: where the time goes."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return None
    catalog = write_catalog(work / "catalog-profile.json", plan.devices)
    raw = work / "pipeline.raw"
    with procs.running(procs.mosquitto(work / "mosquitto-profile")) as mq:
        port = int(mq.port or 0)
        agents.prime(port, ["profile-pipe"])
        count = 150_000  # ~8 s of draining at ~20k msg/s: longer than the recording
        _publish(work, port, catalog, count, births=True, seed=99)
        proc = procs.agent(
            work, "pipeline", port=port, client_id="profile-pipe", count=count,
            catalog=catalog, data_dir=work / "data-profile",
        ).start()  # fmt: skip
        time.sleep(1.5)  # imports and connect: profile the steady drain only
        subprocess.run(
            [spy, "record", "-r", "100", "-d", str(int(seconds)), "--format", "raw",
             "-o", str(raw), "-p", str(proc.pid)],
            capture_output=True, timeout=seconds + 30, check=False,
        )  # fmt: skip
        proc.wait(600)
    if not raw.exists():
        return None
    return summarize_stacks(raw.read_text())


_IDLE = ("Condition.wait", "_worker (concurrent/futures/thread.py:81)", "select (selectors.py")


def summarize_stacks(collapsed: str, top: int = 18) -> dict[str, Any]:
    """Self and inclusive shares of the busy samples in py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, n_text = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or any(idle in frames[-1] for idle in _IDLE):
            continue  # waiting, not working
        n = int(n_text)
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    ours = (
        "ingest/", "devices/", "paho/", "gmqtt/", "sqlite", "prometheus_client", "pydantic", "json/",
    )  # fmt: skip

    def ranked(d: dict[str, int], only_ours: bool) -> list[tuple[str, float]]:
        items = [(f, c / total) for f, c in d.items() if not only_ours or any(o in f for o in ours)]
        return sorted(items, key=lambda x: -x[1])[:top]

    return {"samples": total, "self": ranked(own, False), "inclusive": ranked(incl, True)}


# -- latency and the rider API -----------------------------------------------------------


@contextlib.contextmanager
def _service(work: Path, catalog: Path | None) -> Iterator[tuple[procs.Proc, procs.Proc, str]]:
    with procs.running(procs.mosquitto(work / "mosquitto")) as mq:
        serve = procs.serve(work / "serve", f"mqtt://{procs.LOOPBACK}:{mq.port}", catalog)
        with procs.running(serve, timeout=60):
            base = f"http://{procs.LOOPBACK}:{serve.port}"
            procs.wait_ready(base)
            yield mq, serve, base


@contextlib.contextmanager
def _background(
    work: Path, port: int, rate: float, seconds: float, exclude: list[str]
) -> Iterator[None]:
    pub = procs.agent(
        work, "publish", port=port, catalog=None, count=int(rate * seconds) + 1, rate=rate,
        births=True, exclude=exclude, seed=int(rate), max_s=seconds + 30,
    ).start()  # fmt: skip
    try:
        yield
    finally:
        pub.stop()


def _probe_latencies(
    port: int, base: str, probe_ids: list[str], probes: int, gap_s: float, seed: int
) -> list[float]:
    """Publish a status of a probe device and poll its API view until it shows that seq."""
    specs = specs_of(None)
    chosen = [s for s in specs if s.id in probe_ids]
    stream = Stream(chosen, seed=seed, births=True)  # a new boot per call: seqs start over
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-probe", clean_session=True)
    client.connect(procs.LOOPBACK, port)
    client.loop_start()
    out: list[float] = []
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            for _ in range(len(chosen)):  # births first, so the probes are statuses
                topic, payload = stream.next(time.time_ns() // 1_000_000)
                client.publish(topic, payload, qos=1).wait_for_publish(5)
            for _ in range(probes):
                topic, payload = stream.next(time.time_ns() // 1_000_000)
                device_id = topic.split("/")[2]
                sent = json.loads(payload)
                # this status: its seq and its time (the public view hides the boot id, and a
                # new boot's seqs start over)
                seq, sent_at = sent["seq"], datetime.fromisoformat(sent["ts"])
                t0 = time.perf_counter()
                client.publish(topic, payload, qos=1)
                deadline = t0 + 10
                while time.perf_counter() < deadline:
                    view = http.get(f"/v1/devices/{device_id}").json()
                    shown = view.get("reported_at")
                    if (
                        view.get("status_seq") == seq
                        and shown
                        and datetime.fromisoformat(shown) == sent_at
                    ):
                        out.append(time.perf_counter() - t0)
                        break
                else:
                    raise procs.BenchError(
                        f"{device_id} seq {seq}: not shown by the API within 10 s"
                    )
                time.sleep(gap_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return out


class _StationStream:
    """Reads ``/v1/stations/stream?stations=ID`` in a thread (reconnecting when the server
    ends a stream), keeping each event's arrival time and the station's free ports."""

    def __init__(self, base: str, station_id: str) -> None:
        self.url = f"{base}/v1/stations/stream?stations={station_id}"
        self.events: queue.Queue[tuple[float, int]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="sse-probe", daemon=True)

    def __enter__(self) -> _StationStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _read(self) -> None:
        while not self._stop.is_set():
            timeout = httpx.Timeout(5, read=20)
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream("GET", self.url, timeout=timeout) as r,
            ):
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        free = json.loads(line[6:])["piles"]["ports_free"]
                        self.events.put((time.perf_counter(), int(free)))
                    if self._stop.is_set():
                        return

    def wait_for(self, free: int, after: float, timeout_s: float = 10.0) -> float | None:
        """Arrival time of the first event at or after ``after`` showing ``free`` ports."""
        deadline = time.perf_counter() + timeout_s
        while (left := deadline - time.perf_counter()) > 0:
            try:
                at, seen = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if at >= after and seen == free:
                return at
        return None


def _sse_latencies(
    port: int, base: str, pile: Device, probes: int, gap_s: float, seed: int
) -> list[float]:
    """Publish statuses of ``spec`` (a pile alone at its station: the background leaves the
    station out) that turn all its ports free, then all busy, and time each until the
    station's SSE event shows it."""
    spec, boot = pile.spec, f"sse{seed:x}"
    topic = f"cw/v1/{spec.id}"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-sse", clean_session=True)
    client.connect(procs.LOOPBACK, port)
    client.loop_start()
    out: list[float] = []

    def status(seq: int, state: str) -> bytes:
        ports = [{"n": n, "state": state} for n in range(1, spec.units + 1)]
        body = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": boot, "seq": seq}
        return json.dumps({**body, "kind": "pile", "ports": ports}).encode()

    try:
        with _StationStream(base, pile.station_id) as sse:
            birth = birth_payload(spec, boot, 0, time.time_ns() // 1_000_000)
            client.publish(f"{topic}/state", birth, qos=1).wait_for_publish(5)
            for seq in range(1, probes + 1):
                free = spec.units if seq % 2 else 0
                payload = status(seq, "available" if free else "charging")
                t0 = time.perf_counter()
                client.publish(f"{topic}/status", payload, qos=1)
                at = sse.wait_for(free, t0)
                if at is not None and seq > 1:  # the first one also waits for the birth
                    out.append(at - t0)
                time.sleep(gap_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(work: Path, plan: Plan) -> list[dict[str, Any]]:
    """Publish -> visible in ``GET /v1/devices/{id}`` (four probe devices) and in the station
    SSE stream (a pile whose station the background leaves out, so only the probe moves its
    counts), at each background rate."""
    catalog = Catalog.load(None)
    probe_ids = [d.id for d in specs_of(None)][:4]
    sse_pile = next(
        d
        for d in catalog.devices.values()
        if d.kind == "pile"
        and not {x.id for x in catalog.stations[d.station_id].devices} & set(probe_ids)
    )
    quiet = [d.id for d in catalog.stations[sse_pile.station_id].devices]
    rows = []
    with _service(work, None) as (mq, _serve, base):
        for rate in plan.latency_rates:
            seconds = plan.probes * 0.1 + 20
            exclude = sorted({*probe_ids, *quiet})
            with _background(work / f"bg-{rate:.0f}", int(mq.port or 0), rate, seconds, exclude):
                time.sleep(2)
                lat = _probe_latencies(
                    int(mq.port or 0), base, probe_ids, plan.probes, 0.03, seed=int(rate) + 4242
                )
                sse = _sse_latencies(
                    int(mq.port or 0), base, sse_pile, plan.probes, 0.03, seed=int(rate) + 77
                )
            row = {
                "rate": rate,
                "x_district": rate / DISTRICT_RATE,
                "probes": len(lat),
                "p50_ms": _pct(lat, 0.5) * 1000,
                "p99_ms": _pct(lat, 0.99) * 1000,
                "max_ms": max(lat) * 1000,
                "sse_probes": len(sse),
                "sse_p50_ms": _pct(sse, 0.5) * 1000 if sse else None,
                "sse_p99_ms": _pct(sse, 0.99) * 1000 if sse else None,
                "sse_max_ms": max(sse) * 1000 if sse else None,
            }
            log(
                f"latency at {rate:.0f} msg/s: p50 {row['p50_ms']:.1f} ms p99 {row['p99_ms']:.1f} ms"
            )
            rows.append(row)
    return rows


def _wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    """wrk's maximum rate (closed loop: each connection sends when it has its answer)."""
    argv = [procs.binary("wrk"), "-t", "1", "-c", str(connections), "-d", f"{seconds:.0f}s",
            "--latency", url]  # fmt: skip
    text = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = p50 = p99 = 0.0
    errors = 0
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(parts[1])
        elif parts[:1] == ["50%"]:
            p50 = _ms(parts[1])
        elif parts[:1] == ["99%"]:
            p99 = _ms(parts[1])
        elif "Non-2xx or 3xx responses:" in line or line.strip().startswith("Socket errors:"):
            errors += sum(int(x.strip(",")) for x in parts if x.strip(",").isdigit())
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def _ms(text: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def open_loop(
    url: str, rate: float, seconds: float, server_pid: int, *headers: str
) -> dict[str, Any]:
    """``bench.openloop`` in its own process: ``rate`` requests/s on a fixed schedule,
    latency from each request's scheduled time (no coordinated omission); with the server's
    CPU per request and the load average, since the machine is shared."""
    argv = [sys.executable, "-m", "bench.openloop", url, str(rate), str(seconds)]
    argv += [f"--header={h}" for h in headers]
    cpu0 = procs.cpu_s(server_pid)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True)
    cpu = procs.cpu_s(server_pid) - cpu0
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["server_cpu_us_per_request"] = (
        cpu / result["requests"] * 1e6 if result["requests"] else None
    )
    result["loadavg_1m"] = os.getloadavg()[0]
    return result


OPEN_LOOP_RPS = 500.0


def rider_api(work: Path, plan: Plan) -> dict[str, Any] | None:
    """The rider endpoints of a ``chargewatch serve`` process: wrk's maximum rate while ingest
    takes 10x district, then a fixed 500 requests/s (open loop) at 10x and at 1x district."""
    if not procs.have("wrk"):
        return None
    with _service(work, None) as (mq, serve, base):
        station = httpx.get(base + "/v1/stations").json()["stations"][0]["id"]
        urls = {
            "trivial (/healthz)": "/healthz",
            "stations near a point": "/v1/stations?lat=31.742&lon=117.296",
            "station detail": f"/v1/stations/{station}",
        }
        open_s = 2 * plan.api_seconds
        out: dict[str, Any] = {
            "ingest_rate": 10 * DISTRICT_RATE,
            "max": {},
            "open_loop_rps": OPEN_LOOP_RPS,
            "open_loop": [],
        }
        for x in (10, 1):  # 10x first: every device is born (1x takes 30 s for the births)
            rate = x * DISTRICT_RATE
            seconds = (plan.api_seconds + 1) * (len(urls) + 1) * (2 if x == 10 else 1) + 30
            port = int(mq.port or 0)
            with _background(work / f"bg-api-{x}", port, rate, seconds, []):
                time.sleep(2)
                if x == 10:
                    for name, path in urls.items():
                        out["max"][name] = v = _wrk(base + path, plan.api_seconds, 8)
                        log(f"api {name}: {v['rps']:.0f} req/s p99 {v['p99_ms']:.1f} ms")
                for name, path, headers in [
                    *((n, p, ()) for n, p in urls.items()),
                    # what a browser asks for: gzip (the station detail is ~190 KB of JSON)
                    ("station detail, gzip", urls["station detail"], ("Accept-Encoding: gzip",)),
                ]:
                    v = open_loop(base + path, OPEN_LOOP_RPS, open_s, serve.pid, *headers)
                    v |= {"endpoint": name, "x_district": x, "ingest_rate": rate}
                    out["open_loop"].append(v)
                    log(
                        f"api {name} at {OPEN_LOOP_RPS:.0f} req/s, {x}x district: achieved"
                        f" {v['achieved_rps']:.0f} p50 {v['p50_ms']:.1f} p99 {v['p99_ms']:.1f}"
                        f" max {v['max_ms']:.1f} ms, {v['server_cpu_us_per_request']:.0f} us CPU/req"
                    )
        trivial = out["max"]["trivial (/healthz)"]["rps"]
        out["ratios"] = {k: v["rps"] / trivial for k, v in out["max"].items() if trivial}
    return out


# -- footprint ------------------------------------------------------------------------------


def footprint(work: Path, plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for devices in plan.footprint:
        w = work / f"fp-{devices}"
        w.mkdir(parents=True, exist_ok=True)
        catalog = write_catalog(w / "catalog.json", devices)
        with _service(w, catalog) as (mq, serve, base):
            idle = serve.rss_bytes()
            count = 2 * devices  # a birth and a status each
            _publish(w, int(mq.port or 0), catalog, count, births=True, seed=7)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                acked = procs.metric(
                    httpx.get(base + "/metrics", timeout=30).text,
                    "chargewatch_messages_acked_total",
                )
                if acked >= count:
                    break
                time.sleep(0.5)
            rss = serve.rss_bytes()
        rows.append(
            {
                "devices": devices,
                "rss_mb": rss / 2**20,
                "rss_idle_mb": idle / 2**20,
                "mb_per_1000": rss / 2**20 / (devices / 1000),
            }
        )
        log(
            f"footprint {devices}: {rows[-1]['rss_mb']:.0f} MB ({rows[-1]['mb_per_1000']:.1f} MB per 1,000)"
        )
    return rows


# -- the simulator --------------------------------------------------------------------------

HEARTBEAT_PACE = (0.8 + 0.95) / 2
"""Simulated devices beat at 0.8-0.95 x ``heartbeat_s`` (uniform): the mean pace of demand."""


def _stats_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("STATS ")]


def _published_at(stats: list[dict[str, Any]], t: float) -> float:
    """A shard's published count at monotonic ``t``, interpolated between its STATS lines."""
    before = [s for s in stats if s["t"] <= t]
    after = [s for s in stats if s["t"] >= t]
    if not before or not after:
        raise procs.BenchError(f"no STATS lines around t={t:.1f}")
    a, b = before[-1], after[0]
    if b["t"] == a["t"]:
        return float(a["published"])
    return float(
        a["published"] + (b["published"] - a["published"]) * (t - a["t"]) / (b["t"] - a["t"])
    )


def _heartbeats_due(births: list[float], heartbeat_s: int, w0: float, w1: float) -> float:
    """Heartbeats the devices born at ``births`` schedule within [w0, w1): each beats every
    p = 0.8-0.95 x ``heartbeat_s`` after its birth's snapshot (p uniform, averaged on a grid).
    All devices born within seconds beat in waves, so a window can hold fewer (or more) than
    the long-run demand; this is what a simulator that keeps up publishes in it."""
    grid = [heartbeat_s * (0.8 + 0.15 * (i + 0.5) / 16) for i in range(16)]
    due = 0
    for b in births:
        for p in grid:
            first = max(1, math.ceil((w0 - b) / p))
            last = math.ceil((w1 - b) / p) - 1
            due += max(0, last - first + 1)
    return due / len(grid)


def simulator_run(
    work: Path,
    catalog: Path,
    devices: int,
    heartbeat_s: int,
    shards: int = 1,
    window_s: float = 60.0,
    speed: float = 1.0,
    ready_timeout_s: float = 180.0,
    spy_s: float = 0.0,
) -> dict[str, Any]:
    """``shards`` ``chargewatch simulate --shard i/n`` processes against one mosquitto:
    time to all births, then over ``window_s`` of steady state (from one heartbeat period
    after the last birth) the simulator's own publish rate (its STATS lines), the rate
    mosquitto_sub observes, the demand of the heartbeats alone, the simulator's CPU per
    published message and the latest any heartbeat was queued after it was due."""
    work.mkdir(parents=True, exist_ok=True)
    spy_out = work / "sim.raw" if spy_s > 0 else None
    with procs.running(procs.mosquitto(work / "mosquitto")) as mq:
        count_file = work / "count.txt"
        argv = [
            procs.binary("mosquitto_sub"), "-h", procs.LOOPBACK, "-p", str(mq.port), "-q", "1",
            "-t", SUBSCRIPTION, "-F", "%U %t",
        ]  # fmt: skip
        counter = procs.Proc(argv, work / "sub.log", stdout=count_file).start()
        sims: list[procs.Proc] = []
        began, launched = time.monotonic(), time.time()
        try:
            for i in range(1, shards + 1):
                sims.append(
                    procs.Proc(
                        procs.python_argv(
                            "-m", "simulators", "--broker", f"mqtt://{procs.LOOPBACK}:{mq.port}",
                            "--catalog", str(catalog), "--heartbeat-s", str(heartbeat_s),
                            "--speed", str(speed), "--shard", f"{i}/{shards}", "--stats-s", "1",
                            "--log-level", "WARNING",
                        ),
                        work / f"sim-{i}.log",
                        stdout=work / f"sim-{i}.out",
                    ).start()
                )  # fmt: skip
            ready_s: float | None = None
            while time.monotonic() - began < ready_timeout_s:
                outs = [(p.stdout.read_text() if p.stdout else "") for p in sims]
                if all("READY" in o for o in outs):
                    ready_s = time.monotonic() - began
                    break
                if any(p.popen is not None and p.popen.poll() is not None for p in sims):
                    raise procs.BenchError(f"a simulator exited: {sims[0].tail()}")
                time.sleep(0.2)
            # the first heartbeats follow each birth's snapshot by 0.8-0.95 x heartbeat_s
            time.sleep(heartbeat_s if ready_s is not None else 0.0)
            cpu0, m0, w0 = sum(procs.cpu_s(p.pid) for p in sims), time.monotonic(), time.time()
            if spy_out is not None:
                spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
                assert spy is not None
                subprocess.run(
                    [spy, "record", "-r", "50", "-d", str(int(spy_s)), "--format", "raw",
                     "-o", str(spy_out), "-p", str(sims[0].pid)],
                    capture_output=True, timeout=spy_s + 60, check=False,
                )  # fmt: skip
            time.sleep(max(0.0, window_s - (time.monotonic() - m0)))
            cpu1, m1, w1 = sum(procs.cpu_s(p.pid) for p in sims), time.monotonic(), time.time()
            time.sleep(1.5)  # one more STATS line after the window
        finally:
            for p in sims:
                p.stop(60)
            counter.stop()
    shard_stats = [_stats_lines(p.stdout) for p in sims if p.stdout]
    published = sum(_published_at(st, m1) - _published_at(st, m0) for st in shard_stats)
    lags = [s["lag_max_s"] for st in shard_stats for s in st if m0 <= s["t"] <= m1 + 1.0]
    lines = [line.split() for line in count_file.read_text().splitlines()]
    observed = sum(1 for t, *_ in lines if w0 <= float(t) < w1)
    births = sorted(float(t) for t, topic in lines if topic.endswith("/state") and float(t) < w0)
    first_births: dict[str, float] = {}
    for t, topic in lines:
        if topic.endswith("/state"):
            first_births.setdefault(topic, float(t))
    due = _heartbeats_due(list(first_births.values()), heartbeat_s, w0, w1)
    demand = devices / (heartbeat_s * HEARTBEAT_PACE)
    cpu_s = cpu1 - cpu0
    result: dict[str, Any] = {
        "devices": devices,
        "heartbeat_s": heartbeat_s,
        "speed": speed,
        "processes": shards,
        "ready_s": ready_s,  # from launch to READY in every process
        # from launch to the last birth mosquitto_sub saw (more than ``devices``: reconnects)
        "births_s": births[devices - 1] - launched if len(births) >= devices else None,
        "births_seen": len(births),
        "window_s": m1 - m0,
        "published_rate": published / (m1 - m0),
        "observed_rate": observed / (w1 - w0),
        "demand": demand,
        "due_rate": due / (w1 - w0),  # heartbeats scheduled in this very window
        "heartbeat_lag_max_s": max(lags, default=None),
        "cpu_s": cpu_s,
        "cpu_us_per_msg": cpu_s / published * 1e6 if published else None,
        "cpu_share": cpu_s / (m1 - m0),  # of one core, all processes together
    }
    if spy_out is not None and spy_out.exists():
        result["profile"] = summarize_stacks(spy_out.read_text())
    log(
        f"simulator {devices} devices, heartbeat {heartbeat_s} s, {shards} process(es): "
        f"READY after {ready_s or float('nan'):.1f} s, published {result['published_rate']:.0f}"
        f" msg/s (mosquitto_sub {result['observed_rate']:.0f}), heartbeats due"
        f" {result['due_rate']:.0f} msg/s (long-run demand {demand:.0f}), "
        f"{result['cpu_us_per_msg'] or 0:.0f} us CPU/msg, {result['cpu_share']:.0%} of a core"
    )
    return result


def simulator(work: Path, plan: Plan) -> dict[str, Any]:
    """The simulator itself at 10,000 devices, one process (``plan.simulator_processes``):
    a realistic 30 s heartbeat over 90 s, and a 5 s heartbeat (six times the demand)."""
    devices = plan.simulator_devices
    catalog = write_catalog(work / "catalog-sim.json", devices)
    runs = [
        simulator_run(
            work / f"heartbeat-{hb}", catalog, devices, hb, plan.simulator_processes, window
        )
        for hb, window in ((30, 90.0), (5, 30.0))
    ]
    return {"devices": devices, "runs": runs}


# -- alerts ---------------------------------------------------------------------------------


def alerts(work: Path, plan: Plan) -> dict[str, Any] | None:
    from bench.alertbench import alert_latency

    return alert_latency(work, plan.probes // 5)


def history(work: Path, plan: Plan) -> dict[str, Any]:
    from bench.historyday import district_day

    return district_day(work, plan.history_devices)


PARTS: dict[str, Callable[[Path, Plan], Any]] = {
    "throughput": throughput,
    "scale": scale,
    "latency": latency,
    "api": rider_api,
    "footprint": footprint,
    "simulator": simulator,
    "alerts": alerts,
    "history": history,
    "profile": profile,
    "stages": lambda work, plan: stages.stages(work, plan.devices),
    "cluster": lambda work, plan: _cluster(work, plan),
}


def _cluster(work: Path, plan: Plan) -> dict[str, Any] | None:
    from bench.cluster import cluster

    return cluster(work, plan)
