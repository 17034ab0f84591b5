"""Real servers for tests, started as processes on free loopback ports and stopped by PID.

Missing binaries skip with a reason on a laptop and fail under CI (``CI=true``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, TypeVar

import httpx
import pytest

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def eventually(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns without AssertionError; re-raise the last one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(interval)


def need_binary(name: str, *candidates: str) -> str:
    for candidate in (name, *candidates):
        found = shutil.which(candidate)
        if found:
            return found
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    missing(f"{name} is not installed (Debian package; .ci/run installs it)")


def missing(message: str) -> NoReturn:
    """What a test needs is not installed: skip on a laptop, fail under CI (``CI=true``)."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Process:
    """A server process we started; ``stop``/``kill``/``start`` for fault injection."""

    argv: list[str]
    port: int
    workdir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this account (we are root)

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
                user=self.user,
            )
        try:
            wait_port(self.port, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(
                f"{self.argv[0]} did not start; log:\n{self.log.read_text()}"
            ) from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


@contextmanager
def mosquitto(tmp: Path, *, persistence: bool = True) -> Iterator[Process]:
    binary = need_binary("mosquitto", "/usr/sbin/mosquitto")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                # started as root, mosquitto would switch to user "mosquitto", which cannot
                # write its persistence file into our temp dir: stay who we are
                f"user {getpass.getuser()}",
                "allow_anonymous true",
                f"persistence {'true' if persistence else 'false'}",
                f"persistence_location {tmp}/",
                "autosave_interval 1",
                # The default of 20 throttles QoS 1 (shared/architecture.md).
                "max_inflight_messages 1000",
                "max_queued_messages 1000000",
                "log_dest stdout",
                "log_type error",
                "log_type warning",
            ]
        )
        + "\n"
    )
    proc = Process([binary, "-c", str(conf)], port, tmp, tmp / "mosquitto.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def broker_config_dir() -> Path:
    """An empty directory for ``chargewatch broker-config mosquitto --out``, under /tmp
    itself: run as root, the generator gives it to the mosquitto account, which must reach
    it (pytest's own tmp_path sits in a root-only directory). Remove it with shutil.rmtree."""
    return Path(tempfile.mkdtemp(prefix="cw-broker-", dir="/tmp"))


@contextmanager
def mosquitto_from(
    conf_dir: Path, port: int, log_dir: Path, *, user: str | None = None
) -> Iterator[Process]:
    """mosquitto started with the files ``chargewatch broker-config mosquitto`` wrote to
    ``conf_dir`` (listening on ``port``, as generated); as root it switches to the account
    the config names, or it runs as ``user`` from the start."""
    binary = need_binary("mosquitto", "/usr/sbin/mosquitto")
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = Process(
        [binary, "-c", str(conf_dir / "mosquitto.conf")],
        port,
        conf_dir,
        log_dir / "mosquitto.log",
        user=user,
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Service:
    """A ``chargewatch serve`` process and its HTTP base URL."""

    process: Process
    base_url: str
    data_dir: Path
    db: str | None = None  # an API replica's PostgreSQL: its keys are there, not in data_dir

    def get(self, path: str, **params: object) -> httpx.Response:
        return httpx.get(self.base_url + path, params=params or None, timeout=10)  # type: ignore[arg-type]


def chargewatch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "api.cli", *args]


@contextmanager
def chargewatch_serve(
    tmp: Path,
    broker: str | None,
    *extra: str,
    data_dir: Path | None = None,
    broker_port: int | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """Start ``chargewatch serve`` on free ports; wait until /readyz says ready."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or tmp / "data"
    argv = ["serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
    if broker is None:
        argv += ["--broker-port", str(broker_port or free_port())]
    else:
        argv += ["--broker", broker]
    proc = Process(
        chargewatch_argv(*argv),
        port,
        Path(__file__).resolve().parent.parent,
        tmp / "serve.log",
        env=env or {},
    )
    proc.start()
    service = Service(proc, f"http://127.0.0.1:{port}", data_dir)

    def ready() -> None:
        assert service.get("/readyz").status_code == 200, service.get("/readyz").text

    try:
        eventually(ready, timeout=30)
        yield service
    finally:
        proc.stop()
