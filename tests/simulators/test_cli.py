"""``python -m simulators`` as a process: the whole district, READY, HOLD, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.workload import write_catalog
from devices.catalog import Catalog
from devices.contract import Death, decode
from devices.topics import TopicScheme
from simulators.cli import main
from tests.servers import Process
from tests.simulators.conftest import read_truth, within


async def _line(stream: asyncio.StreamReader) -> str:
    raw = await stream.readline()
    if not raw:
        raise AssertionError("the simulator closed stdout")
    return raw.decode().strip()


async def test_the_whole_district_comes_up_holds_and_stops_gracefully(
    broker: Process, catalog: Catalog, tmp_path: Path
) -> None:
    truth_path = tmp_path / "truth.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators",
        "--broker",
        broker.url,
        "--speed",
        "600",
        "--duration",
        "900",
        "--truth",
        str(truth_path),
        "--start",
        "2026-11-28T18:00:00+08:00",
        "--fault-rate",
        "0",
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        assert await within(_line(proc.stdout), 30) == f"READY {len(catalog.devices)}"
        assert await within(_line(proc.stdout), 30) == "HOLD"
        proc.send_signal(signal.SIGTERM)
        assert await within(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = (await proc.stderr.read()).decode()
    assert "Traceback" not in stderr, stderr
    lines = read_truth(truth_path)
    holds = [line for line in lines if line.get("hold")]
    assert len(holds) == 1
    assert holds[0]["devices"] == len(catalog.devices)
    scheme = TopicScheme()
    deaths = set()
    for line in lines:
        if "topic" not in line:
            continue
        topic = scheme.parse(line["topic"])
        assert topic is not None
        assert topic.device_id in catalog.devices
        message = decode(topic.channel, line["payload"].encode())
        if isinstance(message, Death):
            deaths.add(topic.device_id)
    assert deaths == set(catalog.devices)  # every device said goodbye itself
    assert json.loads(lines[-1]["payload"])["online"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--broker", "http://h:1"], "mqtt://host:port or mqtts://host:port"),
        (["--broker", "mqtt://u:p@h:1"], "--credentials"),
        (["--broker", "mqtt://h:1", "--cafile", "/etc/hosts"], "--cafile is for TLS"),
        (["--broker", "mqtt://h:1", "--credentials", "/nonexistent.json"], "--credentials"),
        (["--broker", "mqtt://h:1", "--shard", "3/2"], "--shard"),
        (["--broker", "mqtt://h:1", "--catalog", "/nonexistent.json"], "cannot read catalog"),
        (["--broker", "mqtt://h:1", "--speed", "0"], "--speed"),
        # the service rejects a birth with a longer heartbeat (contract bound)
        (["--broker", "mqtt://h:1", "--heartbeat-s", "601"], "--heartbeat-s 601: must be 1..600"),
    ],
)
def test_bad_options_fail_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


async def test_stats_lines_count_what_the_simulator_published(
    broker: Process, tmp_path: Path
) -> None:
    catalog = write_catalog(tmp_path / "catalog.json", 3)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators", "--broker", broker.url, "--catalog", str(catalog),
        "--stats-s", "0.2", "--log-level", "WARNING",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:

        async def until_all_born() -> dict[str, Any]:
            while True:
                line = await _line(proc.stdout)  # type: ignore[arg-type]
                if line.startswith("STATS "):
                    stats: dict[str, Any] = json.loads(line.removeprefix("STATS "))
                    if stats["born"] == 3:
                        return stats

        stats = await within(until_all_born(), 30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await within(proc.wait(), 30) == 0
    assert stats["connected"] == 3
    assert stats["published"] >= 3  # every birth at least; then a snapshot each
    assert stats["cpu_s"] > 0
    assert stats["lag_max_s"] >= 0


def test_every_device_needs_a_password_in_the_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"ingest": {}, "devices": {"WGS-P01": "pw"}}))
    assert main(["--broker", "mqtt://127.0.0.1:1", "--credentials", str(creds)]) == 2
    err = capsys.readouterr().err
    assert "411 devices have no password in the credentials" in err
    assert "pw" not in err.replace("password", "")
