"""A throwaway PostgreSQL: the Debian binaries, a temp dir, a free loopback port.

The one recipe, for the benchmarks (``postgresql()`` here), ``make cluster-demo``
(``bench.clusterdemo``, when the machine runs no PostgreSQL) and the tests
(``tests.pg_server``, which runs the same server under its process helper so that a test can
stop, kill and restart it; bench may not import tests/): ``initdb`` as the ``postgres``
account when run as root (PostgreSQL refuses root) into a temp dir it may reach
(``new_cluster``), the server in the foreground so it is stopped by its PID, fsync off
(``server_argv``: the figures are CPU per message, and the tests do not exercise a crash of
the machine; a kill -9 of the server still loses nothing committed). ``cpu_s()`` sums the CPU of the postmaster and its backends
(``/proc``), so a run can say what the database costs a message too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.procs import LOOPBACK, BenchError, cpu_s, free_port, reaped_cpu_s

ACCOUNT = "postgres"


def pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise BenchError(f"PostgreSQL's {name} is not installed (Debian package postgresql)")
    return found[-1]


def available() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/postgres"))


SHM_NEEDED = 1 << 30
"""Free space a cluster in ``/dev/shm`` may need: its WAL grows to ``IN_MEMORY_WAL``'s
``max_wal_size`` and the databases come on top (a container's default /dev/shm of 64 MB is
too small)."""
IN_MEMORY_WAL = ["-c", "max_wal_size=256MB", "-c", "min_wal_size=32MB"]
"""A cluster in memory: a checkpoint costs nothing and the WAL should not grow to 1 GB."""


def scratch_dir() -> str:
    """Where a test cluster's files go: the tmpfs ``/dev/shm`` when it is there, writable and
    has ``SHM_NEEDED`` free, else ``/tmp``. Every ``CREATE DATABASE`` copies ~7.5 MB of
    catalog through the WAL; on a disk mounted with ``discard`` creating and removing those
    files cost ~0.5 s a database and ~20 s of rmtree at the end of a full test run."""
    shm = "/dev/shm"
    if (
        os.path.isdir(shm)
        and os.access(shm, os.W_OK | os.X_OK)
        and shutil.disk_usage(shm).free >= SHM_NEEDED
    ):
        return shm
    return "/tmp"


def new_cluster(prefix: str, dir: str = "/tmp") -> tuple[Path, str | None]:
    """A new database cluster in a new temp dir under ``dir`` itself (the ``postgres``
    account must reach it; pytest's tmp_path is root-only): (the dir, ``init_cluster``'s
    account)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    return root, init_cluster(root)


def init_cluster(root: Path) -> str | None:
    """``initdb`` into ``root/data`` (``root`` is the server's socket dir too): the account
    that must run the server, given ``root`` (``postgres`` when we are root, else None)."""
    user = ACCOUNT if os.geteuid() == 0 else None
    if user is not None:
        shutil.chown(root, user, user)
    subprocess.run(
        [pg_bin("initdb"), "-D", str(root / "data"), "-A", "trust", "-U", ACCOUNT, "--no-sync",
         "-E", "UTF8", "--locale", "C"],
        check=True, capture_output=True, timeout=120, user=user,
    )  # fmt: skip
    return user


def server_argv(root: Path, port: int) -> list[str]:
    """The foreground server of ``new_cluster``'s ``root`` on ``port`` (loopback only)."""
    return [
        pg_bin("postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root),
        "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
        "-c", "max_connections=200",
    ]  # fmt: skip


def create_database(port: int, name: str) -> None:
    subprocess.run(
        [pg_bin("createdb"), "-h", LOOPBACK, "-p", str(port), "-U", ACCOUNT, name],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def ready(port: int) -> bool:
    """The server on ``port`` accepts connections (``pg_isready``)."""
    done = subprocess.run(
        [pg_bin("pg_isready"), "-q", "-h", LOOPBACK, "-p", str(port)], check=False
    )
    return done.returncode == 0


@dataclass
class PgBench:
    popen: subprocess.Popen[bytes]
    port: int
    root: Path

    def url(self, database: str) -> str:
        return f"postgresql://{ACCOUNT}@{LOOPBACK}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        create_database(self.port, name)
        return self.url(name)

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, walwriter, checkpointer, ...)."""
        out = [self.popen.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rpartition(")")[2].split()
                if int(fields[1]) == self.popen.pid:
                    out.append(int(stat.parent.name))
        return out

    def cpu_s(self) -> dict[int, float]:
        """CPU seconds so far of each of ``pids()``; the postmaster's with what its exited
        children spent (a connection pool's overflow connections come and go: their backends'
        CPU would be lost with them)."""
        out: dict[int, float] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                out[pid] = cpu_s(pid)
                if pid == self.popen.pid:
                    out[pid] += reaped_cpu_s(pid)
        return out


def cpu_between(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two ``PgBench.cpu_s()`` readings by the processes of either."""
    return sum(after[p] - before.get(p, 0.0) for p in after)


@contextlib.contextmanager
def postgresql(timeout: float = 60.0) -> Iterator[PgBench]:
    root, user = new_cluster("cw-bench-pg-")
    port = free_port()
    argv = server_argv(root, port)
    with open(root / "postgres.log", "ab") as log:
        popen = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=user
        )
    try:
        deadline = time.monotonic() + timeout
        while not ready(port):
            if popen.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"PostgreSQL on {port} did not start: see {root}/postgres.log")
            time.sleep(0.1)
        yield PgBench(popen, port, root)
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGINT)  # fast shutdown: clients may still be connected
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(10)
        shutil.rmtree(root, ignore_errors=True)
