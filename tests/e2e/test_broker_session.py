"""A broker that lost our persistent session (a crash without a saved persistence file, an
expired session): everything it held for us is gone, and the service must say so, counted,
logged and as an alert, with both MQTT clients. Real mosquitto, killed with -9 and started
again without its persistence file; a real ``chargewatch serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.alerts.keys import maintainer_get
from tests.servers import Process, Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

LOST = "chargewatch_broker_sessions_lost_total"


@pytest.fixture
def fast_alerts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S", "0")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__TICK_S", "0.2")


@pytest.fixture
def crashable(tmp_path: Path) -> Iterator[Process]:
    with mosquitto(tmp_path / "mosquitto") as proc:
        yield proc


def crash_and_forget(broker: Process) -> None:
    """kill -9, and start again without the persistence file: every session is gone."""
    broker.kill()
    (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
    broker.start()


def metric(service: Service, name: str) -> float:
    for line in service.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exposed")


def session_alerts(service: Service) -> list[tuple[str, str, int]]:
    alerts = maintainer_get(service, "/v1/alerts", rule="broker_session_lost").json()["alerts"]
    return [(a["severity"], a["status"], a["count"]) for a in alerts]


@pytest.mark.usefixtures("fast_alerts")
@pytest.mark.parametrize("client", ["gmqtt", "paho"])
def test_a_lost_session_is_counted_logged_and_alerted(
    crashable: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    monkeypatch.setenv("CHARGEWATCH_INGEST__MQTT_CLIENT", client)
    with chargewatch_serve(tmp_path / "serve", crashable.url) as svc:
        # the very first connect of our client id: no session yet, and nothing was lost
        assert metric(svc, LOST) == 0
        assert session_alerts(svc) == []
        crash_and_forget(crashable)

        def alerted() -> None:
            assert metric(svc, LOST) == 1
            assert session_alerts(svc) == [("major", "open", 1)]

        eventually(alerted, timeout=20)
        log = svc.process.log.read_text()
        warned = [line for line in log.splitlines() if "WARNING" in line and "no session" in line]
        assert len(warned) == 1


@pytest.mark.usefixtures("fast_alerts")
def test_a_session_lost_while_the_service_was_down_is_alerted_at_start(
    crashable: Process, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    with chargewatch_serve(tmp_path / "serve1", crashable.url, data_dir=data_dir) as svc:
        assert metric(svc, LOST) == 0
    # a graceful restart finds its session: nothing to say
    with chargewatch_serve(tmp_path / "serve2", crashable.url, data_dir=data_dir) as svc:
        assert metric(svc, LOST) == 0
    crash_and_forget(crashable)
    with chargewatch_serve(tmp_path / "serve3", crashable.url, data_dir=data_dir) as svc:

        def alerted() -> None:
            assert metric(svc, LOST) == 1
            assert session_alerts(svc) == [("major", "open", 1)]

        eventually(alerted, timeout=20)
