"""Battery passports: fire safety by serial number.

Every pack named in a cabinet's slots (status) or a ``swap`` event is indexed: where it is
now (cabinet, slot, since), where it has been (stays), the highest temperature and the
fastest rise seen in a slot, and every safety event while it sat in one. A safety event is
an alert opening at its slot (``temperature_rise``, ``temperature_high``, faults
``battery_fault``, ``thermal_runaway``, ``over_temperature``) or ``smoke`` at its cabinet
(every pack in it); the pack is then **flagged**, and locked where it sits.

When a flagged pack appears in a slot (a status or a swap's ``battery_in``, at any
cabinet), a critical ``flagged_battery`` alert opens at that cabinet and slot at once (one
per pack and slot) and, unless ``batteries.lock_flagged`` is off, ``lock_battery`` is sent
for that slot through a ``CommandSender`` (the remote-commands service; without one the
lock is logged and counted as unsent). The rider API never counts a flagged pack as ready
(``flagged`` is read by ``api.snapshots.StationViews``). A maintainer clears a flag with a
note (``clear``).

In the cluster (``ingest.worker_passports``) each partition runs an index of its own over
its cabinets (``devices``), and the flagged set is every partition's: ``adopt_flags`` takes
the flags as PostgreSQL has them (raised in other partitions, cleared on any API replica),
keeping those raised here that the read could not see yet (``flushes`` marks which), and
catches a pack in one of its slots that the flag's notice found there.

The invariant, at each start (``announce_flagged``: ``serve``'s, or a partition's load by a
new owner) and for each flag ``adopt_flags`` learns: every slot holding a flagged pack has an
unresolved ``flagged_battery`` alert for that cabinet, slot and serial, or a safety event
flagged the pack there during its stay (its own alert announced it, and locked it); one
with neither opens, with its lock, and one with an alert open gets no second. The only view
not trusted is the index's own stale one: a pack whose latest stay (in any partition, as the
flags' read saw it) is elsewhere since after it came to our slot left it, unreported yet.

Memory is bounded by the district: the occupant of every slot and the flagged serials;
everything else is on disk (``ingest.passport_store``), written in batches by the
``passports`` task, so ingest never waits for it. Cost: ~10 us per status of a 12-slot
cabinet whose packs stay put (tests/ingest/test_passports.py measures it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from devices.catalog import Catalog
from devices.contract import CabinetStatus, Event, Message
from ingest import StoreError
from ingest.alerts.model import Alert, Key, Observation
from ingest.passport_store import APPEARED, PassportOps, PassportStore
from ingest.readside import SERIAL_PATTERN
from ingest.twins import Twin

log = logging.getLogger(__name__)

_SERIAL = re.compile(SERIAL_PATTERN)

SLOT_RULES = frozenset({"temperature_rise", "temperature_high"})
"""Alert rules at a slot that flag the pack in it."""
SLOT_FAULTS = frozenset({"battery_fault", "thermal_runaway", "over_temperature"})
"""Fault codes at a slot that flag the pack in it."""
CABINET_FAULTS = frozenset({"smoke"})
"""Fault codes at a cabinet that flag every pack in it."""

TEMP_RANGE_C = (-60.0, 400.0)
"""Temperatures outside this are a sensor's garbage, not a pack's history."""
RISE_SPAN_MS = 30_000
"""A rise is measured over at least this long (one noisy reading is not a fire)."""
WRITE_EVERY_S = 0.5
"""The writer task's pace: a batch at most this late on disk."""
RETRY_MAX_S = 30.0
"""Cap of the writer's backoff while the store fails."""
PENDING_MAX = 100_000
"""Operations kept while the store fails; beyond, the oldest stays are dropped (counted)."""


class CommandSender(Protocol):
    """Sends a device command (the remote-commands service implements it)."""

    def send_lock_battery(self, device_id: str, slot: int, reason: str) -> None: ...


class AlertRaiser(Protocol):
    """The alert engine's door for a condition raised now (``AlertEngine.raise_now``), and
    its unresolved alerts by condition (``AlertEngine.open``)."""

    @property
    def open(self) -> Mapping[Key, Alert]: ...

    def raise_now(self, obs: Observation) -> Alert: ...


@dataclass(slots=True)
class _Stay:
    serial: str
    since_ms: int
    max_temp: float | None = None
    max_rise: float | None = None
    ref_temp: float | None = None  # the reading a rise is measured from
    ref_ms: int = 0
    flagged_here: bool = False  # a safety event here flagged it, in this stay


@dataclass(frozen=True, slots=True)
class Flag:
    at_ms: int | None
    reason: str | None


def _max(a: float | None, b: float | None) -> float | None:
    """The larger of two maxima, either unknown (None)."""
    if a is None:
        return b
    return a if b is None else max(a, b)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def valid_serial(serial: str) -> bool:
    return _SERIAL.match(serial) is not None


class PassportMetrics:
    """The passports' counters: one set per process (the partitions of a worker share it,
    so a partition that moves to another worker does not take its counts along)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        self.refused = Counter(
            "chargewatch_battery_serials_refused",
            "Serials from devices not indexed (not 1-64 printable characters)",
            registry=r,
        )
        self.flagged = Counter(
            "chargewatch_batteries_flagged", "Packs flagged by a safety event", registry=r
        )
        self.locks = Counter(
            "chargewatch_battery_locks",
            "lock_battery commands for flagged packs, by outcome",
            ["outcome"],
            registry=r,
        )
        self.write_errors = Counter(
            "chargewatch_passport_write_errors", "Failed passport writes (retried)", registry=r
        )


class Passports:
    def __init__(
        self,
        store: PassportStore,
        catalog: Catalog,
        *,
        lock_flagged: bool = True,
        clock: Callable[[], int] = now_ms,
        registry: CollectorRegistry | None = None,
        metrics: PassportMetrics | None = None,
        devices: Collection[str] | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.lock_flagged = lock_flagged
        self.clock = clock
        self.alerts: AlertRaiser | None = None
        self.sender: CommandSender | None = None  # wired by the integration (remote commands)
        # called with a cabinet's device id when a pack in it was flagged or cleared
        self.on_flag_change: list[Callable[[str], None]] = []
        self.flagged: dict[str, Flag] = {}
        self._slots: dict[tuple[str, int], _Stay] = {}  # occupant of each slot
        self._where: dict[str, tuple[str, int]] = {}  # slot of each placed serial
        self._first_seen: dict[str, int] = {}  # serials new since the last write
        self._ops = PassportOps()
        self._wake = asyncio.Event()
        # the cabinets whose slots this index keeps (None: the catalog's; a partition's own)
        self.devices = None if devices is None else set(devices)
        # flags made here and not known to be written yet, and the flush that wrote each
        # (``adopt_flags`` keeps those a reload read before they were written)
        self._unwritten: set[str] = set()
        self._written_in: dict[str, int] = {}
        self.flushes = 0  # flushes done (the mark of ``adopt_flags``)
        # False until ``announce_flagged`` runs, when an owner sets it so (a partition's index
        # adopts flags while its alert engine is still loading): the flags are adopted, and
        # announced by ``announce_flagged`` with the engine there
        self.announcing = True
        self._writing: asyncio.Future[None] | None = None  # the write under way, or the last
        self._flushing = asyncio.Lock()
        m = metrics or PassportMetrics(registry)
        self.m_refused, self.m_flagged = m.refused, m.flagged
        self.m_locks, self.m_write_errors = m.locks, m.write_errors

    def restore(self) -> None:
        """Blocking: the flagged serials and the packs in slots, as stored."""
        restored = self.store.restore(self.devices)
        self.flagged.clear()  # in place: the alert engine holds this mapping
        self.flagged.update((s, Flag(at, why)) for s, (at, why) in restored.flagged.items())
        for serial, device_id, slot, since, max_temp, max_rise in restored.placed:
            if device_id in self.catalog.devices and self._keeps(device_id):
                stay = _Stay(serial, since, max_temp, max_rise)
                stay.flagged_here = serial in restored.flagged_here
                self._slots[(device_id, slot)] = stay
                self._where[serial] = (device_id, slot)

    def _keeps(self, device_id: str) -> bool:
        return self.devices is None or device_id in self.devices

    # -- reading -------------------------------------------------------------------------

    def occupant(self, device_id: str, slot: int) -> str | None:
        stay = self._slots.get((device_id, slot))
        return stay.serial if stay is not None else None

    # -- the pipeline's observer ---------------------------------------------------------

    def observe(self, twin: Twin, msg: Message, received_ms: int) -> None:
        """Pipeline observer: one applied message, after its batch is durable. Runs before
        the alert engine's, so an alert that a status opens finds its pack in the slot."""
        if twin.kind != "cabinet":
            return
        if isinstance(msg, CabinetStatus):
            for slot in msg.slots:
                key = (twin.device_id, slot.n)
                stay = self._slots.get(key)
                serial = slot.battery
                if serial is None or not valid_serial(serial):
                    if serial is not None:
                        self.m_refused.inc()
                    if stay is not None:
                        self._leave(key, stay, received_ms)
                    continue
                if stay is None or stay.serial != serial:
                    stay = self._arrive(twin, key, serial, received_ms)
                if slot.temp_c is not None:
                    self._reading(stay, slot.temp_c, received_ms)
        elif isinstance(msg, Event) and msg.type == "swap":
            if msg.slot_out is not None and msg.battery_out is not None:
                key = (twin.device_id, msg.slot_out)
                stay = self._slots.get(key)
                if stay is not None and stay.serial == msg.battery_out:
                    self._leave(key, stay, received_ms)
            if msg.slot_in is not None and msg.battery_in is not None:
                if not valid_serial(msg.battery_in):
                    self.m_refused.inc()
                    return
                key = (twin.device_id, msg.slot_in)
                stay = self._slots.get(key)
                if stay is None or stay.serial != msg.battery_in:
                    self._arrive(twin, key, msg.battery_in, received_ms)

    def _reading(self, stay: _Stay, temp: float, at_ms: int) -> None:
        if not (math.isfinite(temp) and TEMP_RANGE_C[0] <= temp <= TEMP_RANGE_C[1]):
            return
        changed = False
        if stay.max_temp is None or temp > stay.max_temp:
            stay.max_temp = temp
            changed = True
        if stay.ref_temp is None:
            stay.ref_temp, stay.ref_ms = temp, at_ms
        elif at_ms - stay.ref_ms >= RISE_SPAN_MS:
            rise = round((temp - stay.ref_temp) * 60_000 / (at_ms - stay.ref_ms), 3)
            stay.ref_temp, stay.ref_ms = temp, at_ms
            if rise > 0 and (stay.max_rise is None or rise > stay.max_rise):
                stay.max_rise = rise
                changed = True
        if changed:
            self._dirty(stay.serial)

    def _leave(self, key: tuple[str, int], stay: _Stay, at_ms: int) -> None:
        del self._slots[key]
        if self._where.get(stay.serial) == key:
            del self._where[stay.serial]
        self._ops.closed.append((at_ms, stay.serial, key[0], key[1], stay.since_ms))
        self._dirty(stay.serial)

    def _arrive(self, twin: Twin, key: tuple[str, int], serial: str, at_ms: int) -> _Stay:
        old = self._slots.get(key)
        if old is not None:
            self._leave(key, old, at_ms)
        before = self._where.get(serial)
        if before is not None:  # it moved without a swap out (or that was lost)
            self._leave(before, self._slots[before], at_ms)
        stay = self._slots[key] = _Stay(serial, at_ms)
        self._where[serial] = key
        self._first_seen.setdefault(serial, at_ms)
        self._ops.opened.append((serial, key[0], key[1], at_ms))
        self._dirty(serial)
        if serial in self.flagged:
            self._flagged_appears(twin.station_id, key, serial, at_ms)
        return stay

    def _flagged_appears(
        self, station_id: str, key: tuple[str, int], serial: str, at_ms: int
    ) -> None:
        device_id, slot = key
        flag = self.flagged[serial]
        info = f"flagged battery {serial} in slot {slot}"
        if flag.reason:
            info += f" (flagged for {flag.reason})"
        alert_id = None
        if self.alerts is not None:
            obs = Observation(
                Key(station_id, device_id, slot, "flagged_battery", serial),
                "critical",
                info=info,
                auto_resolve=False,
            )
            alert_id = self.alerts.raise_now(obs).id
        else:
            log.warning("%s at %s: alerts are disabled, no alert opened", info, device_id)
        self._ops.events.append((serial, APPEARED, alert_id, at_ms, device_id, slot, info))
        self._lock(device_id, slot, f"flagged battery {serial}")
        for callback in self.on_flag_change:
            callback(device_id)

    def _lock(self, device_id: str, slot: int, reason: str) -> None:
        if not self.lock_flagged:
            self.m_locks.labels("disabled").inc()
            return
        if self.sender is None:
            self.m_locks.labels("unsent").inc()
            log.warning(
                "lock_battery %s slot %d (%s): no command sender, not sent",
                device_id,
                slot,
                reason,
            )
            return
        try:
            self.sender.send_lock_battery(device_id, slot, reason)
        except Exception:
            self.m_locks.labels("failed").inc()
            log.exception("lock_battery %s slot %d failed", device_id, slot)
        else:
            self.m_locks.labels("sent").inc()

    def _dirty(self, serial: str) -> None:
        where = self._where.get(serial)
        stay = self._slots.get(where) if where is not None else None
        first = self._first_seen.get(serial, stay.since_ms if stay else self.clock())
        pending = self._ops.batteries.get(serial)
        self._ops.batteries[serial] = (
            first,
            where[0] if where else None,
            where[1] if where else None,
            stay.since_ms if stay else None,
            _max(pending[4] if pending else None, stay.max_temp if stay else None),
            _max(pending[5] if pending else None, stay.max_rise if stay else None),
        )
        self._wake.set()

    # -- the alert engine's hook ---------------------------------------------------------

    async def reconcile(self, open_alerts: list[Alert], twins: Mapping[str, Twin]) -> int:
        """At start: a safety alert still open whose event never reached the passports (a
        crash within a write period after it opened: the alert store saved the alert, so it
        will not open again) flags the packs its slots hold, as it would have. The packs are
        read from the restored twins' statuses, which are durable with each ingest batch
        (the passports' own record of the slots may have been lost with the flag). An event
        already recorded is left alone: a maintainer's clearance stands. Returns how many
        alerts were taken up again."""
        ids = [a.id for a in open_alerts if a.device_id is not None]
        recorded = await asyncio.to_thread(self.store.alerts_recorded, ids)
        taken = 0
        for alert in open_alerts:
            twin = twins.get(alert.device_id) if alert.device_id is not None else None
            status = twin.status if twin is not None else None
            if not isinstance(status, CabinetStatus):
                continue
            held = {(twin.device_id, s.n): s.battery for s in status.slots if s.battery}  # type: ignore[union-attr]
            packs = [(key, held[key]) for key in self._keys(alert, held) if key in held]
            if packs and not any((serial, alert.id) in recorded for _, serial in packs):
                self._record(alert, packs)
                taken += 1
        return taken

    @staticmethod
    def _keys(alert: Alert, slots: Collection[tuple[str, int]]) -> list[tuple[str, int]]:
        """The slots a safety alert concerns, among ``slots`` (those holding a pack)."""
        if alert.device_id is None:
            return []
        if alert.rule == "fault" and alert.code in CABINET_FAULTS:
            return sorted(k for k in slots if k[0] == alert.device_id)
        if alert.unit is not None and (
            alert.rule in SLOT_RULES or (alert.rule == "fault" and alert.code in SLOT_FAULTS)
        ):
            key = (alert.device_id, alert.unit)
            return [key] if key in slots else []
        return []

    def alert_opened(self, alert: Alert) -> None:
        """``AlertEngine.on_opened``: a safety alert flags the packs where it opened."""
        keys = self._keys(alert, self._slots)
        if keys:
            self._record(alert, [(key, self._slots[key].serial) for key in keys])

    def _record(self, alert: Alert, packs: list[tuple[tuple[str, int], str]]) -> None:
        kind = alert.code if alert.rule == "fault" else alert.rule
        at = alert.opened_at_ms
        detail = None if alert.last_value is None else f"{alert.last_value:g}"
        for key, serial in packs:
            self._ops.events.append((serial, kind, alert.id, at, key[0], key[1], detail))
            stay = self._slots.get(key)
            if stay is not None and stay.serial == serial:
                stay.flagged_here = True  # announced by this alert, locked below
            if serial not in self.flagged:
                self.flagged[serial] = Flag(at, kind)
                self.m_flagged.inc()
                self._dirty(serial)
                self._ops.flags.append((at, kind, serial))
                self._unwritten.add(serial)
                self._lock(key[0], key[1], f"battery {serial}: {kind}")
                for callback in self.on_flag_change:
                    callback(key[0])
        self._wake.set()

    # -- maintainers ---------------------------------------------------------------------

    async def clear(self, serial: str, actor_id: str, actor_name: str, note: str) -> bool:
        """Clear the flag (False: not flagged). The pack's next safety event flags it again."""
        await self.flush()
        cleared = await asyncio.to_thread(
            self.store.clear, serial, self.clock(), actor_id, actor_name, note
        )
        if self.flagged.pop(serial, None) is not None or cleared:
            self._flag_changed(serial)
        return cleared

    # -- the other partitions' flags (ingest.worker_passports) ------------------------------

    def adopt_flags(
        self,
        stored: Mapping[str, Flag],
        mark: int,
        last_stays: Mapping[str, tuple[str, int, int]] | None = None,
    ) -> None:
        """The flagged packs as the database had them when a read began (``mark``: our
        ``flushes`` then): flags raised in other partitions are ours too, and flags cleared
        by a maintainer (on any replica) are gone. A flag this index raised itself is kept
        when that read could not see it yet (written after ``mark``, or not yet).

        A pack newly known as flagged that sits in one of our slots is announced there
        (``announce_flagged``'s invariant): ``flagged_battery`` and ``lock_battery``, unless
        its alert there is unresolved already. Whether it arrived before or after its flag
        does not matter (carried here from the cabinet where it overheated before the flag's
        notice; or here already when another partition, whose cabinet had not yet reported
        it gone, flagged it there). One exception, our stale view: ``last_stays`` (the
        pack's latest stay as the same read saw it, in any partition) shows it in another
        slot since after it came to ours: it left without our cabinet saying so yet, and its
        cabinet now is the one that announces it; ours would lock a slot it is not in."""
        for serial in [s for s in self.flagged if s not in stored]:
            if serial in self._unwritten or self._written_in.get(serial, -1) > mark:
                continue
            del self.flagged[serial]
            log.info("battery %s: its flag was cleared", serial)
            self._flag_changed(serial)
        for serial, flag in stored.items():
            if serial in self.flagged:
                continue
            self.flagged[serial] = flag
            where = self._where.get(serial)
            stay = self._slots.get(where) if where is not None else None
            if where is None or stay is None:
                continue
            last = last_stays.get(serial) if last_stays is not None else None
            if last is not None and last[:2] != where and last[2] > stay.since_ms:
                log.info(
                    "battery %s: flagged; last seen in %s slot %d, not in %s slot %d",
                    serial, last[0], last[1], where[0], where[1],
                )  # fmt: skip
                continue
            if self.announcing:
                self._announce(where, stay)
        self._written_in = {s: n for s, n in self._written_in.items() if n > mark}

    def announce_flagged(self) -> int:
        """The invariant, at a partition's load (after ``restore``, the alert engine's
        unresolved alerts loaded and ``reconcile``) and for each flag ``adopt_flags`` learns:
        every slot of ours that holds a flagged pack has an unresolved ``flagged_battery``
        alert for that cabinet, slot and serial, or the pack was flagged there, in this stay,
        by a safety event (its own alert at that slot announced it, and locked it). One that
        has neither opens now, and the slot is locked, as when it arrived: a pack flagged
        after it arrived here, or whose arrival a previous owner (a worker that died before
        the flag's notice) or a crash never announced. One that has one gets no second.
        Without an alert engine nothing is done: nothing could tell what was announced
        already, and each start would lock every slot again. Returns how many opened."""
        self.announcing = True  # from now on ``adopt_flags`` announces what it learns
        if self.alerts is None:
            return 0
        opened = 0
        for key, stay in list(self._slots.items()):
            if stay.serial in self.flagged and self._announce(key, stay):
                opened += 1
        return opened

    def _announce(self, key: tuple[str, int], stay: _Stay) -> bool:
        """``flagged_battery`` and the lock for the flagged pack of ``stay`` at ``key``,
        unless announced already (``announce_flagged``). True if it was announced now."""
        device = self.catalog.devices.get(key[0])
        if stay.flagged_here or device is None:
            return False
        if self.alerts is not None:
            alert_key = Key(device.station_id, key[0], key[1], "flagged_battery", stay.serial)
            if alert_key in self.alerts.open:
                return False
        self._flagged_appears(device.station_id, key, stay.serial, self.clock())
        self._wake.set()
        return True

    def _flag_changed(self, serial: str) -> None:
        """A flag gone (cleared): a next one is announced anew, wherever the pack is."""
        where = self._where.get(serial)
        if where is not None:
            stay = self._slots.get(where)
            if stay is not None:
                stay.flagged_here = False
            for callback in self.on_flag_change:
                callback(where[0])

    # -- writing -------------------------------------------------------------------------

    async def run(self) -> None:
        """The writer task (supervised): pending operations to disk in batches."""
        delay = WRITE_EVERY_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except StoreError:  # logged and kept: retried with what comes meanwhile
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                delay = WRITE_EVERY_S
            await asyncio.sleep(delay)

    async def flush(self) -> None:
        """Write what is pending now; on failure it stays pending (retried, counted). A
        flush cancelled while its thread writes (the writer task stopped) lets that write
        finish on its own; the next flush waits for it first, so writes never overlap and
        the store is closed only once none is under way. One flush at a time: a flush that
        returns has written everything pending when it was called (the writer task's
        included)."""
        async with self._flushing:
            if self._writing is not None:
                await asyncio.gather(self._writing, return_exceptions=True)
            ops, self._ops = self._ops, PassportOps()
            self._first_seen.clear()
            if not len(ops):
                return
            self._writing = asyncio.ensure_future(self._write(ops))
            self._writing.add_done_callback(_retrieved)
            await asyncio.shield(self._writing)

    async def _write(self, ops: PassportOps) -> None:
        try:
            await asyncio.to_thread(self.store.apply, ops)
        except StoreError:
            self.m_write_errors.inc()
            log.exception("passport write failed (%d operations kept)", len(ops))
            ops.merge(self._ops)
            self._ops = ops
            if len(ops.opened) + len(ops.closed) + len(ops.events) > PENDING_MAX:
                del ops.opened[: len(ops.opened) // 2]
                del ops.closed[: len(ops.closed) // 2]
            self._wake.set()
            raise
        self.flushes += 1
        again = {f[2] for f in self._ops.flags}  # flagged anew since (cleared meanwhile)
        for _, _, serial in ops.flags:
            if serial not in again:
                self._unwritten.discard(serial)
            self._written_in[serial] = self.flushes


def _retrieved(write: asyncio.Future[None]) -> None:
    """A write's failure is logged and kept pending by ``_write``: not an unretrieved error
    when the flush that started it was cancelled."""
    if not write.cancelled():
        write.exception()
