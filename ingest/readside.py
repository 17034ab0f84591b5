"""The one door between ingest and the API: what api/ reads (``ReadSide``) and the
maintainers' actions it performs (``Actions``), as typed protocols over plain records.

api/ knows only these two protocols (like httpx's client knows only ``BaseTransport``).
``serve`` hands it the in-process implementation over the running ``Ingest``
(``ingest.inprocess``); a PostgreSQL implementation for ``chargewatch api`` replicas can
implement the same protocols from the database, so no signature names ``Ingest``,
``Pipeline``, ``AlertEngine`` or a store class: only the plain records below (the catalog,
twins, alerts, work orders, commands, dead letters, queries) and JSON-ready dicts.

Exceptions the implementations raise (api/ turns them into HTTP answers)::

    IngestError
    └── Unavailable           that part of the service does not run here (503)
    AlertError (ValueError)   ingest.alerts.model
    ├── AlertNotFound         404
    └── AlertConflict         409
    WorkOrderError (ValueError)  ingest.alerts.order_model
    ├── OrderNotFound         404
    ├── OrderConflict         409
    └── OrderInvalid          422
    CommandError              ingest.commands: CommandNotFound, CommandInvalid, TooManyCommands
    StoreError                ingest: a store that cannot answer now
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from devices.catalog import Catalog
from ingest import IngestError
from ingest.alerts.config import AlertsConfig
from ingest.alerts.model import Alert, AlertQuery, StreamEvent, Timing
from ingest.alerts.order_model import OrderQuery, WorkOrder
from ingest.commands.model import CommandRecord
from ingest.store import DeadLetter, HistoryStore
from ingest.twins import Twin

JSON = dict[str, Any]

SERIAL_PATTERN = r"^[\x21-\x7e]{1,64}$"
"""A battery serial the passports index: 1 to 64 printable ASCII characters, no spaces
(anything else from a device is counted and ignored; the API refuses it)."""
COMMANDS_LIST_MAX = 1000
"""The most commands one ``commands`` call answers."""


def now_ms() -> int:
    """The wall clock, epoch milliseconds: the time every ``*_ms`` of the read side is in."""
    return time.time_ns() // 1_000_000


class Unavailable(IngestError):
    """A part of the service that does not run here (alerts disabled, no commands): the
    message says which and why."""


class ReadSide(Protocol):
    """Everything api/ reads: catalog, twins, history, alerts, work orders, commands,
    batteries, dead letters, readiness and metrics, and changes to subscribe to."""

    # -- the district and its live state -------------------------------------------------

    @property
    def catalog(self) -> Catalog: ...

    @property
    def release_soc(self) -> float:
        """The default state of charge at which a battery counts as ready."""
        ...

    @property
    def history_days(self) -> float:
        """How long raw history is kept (older: hourly rollups)."""
        ...

    @property
    def data_dir(self) -> Path:
        """Where the API keeps its own files (keys, audit log, riders)."""
        ...

    @property
    def twins(self) -> Mapping[str, Twin]:
        """Every catalog device's current state, by device id (read only)."""
        ...

    def on_twins_changed(self, listener: Callable[[list[Twin]], None]) -> None:
        """Call ``listener`` (on the loop) with the twins each applied batch changed."""
        ...

    @property
    def flagged_batteries(self) -> Collection[str]:
        """Serials of flagged packs (battery passports): never a ready battery."""
        ...

    def on_flag_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener`` with a pack's serial when it is flagged or cleared."""
        ...

    @property
    def history(self) -> HistoryStore | None:
        """The history store (None: not started)."""
        ...

    # -- the service itself ----------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the service is not ready; empty when it is (``/readyz``)."""
        ...

    def metrics(self) -> bytes:
        """The service's counters, Prometheus text format."""
        ...

    async def dead_letters(self, limit: int) -> tuple[list[DeadLetter], dict[str, int]]:
        """The newest rejected messages, and a count per reason since the start."""
        ...

    # -- alerts ----------------------------------------------------------------------------

    @property
    def alerts_config(self) -> AlertsConfig | None:
        """The alert options (reports, sentinels, SSE); None: alerts are disabled."""
        ...

    def clock_ms(self) -> int:
        """The alerts' clock (epoch ms): what "now" is for alerts, orders and reports."""
        ...

    async def alerts(self, q: AlertQuery) -> list[Alert]: ...

    async def alert(self, alert_id: int) -> Alert:
        """Raises AlertNotFound."""
        ...

    async def alert_notes(self, alert_id: int) -> list[JSON]: ...

    async def alert_deliveries(self, alert_id: int) -> list[JSON]:
        """The webhook deliveries of one alert, JSON-ready (times RFC 3339)."""
        ...

    def subscribe_alerts(self) -> tuple[asyncio.Queue[StreamEvent | None], int]:
        """A queue of every alert change from now on (None: the stream ends), and the id of
        the last event before it. Give it back with ``unsubscribe_alerts``."""
        ...

    def unsubscribe_alerts(self, queue: asyncio.Queue[StreamEvent | None]) -> None: ...

    async def oldest_alert_event(self) -> int | None:
        """The id of the oldest stored change (older ones are pruned), after everything
        changed so far is stored."""
        ...

    async def alert_events_after(self, after: int, limit: int) -> list[StreamEvent]: ...

    async def webhooks(self) -> list[JSON]:
        """Webhook subscriptions with their health (no secrets)."""
        ...

    async def pending_notifications(self, limit: int) -> tuple[list[JSON], int]:
        """The oldest ``limit`` notifications not finished yet (waiting for their next try,
        or in flight), and how many there are in all."""
        ...

    async def undelivered_notifications(self, limit: int) -> tuple[list[JSON], bool]:
        """Given-up notifications, newest first, and whether the list is complete."""
        ...

    async def repair_times(
        self, start_ms: int, end_ms: int, by: Literal["station", "code"]
    ) -> list[JSON]:
        """Times to acknowledge and to repair of the alerts opened in [start, end)."""
        ...

    async def alert_timings(self, start_ms: int, end_ms: int) -> list[Timing]:
        """(station, code, opened, acknowledged, resolved) of each alert opened in
        [start, end), what has just happened included; none when alerts are off."""
        ...

    # -- work orders, commands, batteries ----------------------------------------------------

    async def work_orders(self, q: OrderQuery) -> list[WorkOrder]: ...

    async def work_order(self, order_id: int) -> WorkOrder:
        """Raises OrderNotFound."""
        ...

    async def work_order_log(self, order_id: int) -> list[JSON]: ...

    async def command(self, command_id: str) -> CommandRecord | None: ...

    async def commands(self, device_id: str | None, limit: int) -> list[CommandRecord]:
        """Newest first; ``device_id`` None: every device's."""
        ...

    async def battery(self, serial: str) -> JSON | None:
        """One pack's passport with its stays, events and clearances (None: never seen)."""
        ...

    async def batteries(self, *, flagged: bool | None, after: str | None, limit: int) -> list[JSON]:
        """Packs by serial, after ``after``."""
        ...


class Actions(Protocol):
    """What maintainers (and riders' reports) change through ingest."""

    async def acknowledge(self, alert_id: int, by: str, note: str | None) -> Alert: ...

    async def resolve(self, alert_id: int, by: str, note: str | None) -> Alert: ...

    async def add_alert_note(self, alert_id: int, by: str, text: str) -> Alert: ...

    async def report(
        self, station_id: str, device_id: str | None, unit: int | None, category: str, text: str
    ) -> tuple[Alert, bool]:
        """A rider's report: the alert it joined or opened, and whether it joined one."""
        ...

    async def add_webhook(self, url: str, **options: Any) -> JSON:
        """A new subscription's view with its signing secret (shown this once)."""
        ...

    async def remove_webhook(self, webhook_id: int) -> bool: ...

    async def create_work_order(
        self,
        alert_id: int,
        by: str,
        *,
        assignee: str | None,
        due_at_ms: int | None,
        note: str | None,
    ) -> WorkOrder: ...

    async def move_work_order(
        self, order_id: int, state: str, by: str, *, assignee: str | None, note: str | None
    ) -> WorkOrder: ...

    async def add_work_order_note(self, order_id: int, by: str, text: str) -> WorkOrder: ...

    async def send_command(
        self,
        device_id: str,
        ctype: str,
        unit: int | None,
        *,
        ttl_s: float | None,
        requested_by: str,
        requested_key: str | None,
    ) -> CommandRecord: ...

    async def clear_battery(self, serial: str, actor_id: str, actor_name: str, note: str) -> bool:
        """False: the pack is not flagged (or never seen)."""
        ...
