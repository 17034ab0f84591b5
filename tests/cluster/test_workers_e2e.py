"""``chargewatch ingest`` worker processes against real mosquitto and PostgreSQL, running the
real pipeline into the PostgreSQL store: a worker killed with SIGKILL mid-stream, a worker
joining mid-stream, PostgreSQL stopped mid-stream. What was stored is read back from the
history (``messages``: each (device, boot, seq, type) must be there exactly once) and the
twins (each device's equals its last message); each message is applied by exactly one
worker (the workers' ``chargewatch_messages_applied_total``); no two workers ever believe
they own one partition (their logs: ``tests.cluster.leasecheck.overlaps``)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import Catalog
from ingest.db import migrate
from ingest.partitions import PartitionMap
from tests.cluster.leasecheck import Held, held_from_log, overlaps
from tests.pg_server import PgServer
from tests.servers import Process, eventually, free_port

pytestmark = pytest.mark.e2e

LEASE_S = 2.0
BOOT = "boot-e2e"
OUTAGE_S = float(os.environ.get("CW_TEST_PG_OUTAGE_S", "30"))  # the 30 s
CATALOG = Catalog.load()
PM = PartitionMap(CATALOG)
BUSY = sum(1 for p in range(16) if PM.devices(p))  # partitions with devices: 7
# two devices of every station: every busy partition carries traffic
DEVICES = [d.id for s in CATALOG.stations.values() for d in CATALOG.station_devices(s.id)[:2]]


@contextmanager
def worker(
    name: str, broker: Process, db: str, tmp: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "ingest", "--broker", broker.url, "--db", db,
         "--worker", name, "--metrics-port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "CHARGEWATCH_LEASE_TIMEOUT_S": str(LEASE_S)},
    )  # fmt: skip
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()


def scrape(port: int) -> dict[str, float]:
    """A worker's /metrics, each metric summed over its labels. A worker that does not
    answer is an AssertionError: ``eventually`` tries again (a worker starting), anywhere
    else it fails the test (a dead worker acknowledges nothing and owns nothing, too)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError as exc:
        raise AssertionError(
            f"the worker's /metrics on port {port} does not answer: {exc}"
        ) from None
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            out[line.split("{", 1)[0].split(" ", 1)[0]] += float(line.rsplit(maxsplit=1)[1])
    return dict(out)


def gauge(port: int, name: str) -> float:
    return scrape(port).get(name, 0.0)


def beliefs(tmp: Path, name: str, until: float = float("inf")) -> list[Held]:
    """What worker ``name`` (its log, ``worker``) believed it owned."""
    return held_from_log((tmp / f"{name}.log").read_text(errors="replace"), name, until)


class Publisher(threading.Thread):
    """QoS 1 status messages round-robin over DEVICES, ``rate`` per second: ``count`` of
    them, or fewer once ``until`` is set."""

    def __init__(
        self, port: int, count: int, rate: float, until: threading.Event | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.rate = port, count, rate
        self.until = until
        self.sent: list[tuple[str, str, int]] = []

    def run(self) -> None:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="e2e-pub", protocol=paho.MQTTv311)
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        try:
            start = time.monotonic()
            infos = []
            for i in range(self.count):
                if self.until is not None and self.until.is_set():
                    break
                device, seq = DEVICES[i % len(DEVICES)], i // len(DEVICES)
                body = json.dumps(status(device, seq))
                infos.append(c.publish(f"cw/v1/{device}/status", body, qos=1))
                self.sent.append((device, BOOT, seq))
                time.sleep(max(0.0, start + (i + 1) / self.rate - time.monotonic()))
            for info in infos:
                info.wait_for_publish(10)
        finally:
            c.disconnect()
            c.loop_stop()


def status(device_id: str, seq: int) -> dict[str, object]:
    """A valid contract v1 status of the catalog's device (its ports or slots)."""
    device = CATALOG.devices[device_id]
    head = {"v": 1, "ts": time.time_ns() // 1_000_000, "boot": BOOT, "seq": seq}
    if device.kind == "pile":
        ports = [{"n": n, "state": "available"} for n in range(1, device.spec.units + 1)]
        return {**head, "kind": "pile", "ports": ports}
    slots = [{"n": n, "state": "ready", "soc": 95} for n in range(1, device.spec.units + 1)]
    return {**head, "kind": "cabinet", "slots": slots}


def stored(db: str) -> dict[tuple[str, str, int], int]:
    """(device, boot, seq) -> how many times the history holds it as a status."""
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT device_id, boot, seq, count(*) FROM messages WHERE type = 'status'"
            " GROUP BY device_id, boot, seq"
        ).fetchall()
    return {(d, b, int(s)): int(n) for d, b, s, n in rows}


def twins_seq(db: str) -> dict[str, tuple[str, int]]:
    with psycopg.connect(db) as conn:
        rows = conn.execute("SELECT device_id, record FROM twins").fetchall()
    return {d: (json.loads(r)["boot"], json.loads(r)["status_seq"]) for d, r in rows}


def check_stored(db: str, sent: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], int]:
    """Everything sent is in the history exactly once, and nothing else; every twin is at
    its device's last message."""
    got = wait_all_stored(db, sent)
    assert all(n == 1 for n in got.values()), collections.Counter(got.values())
    last: dict[str, tuple[str, int]] = {}
    for device, boot, seq in sent:
        last[device] = (boot, max(seq, last.get(device, (boot, -1))[1]))
    assert twins_seq(db) == last
    return got


def counter(ports: list[int], name: str) -> float:
    return sum(gauge(p, name) for p in ports)


def wait_subscribed(ports: list[int]) -> None:
    def check() -> None:
        assert sum(gauge(p, "chargewatch_ingest_partitions_subscribed") for p in ports) == BUSY

    eventually(check, timeout=30, interval=0.1)


def wait_all_stored(db: str, sent: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], int]:
    def check() -> dict[tuple[str, str, int], int]:
        got = stored(db)
        missing = set(sent) - set(got)
        assert not missing, f"{len(missing)} not stored yet"
        return got

    got = eventually(check, timeout=40, interval=0.2)
    assert set(got) == set(sent)  # nothing else
    return got


def test_a_worker_killed_mid_stream_loses_nothing(
    broker: Process, pg_url: str, tmp_path: Path
) -> None:
    with (
        worker("a", broker, pg_url, tmp_path) as (a, a_port),
        worker("b", broker, pg_url, tmp_path) as (_b, b_port),
    ):
        wait_subscribed([a_port, b_port])
        eventually(lambda: _assert(gauge(a_port, "chargewatch_ingest_partitions_owned") == 8), 20)
        pub = Publisher(broker.port, count=1200, rate=300)
        pub.start()
        time.sleep(1.5)
        a.kill()  # SIGKILL mid-stream
        killed = time.monotonic()
        a.wait(5)
        dead = time.time()  # a believes nothing from here on
        eventually(
            lambda: _assert(gauge(b_port, "chargewatch_ingest_partitions_owned") == 16),
            timeout=LEASE_S + 3,
        )
        moved_s = time.monotonic() - killed
        pub.join(30)
        got = check_stored(pg_url, pub.sent)
        again = gauge(b_port, "chargewatch_messages_duplicate_total")
        print(f"\nkill -9: partitions moved in {moved_s:.2f}s; {len(got)} stored once, "
              f"{again:.0f} delivered again after the kill (deduplicated by the twins)")  # fmt: skip
    held = beliefs(tmp_path, "a", until=dead) + beliefs(tmp_path, "b")
    assert overlaps(held) == []
    # b took over what a held when it died
    held_by_a = {h.partition for h in held if h.worker == "a" and h.end == dead}
    assert len(held_by_a) == 8
    assert {h.partition for h in held if h.worker == "b" and h.start > dead} == held_by_a


def test_a_worker_joining_mid_stream_processes_nothing_twice(
    broker: Process, pg_url: str, tmp_path: Path
) -> None:
    enough = threading.Event()  # the stream goes on until the joiner has taken part in it
    with worker("a", broker, pg_url, tmp_path) as (_, a_port):
        wait_subscribed([a_port])
        try:
            pub = Publisher(broker.port, count=20_000, rate=300, until=enough)
            pub.start()
            time.sleep(1.5)
            with worker("b", broker, pg_url, tmp_path) as (_, b_port):
                try:
                    eventually(
                        lambda: _assert(gauge(b_port, "chargewatch_ingest_partitions_owned") == 8),
                        30,
                    )
                    eventually(
                        lambda: _assert(gauge(b_port, "chargewatch_messages_applied_total") > 0), 30
                    )
                    time.sleep(1.0)  # both workers busy for a while
                finally:
                    enough.set()
                pub.join(30)
                assert not pub.is_alive()
                check_stored(pg_url, pub.sent)
                ports = [a_port, b_port]
                # each message applied by exactly one worker, none seen twice
                applied = [gauge(p, "chargewatch_messages_applied_total") for p in ports]
                assert sum(applied) == len(pub.sent), applied
                assert all(n > 0 for n in applied), applied
                assert counter(ports, "chargewatch_messages_duplicate_total") == 0
                assert counter(ports, "chargewatch_dead_letters_total") == 0
        finally:
            enough.set()
    # no two workers ever believed they owned one partition (each acknowledging it) over
    # the whole run: the 8 partitions a held from the start and handed over to b
    held = beliefs(tmp_path, "a") + beliefs(tmp_path, "b")
    assert overlaps(held) == []
    moved = {h.partition for h in held if h.worker == "b"}
    assert len(moved) == 8
    assert {h.partition for h in held if h.worker == "a"} == set(range(16))


def _assert(ok: bool) -> None:
    assert ok


def test_postgresql_stopped_mid_stream_nothing_acked_then_resumes(
    broker: Process, tmp_path: Path
) -> None:
    from tests.pg_server import postgresql

    with postgresql() as pg:
        migrate.upgrade(pg.url())
        with worker("a", broker, pg.url(), tmp_path) as (_, port):
            _outage(pg, broker, port)


def _outage(pg: PgServer, broker: Process, port: int) -> None:
    db = pg.url()
    wait_subscribed([port])
    pub = Publisher(broker.port, count=1500, rate=250)
    pub.start()
    time.sleep(1.5)
    pg.stop()  # fast shutdown: clients are cut off
    acked_at_stop = gauge(port, "chargewatch_ingest_acked_total")
    # every lease dropped within the health check bound
    eventually(
        lambda: _assert(gauge(port, "chargewatch_ingest_partitions_owned") == 0),
        timeout=LEASE_S,
    )
    m = scrape(port)
    stored, acked = m["chargewatch_ingest_stored_total"], m["chargewatch_ingest_acked_total"]
    # Until the worker noticed, it acknowledged only what was committed before the stop: a
    # batch is acked right after its write returned, on the worker's loop, and counted in
    # `stored` first; no write returns while the server is down, so `stored`, read once
    # every lease is dropped (any write that committed before the stop has returned by
    # then), counts only writes committed before the stop. A worker that acknowledged a
    # batch its write failed to commit would be above it.
    assert acked - acked_at_stop <= stored - acked_at_stop, (acked_at_stop, acked, stored)
    # and while it is down: nothing stored, acknowledged or owned (a worker that died
    # meanwhile does not answer: a failure too)
    up_at = time.monotonic() + OUTAGE_S
    while time.monotonic() < up_at:
        m = scrape(port)
        assert m["chargewatch_ingest_partitions_owned"] == 0
        assert (m["chargewatch_ingest_stored_total"], m["chargewatch_ingest_acked_total"]) == (
            stored,
            acked,
        )
        time.sleep(1.0)
    pg.start()
    pub.join(30)
    got = check_stored(db, pub.sent)
    assert gauge(port, "chargewatch_ingest_acked_total") >= len(got)
    print(f"\nPostgreSQL down {OUTAGE_S}s: {len(got)} stored once; acked {acked_at_stop:.0f}"
          f" at the stop, {acked:.0f} once every lease was dropped")  # fmt: skip
