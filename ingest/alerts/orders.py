"""Work orders: a maintainer hands an alert to a person, with a due time (docs/alerts.md,
"Work orders"; states in ``order_model``).

Runs on the ingest loop beside the alert engine. ``observe`` is a ``Pipeline.observers``
callback: the device's own ``door_opened`` during an order puts it ``on_site``.
``alert_resolved`` is an ``AlertEngine.on_resolved`` callback: the order is ``fixed``. A
timer (under the service's supervisor) publishes ``overdue`` through the alert notifier,
once per order and again every ``repeat_s`` up to ``notices_max``. Changes are made in
memory on the loop and persisted by a writer task; a request waits for its own (``flush``).

In an ingest worker (issue 13) each owned partition runs one over its ``AlertEngine``
(``ingest.partition_consumer``): the orders of the engine's ``stations`` only, new ids from
PostgreSQL's sequence (``ids``, an ``IdPool`` over the store's ``reserve_ids``: two workers
never number one alike), and writes fenced by the engine's ``fence`` (partition, epoch): once
the lease moved, the changes left are dropped with a warning, as the engine's are, and a
request waiting for them gets ``StoreError`` (it was not saved). ``serve`` numbers its
orders itself, after the highest stored.

Exceptions::

    WorkOrderError        (ValueError)
    ├── OrderNotFound     no work order with that id
    ├── OrderConflict     the order's or the alert's state does not allow it (409)
    └── OrderInvalid      a value that cannot be (a due time in the past; 422)

and from the store: ``AlertStoreBusy`` (not saved in time), ``StoreError`` (a worker's
partition moved: not saved at all; 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from types import TracebackType
from typing import Any, Self

from devices.contract import Event, Message
from ingest import StoreUnavailable
from ingest.alerts.config import WorkOrderOptions
from ingest.alerts.engine import REQUEST_FLUSH_S, AlertEngine, AlertStoreBusy
from ingest.alerts.ids import IdPool
from ingest.alerts.model import Alert
from ingest.alerts.order_model import (  # the errors are the model's, named here too
    MANUAL,
    UNFINISHED,
    OrderConflict,
    OrderInvalid,
    OrderNotFound,
    OrderQuery,
    WorkOrder,
    order_view,
)
from ingest.alerts.order_store import WorkOrderStore
from ingest.leases import StaleLease, not_saved
from ingest.twins import Twin

log = logging.getLogger(__name__)

WRITER = "orders:writer"
TIMER = "orders:timer"


LogRow = tuple[int, int, str, str, str | None]  # order_id, at_ms, actor, what, note


class WorkOrders:
    def __init__(
        self,
        engine: AlertEngine,
        store: WorkOrderStore,
        config: WorkOrderOptions,
        *,
        ids: IdPool | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.config = config
        self.ids = ids  # None: after the highest stored (one writer)
        self.clock = engine.clock
        self.supervisor = engine.supervisor
        self.current: dict[int, WorkOrder] = {}  # orders not closed, by id
        self.by_alert: dict[int, WorkOrder] = {}  # orders not closed, by alert id
        self._next_id = 1
        self._dirty: dict[int, WorkOrder] = {}
        self._log: list[LogRow] = []
        self._queued = 0
        self._written = 0
        self._wake = asyncio.Event()
        self._written_cond = asyncio.Condition()
        self.lost: StaleLease | None = None  # the partition moved: nothing is saved any more

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        for order in await asyncio.to_thread(self.store.load_unclosed, self.engine.stations):
            self.current[order.id] = order
            self.by_alert[order.alert_id] = order
        if self.ids is None:
            self._next_id = await asyncio.to_thread(self.store.next_id)
        self.engine.on_resolved.append(self.alert_resolved)
        self.supervisor.start(WRITER, self._writer)
        # an alert resolved while a change to its order was not yet written (a crash)
        for order in list(self.current.values()):
            if order.state in UNFINISHED and order.alert_id not in self.engine.by_id:
                alert = await asyncio.to_thread(self.engine.store.get, order.alert_id)
                if alert is not None and not alert.active:
                    self.alert_resolved(alert)
        self.supervisor.start(TIMER, self._ticker)
        log.info("work orders: %d not closed restored", len(self.current))
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.supervisor.stop(TIMER)
        with contextlib.suppress(ValueError):
            self.engine.on_resolved.remove(self.alert_resolved)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.flush()
        await self.supervisor.stop(WRITER)

    # -- automatic transitions ---------------------------------------------------------

    def observe(self, twin: Twin, msg: Message, received_ms: int) -> None:
        """Pipeline observer: the order's device opened its door during the order (a
        station-wide alert: any device of the station) -> ``on_site``."""
        if not isinstance(msg, Event) or msg.type != "door_opened" or not self.current:
            return
        for order in self.current.values():
            if order.state not in ("open", "assigned") or received_ms < order.created_at_ms:
                continue
            if order.device_id is None:
                spec = self.engine.catalog.devices.get(twin.device_id)
                if spec is None or spec.station_id != order.station_id:
                    continue
            elif order.device_id != twin.device_id:
                continue
            order.state, order.on_site_at_ms, order.on_site_how = "on_site", received_ms, "door"
            self._change(order, received_ms, twin.device_id, "on_site", "door_opened")

    def alert_resolved(self, alert: Alert) -> None:
        """AlertEngine.on_resolved: the alert resolved (the device reports healthy, or a
        maintainer resolved it) -> its order is ``fixed``."""
        order = self.by_alert.get(alert.id)
        if order is None or order.state not in UNFINISHED:
            return
        now = alert.resolved_at_ms or self.clock()
        order.state, order.fixed_at_ms = "fixed", now
        how = f"alert resolved ({alert.resolved_how or 'manual'})"
        self._change(order, now, alert.resolved_by or "chargewatch", "fixed", how)

    # -- maintainers' actions ----------------------------------------------------------

    async def create(
        self,
        alert_id: int,
        by: str,
        *,
        assignee: str | None = None,
        due_at_ms: int | None = None,
        note: str | None = None,
    ) -> WorkOrder:
        if due_at_ms is not None and due_at_ms <= self.clock():
            raise OrderInvalid("due_at is in the past")
        alert = await self.engine.get(alert_id)  # AlertNotFound
        if not alert.active:
            raise OrderConflict(f"alert {alert_id} is resolved: nothing left to repair")
        if self.ids is not None:  # the last await before the order is made
            await self.ids.top_up()
        taken = self.by_alert.get(alert_id)
        if taken is not None:
            raise OrderConflict(
                f"alert {alert_id} already has work order {taken.id} ({taken.state})"
            )
        now = self.clock()
        due = due_at_ms or now + int(self.config.due_after_s(alert.severity) * 1000)
        order = WorkOrder(
            id=self._new_id(),
            alert_id=alert.id,
            station_id=alert.station_id,
            device_id=alert.device_id,
            rule=alert.rule,
            code=alert.code,
            severity=alert.severity,
            state="assigned" if assignee else "open",
            assignee=assignee,
            created_by=by,
            created_at_ms=now,
            due_at_ms=due,
            assigned_at_ms=now if assignee else None,
        )
        self.current[order.id] = order
        self.by_alert[alert.id] = order
        self._change(order, now, by, "created", note)
        await self.flush(REQUEST_FLUSH_S)
        return order

    async def move(
        self,
        order_id: int,
        state: str,
        by: str,
        *,
        assignee: str | None = None,
        note: str | None = None,
    ) -> WorkOrder:
        order = await self.get(order_id)
        if state not in MANUAL.get(order.state, ()):
            raise OrderConflict(f"a {order.state} work order cannot be moved to {state}")
        now = self.clock()
        if state == "assigned":
            name = assignee or order.assignee
            if not name:
                raise OrderInvalid("assigned to whom? give an assignee")
            order.assignee, order.assigned_at_ms = name, now
        elif state == "on_site":
            order.on_site_at_ms, order.on_site_how = now, "manual"
        elif state == "fixed":
            alert = await self.engine.get(order.alert_id)
            if alert.active:
                raise OrderConflict(
                    f"alert {alert.id} is not resolved: an order is fixed when its device"
                    " reports healthy again (or a maintainer resolves the alert)"
                )
            order.fixed_at_ms = alert.resolved_at_ms or now
        elif state == "closed":
            order.closed_at_ms, order.closed_by = now, by
        order.state = state
        self._change(order, now, by, state, note)
        await self.flush(REQUEST_FLUSH_S)
        return order

    async def add_note(self, order_id: int, by: str, text: str) -> WorkOrder:
        order = await self.get(order_id)
        self._change(order, self.clock(), by, "note", text)
        await self.flush(REQUEST_FLUSH_S)
        return order

    async def get(self, order_id: int) -> WorkOrder:
        order = self.current.get(order_id)
        if order is not None:
            return order
        await self.flush(REQUEST_FLUSH_S)
        stored = await asyncio.to_thread(self.store.get, order_id)
        if stored is None:
            raise OrderNotFound(f"no work order with id {order_id}")
        return stored

    async def query(self, q: OrderQuery) -> list[WorkOrder]:
        await self.flush(REQUEST_FLUSH_S)
        found = await asyncio.to_thread(self.store.query, q)
        return [self.current.get(o.id, o) for o in found]

    async def history(self, order_id: int) -> list[dict[str, Any]]:
        await self.flush(REQUEST_FLUSH_S)
        return await asyncio.to_thread(self.store.log, order_id)

    # -- overdue -----------------------------------------------------------------------

    async def check_overdue(self) -> int:
        """Publish ``overdue`` for every order past its due time that has not had its
        notice yet (then again every ``repeat_s``, at most ``notices_max``). Returns how
        many were published."""
        now = self.clock()
        published = 0
        for order in list(self.current.values()):
            if not order.overdue(now) or order.overdue_notices >= self.config.notices_max:
                continue
            if order.overdue_notices and (
                self.config.repeat_s <= 0
                or order.overdue_at_ms is None
                or now - order.overdue_at_ms < self.config.repeat_s * 1000
            ):
                continue
            alert = self.engine.by_id.get(order.alert_id)
            if alert is None:
                alert = await self.engine.get(order.alert_id)
            order.overdue_notices += 1
            order.overdue_at_ms = now
            self._change(order, now, "chargewatch", "overdue", f"notice {order.overdue_notices}")
            self.engine.notifier.publish(
                "overdue", alert, extra={"work_order": order_view(order, now)}
            )
            published += 1
        return published

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_s)
            try:
                await self.check_overdue()
            except Exception:
                log.exception("work orders: overdue check failed; continuing")

    # -- persistence -------------------------------------------------------------------

    def _new_id(self) -> int:
        if self.ids is not None:
            return self.ids.take()
        self._next_id += 1
        return self._next_id - 1

    def _change(self, order: WorkOrder, now: int, actor: str, what: str, note: str | None) -> None:
        order.updated_at_ms = now
        if order.state == "closed":
            self.current.pop(order.id, None)
            if self.by_alert.get(order.alert_id) is order:
                del self.by_alert[order.alert_id]
        self._dirty[order.id] = order
        self._log.append((order.id, now, actor, what, note))
        self._queued += 1
        self._wake.set()

    async def _writer(self) -> None:
        """Persist the changes in batches; a store that cannot write now is retried with
        backoff (the changes stay in memory meanwhile)."""
        delay = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            queued = self._queued
            orders = [WorkOrder.from_row(o.row()) for o in self._dirty.values()]
            rows, self._dirty, self._log = self._log, {}, []
            while True:
                try:
                    await asyncio.to_thread(self.store.save, orders, rows, self.engine.fence)
                    delay = 0.2
                    break
                except StaleLease as exc:  # the next owner has the partition's orders
                    log.warning("work orders: %s; %d changes not written", exc, len(rows))
                    self.lost = exc
                    break
                except StoreUnavailable as exc:
                    log.error("work orders: store write failed (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 30.0)
                except Exception:  # refused for good (a bug): dropped, loudly, not retried
                    log.exception("work orders: the store refused %d changes; dropped", len(rows))
                    break
            async with self._written_cond:
                self._written = queued
                self._written_cond.notify_all()

    async def flush(self, timeout_s: float | None = None) -> None:
        target = self._queued
        try:
            async with asyncio.timeout(timeout_s), self._written_cond:
                await self._written_cond.wait_for(lambda: self._written >= target)
        except TimeoutError:
            raise AlertStoreBusy(f"work order changes not saved within {timeout_s:.0f}s") from None
        if self.lost is not None:
            raise not_saved("work order changes", self.lost)
