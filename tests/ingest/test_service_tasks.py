"""The service's tasks (issue 13): while it runs, every task our code started has a name and
the long-lived ones run under the supervisor's one TaskGroup; after a stop, none is left.
The service runs in this test's process against a real mosquitto, with each MQTT client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from devices.catalog import Catalog
from ingest.alerts.engine import TIMER, WRITER
from ingest.alerts.notify import SAVER
from ingest.commands.service import TASK as COMMANDS
from ingest.config import IngestConfig
from ingest.service import DISK, HOUSEKEEPING, PASSPORTS, PIPELINE, SOURCE, Ingest
from tests.alerts.helpers import eventually
from tests.servers import mosquitto

REPO = Path(__file__).resolve().parents[2]
SUPERVISED = {
    DISK, PASSPORTS, HOUSEKEEPING, PIPELINE, SOURCE, WRITER, TIMER, SAVER, COMMANDS,
    "orders:writer", "orders:timer", "webhook:1:fresh", "webhook:1:retry",
}  # fmt: skip


def _ours(task: asyncio.Task[object]) -> bool:
    """Started by code of this repository (gmqtt runs a read loop of its own, unnamed)."""
    code = getattr(task.get_coro(), "cr_code", None)
    if code is None:
        return True
    where = Path(code.co_filename).resolve()
    return where.is_relative_to(REPO) and "site-packages" not in where.parts


@pytest.mark.parametrize("client", ["gmqtt", "paho"])
async def test_every_task_is_named_supervised_and_gone_after_a_stop(
    tmp_path: Path, client: str
) -> None:
    with mosquitto(tmp_path / "mosquitto") as broker:
        config = IngestConfig(broker=broker.url, data_dir=tmp_path / "data", mqtt_client=client)
        before = asyncio.all_tasks()
        async with Ingest(config, Catalog.load()) as ingest:
            assert ingest.alerts is not None
            await ingest.alerts.notifier.add("http://127.0.0.1:9/hook")  # its two lanes

            def up() -> None:
                assert ingest.ready, ingest.problems()
                assert all(ingest.supervisor.task(n) is not None for n in SUPERVISED)

            await eventually(up, within_s=15)
            running = asyncio.all_tasks() - before
            names = {t.get_name() for t in running}
            assert set(ingest.supervisor.names) == SUPERVISED
            for name in SUPERVISED:  # each task, and the keeper that restarts it
                assert {name, f"supervise:{name}"} <= names, name
            unnamed = [t for t in running if t.get_name().startswith("Task-") and _ours(t)]
            assert unnamed == []
        assert asyncio.all_tasks() == before
