"""The service's own alerts (station ``service``), in-process on a fake clock: a store outage
opens and resolves with its condition; a lost broker session stays until a maintainer
resolves it, and a further loss counts on the open one."""

from __future__ import annotations

from pathlib import Path

from ingest.alerts.engine import AlertEngine
from ingest.alerts.model import AlertQuery
from tests.alerts.helpers import Clock, running


async def service_alerts(engine: AlertEngine, rule: str) -> list[tuple[str, str, int]]:
    alerts = await engine.query(AlertQuery(rule=rule))
    return [(a.severity, a.status, a.count) for a in alerts]


async def test_a_store_outage_opens_and_resolves_a_critical_alert(tmp_path: Path) -> None:
    clock = Clock()
    problem: list[str] = []
    async with running(tmp_path, clock) as engine:
        engine.store_check = lambda now: problem[0] if problem else None
        engine.tick()
        assert await service_alerts(engine, "store_unavailable") == []
        problem.append("store write waiting for 3s (database locked?)")
        engine.tick()
        assert await service_alerts(engine, "store_unavailable") == [("critical", "open", 1)]
        (alert,) = await engine.query(AlertQuery(rule="store_unavailable"))
        assert alert.info == problem[0]
        assert alert.station_id == "service"
        problem.clear()
        engine.tick()
        clock.advance(61)  # the verification window
        engine.tick()
        assert await service_alerts(engine, "store_unavailable") == [("critical", "resolved", 1)]


async def test_the_alert_stores_own_failure_is_a_store_outage(tmp_path: Path) -> None:
    async with running(tmp_path, Clock()) as engine:
        engine.store_healthy = False  # what the writer sets when the alert store fails
        engine.tick()
        engine.store_healthy = True
        assert await service_alerts(engine, "store_unavailable") == [("critical", "open", 1)]


async def test_a_lost_session_stays_until_resolved_by_hand(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        engine.raise_service_event("broker_session_lost", "major", "no session")
        engine.tick()
        assert await service_alerts(engine, "broker_session_lost") == [("major", "open", 1)]
        clock.advance(3600)
        engine.tick()  # nothing clears it
        engine.raise_service_event("broker_session_lost", "major", "no session again")
        engine.tick()
        assert await service_alerts(engine, "broker_session_lost") == [("major", "open", 2)]
        (alert,) = await engine.query(AlertQuery(rule="broker_session_lost"))
        await engine.resolve(alert.id, by="li-wei")
        engine.tick()  # resolved by hand: not raised again by itself
        assert await service_alerts(engine, "broker_session_lost") == [("major", "resolved", 2)]
        engine.raise_service_event("broker_session_lost", "major", "lost once more")
        engine.tick()
        assert sorted(await service_alerts(engine, "broker_session_lost")) == [
            ("major", "open", 1),
            ("major", "resolved", 2),
        ]
