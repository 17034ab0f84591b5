"""``make cluster-demo``: the scaled-out shape on one machine, from the engines it runs on.

PostgreSQL (``--db``, else the machine's server at 127.0.0.1:5432 when it answers, else one
started from the Debian binaries in a temp dir), a mosquitto on a free port, ``chargewatch db
upgrade``, two ``chargewatch ingest`` workers, two ``chargewatch api`` replicas and the
simulated district; prints both replicas' URLs once both answer ``/readyz`` with 200, and
stops everything it started on Ctrl-C or SIGTERM (by PID).

    python -m bench.clusterdemo [--speed 60] [--partitions 16] [--db postgresql://...]
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import httpx

from bench import pgserver, procs
from bench.procs import LOOPBACK, BenchError, Proc, free_port
from devices.catalog import Catalog, CatalogError
from ingest import StoreError
from ingest.db import cli as db_cli
from ingest.db.migrate import shown
from ingest.partitions import station_partition

DATABASE = "chargewatch_demo"
SUBSCRIBED = "chargewatch_ingest_partitions_subscribed"
SERVERS = ("postgresql", "mosquitto")  # stopped last, once nothing is connected to them


class Demo:
    """The processes the demo started, each in its own session, by name."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, Proc] = {}

    def start(self, name: str, proc: Proc) -> Proc:
        """``proc`` spawned (not waited for: ``until``)."""
        self.procs[name] = proc
        proc.spawn()
        return proc

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def check(self) -> None:
        for name, proc in self.procs.items():
            assert proc.popen is not None
            if proc.popen.poll() is not None:
                raise BenchError(f"{name} exited ({proc.popen.returncode}):\n{proc.tail()}")

    def until(self, what: str, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait for ``ready``; a process of the demo that exits meanwhile ends the wait."""
        deadline = time.monotonic() + timeout
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                raise BenchError(f"{what} not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        """The workers, replicas and simulators at once (each takes a second or two to
        finish its work), then the servers."""
        clients = [p for name, p in self.procs.items() if name not in SERVERS]
        with ThreadPoolExecutor(max(1, len(clients))) as pool:
            list(pool.map(lambda p: p.stop(grace=20), clients))
        for name in reversed(SERVERS):
            if name in self.procs:
                self.procs[name].stop(grace=20)


def subscribed(port: int) -> float:
    """A worker's subscribed partition sessions (0 while its /metrics does not answer)."""
    try:
        text = httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    return procs.metric(text, SUBSCRIBED)


def chargewatch(*args: str) -> list[str]:
    return procs.python_argv("-m", "api.cli", *args)


def machine_postgresql() -> str | None:
    """The machine's PostgreSQL, with our demo database in it, if it answers."""
    import psycopg

    try:
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=2,
                             autocommit=True) as conn:  # fmt: skip
            known = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if known.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')
    except psycopg.Error:
        return None
    return f"postgresql://postgres@127.0.0.1:5432/{DATABASE}"


def own_postgresql(demo: Demo) -> str:
    """A server of our own in the demo's dir (``bench.pgserver``'s recipe)."""
    if not pgserver.available():
        raise BenchError("no PostgreSQL answers on 5432 and none is installed")
    user = pgserver.init_cluster(demo.workdir)
    port = free_port()
    argv = pgserver.server_argv(demo.workdir, port)
    log = demo.log("postgresql")
    demo.start("postgresql", Proc(argv, log, user=user, stop_signal=signal.SIGINT))
    demo.until("PostgreSQL", lambda: pgserver.ready(port))
    pgserver.create_database(port, DATABASE)
    return f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"


def interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM stops everything as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make cluster-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--speed", type=float, default=60.0, help="sim seconds per wall second")
    p.add_argument("--partitions", type=int, default=16)
    p.add_argument("--db", help="a PostgreSQL database of yours (postgresql://...)")
    args = p.parse_args(argv)
    demo = Demo(Path(tempfile.mkdtemp(prefix="cw-cluster-demo-", dir="/tmp")))
    signal.signal(signal.SIGTERM, interrupted)
    try:
        db = args.db or machine_postgresql() or own_postgresql(demo)
        broker = demo.start("mosquitto", procs.mosquitto(demo.workdir / "mosquitto"))
        broker.wait_port(30)
        broker_url = f"mqtt://{LOOPBACK}:{broker.port}"
        db_cli.upgrade(db, None)  # `chargewatch db upgrade`, without starting a Python
        workers = []
        for name in ("w1", "w2"):
            port = free_port()
            workers.append(port)
            demo.start(f"ingest-{name}", Proc(chargewatch(
                "ingest", "--broker", broker_url, "--db", db,
                "--worker", name, "--partitions", str(args.partitions),
                "--metrics-port", str(port)), demo.log(f"ingest-{name}")))  # fmt: skip
        urls = []
        for name in ("a", "b"):
            port = free_port()
            env = {"CHARGEWATCH_INGEST__DATA_DIR": str(demo.workdir / f"api-{name}")}  # keys
            demo.start(f"api-{name}", Proc(chargewatch("api", "--db", db, "--port", str(port)),
                                           demo.log(f"api-{name}"), env=env))  # fmt: skip
            urls.append(f"http://{LOOPBACK}:{port}")
        # every partition with devices subscribed before the devices speak: a broker keeps
        # nothing for a session that never subscribed (the first start only)
        busy = len({station_partition(s, args.partitions) for s in Catalog.load().stations})
        demo.until("the workers' partition sessions",
                   lambda: sum(subscribed(p) for p in workers) >= busy)  # fmt: skip
        demo.start("simulators", Proc(procs.python_argv(
            "-m", "simulators", "--broker", broker_url, "--speed", str(args.speed)),
            demo.log("simulators")))  # fmt: skip
        demo.until("the API replicas", lambda: all(procs.ready(u) for u in urls))
        print(f"chargewatch cluster-demo: PostgreSQL {shown(db)}, broker {broker_url}")
        print(f"  two workers (w1, w2), {args.partitions} partitions: "
              + "  and  ".join(f"http://{LOOPBACK}:{p}/metrics" for p in workers))  # fmt: skip
        print(f"  two API replicas, both ready (/readyz 200): {urls[0]}/  and  {urls[1]}/")
        print(f"  logs in {demo.workdir}; Ctrl-C stops everything", flush=True)
        while True:
            demo.check()
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    except (BenchError, StoreError, CatalogError) as exc:
        print(f"cluster-demo: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
