"""A real PostgreSQL for tests, from the Debian binaries, in a temp dir on a free port.

The cluster and the server's command line are the benchmarks' (``bench.pgserver``: one
recipe; the cluster belongs to the ``postgres`` account, PostgreSQL refuses root). Here the
server runs under ``tests.servers.Process``, in the foreground, so a test can stop, kill and
restart it by PID like the other servers. Missing binaries skip with a reason on a laptop and
fail under CI (``CI=true``).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import pgserver
from bench.procs import BenchError
from tests.servers import Process, free_port, missing

ACCOUNT = pgserver.ACCOUNT


def pg_bin(name: str) -> str:
    """The newest installed PostgreSQL's ``name`` binary (initdb, postgres, pg_isready)."""
    try:
        return pgserver.pg_bin(name)
    except BenchError as exc:
        missing(f"{exc}; .ci/run installs it")


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
        pg_bin("pg_isready")  # skips (or fails under CI) without it
        while True:
            if pgserver.ready(self.port):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL on {self.port} not ready after {timeout}s")
            time.sleep(0.1)


@contextmanager
def postgresql() -> Iterator[PgServer]:
    """A fresh PostgreSQL cluster on a free loopback port (no fsync: ``bench.pgserver``),
    its files in memory when the machine has room (``pgserver.scratch_dir``: the same real
    PostgreSQL, without the disk's cost of creating and dropping a database a test); removed
    afterwards."""
    pg_bin("initdb")  # skips (or fails under CI) without the binaries
    scratch = pgserver.scratch_dir()
    root, user = pgserver.new_cluster("cw-pg-", scratch)
    port = free_port()
    argv = pgserver.server_argv(root, port)
    if scratch != "/tmp":
        argv += pgserver.IN_MEMORY_WAL
    server = PgServer(Process(argv, port, root, root / "postgres.log", user=user), root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
