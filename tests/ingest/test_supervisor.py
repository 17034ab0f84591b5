"""The supervisor: a long-lived task that dies is logged, reported, shown, and restarted
(or, for a task a restart in place cannot rebuild, the service is told to stop)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ingest.supervisor import Supervisor
from tests.alerts.helpers import eventually


class Crashy:
    """A task that raises on its first ``crashes`` runs, then runs until cancelled."""

    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        await asyncio.Event().wait()


async def test_a_task_that_raises_is_reported_shown_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a), restart_min_s=0.01)
    crashy = Crashy(crashes=2)
    sup.start("alerts:writer", crashy)
    try:
        await eventually(lambda: _assert(crashy.runs == 3))
        assert failures == [("alerts:writer", "OverflowError: Python int too large to convert to SQLite INTEGER")] * 2  # fmt: skip
        assert sup.task("alerts:writer") is not None
        (problem,) = sup.problems()  # restarted, but it died recently: still said
        assert problem.startswith("task alerts:writer died")
        assert "(2 times)" in problem
        assert problem.endswith("restarted")
        critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
        assert len(critical) == 2
        assert critical[0].exc_info is not None  # the traceback, at once
    finally:
        await sup.close()
    assert sup.task("alerts:writer") is None


async def test_a_recent_death_stops_being_a_problem_once_the_task_ran_long_enough() -> None:
    sup = Supervisor(restart_min_s=0.01, healthy_after_s=0.2)
    sup.start("alerts:timer", Crashy(crashes=1))
    try:
        await eventually(
            lambda: _assert(
                sup.deaths.get("alerts:timer") is not None and sup.deaths["alerts:timer"].running
            )
        )
        assert sup.problems()
        await eventually(lambda: _assert(sup.problems() == []))
    finally:
        await sup.close()


async def test_a_task_cancelled_by_someone_else_has_died() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a), restart_min_s=0.01)
    sup.start("alerts:timer", Crashy(crashes=0))
    try:
        await eventually(lambda: _assert(sup.task("alerts:timer") is not None))
        first = sup.task("alerts:timer")
        assert first is not None
        first.cancel()
        await eventually(lambda: _assert(failures == [("alerts:timer", "cancelled")]))
        await eventually(lambda: _assert(sup.task("alerts:timer") not in (None, first)))
    finally:
        await sup.close()


async def test_a_task_that_returns_has_died() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a), restart_min_s=10)

    async def quits() -> None:
        return None

    sup.start("ingest:mqtt", quits)
    try:
        await eventually(lambda: _assert(len(failures) == 1))
        assert "returned" in failures[0][1]
        (problem,) = sup.problems()  # waiting to restart: down, and said so
        assert "died" in problem
        assert "restarted" not in problem
    finally:
        await sup.close()


async def test_a_fatal_task_asks_the_service_to_stop_and_is_not_restarted() -> None:
    fatal: list[tuple[str, str]] = []
    failures: list[tuple[str, str]] = []
    sup = Supervisor(
        on_failure=lambda *a: failures.append(a),
        on_fatal=lambda *a: fatal.append(a),
        restart_min_s=0.01,
    )
    crashy = Crashy(crashes=5)
    sup.start("ingest:pipeline", crashy, policy="fatal")
    try:
        await eventually(lambda: _assert(len(fatal) == 1))
        await asyncio.sleep(0.1)
        assert crashy.runs == 1
        assert failures == fatal
        assert sup.problems() == [
            "task ingest:pipeline died: OverflowError: Python int too large to convert to"
            " SQLite INTEGER; the service is stopping"
        ]
    finally:
        await sup.close()


async def test_stopping_a_task_on_purpose_is_no_death() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a))
    sup.start("alerts:timer", Crashy(crashes=0))
    await eventually(lambda: _assert(sup.task("alerts:timer") is not None))
    await sup.stop("alerts:timer")
    await sup.close()
    assert failures == []
    assert sup.problems() == []


async def test_a_failing_report_does_not_kill_the_supervisor() -> None:
    def broken(name: str, reason: str) -> None:
        raise RuntimeError("alerting is down too")

    sup = Supervisor(on_failure=broken, restart_min_s=0.01)
    crashy = Crashy(crashes=1)
    sup.start("alerts:writer", crashy)
    try:
        await eventually(lambda: _assert(crashy.runs == 2))
    finally:
        await sup.close()


def _assert(condition: bool) -> None:
    assert condition
