"""``make cluster-demo`` as the Makefile runs it (``python -m bench.clusterdemo``), on a
database of the session's PostgreSQL (``--db``: the machine's own server, when there is one,
is not the test's): it prints both replicas' URLs only once both are ready, each answers a
rider's query, the workers split the ``--partitions`` asked for, and SIGTERM stops every
process it started."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from devices.catalog import Catalog
from tests.cluster.processes import LEASE_S, ROOT, new_database
from tests.pg_server import PgServer

pytestmark = pytest.mark.e2e

READY_LINE = "Ctrl-C stops everything"


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (state, ppid, ...; field 22, the start
    time, at 19), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """The processes under ``pid`` now, each with its start time (a PID given later to
    another process is not taken for one of them)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            starts[int(entry.name)] = fields[19]
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: str) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[19] == start and fields[0] != "Z"


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return "(gone)"


def until_ready(demo: subprocess.Popen[str], timeout: float) -> list[str]:
    """The demo's output up to the line that says everything is up."""
    stream = demo.stdout
    assert stream is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        with stream:  # closed at EOF: the demo ended
            for line in stream:
                lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while not out or READY_LINE not in out[-1]:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"the demo is not up after {timeout:.0f} s:\n{''.join(out)}")
        if line is None:
            pytest.fail(f"the demo ended ({demo.wait()}):\n{''.join(out)}")
        out.append(line)
    return out


def test_cluster_demo_prints_two_ready_replicas_and_leaves_nothing_behind(
    pg_session: PgServer,
) -> None:
    db = new_database(pg_session, "cluster_demo")
    # the cluster tests' lease timeout: with the default 10 s, the second worker to join
    # takes its partitions only after the first gave them back and a grace of 3.5 s more
    env = {**os.environ, "CHARGEWATCH_LEASE_TIMEOUT_S": str(LEASE_S)}
    demo = subprocess.Popen(
        [sys.executable, "-m", "bench.clusterdemo", "--db", db, "--partitions", "4"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    started: dict[int, str] = {}
    workdir: Path | None = None
    try:
        out = until_ready(demo, timeout=60)
        started = descendants(demo.pid)
        text = "".join(out)
        found = re.search(r"logs in (\S+);", text)
        assert found, text
        workdir = Path(found.group(1))
        replicas = next(line for line in out if "API replicas" in line)
        assert "both ready (/readyz 200)" in replicas
        urls = re.findall(r"http://127\.0\.0\.1:\d+(?=/)", replicas)
        metrics = re.findall(r"http://127\.0\.0\.1:\d+/metrics", text)
        assert len(urls) == 2, text
        assert len(metrics) == 2, text
        stations = set(Catalog.load().stations)
        for url in urls:  # ready as printed: not a moment later
            assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200, url
            answer = httpx.get(f"{url}/v1/stations", timeout=5)
            assert answer.status_code == 200, answer.text
            assert {s["id"] for s in answer.json()["stations"]} == stations

        # what it started: mosquitto, two workers, two replicas, the simulators
        commands = [cmdline(pid) for pid in started]
        for what, count in (("mosquitto", 1), (" ingest ", 2), (" api ", 2), ("simulators", 1)):
            assert sum(what in c for c in commands) == count, commands
        for url in metrics:  # --partitions 4 reached each worker: it knows partitions 0..3
            body = httpx.get(url, timeout=5).text
            labels = re.findall(r'^chargewatch_ingest_partition_owned\{partition="(\d+)"\}', body,
                                re.MULTILINE)  # fmt: skip
            assert sorted(labels) == ["0", "1", "2", "3"], body

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
        left = {pid: cmdline(pid) for pid, start in started.items() if alive(pid, start)}
        assert left == {}, "left running"
    finally:
        if demo.poll() is None:  # a check failed: the demo stops what it started
            started |= descendants(demo.pid)
            demo.send_signal(signal.SIGTERM)
            try:
                demo.wait(30)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
        for pid, start in started.items():  # what a failed stop left: by its PID
            if alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
