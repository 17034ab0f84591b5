"""Work orders in-process: a real AlertEngine and WorkOrders on a real SQLite file, a fake
clock, devices fed like the pipeline feeds them, overdue notices to a real local HTTP
receiver. The state machine, the door and the resolve hooks, due times, overdue notices
(once, then per repeat), a restart, and the repair statistics from known timestamps."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from api.settings import ServeSettings
from devices.contract import decode
from ingest.alerts.config import AlertsConfig, WorkOrderOptions
from ingest.alerts.engine import AlertEngine
from ingest.alerts.model import Alert, AlertNotFound, rfc3339
from ingest.alerts.order_model import OrderConflict, OrderInvalid, OrderNotFound
from ingest.alerts.order_store import WorkOrderStore
from ingest.alerts.orders import WorkOrders
from ingest.alerts.repair import repair_times
from ingest.alerts.store import AlertStore, Ops
from ingest.twins import Outcome
from tests.alerts.helpers import Clock, Device, active, config, eventually, running
from tests.alerts.receiver import Receiver, receiver

CABINET, OTHER = "WGS-C01", "WGS-C02"  # the same station
ELSEWHERE = "GHY-C01"  # another station
HOUR_MS = 3_600_000


@asynccontextmanager
async def orders_on(
    engine: AlertEngine, data_dir: Path, options: WorkOrderOptions | None = None
) -> AsyncIterator[WorkOrders]:
    store = WorkOrderStore.in_dir(data_dir)
    try:
        async with WorkOrders(engine, store, options or WorkOrderOptions(check_s=3600)) as orders:
            yield orders
    finally:
        store.close()


def faulted(engine: AlertEngine, clock: Clock, code: str, device_id: str = CABINET) -> Alert:
    dev = Device(engine, clock, device_id)
    dev.birth()
    dev.cabinet(faults=[code])
    (alert,) = active(engine, device_id=device_id, code=code)
    return alert


class Fed(Device):
    """A device whose messages reach the work orders too, as the pipeline's observers."""

    def __init__(self, engine: AlertEngine, clock: Clock, device_id: str, orders: WorkOrders):
        super().__init__(engine, clock, device_id)
        self.orders = orders
        self.seq = 10  # the same boot, after what `faulted` sent

    def _send(self, channel: str, body: dict[str, Any], *, retained: bool = False) -> None:
        payload = {"v": 1, "boot": self.boot, "seq": self.seq, "ts": self.clock(), **body}
        self.seq += 1
        msg = decode(channel, json.dumps(payload).encode())  # type: ignore[arg-type]
        twin = self.engine.twins[self.id]
        assert twin.apply(msg, self.clock()) is Outcome.APPLIED
        for observer in (self.engine.observe, self.orders.observe):  # the pipeline's order
            observer(twin.snapshot(), msg, self.clock())


def device(engine: AlertEngine, clock: Clock, device_id: str, orders: WorkOrders) -> Fed:
    return Fed(engine, clock, device_id, orders)


@pytest.mark.parametrize(
    ("code", "hours"), [("smoke", 1), ("battery_fault", 4), ("door_fault", 24), ("comm_error", 72)]
)
async def test_due_by_severity_and_one_order_per_alert(
    tmp_path: Path, code: str, hours: int
) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine, orders_on(engine, tmp_path) as orders:
        alert = faulted(engine, clock, code)
        clock.advance(5)
        order = await orders.create(alert.id, "li-wei", note="bring a spare lock")
        assert order.state == "open"
        assert order.assignee is None
        assert order.due_at_ms - order.created_at_ms == hours * HOUR_MS
        assert order.created_at_ms == clock()
        with pytest.raises(OrderConflict, match=f"already has work order {order.id}"):
            await orders.create(alert.id, "li-wei")
        with pytest.raises(AlertNotFound):
            await orders.create(alert.id + 1000, "li-wei")
        with pytest.raises(OrderInvalid):
            await orders.create(alert.id, "li-wei", due_at_ms=clock() - 1)


async def test_configured_due_and_given_due(tmp_path: Path) -> None:
    clock = Clock()
    options = WorkOrderOptions(check_s=3600, due_minor_s=600)
    async with running(tmp_path, clock) as engine, orders_on(engine, tmp_path, options) as orders:
        alert = faulted(engine, clock, "door_fault")
        other = faulted(engine, clock, "lock_failure", OTHER)
        order = await orders.create(alert.id, "li-wei", assignee="wang-fang")
        assert order.due_at_ms == clock() + 600_000
        assert (order.state, order.assignee, order.assigned_at_ms) == (
            "assigned",
            "wang-fang",
            clock(),
        )
        given = await orders.create(other.id, "li-wei", due_at_ms=clock() + 123_456)
        assert given.due_at_ms == clock() + 123_456


async def test_forbidden_moves_are_refused(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine, orders_on(engine, tmp_path) as orders:
        alert = faulted(engine, clock, "door_fault")
        order = await orders.create(alert.id, "li-wei")
        with pytest.raises(OrderConflict, match="open work order cannot be moved to closed"):
            await orders.move(order.id, "closed", "li-wei")
        with pytest.raises(OrderInvalid, match="assigned to whom"):
            await orders.move(order.id, "assigned", "li-wei")
        with pytest.raises(OrderConflict, match="is not resolved"):
            await orders.move(order.id, "fixed", "li-wei")
        assert order.state == "open"
        await orders.move(order.id, "assigned", "li-wei", assignee="wang-fang")
        await orders.move(order.id, "assigned", "li-wei", assignee="zhao-lei")  # handed on
        assert order.assignee == "zhao-lei"
        await orders.move(order.id, "on_site", "zhao-lei", note="at the cabinet")
        assert (order.state, order.on_site_how, order.on_site_at_ms) == (
            "on_site",
            "manual",
            clock(),
        )
        with pytest.raises(OrderConflict, match="on_site work order cannot be moved to assigned"):
            await orders.move(order.id, "assigned", "li-wei", assignee="wang-fang")
        with pytest.raises(OrderNotFound):
            await orders.move(order.id + 1, "on_site", "li-wei")
        log = await orders.history(order.id)
        assert [(r["actor"], r["what"], r["note"]) for r in log] == [
            ("li-wei", "created", None),
            ("li-wei", "assigned", None),
            ("li-wei", "assigned", None),
            ("zhao-lei", "on_site", "at the cabinet"),
        ]


async def test_door_opened_puts_on_site_and_healthy_device_fixes(tmp_path: Path) -> None:
    clock = Clock()
    async with (
        running(tmp_path, clock, config(verify_s=60)) as engine,
        orders_on(engine, tmp_path) as orders,
    ):
        alert = faulted(engine, clock, "door_fault")
        order = await orders.create(alert.id, "li-wei", assignee="wang-fang")
        clock.advance(10)
        device(engine, clock, OTHER, orders).event(
            "door_opened"
        )  # another cabinet's door: not ours
        assert order.state == "assigned"
        clock.advance(20)
        cabinet = device(engine, clock, CABINET, orders)
        cabinet.event("door_opened")
        assert (order.state, order.on_site_how, order.on_site_at_ms) == ("on_site", "door", clock())
        cabinet.cabinet(faults=[])  # healthy again: the alert verifies, then resolves
        clock.advance(61)
        engine.tick()
        assert alert.status == "resolved"
        assert (order.state, order.fixed_at_ms) == ("fixed", alert.resolved_at_ms)
        closed = await orders.move(order.id, "closed", "li-wei")
        assert (closed.state, closed.closed_by) == ("closed", "li-wei")
        assert order.id not in orders.current
        with pytest.raises(OrderConflict, match="closed work order cannot be moved"):
            await orders.move(order.id, "on_site", "li-wei")
        log = await orders.history(order.id)
        assert [(r["actor"], r["what"]) for r in log] == [
            ("li-wei", "created"),
            (CABINET, "on_site"),
            ("chargewatch", "fixed"),
            ("li-wei", "closed"),
        ]


async def test_a_station_order_is_on_site_by_any_door_of_that_station(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine, orders_on(engine, tmp_path) as orders:
        for device_id in (CABINET, ELSEWHERE):
            Device(engine, clock, device_id).birth()
        alert, _ = await engine.report("wanguo-south", None, None, "damage", "a bent door")
        order = await orders.create(alert.id, "li-wei")
        clock.advance(5)
        device(engine, clock, ELSEWHERE, orders).event("door_opened")  # another station
        assert order.state == "open"
        device(engine, clock, CABINET, orders).event("door_opened")
        assert (order.state, order.on_site_how) == ("on_site", "door")


async def test_resolved_by_hand_fixes_and_a_new_order_needs_an_open_alert(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine, orders_on(engine, tmp_path) as orders:
        alert = faulted(engine, clock, "door_fault")
        order = await orders.create(alert.id, "li-wei")
        await engine.resolve(alert.id, "zhao-lei")
        assert order.state == "fixed"
        await orders.move(order.id, "closed", "li-wei")
        with pytest.raises(OrderConflict, match="is resolved"):
            await orders.create(alert.id, "li-wei")


async def test_orders_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    async with running(tmp_path, clock) as engine:
        async with orders_on(engine, tmp_path) as orders:
            alert = faulted(engine, clock, "door_fault")
            order = await orders.create(alert.id, "li-wei", assignee="wang-fang")
            await orders.move(order.id, "on_site", "wang-fang")
        async with orders_on(engine, tmp_path) as again:
            back = await again.get(order.id)
            assert back is again.current[order.id]
            assert (back.state, back.assignee, back.due_at_ms) == (
                "on_site",
                "wang-fang",
                order.due_at_ms,
            )
            with pytest.raises(OrderConflict):
                await again.create(alert.id, "li-wei")


async def test_overdue_is_notified_once_then_per_repeat(tmp_path: Path) -> None:
    clock = Clock()
    options = WorkOrderOptions(check_s=3600, due_critical_s=60, repeat_s=600, notices_max=2)
    with receiver() as hook:
        async with (
            running(tmp_path, clock) as engine,
            orders_on(engine, tmp_path, options) as orders,
        ):
            await engine.notifier.add(hook.url)  # the default events: escalations included
            alert = faulted(engine, clock, "smoke")
            await eventually(lambda: _saw(hook, ["opened"]))
            order = await orders.create(alert.id, "li-wei", assignee="wang-fang")
            clock.advance(59)
            assert await orders.check_overdue() == 0
            clock.advance(1)
            assert await orders.check_overdue() == 1
            assert await orders.check_overdue() == 0  # once
            clock.advance(599)
            assert await orders.check_overdue() == 0
            clock.advance(1)
            assert await orders.check_overdue() == 1  # again after repeat_s
            clock.advance(3600)
            assert await orders.check_overdue() == 0  # at most notices_max
            await eventually(lambda: _saw(hook, ["opened", "overdue", "overdue"]))
            body = hook.delivered()[1].json
            assert body["alert"]["id"] == alert.id
            assert body["work_order"]["id"] == order.id
            assert body["work_order"]["assignee"] == "wang-fang"
            assert body["work_order"]["overdue"] is True
            assert body["title"].startswith("【紧急】工单超时：烟雾")
            assert "处理人 wang-fang" in body["summary"]
            log = await orders.history(order.id)
            assert [r["note"] for r in log if r["what"] == "overdue"] == ["notice 1", "notice 2"]
            assert order.overdue_notices == 2


def _saw(hook: Receiver, events: list[str]) -> None:
    assert [r.json["event"] for r in hook.delivered()] == events


def test_repair_times_per_station_and_code_from_stored_timestamps(tmp_path: Path) -> None:
    """Alerts with known timestamps in the real store: exact means and medians."""
    t0 = 1_796_284_800_000
    rows = [  # id, station, code, opened +s, acknowledged +s, resolved +s
        (1, "WGS", "door_fault", 0, 60, 600),
        (2, "WGS", "door_fault", 100, 220, 1000),
        (3, "WGS", "smoke", 200, None, 500),
        (4, "HFB", "door_fault", 300, 330, None),
        (5, "HFB", "smoke", 400, 700, 2200),
        (6, "service", "task_failed", 0, 10, 20),  # the service itself: no repair
        (7, "WGS", "door_fault", 10_000_000, 10_000_010, 10_000_020),  # after `to`
    ]
    store = AlertStore.in_dir(tmp_path)
    try:
        ops = Ops()
        for id_, station, code, opened, acked, resolved in rows:
            alert = Alert(
                id=id_,
                rule="fault",
                code=code,
                severity="minor",
                status="resolved" if resolved is not None else "acknowledged",
                station_id=station,
                device_id=None,
                unit=None,
                unit_kind=None,
                opened_at_ms=t0 + opened * 1000,
                last_seen_at_ms=t0 + opened * 1000,
                acknowledged_at_ms=None if acked is None else t0 + acked * 1000,
                resolved_at_ms=None if resolved is None else t0 + resolved * 1000,
            )
            ops.alerts[id_] = alert.record()
        store.apply(ops, 1000)
        timings = store.timings(t0, t0 + 1_000_000)
    finally:
        store.close()
    by_station = {g.key: g.view() for g in repair_times(timings, "station")}
    assert list(by_station) == ["HFB", "WGS"]
    assert by_station["WGS"] == {
        "key": "WGS",
        "alerts": 3,
        "acknowledged": 2,
        "resolved": 3,
        "mtta_s": 90.0,  # (60 + 120) / 2
        "mtta_median_s": 90.0,
        "mttr_s": 600.0,  # (600 + 900 + 300) / 3
        "mttr_median_s": 600.0,
    }
    assert by_station["HFB"] == {
        "key": "HFB",
        "alerts": 2,
        "acknowledged": 2,
        "resolved": 1,
        "mtta_s": 165.0,  # (30 + 300) / 2
        "mtta_median_s": 165.0,
        "mttr_s": 1800.0,
        "mttr_median_s": 1800.0,
    }
    by_code = {g.key: g.view() for g in repair_times(timings, "code")}
    assert list(by_code) == ["door_fault", "smoke"]
    assert by_code["door_fault"]["mtta_s"] == 70.0  # (60 + 120 + 30) / 3
    assert by_code["door_fault"]["mtta_median_s"] == 60.0
    assert by_code["door_fault"]["mttr_s"] == 750.0  # (600 + 900) / 2
    assert by_code["smoke"]["mtta_s"] == 300.0
    assert by_code["smoke"]["mttr_s"] == 1050.0  # (300 + 1800) / 2
    assert by_code["smoke"]["mttr_median_s"] == 1050.0


def test_work_order_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WORK_ORDERS__DUE_CRITICAL_S", "900")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WORK_ORDERS__REPEAT_S", "0")
    cfg: AlertsConfig = ServeSettings().ingest.alerts
    assert cfg.work_orders.due_after_s("critical") == 900
    assert cfg.work_orders.due_after_s("major") == 4 * 3600
    assert cfg.work_orders.repeat_s == 0


@pytest.mark.parametrize("fmt", ["json", "wecom", "dingtalk", "feishu"])
@pytest.mark.parametrize("lang", ["zh", "en"])
def test_an_overdue_notice_reads_in_both_languages_in_every_format(fmt: str, lang: str) -> None:
    """The words of an overdue notice: the event, the order, its assignee, its due time in
    the district's clock and how late it is, in each robot's format."""
    from ingest.alerts.notify import render
    from ingest.alerts.order_model import WorkOrder, order_view
    from tests.alerts.test_formats import OPENED_MS, payload, unmarkdown

    order = WorkOrder(
        id=12, alert_id=4711, station_id="wanguo-south", device_id="WGS-C07", rule="fault",
        code="thermal_runaway", severity="critical", state="assigned", assignee="王芳",
        created_by="li-wei", created_at_ms=OPENED_MS, due_at_ms=OPENED_MS + HOUR_MS,
        overdue_notices=1, overdue_at_ms=OPENED_MS + HOUR_MS + 90 * 60_000,
    )  # fmt: skip
    now = OPENED_MS + HOUR_MS + 90 * 60_000  # 1 h 30 min late
    body = {
        **payload("overdue"),
        "work_order": order_view(order, now),
        "created_at": rfc3339(now),
    }
    _, raw = render(fmt, "", "overdue", body, lang)
    sent = json.loads(raw)
    text = {
        "json": lambda: sent["summary"],
        "wecom": lambda: unmarkdown(sent["markdown"]["content"]),
        "dingtalk": lambda: unmarkdown(sent["markdown"]["text"]),
        "feishu": lambda: sent["content"]["text"],
    }[fmt]()
    expected = {
        "zh": ["【紧急】工单超时：热失控", "工单：#12，已派单，处理人 王芳", "期限：", "已超过期限 90 分钟，第 1 次提醒"],
        "en": ["[CRITICAL] Work order overdue: Thermal runaway", "work order: #12, assigned, assigned to 王芳", "due: ", "90 min past due; notice 1"],
    }[lang]  # fmt: skip
    for words in expected:
        assert words in text, (fmt, lang, words, text)


def test_timings_name_the_alerts_device(tmp_path: Path) -> None:
    """Per-device reports need the device of each alert (None: the station's own)."""
    t0 = 1_796_284_800_000
    store = AlertStore.in_dir(tmp_path)
    try:
        ops = Ops()
        for id_, device in ((1, "WGS-C01"), (2, None)):
            ops.alerts[id_] = Alert(
                id=id_, rule="fault", code="door_fault", severity="minor", status="acknowledged",
                station_id="WGS", device_id=device, unit=None, unit_kind=None,
                opened_at_ms=t0 + id_, last_seen_at_ms=t0 + id_, acknowledged_at_ms=t0 + 60_000,
            ).record()  # fmt: skip
        store.apply(ops, 1000)
        timings = store.timings(t0, t0 + 1_000_000)
    finally:
        store.close()
    assert [(t.station_id, t.device_id, t.opened_ms, t.acked_ms) for t in timings] == [
        ("WGS", "WGS-C01", t0 + 1, t0 + 60_000),
        ("WGS", None, t0 + 2, t0 + 60_000),
    ]
