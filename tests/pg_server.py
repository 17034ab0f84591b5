"""A real PostgreSQL for tests, from the Debian binaries, in a temp dir on a free port.

PostgreSQL refuses to run as root, so the cluster belongs to the ``postgres`` account
(shared/architecture.md). The server runs in the foreground (``postgres -D``), so a test can
stop, kill and restart it by PID like the other servers in ``tests.servers``. Missing binaries
skip with a reason on a laptop and fail under CI (``CI=true``).

The cluster's files live in memory (``/dev/shm``, a tmpfs) when the machine has one: every
``CREATE DATABASE`` copies ~7.5 MB of catalog through the WAL, and on a disk mounted with
``discard`` creating and removing those files cost ~0.5 s a database and ~20 s of rmtree at the
end of a full run; in memory both are near zero. The server is the same real PostgreSQL.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import Process, free_port

ACCOUNT = "postgres"


SHM_NEEDED = 1 << 30
"""Free space a cluster in ``/dev/shm`` may need: its WAL grows to ``max_wal_size`` (256 MB)
and a test's databases come on top (a container's default /dev/shm of 64 MB is too small)."""


def scratch_dir() -> str:
    """Where a test cluster's files go: the tmpfs ``/dev/shm`` when it is there, writable and
    has ``SHM_NEEDED`` free, else ``/tmp`` itself (the postgres account must reach it;
    pytest's tmp_path is root-only)."""
    shm = "/dev/shm"
    if (
        os.path.isdir(shm)
        and os.access(shm, os.W_OK | os.X_OK)
        and shutil.disk_usage(shm).free >= SHM_NEEDED
    ):
        return shm
    return "/tmp"


def pg_bin(name: str) -> str:
    """The newest installed PostgreSQL's ``name`` binary (initdb, postgres, pg_isready)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    message = (
        f"PostgreSQL's {name} is not installed (Debian package postgresql; .ci/run installs it)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PgServer:
    process: Process
    dir: Path

    @property
    def port(self) -> int:
        return self.process.port

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy/libpq URL (``postgresql://``) of ``database``."""
        return f"postgresql://{ACCOUNT}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql (no driver needed); its output, tuples only."""
        out = subprocess.run(
            [
                pg_bin("psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                ACCOUNT,
                "-d",
                database,
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout.strip()

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def start(self) -> None:
        self.process.start()
        self.wait_ready()

    def stop(self) -> None:
        """Fast shutdown (SIGINT): SIGTERM is PostgreSQL's "smart" one, which waits for every
        client to leave (a connected worker never does)."""
        self.process.stop(signal.SIGINT)

    def kill(self) -> None:
        self.process.kill()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        isready = pg_bin("pg_isready")
        while True:
            done = subprocess.run(
                [isready, "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on {self.port} not ready after {timeout}s")
            time.sleep(0.1)


@contextmanager
def postgresql() -> Iterator[PgServer]:
    """A fresh PostgreSQL cluster on a free loopback port; removed afterwards. Tuned for tests
    (no fsync, files in memory when possible (``scratch_dir``): a crash of this machine is not
    what the tests exercise; a kill -9 of the server still loses nothing committed, the data is
    in the OS's page cache)."""
    initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
    root = Path(tempfile.mkdtemp(prefix="cw-pg-", dir=scratch_dir()))
    shutil.chown(root, ACCOUNT, ACCOUNT)
    data = root / "data"
    subprocess.run(
        [
            "runuser",
            "-u",
            ACCOUNT,
            "--",
            initdb,
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            ACCOUNT,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale",
            "C",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    port = free_port()
    argv = [
        postgres, "-D", str(data), "-p", str(port), "-k", str(root),
        "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off",
        "-c", "max_connections=200",
        # in memory, a checkpoint costs nothing and the WAL should not grow to the 1 GB default
        "-c", "max_wal_size=256MB", "-c", "min_wal_size=32MB",
    ]  # fmt: skip
    server = PgServer(Process(argv, port, root, root / "postgres.log", user=ACCOUNT), root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
