"""The real servers a benchmark runs: mosquitto, influxd, ``chargewatch serve``, agents.

Each is a process on a free loopback port, started in its own session and stopped by its
PID (SIGTERM, then SIGKILL after a grace period). Nothing here talks to anything but
127.0.0.1.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A benchmark could not run (a server did not start, a binary is missing)."""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reaped_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the children ``pid`` has waited for: what its exited
    children spent (/proc/PID/stat cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def binary(name: str, *candidates: str) -> str:
    for candidate in (name, *candidates):
        found = shutil.which(candidate)
        if found:
            return found
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise BenchError(f"{name} is not installed (Debian package)")


def have(name: str, *candidates: str) -> bool:
    try:
        binary(name, *candidates)
    except BenchError:
        return False
    return True


@dataclass
class Proc:
    argv: list[str]
    log: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    stdout: Path | None = None
    env: dict[str, str] | None = None  # added to this process's environment
    user: str | None = None  # run as this account (PostgreSQL refuses root)
    stop_signal: int = signal.SIGTERM  # PostgreSQL's fast shutdown is SIGINT

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 30.0) -> Proc:
        self.spawn()
        if self.port is not None:
            self.wait_port(timeout)
        return self

    def spawn(self) -> None:
        """Start the process without waiting for its port (``start`` waits)."""
        out = open(self.stdout or self.log, "ab")  # noqa: SIM115 - handed to the child
        err = open(self.log, "ab") if self.stdout else subprocess.STDOUT  # noqa: SIM115
        try:
            env = {**os.environ, **self.env} if self.env else None
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=err, start_new_session=True, env=env, user=self.user
            )
        finally:
            out.close()
            if not isinstance(err, int):
                err.close()

    def wait_port(self, timeout: float) -> None:
        assert self.port is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise BenchError(f"{self.argv[0]} exited: {self.tail()}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BenchError(f"{self.argv[0]} did not listen on {self.port}: {self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise BenchError(f"{self.argv[0]} still running after {timeout:.0f}s") from None
        except BaseException:  # interrupted: do not leave the process behind
            self.stop()
            raise

    def stop(self, grace: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(grace)

    def rss_bytes(self) -> int:
        """Resident memory of the process now (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no VmRSS for {self.pid}")


@contextlib.contextmanager
def running(proc: Proc, timeout: float = 30.0) -> Iterator[Proc]:
    proc.start(timeout)
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def running_together(ps: list[Proc], timeout: float = 30.0) -> Iterator[list[Proc]]:
    """Start every process of ``ps`` at once, then wait for each one's port: their start-ups
    (mostly imports) overlap. All are stopped afterwards."""
    with contextlib.ExitStack() as stack:
        for p in ps:
            stack.callback(p.stop)
            p.spawn()
        for p in ps:
            if p.port is not None:
                p.wait_port(timeout)
        yield ps


def mosquitto(work: Path) -> Proc:
    """mosquitto with ``max_inflight_messages 1000`` (the default 20 throttles QoS 1)."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {LOOPBACK}\n"
        f"user {getpass.getuser()}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_inflight_messages 1000\n"
        "max_queued_messages 10000000\n"
        "log_dest stdout\nlog_type error\nlog_type warning\n"
    )
    return Proc([binary("mosquitto", "/usr/sbin/mosquitto"), "-c", str(conf)], work / "log", port)


def mosquitto_version() -> str:
    out = subprocess.run(
        [binary("mosquitto", "/usr/sbin/mosquitto"), "-h"], capture_output=True, text=True
    ).stdout
    return out.splitlines()[0].strip() if out else "mosquitto ?"


def influxd(work: Path) -> Proc:
    """InfluxDB 1.x; the cache is snapshotted to TSM after 1 s cold so disk use is TSM's."""
    http_port, rpc_port = free_port(), free_port()
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "influxdb.conf"
    conf.write_text(
        f"""reporting-disabled = true
bind-address = "{LOOPBACK}:{rpc_port}"
[meta]
  dir = "{work}/meta"
[data]
  dir = "{work}/data"
  wal-dir = "{work}/wal"
  query-log-enabled = false
  cache-snapshot-write-cold-duration = "1s"
[monitor]
  store-enabled = false
[http]
  bind-address = "{LOOPBACK}:{http_port}"
  log-enabled = false
[continuous_queries]
  enabled = false
"""
    )
    return Proc(
        [binary("influxd", "/usr/bin/influxd"), "-config", str(conf)], work / "log", http_port
    )


def influx_create_db(port: int, db: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            r = httpx.post(f"http://{LOOPBACK}:{port}/query", data={"q": f"CREATE DATABASE {db}"})
            r.raise_for_status()
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]


def serve(work: Path, broker_url: str, catalog: Path | None, *extra: str) -> Proc:
    """``chargewatch serve`` against ``broker_url``; wait with ``wait_ready``."""
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    argv = python_argv(
        "-m", "api.cli", "--log-level", "warning", "serve", "--broker", broker_url,
        "--port", str(port), "--data-dir", str(work / "data"), *extra,
    )  # fmt: skip
    if catalog is not None:
        argv += ["--catalog", str(catalog)]
    return Proc(argv, work / "serve.log", port)


def ready(base_url: str) -> bool:
    """``/readyz`` answers 200."""
    try:
        return httpx.get(base_url + "/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(base_url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready(base_url):
        if time.monotonic() > deadline:
            raise BenchError(f"{base_url} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def agent(work: Path, name: str, **args: Any) -> Proc:
    """A measuring agent (``bench.agents``) in its own process; JSON result on stdout."""
    work.mkdir(parents=True, exist_ok=True)
    argv = python_argv("-m", "bench.agents", name, json.dumps(args, default=str))
    return Proc(argv, work / f"{name}.log", stdout=work / f"{name}.json")


def agent_result(proc: Proc) -> dict[str, Any]:
    assert proc.stdout is not None
    lines = proc.stdout.read_text().strip().splitlines()
    if not lines:
        raise BenchError(f"agent {proc.argv[3]} printed nothing: {proc.tail()}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text (first match, no labels)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise BenchError(f"metric {name} not found")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
