"""``Commands``: create, publish, resend, expire, and apply the devices' answers.

Open commands (``pending``/``sent``) live in memory and in the store; every change is
made on the event loop, marked dirty, and written by the service's task (``commands``,
supervised: a death is reported and the task restarted, its state is this object's).
That task also handles the answers in arrival order, resends open commands every
``resend_s`` (and at once on a new connection of the ingest source, which publishes them,
or when the device is born again), and marks a command ``expired`` when its ``expires``
passes without an answer.

A ``command_result`` event reaches us as a pipeline observer, after its batch is stored
(history keeps it). The first answer to an open command decides its state; any later one
(a device answers a resent id again) changes nothing and is counted as ``repeated``; an
answer to an expired command is kept on the command (``late_result``) and counted; an
answer to an id we do not know, or that another device was sent, is counted and logged
(the event itself is in the history). A stop or crash between an answer and its write
loses nothing for good: the command is still open after the restart, is resent, and the
device answers the same id again.

In an ingest worker (issue 13) each owned partition runs one (``ingest.partition_consumer``):
the open commands of the partition's ``devices`` only, published through the partition's
own MQTT session (``attach`` when it is up, ``detach`` when it ends: a command created
meanwhile is stored and sent at the next ``attach``), answers from the partition's own
subscription, and writes fenced by the partition's lease epoch (``fence``): once the lease
moved, what is left unwritten is dropped with a warning (the next owner loads the open
commands from the database and resends them), and ``create`` raises ``StaleLease``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from devices.catalog import Catalog
from devices.contract import COMMAND_KIND, COMMAND_TYPES, COMMAND_UNIT, Birth, Command, Event
from devices.contract import Message as DeviceMessage
from devices.topics import TopicScheme
from ingest.commands import CommandInvalid, CommandNotFound, TooManyCommands
from ingest.commands.config import CommandsConfig
from ingest.commands.model import CommandRecord
from ingest.commands.store import CommandStore
from ingest.leases import StaleLease
from ingest.supervisor import Supervisor
from ingest.twins import Twin

log = logging.getLogger(__name__)
SYSTEM_ACTOR = "chargewatch"
"""Who asks for a command the service sends by itself (a flagged pack's lock)."""

TASK = "commands"

Ticket = tuple[int, int]  # (connection generation, packet id) of a publish


class Publisher(Protocol):
    """What publishes commands: the ingest MQTT source, on its own connection (why not
    another: ``ingest.gmqtt_source``)."""

    connected: bool
    generation: int  # +1 per connection
    on_published: Callable[[Ticket], None] | None  # set by us: the broker acknowledged

    def publish(self, topic: str, payload: bytes) -> Ticket | None: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Commands:
    def __init__(
        self,
        config: CommandsConfig,
        catalog: Catalog,
        scheme: TopicScheme,
        store: CommandStore,
        *,
        supervisor: Supervisor,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], int] = now_ms,
        devices: Collection[str] | None = None,
    ) -> None:
        self.config = config
        # a partition's (module docstring): the open commands of these devices only, and
        # its writes fenced by (partition, epoch)
        self.devices = frozenset(devices) if devices is not None else None
        self.fence: tuple[int, int] | None = None
        self.catalog = catalog
        self.scheme = scheme
        self.store = store
        self.supervisor = supervisor
        self.clock = clock
        self.publisher: Publisher | None = None  # attach()
        self._tickets: dict[Ticket, str] = {}  # published, PUBACK awaited
        self._sent_on: dict[str, int] = {}  # open command -> connection it was last sent on
        self.open: dict[str, CommandRecord] = {}
        self._open_per_device: collections.Counter[str] = collections.Counter()
        self._dirty: dict[str, CommandRecord] = {}  # changed, not yet written
        self._results: collections.deque[tuple[str, str, str, str | None, int]] = (
            collections.deque()
        )
        self._resend_devices: set[str] = set()
        self._wake = asyncio.Event()
        r = registry or CollectorRegistry()
        self.m_created = Counter(
            "chargewatch_commands_created", "Commands created", ["type"], registry=r
        )
        self.m_sends = Counter(
            "chargewatch_command_sends", "Commands published (first sends and resends)", registry=r
        )
        self.m_results = Counter(
            "chargewatch_command_results",
            "Command answers from devices: applied, repeated (already answered), late"
            " (after expiry), unknown (no such command for that device)",
            ["outcome"],
            registry=r,
        )
        self.m_finished = Counter(
            "chargewatch_commands_finished", "Commands by final state", ["state"], registry=r
        )
        self.m_open = Gauge("chargewatch_commands_open", "Commands pending or sent", registry=r)
        self.m_lock_failures = Counter(
            "chargewatch_command_lock_failures",
            "lock_battery commands for flagged packs that could not be created",
            registry=r,
        )
        self._locks: set[asyncio.Task[None]] = set()  # lock_battery commands being created
        self.m_open.set_function(lambda: len(self.open))

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Commands:
        for record in await asyncio.to_thread(self.store.load_open, self.devices):
            self._opened(record)
        if self.open:
            log.info("commands: %d open commands restored; resending", len(self.open))
        self.supervisor.start(TASK, self._run)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._locks:  # lock_battery commands being created: stored before we stop
            await asyncio.wait(set(self._locks))
        await self.supervisor.stop(TASK)
        if self.publisher is not None:
            self.publisher.on_published = None
        await self._apply_results()  # what the pipeline's last batch brought
        await self._flush()

    def attach(self, publisher: Publisher) -> None:
        """Publish through ``publisher`` from now on (every open command at its first
        connection, and again at every new one)."""
        self.publisher = publisher
        publisher.on_published = self._on_published
        self._wake.set()

    def detach(self) -> None:
        """The publisher's connection is gone for good: nothing is sent until the next
        ``attach`` (what is created meanwhile is stored, and sent then)."""
        publisher, self.publisher = self.publisher, None
        if publisher is not None:
            publisher.on_published = None
        self._tickets.clear()  # their PUBACKs will not come
        self._sent_on.clear()  # every open command is sent again on the next publisher

    # -- asking -----------------------------------------------------------------------------

    def send_lock_battery(self, device_id: str, slot: int, reason: str) -> None:
        """Battery passports (ingest.passports.CommandSender): hold a flagged pack in its
        slot. Called on the loop; the command is stored and published in a task of its own,
        and a failure to create it is logged and counted, never raised into the observer."""
        task = self.supervisor.spawn(
            f"lock-battery:{device_id}", self._lock_battery(device_id, slot, reason)
        )
        self._locks.add(task)
        task.add_done_callback(self._locks.discard)

    async def _lock_battery(self, device_id: str, slot: int, reason: str) -> None:
        try:
            await self.create(
                device_id, "lock_battery", slot, requested_by=f"{SYSTEM_ACTOR} ({reason})"
            )
        except Exception:
            self.m_lock_failures.inc()
            log.exception("commands: lock_battery for %s slot %d not created", device_id, slot)

    def check(
        self, device_id: str, ctype: str, unit: int | None, ttl_s: float | None
    ) -> tuple[str, float]:
        """Validate against the catalog: (station id, ttl); raises CommandNotFound for an
        unknown device, CommandInvalid when the command does not fit it."""
        device = self.catalog.devices.get(device_id)
        if device is None:
            raise CommandNotFound(f"no device with id {device_id!r}")
        if ctype not in COMMAND_TYPES:
            raise CommandInvalid(f"type: {ctype!r} is not one of {', '.join(COMMAND_TYPES)}")
        kind = COMMAND_KIND[ctype]
        if kind is not None and kind != device.kind:
            raise CommandInvalid(f"type: {ctype} is for a {kind}; {device_id} is a {device.kind}")
        field = COMMAND_UNIT[ctype]
        if field is None and unit is not None:
            raise CommandInvalid(f"{ctype} takes no port or slot")
        if field is not None:
            if unit is None:
                raise CommandInvalid(f"{ctype} needs {field}")
            if not 1 <= unit <= device.spec.units:
                raise CommandInvalid(
                    f"{field}: {device_id} has {field}s 1..{device.spec.units}, not {unit}"
                )
        cfg = self.config
        ttl = cfg.ttl_default_s if ttl_s is None else ttl_s
        if not cfg.ttl_min_s <= ttl <= cfg.ttl_max_s:
            raise CommandInvalid(f"ttl_s: must be {cfg.ttl_min_s:g} to {cfg.ttl_max_s:g}")
        return device.station_id, ttl

    async def create(
        self,
        device_id: str,
        ctype: str,
        unit: int | None = None,
        *,
        ttl_s: float | None = None,
        requested_by: str,
        requested_key: str | None = None,
    ) -> CommandRecord:
        """Store a new command (``pending``), then publish it. Durable before it returns."""
        station_id, ttl = self.check(device_id, ctype, unit, ttl_s)
        cfg = self.config
        if self._open_per_device[device_id] >= cfg.open_max_per_device:
            raise TooManyCommands(
                f"{device_id} has {cfg.open_max_per_device} open commands already"
            )
        if len(self.open) >= cfg.open_max:
            raise TooManyCommands(f"{cfg.open_max} commands are open already")
        now = self.clock()
        ident = f"c-{secrets.token_urlsafe(18)}"  # 144 random bits: not guessable
        field = COMMAND_UNIT[ctype]
        command = Command.of(
            {
                "v": 1,
                "id": ident,
                "ts": now,
                "type": ctype,
                "expires": now + int(ttl * 1000),
                **({field: unit} if field is not None else {}),
            }
        )
        record = CommandRecord(
            id=ident,
            device_id=device_id,
            station_id=station_id,
            type=ctype,
            unit=unit,
            state="pending",
            requested_by=requested_by,
            requested_key=requested_key,
            requested_at_ms=now,
            expires_at_ms=command.expires,
            payload=command.encode().decode(),
            updated_at_ms=now,
        )
        await asyncio.to_thread(self.store.save, [record], self.config.kept, self.fence)
        self._opened(record)
        self.m_created.labels(ctype).inc()
        log.info("command %s %s for %s by %s", ident, ctype, device_id, requested_by)
        self._send(record)
        return record

    async def get(self, command_id: str) -> CommandRecord | None:
        found = self.open.get(command_id) or self._dirty.get(command_id)
        if found is not None:
            return found
        return await asyncio.to_thread(self.store.get, command_id)

    async def recent(self, device_id: str | None = None, limit: int = 100) -> list[CommandRecord]:
        """Newest first; what is changed but not yet written shows as it is now."""
        rows = await asyncio.to_thread(self.store.recent, device_id, limit=limit)
        return [self.open.get(r.id) or self._dirty.get(r.id) or r for r in rows]

    # -- the pipeline's side ------------------------------------------------------------

    def observe(self, twin: Twin, msg: DeviceMessage, received_ms: int) -> None:
        """Pipeline observer: answers, and births (a device back on line gets its open
        commands again at once)."""
        if isinstance(msg, Event) and msg.type == "command_result":
            assert msg.cmd is not None  # the contract needs both
            assert msg.result is not None
            self._results.append((twin.device_id, msg.cmd, msg.result, msg.info, received_ms))
            self._wake.set()
        elif isinstance(msg, Birth) and twin.device_id in self._open_per_device:
            self._resend_devices.add(twin.device_id)
            self._wake.set()

    # -- the publisher's side ---------------------------------------------------------------

    def _send(self, record: CommandRecord) -> None:
        if self.publisher is None:
            return
        topic = self.scheme.build(record.device_id, "cmd")
        ticket = self.publisher.publish(topic, record.payload.encode())
        if ticket is None:
            return  # not connected: sent again at the next connection
        self._tickets[ticket] = record.id
        self._sent_on[record.id] = ticket[0]
        record.sends += 1
        record.last_sent_at_ms = self.clock()
        self.m_sends.inc()
        self._mark(record)

    def _on_published(self, ticket: Ticket) -> None:
        command_id = self._tickets.pop(ticket, None)
        if command_id is None:
            return
        record = self.open.get(command_id)
        if record is None or record.state != "pending":
            return
        record.state = "sent"
        record.sent_at_ms = self.clock()
        self._mark(record)

    def _opened(self, record: CommandRecord) -> None:
        self.open[record.id] = record
        self._open_per_device[record.device_id] += 1

    def _closed(self, record: CommandRecord) -> None:
        del self.open[record.id]
        self._sent_on.pop(record.id, None)
        self._open_per_device[record.device_id] -= 1
        if not self._open_per_device[record.device_id]:
            del self._open_per_device[record.device_id]

    def _mark(self, record: CommandRecord) -> None:
        record.updated_at_ms = self.clock()
        self._dirty[record.id] = record
        self._wake.set()

    # -- the task ---------------------------------------------------------------------------

    async def _run(self) -> None:
        resend_ms = int(self.config.resend_s * 1000)
        while True:
            self._wake.clear()
            now = self.clock()
            await self._apply_results()
            self._expire(now)
            self._resend(now, resend_ms)
            await self._flush()
            if self._wake.is_set():
                continue
            due = [r.expires_at_ms for r in self.open.values()]
            due += [(r.last_sent_at_ms or now) + resend_ms for r in self.open.values()]
            wait_s = min([1.0, *((d - self.clock()) / 1000 for d in due)])
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel
            # that lands as the wait ends, and a task that ignores its cancel never stops
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wait_s)):
                    await self._wake.wait()

    async def _apply_results(self) -> None:
        while self._results:
            device_id, ident, result, info, at_ms = self._results.popleft()
            record = self.open.get(ident)
            if record is not None and record.device_id == device_id:
                record.state, record.result, record.info = result, result, info
                record.result_at_ms = at_ms
                self._closed(record)
                self._mark(record)
                self.m_results.labels("applied").inc()
                self.m_finished.labels(result).inc()
                log.info("command %s on %s: %s (%s)", ident, device_id, result, info)
                continue
            record = self._dirty.get(ident) or await asyncio.to_thread(self.store.get, ident)
            if record is None or record.device_id != device_id:
                self.m_results.labels("unknown").inc()
                log.warning("%s answered command %r, which it was never sent", device_id, ident)
            elif record.state == "expired":
                if record.late_result is None:
                    record.late_result, record.late_info = result, info
                    record.late_result_at_ms = at_ms
                    self._mark(record)
                self.m_results.labels("late").inc()
                log.info("command %s on %s: %s after it expired", ident, device_id, result)
            else:
                record.repeats += 1
                self._mark(record)
                self.m_results.labels("repeated").inc()

    def _expire(self, now: int) -> None:
        for record in [r for r in self.open.values() if r.expires_at_ms <= now]:
            self._closed(record)
            record.state = "expired"
            self._mark(record)
            self.m_finished.labels("expired").inc()
            log.info("command %s on %s expired unanswered", record.id, record.device_id)

    def _resend(self, now: int, resend_ms: int) -> None:
        publisher = self.publisher
        if publisher is None or not publisher.connected:
            return
        generation = publisher.generation
        for ticket in [t for t in self._tickets if t[0] != generation]:
            del self._tickets[ticket]  # an old connection's PUBACKs will not come
        devices, self._resend_devices = self._resend_devices, set()
        for record in list(self.open.values()):
            last = record.last_sent_at_ms
            if (
                self._sent_on.get(record.id) != generation  # not yet on this connection
                or record.device_id in devices  # the device is back
                or last is None
                or now - last >= resend_ms
            ):
                self._send(record)

    async def _flush(self) -> None:
        if not self._dirty:
            return
        written = [dataclasses.replace(r) for r in self._dirty.values()]  # as they are now
        try:
            await asyncio.to_thread(self.store.save, written, self.config.kept, self.fence)
        except StaleLease as exc:  # the next owner loads the open commands and resends them
            log.warning("commands: %s; %d changes not written", exc, len(written))
            self._dirty.clear()
            return
        for copy in written:  # done with, unless it changed again during the write
            record = self._dirty.get(copy.id)
            if record is not None and record.row() == copy.row():
                del self._dirty[copy.id]
