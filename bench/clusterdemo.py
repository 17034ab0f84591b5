"""``make cluster-demo``: the scaled-out shape on one machine, from the engines it runs on.

PostgreSQL (the machine's server at 127.0.0.1:5432 when it answers, else one started from
the Debian binaries in a temp dir), a mosquitto on a free port, ``chargewatch db upgrade``,
two ``chargewatch ingest`` workers, two ``chargewatch api`` replicas and the simulated
district; prints both replicas' URLs and stops everything it started on Ctrl-C (by PID).

    python -m bench.clusterdemo [--speed 60] [--partitions 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench import pgserver
from devices.catalog import Catalog
from ingest.partitions import station_partition

DATABASE = "chargewatch_demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(what: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"cluster-demo: {what} not ready after {timeout:.0f}s")
        time.sleep(0.2)


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, user: str | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=user
        )
        self.procs.append((name, proc))

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                log = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"cluster-demo: {name} exited ({proc.returncode}):\n{log}")

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if name == "postgresql" else signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


SUBSCRIBED = "chargewatch_ingest_partitions_subscribed"


def gauge(port: int, name: str) -> float:
    """A worker's gauge from its /metrics (0 while it does not answer)."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def chargewatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *args]


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
        raise SystemExit("cluster-demo: no PostgreSQL answers on 5432 and none is installed")
    user = pgserver.init_cluster(demo.workdir)
    port = free_port()
    demo.start("postgresql", pgserver.server_argv(demo.workdir, port), user=user)
    wait("PostgreSQL", lambda: pgserver.ready(port))
    pgserver.create_database(port, DATABASE)
    return f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"


def mosquitto(demo: Demo) -> str:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(binary):
        raise SystemExit("cluster-demo: mosquitto is not installed (Debian package mosquitto)")
    port = free_port()
    conf = demo.workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
        f"persistence_location {demo.workdir}/\nmax_inflight_messages 1000\n"
        "max_queued_messages 1000000\n"
        + (f"user {os.environ.get('USER', 'root')}\n" if os.geteuid() == 0 else "")
    )
    demo.start("mosquitto", [binary, "-c", str(conf)])
    wait("mosquitto", lambda: listening(port))
    return f"mqtt://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make cluster-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--speed", type=float, default=60.0, help="sim seconds per wall second")
    p.add_argument("--partitions", type=int, default=16)
    args = p.parse_args(argv)
    demo = Demo(Path(tempfile.mkdtemp(prefix="cw-cluster-demo-", dir="/tmp")))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        db = machine_postgresql() or own_postgresql(demo)
        broker = mosquitto(demo)
        subprocess.run(chargewatch("db", "upgrade", "--db", db), check=True)
        metrics = [free_port(), free_port()]
        for name, port in zip(("w1", "w2"), metrics, strict=True):
            demo.start(f"ingest-{name}", chargewatch(
                "ingest", "--broker", broker, "--db", db, "--worker", name,
                "--partitions", str(args.partitions), "--metrics-port", str(port)))  # fmt: skip
        urls = []
        for name in ("a", "b"):
            port = free_port()
            env_dir = demo.workdir / f"api-{name}"
            os.environ["CHARGEWATCH_INGEST__DATA_DIR"] = str(env_dir)  # keys, audit: per replica
            demo.start(f"api-{name}", chargewatch("api", "--db", db, "--port", str(port)))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            port = int(url.rsplit(":", 1)[1])
            wait(f"replica {url}", lambda port=port: listening(port))  # type: ignore[misc]
        # every partition with devices subscribed before the devices speak: a broker keeps
        # nothing for a session that never subscribed (the first start only)
        busy = len({station_partition(s, args.partitions) for s in Catalog.load().stations})
        wait("the workers' partition sessions",
             lambda: sum(gauge(p, SUBSCRIBED) for p in metrics) >= busy, timeout=60)  # fmt: skip
        demo.start("simulators", [sys.executable, "-m", "simulators", "--broker", broker,
                                  "--speed", str(args.speed)])  # fmt: skip
        print(f"chargewatch cluster-demo: PostgreSQL {db}, broker {broker}", flush=True)
        print(f"  two workers (w1, w2), two API replicas: {urls[0]}/  and  {urls[1]}/", flush=True)
        print(f"  logs in {demo.workdir}; Ctrl-C stops everything", flush=True)
        while True:
            demo.check()
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
