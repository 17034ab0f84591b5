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
    async with sup:
        sup.start("alerts:writer", crashy)
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
    assert sup.task("alerts:writer") is None


async def test_a_recent_death_stops_being_a_problem_once_the_task_ran_long_enough() -> None:
    sup = Supervisor(restart_min_s=0.01, healthy_after_s=0.2)
    async with sup:
        sup.start("alerts:timer", Crashy(crashes=1))
        await eventually(
            lambda: _assert(
                sup.deaths.get("alerts:timer") is not None and sup.deaths["alerts:timer"].running
            )
        )
        assert sup.problems()
        await eventually(lambda: _assert(sup.problems() == []))


async def test_a_task_cancelled_by_someone_else_has_died() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a), restart_min_s=0.01)
    async with sup:
        sup.start("alerts:timer", Crashy(crashes=0))
        await eventually(lambda: _assert(sup.task("alerts:timer") is not None))
        first = sup.task("alerts:timer")
        assert first is not None
        first.cancel()
        await eventually(lambda: _assert(failures == [("alerts:timer", "cancelled")]))
        await eventually(lambda: _assert(sup.task("alerts:timer") not in (None, first)))


async def test_a_task_that_returns_has_died() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a), restart_min_s=10)

    async def quits() -> None:
        return None

    async with sup:
        sup.start("ingest:mqtt", quits)
        await eventually(lambda: _assert(len(failures) == 1))
        assert "returned" in failures[0][1]
        (problem,) = sup.problems()  # waiting to restart: down, and said so
        assert "died" in problem
        assert "restarted" not in problem


async def test_a_fatal_task_asks_the_service_to_stop_and_is_not_restarted() -> None:
    fatal: list[tuple[str, str]] = []
    failures: list[tuple[str, str]] = []
    sup = Supervisor(
        on_failure=lambda *a: failures.append(a),
        on_fatal=lambda *a: fatal.append(a),
        restart_min_s=0.01,
    )
    crashy = Crashy(crashes=5)
    async with sup:
        sup.start("ingest:pipeline", crashy, policy="fatal")
        await eventually(lambda: _assert(len(fatal) == 1))
        await asyncio.sleep(0.1)
        assert crashy.runs == 1
        assert failures == fatal
        assert sup.problems() == [
            "task ingest:pipeline died: OverflowError: Python int too large to convert to"
            " SQLite INTEGER; the service is stopping"
        ]


async def test_stopping_a_task_on_purpose_is_no_death() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a))
    async with sup:
        sup.start("alerts:timer", Crashy(crashes=0))
        await eventually(lambda: _assert(sup.task("alerts:timer") is not None))
        await sup.stop("alerts:timer")
    assert failures == []
    assert sup.problems() == []


async def test_a_failing_report_does_not_kill_the_supervisor() -> None:
    def broken(name: str, reason: str) -> None:
        raise RuntimeError("alerting is down too")

    sup = Supervisor(on_failure=broken, restart_min_s=0.01)
    crashy = Crashy(crashes=1)
    async with sup:
        sup.start("alerts:writer", crashy)
        await eventually(lambda: _assert(crashy.runs == 2))


async def test_a_crash_never_cancels_the_other_tasks_of_the_group() -> None:
    failures: list[tuple[str, str]] = []
    sup = Supervisor(on_failure=lambda *a: failures.append(a), restart_min_s=0.01)
    async with sup:
        sup.start("alerts:timer", Crashy(crashes=0))
        await eventually(lambda: _assert(sup.task("alerts:timer") is not None))
        steady = sup.task("alerts:timer")
        crashy = Crashy(crashes=3)
        sup.start("alerts:writer", crashy)
        await eventually(lambda: _assert(crashy.runs == 4))
        assert len(failures) == 3
        assert sup.task("alerts:timer") is steady  # the same task, never cancelled
        assert steady is not None
        assert not steady.done()
    assert steady.cancelled()  # stopped with the supervisor, and only then


async def test_every_task_is_named_and_none_is_left_after_the_supervisor() -> None:
    before = asyncio.all_tasks()
    sup = Supervisor()
    async with sup:
        sup.start("alerts:timer", Crashy(crashes=0))
        sup.start("alerts:writer", Crashy(crashes=0))
        await eventually(lambda: _assert(sup.task("alerts:writer") is not None))
        names = {t.get_name() for t in asyncio.all_tasks() - before}
        assert names == {
            "alerts:timer", "supervise:alerts:timer", "alerts:writer", "supervise:alerts:writer",
        }  # fmt: skip
    assert asyncio.all_tasks() == before


async def test_a_one_shot_job_is_waited_for_and_its_failure_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []

    async def remember() -> None:
        await asyncio.sleep(0.05)
        done.append("remembered")

    async def fails() -> None:
        raise OSError("disk full")

    before = asyncio.all_tasks()
    sup = Supervisor()
    async with sup:
        sup.start("alerts:timer", Crashy(crashes=0))
        job = sup.spawn("ingest:remember-session", remember())
        assert job.get_name() == "ingest:remember-session"
        sup.spawn("lock-battery:C-01", fails())
    assert done == ["remembered"]  # leaving waited for it
    assert asyncio.all_tasks() == before
    (failed,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failed.getMessage() == "task lock-battery:C-01 failed"
    assert failed.exc_info is not None


async def test_a_task_is_started_only_inside_the_supervisor() -> None:
    sup = Supervisor()
    with pytest.raises(RuntimeError, match="not entered: start task 'alerts:timer' inside"):
        sup.start("alerts:timer", Crashy(crashes=0))
    async with sup:
        pass
    with pytest.raises(RuntimeError, match="closing: start task 'alerts:timer' inside"):
        sup.start("alerts:timer", Crashy(crashes=0))
    assert sup.names == []


async def test_leaving_with_an_error_stops_the_tasks_and_raises_that_error() -> None:
    sup = Supervisor()

    async def fails_inside() -> None:
        async with sup:
            sup.start("alerts:timer", Crashy(crashes=0))
            await eventually(lambda: _assert(sup.task("alerts:timer") is not None))
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):  # not wrapped in an ExceptionGroup
        await fails_inside()
    assert sup.task("alerts:timer") is None


def _assert(condition: bool) -> None:
    assert condition
