"""Every long-lived task of the service is supervised (issue 11 A): each one is killed in a
running service (real mosquitto, real uvicorn, the real store) and the service must say so:
``/readyz`` fails with the reason, a ``task_failed`` alert exists, and the task restarts,
or, for the pipeline and the MQTT source, ``serve`` stops with status 70 for its own
supervisor to start it again. The HTTP server's task failing stops ``serve`` with the
reason, everything closed. The service runs in this test's process so that the test can
reach its tasks; it is the same code ``chargewatch serve`` runs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from api import cli
from api.settings import ServeSettings
from devices.catalog import Catalog
from ingest.alerts.engine import TIMER, WRITER
from ingest.alerts.model import AlertQuery
from ingest.alerts.notify import SAVER
from ingest.alerts.store import AlertStore
from ingest.config import IngestConfig
from ingest.service import FATAL_EXIT_STATUS, PIPELINE, SOURCE, Ingest
from tests.alerts.helpers import eventually
from tests.alerts.keys import maintainer_key
from tests.servers import free_port, mosquitto

pytestmark = pytest.mark.e2e


@dataclass
class Served:
    ingest: Ingest
    http: httpx.AsyncClient
    task: asyncio.Task[object]  # serve; its result is the exit status

    async def readyz(self) -> dict[str, object]:
        answer = await self.http.get("/readyz")
        body: dict[str, object] = answer.json()
        body["status"] = answer.status_code
        return body

    async def task_alerts(self) -> dict[str, dict[str, object]]:
        answer = await self.http.get("/v1/alerts", params={"rule": "task_failed"})
        assert answer.status_code == 200, answer.text
        return {a["code"]: a for a in answer.json()["alerts"]}


@asynccontextmanager
async def serving(tmp: Path) -> AsyncIterator[Served]:
    with mosquitto(tmp / "mosquitto") as broker:
        data = tmp / "data"
        port = free_port()
        settings = ServeSettings(
            port=port,
            log_level="warning",
            ingest=IngestConfig(broker=broker.url, data_dir=data),
        )
        found: list[Ingest] = []
        task = asyncio.create_task(_exit_status(settings, found))
        headers = {"Authorization": f"Bearer {maintainer_key(data)}"}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=10
        ) as http:

            async def up() -> None:
                try:
                    answer = await http.get("/readyz")
                except httpx.TransportError as exc:
                    raise AssertionError(f"not listening yet: {exc}") from None
                if task.done():
                    pytest.fail(f"serve stopped with {task.result()}")
                assert answer.status_code == 200, answer.text
                assert found, "on_ready has not run yet"

            await eventually(up, within_s=30)
            (ingest,) = found
            ingest.supervisor.restart_min_s = 0.05
            ingest.supervisor.healthy_after_s = 2.0
            try:
                yield Served(ingest, http, task)
            finally:
                if not task.done():
                    ingest.stopping.set()  # the way a fatal death stops it
                await asyncio.wait_for(task, 30)


async def _exit_status(settings: ServeSettings, found: list[Ingest]) -> object:
    """``chargewatch serve`` in this process; SystemExit comes back as the exit status
    (raised in a task, it would stop the test's event loop)."""
    try:
        await cli.run_serve(settings, Catalog.load(), on_ready=lambda _, i: found.append(i))
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.mark.parametrize("name", [WRITER, TIMER, SAVER, "webhook:1:fresh", "webhook:1:retry"])
async def test_a_killed_alert_task_is_said_alerted_and_restarted(tmp_path: Path, name: str) -> None:
    async with serving(tmp_path) as served:
        assert served.ingest.alerts is not None
        sub = await served.ingest.alerts.notifier.add("http://127.0.0.1:9/hook")  # its lanes
        assert sub.id == 1
        killed = await eventually(lambda: _running(served, name))
        killed.cancel()

        async def said() -> None:
            ready = await served.readyz()
            assert ready["status"] == 503, ready
            assert any(f"task {name} died" in p for p in ready["problems"]), ready  # type: ignore[attr-defined]

        await eventually(said, within_s=5)
        await eventually(lambda: _restarted(served, name, killed), within_s=5)
        alerts = await served.task_alerts()  # saved by the (new) writer
        assert alerts[name]["severity"] == "critical"
        assert alerts[name]["status"] == "open"
        assert f"task {name} died: cancelled" in str(alerts[name]["info"])

        async def ready_again() -> None:
            assert (await served.readyz())["status"] == 200

        await eventually(ready_again, within_s=10)  # ran healthy_after_s since


def _running(served: Served, name: str) -> asyncio.Task[None]:
    task = served.ingest.supervisor.task(name)
    assert task is not None, f"{name} is not running (yet)"
    return task


def _restarted(served: Served, name: str, killed: object) -> None:
    now = served.ingest.supervisor.task(name)
    assert now is not None
    assert now is not killed


@pytest.mark.parametrize("name", [PIPELINE, SOURCE])
async def test_a_killed_ingest_task_stops_the_service_with_status_70(
    tmp_path: Path, name: str
) -> None:
    async with serving(tmp_path) as served:
        if name == SOURCE:
            source_task = served.ingest.source._task  # type: ignore[union-attr]
            assert source_task is not None
            source_task.cancel()  # the connection loop itself, not the supervisor's watch
        else:
            killed = served.ingest.supervisor.task(name)
            assert killed is not None
            killed.cancel()
        await eventually(lambda: _assert(served.ingest.stopping.is_set()), within_s=5)
        assert served.ingest.fatal is not None
        assert served.ingest.fatal.startswith(f"task {name} died")
        assert served.ingest.supervisor.problems() == [
            f"{served.ingest.fatal}; the service is stopping"
        ]
        assert await asyncio.wait_for(asyncio.shield(served.task), 30) == FATAL_EXIT_STATUS
        # the alert was saved before the service went: the next start shows it
        store = AlertStore.in_dir(tmp_path / "data")
        try:
            (alert,) = store.query(AlertQuery(rule="task_failed"))
        finally:
            store.close()
        assert (alert.code, alert.severity, alert.status) == (name, "critical", "open")


def _assert(condition: bool) -> None:
    assert condition


async def test_an_http_server_that_cannot_start_stops_serve_with_the_reason(
    tmp_path: Path,
) -> None:
    """Its port taken, the HTTP server's task fails (uvicorn's ``sys.exit``): serve stops
    with the reason and closes the service, leaving no task behind. SystemExit escaping
    the task used to leave the event loop at once: a traceback, exit status 3, the
    supervised tasks "cancelled by someone else", nothing closed."""
    with mosquitto(tmp_path / "mosquitto") as broker, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServeSettings(
            port=port,
            log_level="critical",
            ingest=IngestConfig(broker=broker.url, data_dir=tmp_path / "data"),
        )
        before = asyncio.all_tasks()
        status = await asyncio.wait_for(_exit_status(settings, []), 30)
        assert status == f"cannot serve HTTP on 127.0.0.1:{port}"
        assert asyncio.all_tasks() == before
