"""The alert lifecycle in-process: real SQLite store, real HTTP receiver, fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from devices.contract import Message
from ingest.alerts import engine as engine_module
from ingest.alerts.model import AlertQuery
from ingest.pipeline import Twins
from ingest.twins import Twin
from tests.alerts.helpers import CATALOG, Clock, Device, active, config, eventually, running
from tests.alerts.receiver import receiver

PILE, PILE2, PILE3, CABINET = "WGS-P01", "WGS-P02", "WGS-P03", "WGS-C01"


async def test_one_alert_per_condition_auto_resolve_and_reopen(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        pile = Device(engine, clock, PILE)
        pile.birth()
        pile.pile()
        assert engine.by_id == {}
        pile.event("fault_raised", code="over_current", port=3, value=17.5)
        pile.pile({3: "over_current"})
        pile.pile({3: "over_current"})  # heartbeats repeat the snapshot: not a new alert
        [alert] = active(engine)
        assert (alert.rule, alert.code, alert.severity) == ("fault", "over_current", "major")
        assert (alert.device_id, alert.unit, alert.unit_kind) == (PILE, 3, "port")
        assert alert.station_id == "wanguo-south"
        assert alert.count == 1
        assert alert.last_value == 17.5

        pile.pile()  # cleared: the verification window starts
        assert alert.clearing_since_ms == clock()
        clock.advance(30)
        engine.tick()
        assert alert.status == "open"
        pile.pile({3: "over_current"})  # back within the window: the same alert, reopened
        assert active(engine) == [alert]
        assert alert.count == 2
        assert alert.clearing_since_ms is None

        pile.pile()
        clock.advance(59)
        engine.tick()
        assert alert.status == "open"
        clock.advance(1)
        engine.tick()
        assert alert.status == "resolved"
        assert (alert.resolved_how, alert.resolved_by) == ("auto", "chargewatch")
        assert engine.by_id == {}

        pile.pile({3: "over_current"})  # after the window: a new alert
        [again] = active(engine)
        assert again.id == alert.id + 1
        stored = await engine.query(AlertQuery(device=PILE))
        assert [(a.id, a.status) for a in stored] == [(again.id, "open"), (alert.id, "resolved")]


async def test_offline_device_suppresses_its_port_alerts(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        pile = Device(engine, clock, PILE)
        pile.birth()
        pile.pile()
        pile.death()
        [offline] = active(engine)
        assert (offline.rule, offline.severity, offline.unit) == ("offline", "major", None)
        assert offline.info == "Will received"
        # the broker's retained copy of a snapshot proves no live connection: the device
        # stays offline, and offline is the root cause (a live message would disprove the
        # Will: tests/ingest/test_twins.py)
        pile.pile({2: "relay_stuck"}, retained=True)
        engine.tick()
        assert active(engine) == [offline]

        pile.birth()  # back: the offline alert starts clearing, the port alert opens
        assert offline.clearing_since_ms == clock()
        [port] = active(engine, rule="fault")
        assert (port.code, port.unit) == ("relay_stuck", 2)


async def test_offline_by_silence_on_the_timer(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        pile = Device(engine, clock, PILE)
        pile.birth(heartbeat_s=2)
        pile.pile()
        clock.advance(6)
        engine.tick()
        assert active(engine) == []
        clock.advance(0.001)
        engine.tick()
        [offline] = active(engine)
        assert offline.info == "no message for 3 heartbeats"
        engine.tick()
        assert len(active(engine)) == 1


async def test_station_incident_groups_offline_devices(tmp_path: Path) -> None:
    clock = Clock()
    with receiver() as hook:
        async with running(tmp_path, clock) as engine:
            await engine.notifier.add(hook.url, secret="station-secret")
            piles = [Device(engine, clock, d) for d in (PILE, PILE2, PILE3, "WGS-P04")]
            for p in piles:
                p.birth()
                p.pile()
            for p in piles[:3]:
                p.death()
            assert len(active(engine, rule="offline")) == 3
            engine.tick()  # offline alerts are held one tick; the station rule sees 3 of 4
            [incident] = active(engine, rule="station_offline")
            assert incident.station_id == "wanguo-south"
            assert incident.device_id is None
            assert incident.info == "3 of 4 devices offline"
            children = active(engine, rule="offline")
            assert {c.parent_id for c in children} == {incident.id}
            assert all(c.suppressed for c in children)
            await engine.notifier.idle()
            assert hook.events() == [("opened", incident.id)]


async def test_webhook_once_per_transition_signed_and_retried(tmp_path: Path) -> None:
    clock = Clock()
    with receiver() as hook:
        async with running(tmp_path, clock, config(escalate_critical_s=10)) as engine:
            sub = await engine.notifier.add(hook.url, secret="s3cret-for-tests")
            cabinet = Device(engine, clock, CABINET)
            cabinet.birth()
            cabinet.cabinet()
            hook.fail_next = 2  # the first two attempts get HTTP 500
            cabinet.event("fault_raised", code="smoke")
            cabinet.cabinet(smoke=True)
            [alert] = active(engine)
            assert (alert.code, alert.severity) == ("smoke", "critical")

            def opened() -> None:
                assert hook.events() == [("opened", alert.id)]

            await eventually(opened)
            assert [r.status for r in hook.requests] == [500, 500, 200]
            assert all(r.signature_ok("s3cret-for-tests") for r in hook.requests)
            assert not hook.requests[0].signature_ok("another-secret")
            assert len({r.headers["x-chargewatch-delivery"] for r in hook.requests}) == 1

            clock.advance(9)
            engine.tick()
            clock.advance(1)
            engine.tick()  # 10 s unacknowledged: escalated
            engine.tick()
            assert alert.escalation_level == 1
            await eventually(
                lambda: _assert_equal(
                    hook.events(), [("opened", alert.id), ("escalated", alert.id)]
                )
            )
            await engine.acknowledge(alert.id, "wang")
            clock.advance(60)
            engine.tick()  # acknowledged: no further escalation
            assert alert.escalation_level == 1
            await engine.resolve(alert.id, "wang", "detector cleaned")
            await eventually(lambda: _assert_equal(len(hook.events()), 3))
            await engine.notifier.idle()
            assert hook.events()[-1] == ("resolved", alert.id)
            body = hook.delivered()[-1].json
            assert body["alert"]["resolved_how"] == "manual"
            assert body["alert"]["resolved_by"] == "wang"
            log = engine.store.deliveries(alert.id)
            assert [(d["event"], d["status"], d["attempts"]) for d in log] == [
                ("opened", "delivered", 3),
                ("escalated", "delivered", 1),
                ("resolved", "delivered", 1),
            ]
            assert sub.failing is False
            notes = await engine.notes(alert.id)
            assert [n["text"] for n in notes] == ["detector cleaned"]


def _assert_equal(a: object, b: object) -> None:
    assert a == b


async def test_failing_subscription_is_marked_and_ingest_goes_on(tmp_path: Path) -> None:
    clock = Clock()
    with receiver() as hook:
        async with running(tmp_path, clock, config(webhooks={"attempts": 2, "backoff_s": 0.01, "failing_after": 3})) as engine:  # fmt: skip
            hook.fail_next = 1000
            sub = await engine.notifier.add(hook.url, secret="failing-secret")
            pile = Device(engine, clock, PILE)
            pile.birth()
            pile.pile({1: "ground_fault", 2: "ground_fault"})  # two alerts, both undeliverable
            assert len(active(engine)) == 2  # opened at once, whatever the receiver does
            await engine.notifier.idle()
            assert sub.failing is True
            assert sub.consecutive_failures == 4  # failed attempts in a row
            assert (sub.failed, sub.expired) == (2, 2)  # the attempts limit was reached
            assert sub.last_error == "HTTP 500"
            assert len(hook.requests) == 4  # 2 deliveries x 2 attempts
            statuses = [d["status"] for d in engine.store.deliveries()]
            assert statuses == ["expired", "expired"]


async def test_open_alerts_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    twins = Twins(CATALOG)  # the service restores them from its store
    async with running(tmp_path, clock, twins=twins) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth()
        cabinet.cabinet({4: {"state": "faulted", "fault": "lock_failure"}})
        [before] = active(engine)
    async with running(tmp_path, clock, twins=twins) as engine:
        [after] = active(engine)
        assert (after.id, after.code, after.unit, after.count) == (before.id, "lock_failure", 4, 1)
        cabinet = Device(engine, clock, CABINET, boot="b00t2")
        cabinet.birth()
        cabinet.cabinet({4: {"state": "faulted", "fault": "lock_failure"}})
        assert active(engine) == [after]  # the same condition: no second alert
        assert after.count == 1


async def test_timer_judges_devices_by_observed_messages_only(tmp_path: Path) -> None:
    """The pipeline applies a batch to the twins, writes it, and only then lets the engine
    observe it. A tick in between must not judge a device by messages the rules have not
    seen: it would open the alert on the batch's last status, the first status would clear
    it and the second reopen it (count 2, as a simulator with messages in flight showed)."""
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth()
        cabinet.cabinet()
        batch: list[tuple[Twin, Message, int]] = []
        engine.observe = lambda twin, msg, ms: batch.append((twin.snapshot(), msg, ms))  # type: ignore[method-assign]
        cabinet.cabinet()  # every slot ready at 95 %
        cabinet.cabinet({1: {"soc": 60}})  # slot 1 ready below the release level
        clock.advance(1)
        engine.tick()  # the batch is being written
        assert active(engine) == []
        del engine.observe  # the write is done: the batch is observed, in order
        for twin, msg, received_ms in batch:
            engine.observe(twin, msg, received_ms)
        [alert] = active(engine)
        assert (alert.rule, alert.unit, alert.count) == ("ready_low_soc", 1, 1)
        engine.tick()
        assert (active(engine), alert.count) == ([alert], 1)


async def test_the_timer_pass_lets_the_loop_run_and_reads_each_device_in_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer evaluates devices in slices, letting the event loop run between them (one
    pass over 50,000 devices held it ~400 ms). A message that arrives meanwhile is judged by
    ``observe``, and the pass then evaluates that device as the message left it, not as it
    was when the pass began."""
    monkeypatch.setattr(engine_module, "TICK_SLICE", 2)
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        piles = [d.id for d in CATALOG.devices.values() if d.kind == "pile"][-5:]
        devices = [Device(engine, clock, i) for i in piles]
        for d in devices:
            d.birth(heartbeat_s=2)
            d.pile()
        clock.advance(7)  # more than three heartbeats of silence: offline by the timer
        ran_between: list[int] = []

        async def meanwhile() -> None:
            while True:
                ran_between.append(len(active(engine)))
                await asyncio.sleep(0)

        other = asyncio.create_task(meanwhile())
        timer = asyncio.create_task(engine._tick_in_slices())
        await asyncio.sleep(0)  # the pass has begun with the catalog's first devices
        devices[-1].pile()  # the last pile speaks before the pass reaches it
        await timer
        other.cancel()
        assert len(ran_between) > len(CATALOG.devices) // 2 // 2, "the pass did not yield"
        offline = {a.device_id for a in active(engine, rule="offline")}
        assert offline == set(piles[:-1])


async def test_the_timer_skips_devices_until_the_clock_can_change_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device with nothing active is evaluated by the timer only once its silence, an
    open door or a port at ~0 W can have run out (rules.next_change_ms): to the ms."""
    calls: list[str] = []
    real = engine_module.device_conditions

    def counting(twin: Twin, *args: Any) -> Any:
        calls.append(twin.device_id)
        return real(twin, *args)

    monkeypatch.setattr(engine_module, "device_conditions", counting)
    clock = Clock()
    async with running(tmp_path, clock, config(cabinet={"door_open_s": 300})) as engine:
        cabinet = Device(engine, clock, CABINET)
        cabinet.birth(heartbeat_s=600)  # stays online through the wait
        cabinet.cabinet()
        cabinet.event("door_opened")
        cabinet.cabinet(door_open=True)
        calls.clear()
        clock.advance(299.999)
        engine.tick()
        assert calls == []  # neither silent nor open long enough yet: not evaluated
        assert active(engine) == []
        clock.advance(0.001)
        engine.tick()
        assert calls == [CABINET]
        [door] = active(engine)
        assert (door.rule, door.last_value) == ("door_open_long", 300)
        clock.advance(5)
        engine.tick()  # something active: evaluated on every tick, its duration counts up
        assert calls == [CABINET, CABINET]
        assert door.last_value == 305
