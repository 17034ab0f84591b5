"""Alerting survives what killed it before (issue 11 A, B): a change the alert store
refuses costs that change only, the writer and the timer are supervised, and events stored
but never observed are observed again at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devices.contract import Event
from ingest.alerts.engine import TIMER, WRITER, AlertStoreBusy
from ingest.alerts.model import AlertQuery
from ingest.alerts.store import AlertStore
from ingest.pipeline import Twins
from ingest.sqlite_store import SQLiteStore
from ingest.store import Unobserved
from ingest.twins import Outcome
from tests.alerts.helpers import CATALOG, Clock, Device, active, config, eventually, running

PILE, OTHER = "WGS-P01", "WGS-P02"


def _unchecked_event(clock: Clock, seq: int, port: int) -> Event:
    """An event as a device could have sent it before ports had an upper bound: built
    directly, the model skips its per-field constraints (what ``decode`` checks)."""
    return Event(
        v=1, ts=clock(), boot="b00t", seq=seq, type="fault_raised", code="relay_stuck", port=port
    )


async def test_a_change_the_store_refuses_costs_that_change_only(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        pile = Device(engine, clock, PILE)
        pile.birth()
        poison = _unchecked_event(clock, pile.seq, 2**63)  # SQLite: OverflowError
        twin = engine.twins[PILE]
        assert twin.apply(poison, clock()) is Outcome.APPLIED
        engine.observe(twin.snapshot(), poison, clock())
        other = Device(engine, clock, OTHER)
        other.birth()
        other.event("fault_raised", code="over_current", port=3)
        await engine.flush(timeout_s=10)  # hung forever when the writer died

        writer = engine.supervisor.task(WRITER)
        assert writer is not None
        assert not writer.done()
        assert engine.m_refused._value.get() == 1
        stored = await engine.query(AlertQuery(device=OTHER))
        assert [(a.code, a.unit) for a in stored] == [("over_current", 3)]
        # and alerting goes on: the next alert is saved too
        other.event("fault_raised", code="ground_fault", port=4)
        stored = await engine.query(AlertQuery(device=OTHER))
        assert {(a.code, a.unit) for a in stored} == {("over_current", 3), ("ground_fault", 4)}


async def test_a_dead_writer_makes_requests_fail_fast_and_says_so(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        await engine.supervisor.stop(WRITER)  # no writer at all: worse than any crash
        Device(engine, clock, PILE).birth()
        Device(engine, clock, OTHER).birth()
        other = Device(engine, clock, OTHER, boot="b00t2")
        other.event("fault_raised", code="over_current", port=3)
        with pytest.raises(AlertStoreBusy, match="not saved within 1s"):
            await engine.flush(timeout_s=1)
        engine.supervisor.start(WRITER, engine._writer)  # what the supervisor does
        await engine.flush(timeout_s=10)


async def test_killed_writer_and_timer_raise_a_task_alert_and_come_back(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(tick_s=0.05)
    async with running(tmp_path, clock, cfg) as engine:
        engine.supervisor.on_failure = engine.task_failed  # as the service wires it
        engine.supervisor.restart_min_s = 0.01
        for name in (WRITER, TIMER):
            task = engine.supervisor.task(name)
            assert task is not None
            task.cancel()
            await eventually(lambda n=name, t=task: _restarted(engine, n, t))
        alerts = {a.code: a for a in active(engine, rule="task_failed")}
        assert set(alerts) == {WRITER, TIMER}
        assert alerts[WRITER].severity == "critical"
        assert alerts[WRITER].station_id == "service"
        assert alerts[WRITER].info == f"task {WRITER} died: cancelled"
        assert not alerts[WRITER].auto_resolve  # a bug: a maintainer closes it
        problems = engine.supervisor.problems()
        assert len(problems) == 2
        assert all("restarted" in p for p in problems)
        stored = await engine.query(AlertQuery(rule="task_failed"))  # the new writer saved it
        assert len(stored) == 2


def _restarted(engine: object, name: str, old: object) -> None:
    new = engine.supervisor.task(name)  # type: ignore[attr-defined]
    assert new is not None
    assert new is not old


def _journal(data_dir: Path, *entries: Unobserved) -> None:
    store = SQLiteStore.in_dir(data_dir)
    try:
        store.save([], [], entries)
    finally:
        store.close()


def _event(seq: int, **fields: object) -> str:
    return json.dumps({"v": 1, "ts": Clock()(), "boot": "b00t", "seq": seq, **fields})


async def test_events_stored_but_never_observed_are_observed_at_start(tmp_path: Path) -> None:
    clock = Clock()
    twins = Twins(CATALOG)
    async with running(tmp_path, clock, twins=twins) as engine:
        Device(engine, clock, PILE).birth()  # online, as the restored twin would be
    raised = _event(1, type="fault_raised", code="relay_stuck", port=2)
    door = _event(1, type="door_opened")
    _journal(
        tmp_path,
        Unobserved(1, PILE, clock(), raised),
        Unobserved(2, "NOT-IN-CATALOG", clock(), door),
    )

    async with running(tmp_path, clock, twins=twins) as engine:
        (alert,) = active(engine, device_id=PILE)
        assert (alert.code, alert.unit, alert.count) == ("relay_stuck", 2, 1)
        await engine.flush(timeout_s=10)
    store = AlertStore.in_dir(tmp_path)
    try:
        assert store.unobserved() == []  # deleted with the alert that it made
    finally:
        store.close()

    async with running(tmp_path, clock, twins=twins) as engine:  # replayed once, not again
        (alert,) = active(engine, device_id=PILE)
        assert alert.count == 1
