"""The read side and actions (``ingest.readside``) over a running ``Ingest`` in this
process: what ``serve`` hands the API. Each call goes to the part that owns it (twins,
stores, alert engine, work orders, commands, passports); a part that does not run here
raises ``Unavailable``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal

from prometheus_client import generate_latest

from devices.catalog import Catalog
from ingest.alerts.config import AlertsConfig
from ingest.alerts.engine import REQUEST_FLUSH_S, AlertEngine
from ingest.alerts.model import Alert, AlertQuery, StreamEvent, Timing
from ingest.alerts.order_model import OrderQuery, WorkOrder
from ingest.alerts.orders import WorkOrders
from ingest.alerts.repair import repair_times
from ingest.commands.model import CommandRecord
from ingest.commands.service import Commands
from ingest.passports import Passports
from ingest.readside import JSON, Actions, ReadSide, Unavailable, now_ms
from ingest.service import Ingest
from ingest.store import DeadLetter, HistoryStore
from ingest.twins import Twin


class InProcessReadSide:
    """``ReadSide`` and ``Actions`` over ``ingest`` (started or not: listeners wait for
    its pipeline, see ``on_twins_changed``)."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self._listeners: list[Callable[[list[Twin]], None]] = []
        self._attached = False

    # -- the district and its live state -------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self.ingest.catalog

    @property
    def release_soc(self) -> float:
        return self.ingest.config.release_soc

    @property
    def history_days(self) -> float:
        return self.ingest.config.history_days

    @property
    def data_dir(self) -> Path:
        return self.ingest.config.data_dir

    @property
    def twins(self) -> Mapping[str, Twin]:
        return self.ingest.twins.by_id

    def on_twins_changed(self, listener: Callable[[list[Twin]], None]) -> None:
        self._listeners.append(listener)
        self.attach()

    def attach(self) -> None:
        """Hear the pipeline's changes: at once when it runs, else once it does (an
        ``Ingest`` entered after this read side was made calls this again)."""
        pipeline = self.ingest.pipeline
        if pipeline is not None and not self._attached:
            pipeline.listeners.append(self._changed)
            self._attached = True

    def _changed(self, twins: list[Twin]) -> None:
        for listener in self._listeners:
            listener(twins)

    @property
    def flagged_batteries(self) -> Collection[str]:
        passports = self.ingest.passports
        return passports.flagged if passports is not None else frozenset()

    def on_flag_change(self, listener: Callable[[str], None]) -> None:
        if self.ingest.passports is not None:
            self.ingest.passports.on_flag_change.append(listener)

    @property
    def history(self) -> HistoryStore | None:
        return self.ingest.history

    # -- the service itself ----------------------------------------------------------------

    def problems(self) -> list[str]:
        return self.ingest.problems()

    def metrics(self) -> bytes:
        return generate_latest(self.ingest.metrics.registry)

    async def dead_letters(self, limit: int) -> tuple[list[DeadLetter], dict[str, int]]:
        state = self.ingest.state
        if state is None:
            raise Unavailable("the state store is not open (service starting or stopped)")
        rows, counts = await asyncio.gather(
            asyncio.to_thread(state.dead_letters, limit),
            asyncio.to_thread(state.dead_letter_counts),
        )
        return rows, counts

    # -- alerts ----------------------------------------------------------------------------

    def _engine(self) -> AlertEngine:
        if self.ingest.alerts is None:
            raise Unavailable("alerts are disabled in this service (alerts.enabled=false)")
        return self.ingest.alerts

    @property
    def alerts_config(self) -> AlertsConfig | None:
        engine = self.ingest.alerts
        return engine.config if engine is not None else None

    def clock_ms(self) -> int:
        engine = self.ingest.alerts
        return engine.clock() if engine is not None else now_ms()

    async def alerts(self, q: AlertQuery) -> list[Alert]:
        return await self._engine().query(q)

    async def alert(self, alert_id: int) -> Alert:
        return await self._engine().get(alert_id)

    async def alert_notes(self, alert_id: int) -> list[JSON]:
        return await self._engine().notes(alert_id)

    async def alert_deliveries(self, alert_id: int) -> list[JSON]:
        return [d.log_entry() for d in await self._engine().notifier.log(alert_id)]

    def subscribe_alerts(self) -> tuple[asyncio.Queue[StreamEvent | None], int]:
        engine = self._engine()
        return engine.subscribe(), engine.last_event_id

    def unsubscribe_alerts(self, queue: asyncio.Queue[StreamEvent | None]) -> None:
        self._engine().unsubscribe(queue)

    async def oldest_alert_event(self) -> int | None:
        engine = self._engine()
        await engine.flush()
        return await asyncio.to_thread(engine.store.oldest_event_id)

    async def alert_events_after(self, after: int, limit: int) -> list[StreamEvent]:
        rows = await asyncio.to_thread(self._engine().store.events_after, after, limit)
        return [StreamEvent(event_id, type_, data) for event_id, type_, data in rows]

    async def webhooks(self) -> list[JSON]:
        return [s.view() for s in self._engine().notifier.subscriptions.values()]

    async def pending_notifications(self, limit: int) -> tuple[list[JSON], int]:
        pending = self._engine().notifier.pending()
        return pending[:limit], len(pending)

    async def undelivered_notifications(self, limit: int) -> tuple[list[JSON], bool]:
        return await self._engine().notifier.undelivered(limit)

    async def repair_times(
        self, start_ms: int, end_ms: int, by: Literal["station", "code"]
    ) -> list[JSON]:
        self._orders()  # Unavailable without alerts
        rows = await self.alert_timings(start_ms, end_ms)
        return [g.view() for g in repair_times(rows, by)]

    async def alert_timings(self, start_ms: int, end_ms: int) -> list[Timing]:
        engine = self.ingest.alerts
        if engine is None:
            return []
        await engine.flush(REQUEST_FLUSH_S)
        return await asyncio.to_thread(engine.store.timings, start_ms, end_ms)

    # -- work orders, commands, batteries ----------------------------------------------------

    def _orders(self) -> WorkOrders:
        if self.ingest.orders is None:
            raise Unavailable("work orders need alerts (alerts.enabled=false)")
        return self.ingest.orders

    async def work_orders(self, q: OrderQuery) -> list[WorkOrder]:
        return await self._orders().query(q)

    async def work_order(self, order_id: int) -> WorkOrder:
        return await self._orders().get(order_id)

    async def work_order_log(self, order_id: int) -> list[JSON]:
        return await self._orders().history(order_id)

    def _commands(self) -> Commands:
        if self.ingest.commands is None:
            raise Unavailable("commands are not running in this service")
        return self.ingest.commands

    async def command(self, command_id: str) -> CommandRecord | None:
        return await self._commands().get(command_id)

    async def commands(self, device_id: str | None, limit: int) -> list[CommandRecord]:
        return await self._commands().recent(device_id, limit)

    def _passports(self) -> Passports:
        if self.ingest.passports is None:
            raise Unavailable("battery passports are not running")
        return self.ingest.passports

    async def battery(self, serial: str) -> JSON | None:
        passports = self._passports()
        await passports.flush()  # what the last messages did, written first
        return await asyncio.to_thread(passports.store.passport, serial)

    async def batteries(self, *, flagged: bool | None, after: str | None, limit: int) -> list[JSON]:
        passports = self._passports()
        await passports.flush()
        return await asyncio.to_thread(
            passports.store.batteries, flagged=flagged, after=after, limit=limit
        )

    # -- actions ---------------------------------------------------------------------------

    async def acknowledge(self, alert_id: int, by: str, note: str | None) -> Alert:
        return await self._engine().acknowledge(alert_id, by, note)

    async def resolve(self, alert_id: int, by: str, note: str | None) -> Alert:
        return await self._engine().resolve(alert_id, by, note)

    async def add_alert_note(self, alert_id: int, by: str, text: str) -> Alert:
        return await self._engine().add_note(alert_id, by, text)

    async def report(
        self, station_id: str, device_id: str | None, unit: int | None, category: str, text: str
    ) -> tuple[Alert, bool]:
        return await self._engine().report(station_id, device_id, unit, category, text)

    async def add_webhook(self, url: str, **options: Any) -> JSON:
        sub = await self._engine().notifier.add(url, **options)
        return sub.created_view()

    async def remove_webhook(self, webhook_id: int) -> bool:
        return await self._engine().notifier.remove(webhook_id)

    async def create_work_order(
        self,
        alert_id: int,
        by: str,
        *,
        assignee: str | None,
        due_at_ms: int | None,
        note: str | None,
    ) -> WorkOrder:
        return await self._orders().create(
            alert_id, by, assignee=assignee, due_at_ms=due_at_ms, note=note
        )

    async def move_work_order(
        self, order_id: int, state: str, by: str, *, assignee: str | None, note: str | None
    ) -> WorkOrder:
        return await self._orders().move(order_id, state, by, assignee=assignee, note=note)

    async def add_work_order_note(self, order_id: int, by: str, text: str) -> WorkOrder:
        return await self._orders().add_note(order_id, by, text)

    async def send_command(
        self,
        device_id: str,
        ctype: str,
        unit: int | None,
        *,
        ttl_s: float | None,
        requested_by: str,
        requested_key: str | None,
    ) -> CommandRecord:
        return await self._commands().create(
            device_id,
            ctype,
            unit,
            ttl_s=ttl_s,
            requested_by=requested_by,
            requested_key=requested_key,
        )

    async def clear_battery(self, serial: str, actor_id: str, actor_name: str, note: str) -> bool:
        return await self._passports().clear(serial, actor_id, actor_name, note)


def read_and_act(ingest: Ingest) -> tuple[ReadSide, Actions]:
    """The read side and the actions over ``ingest`` (one object; typed as the two
    protocols, so the type checker holds it to both)."""
    side = InProcessReadSide(ingest)
    return side, side
