"""InfluxDB 1.x and VictoriaMetrics for tests, as processes on free loopback ports.

Debian packages ``influxdb`` (1.6.7, ``/usr/bin/influxd``) and ``victoria-metrics``
(1.79.5, ``/usr/bin/victoria-metrics``). Each server gets a temp data dir and is stopped by
PID; missing binaries skip on a laptop and fail under ``CI=true`` (``need_binary``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.servers import Process, eventually, free_port, need_binary


@dataclass
class HTTPServer:
    """A server process we started and its HTTP base URL."""

    process: Process
    base_url: str

    @property
    def port(self) -> int:
        return self.process.port

    def stop(self) -> None:
        self.process.stop()

    def start(self) -> None:
        self.process.start()
        self.wait_ready()

    def wait_ready(self) -> None:
        def ping() -> None:
            try:
                status = httpx.get(self.base_url + "/ping", timeout=2).status_code
            except httpx.HTTPError as exc:
                raise AssertionError(f"{self.base_url}/ping: {exc}") from exc
            assert status == 204, f"{self.base_url}/ping answered {status}"

        eventually(ping, timeout=20)


@contextmanager
def influxd(tmp: Path) -> Iterator[HTTPServer]:
    """InfluxDB 1.x (``influxd``): v1 ``/write`` and InfluxQL ``/query``, no auth."""
    binary = need_binary("influxd", "/usr/bin/influxd")
    http_port, rpc_port = free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "influxdb.conf"
    conf.write_text(
        f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{tmp}/meta"
[data]
  dir = "{tmp}/data"
  wal-dir = "{tmp}/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
[continuous_queries]
  enabled = false
"""
    )
    proc = Process([binary, "-config", str(conf)], http_port, tmp, tmp / "influxd.log")
    server = HTTPServer(proc, f"http://127.0.0.1:{http_port}")
    server.start()
    try:
        yield server
    finally:
        proc.stop()


@contextmanager
def victoria_metrics(tmp: Path) -> Iterator[HTTPServer]:
    """VictoriaMetrics: accepts influxdb-client writes on ``/api/v2/write``.

    Read back with ``export`` after ``force_flush``; ``-search.latencyOffset=0s`` makes fresh
    samples visible at once.
    """
    binary = need_binary("victoria-metrics", "/usr/bin/victoria-metrics")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        f"-httpListenAddr=127.0.0.1:{port}",
        f"-storageDataPath={tmp}/data",
        "-retentionPeriod=100y",
        "-search.latencyOffset=0s",
        "-loggerLevel=ERROR",
    ]
    proc = Process(argv, port, tmp, tmp / "victoria-metrics.log")
    server = HTTPServer(proc, f"http://127.0.0.1:{port}")
    server.start()
    try:
        yield server
    finally:
        proc.stop()


def vm_export(server: HTTPServer, match: str) -> list[dict[str, object]]:
    """Flush VictoriaMetrics and export the series matching ``match`` (a series selector)."""
    httpx.get(server.base_url + "/internal/force_flush", timeout=10).raise_for_status()
    response = httpx.post(server.base_url + "/api/v1/export", data={"match[]": match}, timeout=10)
    response.raise_for_status()
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]
