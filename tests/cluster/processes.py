"""The scaled-out shape as real processes, for tests: a mosquitto, a database on a given
PostgreSQL migrated by ``chargewatch db upgrade`` (registry seeded from the catalog),
``chargewatch ingest`` workers and ``chargewatch api`` replicas, each on free loopback ports
and stopped by PID. A replica is a ``tests.servers.Service`` (its own data dir holds its API
keys, so ``tests.alerts.keys.maintainer_get`` works on it as on ``serve``).

    with cluster(tmp, pg_session, catalog=path, workers=2, replicas=2) as c:
        c.replicas[0].get("/v1/stations")
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from devices.catalog import Catalog
from ingest.partitions import PartitionMap
from tests.pg_server import PgServer
from tests.servers import Process, Service, chargewatch_argv, eventually, free_port, mosquitto

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 2.0  # a dead worker's partitions move this fast (CHARGEWATCH_LEASE_TIMEOUT_S)


@dataclass
class Worker:
    name: str
    process: Process
    metrics_port: int

    def gauge(self, name: str) -> float:
        """A metric of the worker, summed over its labels. A worker that does not answer
        fails the check (AssertionError: ``eventually`` tries again), never reads as 0: a
        dead worker would pass every check of a count that should fall to 0."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        except httpx.HTTPError as exc:
            raise AssertionError(f"worker {self.name}: /metrics does not answer ({exc})") from exc
        return sum(
            float(line.rsplit(maxsplit=1)[1])
            for line in text.splitlines()
            if line.startswith((name + " ", name + "{"))
        )


@dataclass
class Cluster:
    broker: Process
    db: str
    catalog: Catalog
    workers: list[Worker] = field(default_factory=list)
    replicas: list[Service] = field(default_factory=list)

    def busy_partitions(self) -> int:
        """Partitions with at least one device of the catalog (16 partitions)."""
        pm = PartitionMap(self.catalog)
        return sum(1 for p in range(pm.partitions) if pm.devices(p))

    def wait_subscribed(self, timeout: float = 60.0) -> None:
        """Every partition with devices subscribed by some worker: a broker keeps nothing
        for a session that never subscribed, so devices must not speak before this."""
        busy = self.busy_partitions()

        def check() -> None:
            got = sum(w.gauge("chargewatch_ingest_partitions_subscribed") for w in self.workers)
            assert got == busy, f"{got} of {busy} partitions subscribed"

        eventually(check, timeout=timeout, interval=0.2)


def new_database(pg: PgServer, name: str) -> str:
    clean = re.sub(r"[^a-z0-9_]", "_", name.lower())[:40]
    return pg.create_database(f"c_{clean}_{uuid.uuid4().hex[:8]}")


def db_upgrade(db: str, catalog: Path | None) -> None:
    argv = chargewatch_argv("db", "upgrade", "--db", db)
    if catalog is not None:
        argv += ["--catalog", str(catalog)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


@contextmanager
def ingest_worker(
    name: str,
    broker: str,
    db: str,
    tmp: Path,
    catalog: Path | None = None,
    *,
    history: str | None = None,
) -> Iterator[Worker]:
    """``history``: the worker's ``--history`` (an InfluxDB URL)."""
    port = free_port()
    argv = chargewatch_argv(
        "ingest", "--broker", broker, "--db", db, "--worker", name, "--metrics-port", str(port)
    )
    if catalog is not None:
        argv += ["--catalog", str(catalog)]
    if history is not None:
        argv += ["--history", history]
    tmp.mkdir(parents=True, exist_ok=True)
    proc = Process(
        argv, port, ROOT, tmp / f"ingest-{name}.log",
        env={"CHARGEWATCH_LEASE_TIMEOUT_S": str(LEASE_S)},
    )  # fmt: skip
    proc.start()  # returns once /metrics listens
    try:
        yield Worker(name, proc, port)
    finally:
        proc.stop()


@contextmanager
def api_replica(
    name: str, db: str, tmp: Path, *, history: str | None = None, ready: bool = True
) -> Iterator[Service]:
    """``chargewatch api --db`` on a free port, ready (/readyz 200) before it is yielded
    (``ready=False``: once it listens). ``history``: its ``CHARGEWATCH_HISTORY``."""
    port = free_port()
    data_dir = tmp / f"api-{name}"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {"CHARGEWATCH_INGEST__DATA_DIR": str(data_dir)}
    if history is not None:
        env["CHARGEWATCH_HISTORY"] = history
    proc = Process(
        chargewatch_argv("api", "--db", db, "--port", str(port)),
        port,
        ROOT,
        tmp / f"api-{name}.log",
        env=env,
    )
    proc.start()
    service = Service(proc, f"http://127.0.0.1:{port}", data_dir, db)

    def is_ready() -> None:
        r = service.get("/readyz")
        assert r.status_code == 200, r.text

    try:
        if ready:
            eventually(is_ready, timeout=30, interval=0.1)
        yield service
    finally:
        proc.stop()


@contextmanager
def cluster(
    tmp: Path,
    pg: PgServer,
    *,
    catalog: Path | None = None,
    workers: int = 2,
    replicas: int = 2,
) -> Iterator[Cluster]:
    """mosquitto + a new database on ``pg`` + ``workers`` ingest workers (every busy partition
    subscribed) + ``replicas`` API replicas (ready). ``catalog``: a catalog file for the
    registry and the workers (default: the shipped district)."""
    tmp.mkdir(parents=True, exist_ok=True)
    db = new_database(pg, tmp.name)
    db_upgrade(db, catalog)
    with ExitStack() as stack:
        broker = stack.enter_context(mosquitto(tmp / "mosquitto"))
        c = Cluster(broker, db, Catalog.load(catalog))
        for i in range(workers):
            w = stack.enter_context(ingest_worker(f"w{i + 1}", broker.url, db, tmp, catalog))
            c.workers.append(w)
        for i in range(replicas):
            c.replicas.append(stack.enter_context(api_replica(chr(ord("a") + i), db, tmp)))
        c.wait_subscribed()
        yield c
