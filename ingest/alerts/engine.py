"""The alert engine: rules -> one alert per condition -> lifecycle -> store, stream, webhooks.

Runs on the ingest loop. ``observe`` is a ``Pipeline.observers`` callback (after each
batch is durable); a timer task checks absences, verification windows and escalation. All
state changes happen synchronously on the loop; a writer task persists them in batches
(``flush`` waits for it), the change stream fans them out to SSE subscribers, and the
notifier queues webhooks. Nothing here blocks ingest.

Exceptions::

    AlertError          (ValueError)
    ├── AlertNotFound   no alert with that id
    └── AlertConflict   the alert's state does not allow the change (e.g. already resolved)
    StoreError (ingest)
    └── AlertStoreBusy  the alert store did not take the changes in time

A partition's engine in an ingest worker (issue 13; ``ingest.worker_alerts``) writes under
the partition's lease epoch (``fence``): once another worker took the partition, its
changes are dropped with a warning, and every ``flush`` after that raises ``StoreError``
(``ingest.leases.not_saved``), so a maintainer's or a rider's action it was applying
(``ingest.actions``) is answered 503, never as saved. ``serve`` has no fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import Any, Self
from zoneinfo import ZoneInfo

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from devices.catalog import Catalog
from devices.contract import ContractError, Message, decode
from devices.faults import Severity
from ingest import StoreError, StoreUnavailable
from ingest.alerts.config import AlertsConfig
from ingest.alerts.ids import AlertIds
from ingest.alerts.model import (  # the errors and records are the model's, named here too
    REPORT_CATEGORIES,
    SERVICE_STATION,
    SEVERITY_RANK,
    Alert,
    AlertConflict,
    AlertNotFound,
    AlertQuery,
    Key,
    Observation,
    StreamEvent,
    alert_view,
    rfc3339,
)
from ingest.alerts.notify import Notifier
from ingest.alerts.rules import (
    DeviceMemory,
    StationMemory,
    device_conditions,
    next_change_ms,
    observe,
    station_conditions,
)
from ingest.alerts.store import AlertStore, Ops, journal_range
from ingest.leases import StaleLease, not_saved
from ingest.pipeline import Twins
from ingest.supervisor import Supervisor
from ingest.twins import Twin

log = logging.getLogger(__name__)

SYSTEM = "chargewatch"
TICK_SLICE = 500
"""Devices the timer's pass evaluates before it lets the event loop run (~3-5 ms of CPU)."""


class AlertStoreBusy(StoreError):
    """The alert store did not take the changes in time (an outage, a dead writer)."""


REQUEST_FLUSH_S = 10.0
"""How long a maintainer's or a rider's request waits for the alert store before a 503."""
WRITER = "alerts:writer"
TIMER = "alerts:timer"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class AlertEngine:
    def __init__(
        self,
        config: AlertsConfig,
        catalog: Catalog,
        twins: Twins,
        store: AlertStore,
        *,
        clock: Callable[[], int] = _now_ms,
        registry: CollectorRegistry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        supervisor: Supervisor | None = None,
        stations: Collection[str] | None = None,
        partition: int = 0,
        ids: AlertIds | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        # a partition's engine (ingest.partition_consumer): only these stations' alerts,
        # the partition's event journal, ids from PostgreSQL's sequences, the worker's
        # notifier (entered and left by the worker), and no alerts of the service itself
        # (a worker says what is wrong with it on /metrics and in its log)
        self.stations = frozenset(stations) if stations is not None else None
        self.partition = partition
        self.ids = ids
        self._own_notifier = notifier is None
        # (partition, epoch): the alert writes of a partition's engine are fenced like its
        # batches; once the lease moved, what is left unwritten is dropped (the next owner
        # judges the partition's devices again from what was stored), and ``lost`` says so:
        # from then on ``flush`` raises, so no request is answered as saved
        self.fence: tuple[int, int] | None = None
        self.lost: StaleLease | None = None
        # the service's supervisor (its tasks' deaths fail /readyz and raise alerts here);
        # an engine of its own has one of its own, entered and left with the engine
        self._own_supervisor = supervisor is None
        self.supervisor = supervisor or Supervisor()
        self.catalog = catalog
        self.twins = twins
        # each device's twin as of the last message this engine observed (at first: as
        # restored). The pipeline applies a batch to the live twins before the batch is
        # durable and observed; the timer judges devices by what the rules have seen, or an
        # alert would open on a later message, clear on an earlier one, and open again.
        self.seen: dict[str, Twin] = {d: t.snapshot() for d, t in twins.by_id.items()}
        self.store = store
        self.clock = clock
        self.tz = ZoneInfo(catalog.data.district.timezone)
        self.notifier = notifier or Notifier(
            store, config.webhooks, transport=transport, supervisor=self.supervisor, catalog=catalog
        )
        self.open: dict[Key, Alert] = {}  # unresolved alerts by condition
        self.by_id: dict[int, Alert] = {}  # unresolved alerts by id
        self._memory: dict[str, DeviceMemory] = {}
        self._device_active: dict[str, dict[Key, Observation]] = {}
        # per device, when the clock alone could next change its conditions: the timer's
        # pass skips a device with nothing active until then (rules.next_change_ms)
        self._due: dict[str, int] = {}
        self._station_active: dict[str, dict[Key, Observation]] = {}
        self._station_memory: dict[str, StationMemory] = {}
        self._hold: list[Alert] = []  # offline alerts waiting one tick for station grouping
        # service-level checks (the ingest watchdog, the store): what is wrong now, or None
        self.stall_check: Callable[[int], str | None] | None = None
        self.store_check: Callable[[int], str | None] | None = None
        # service-level happenings that stay until a maintainer resolves them (a lost
        # broker session): raised on the next tick (``raise_service_event``)
        self._service_events: list[Observation] = []
        # the disk filling up (ingest.diskusage): a warning days before it is full
        self.disk_check: Callable[[int], str | None] | None = None
        # called with each alert as it resolves, on the loop (work orders: -> fixed)
        self.on_resolved: list[Callable[[Alert], None]] = []
        self._disk_active: dict[Key, Observation] = {}
        self._service_active: dict[Key, Observation] = {}
        self._next_alert = 1
        self._next_event = 1
        # called with every alert just opened (battery passports flag the packs at its slot)
        self.on_opened: list[Callable[[Alert], None]] = []
        # serials of flagged packs (battery passports): never a ready battery for a station
        self.flagged_batteries: Collection[str] = frozenset()
        self._ops = Ops()
        self._queued = 0
        self._written = 0
        self._wake = asyncio.Event()
        self._written_cond = asyncio.Condition()
        self._subscribers: set[asyncio.Queue[StreamEvent | None]] = set()
        self._started_ms = 0
        self.store_healthy = True
        r = registry or CollectorRegistry()
        self.m_opened = Counter(
            "chargewatch_alerts_opened", "Alerts opened", ["severity", "rule"], registry=r
        )
        self.m_active = Gauge("chargewatch_alerts_active", "Unresolved alerts", registry=r)
        self.m_webhooks = Counter(
            "chargewatch_webhook_deliveries", "Webhook deliveries by result", ["result"], registry=r
        )
        self.m_refused = Counter(
            "chargewatch_alert_writes_refused",
            "Alert changes the alert store refused for good (dropped, logged)",
            registry=r,
        )
        self.m_failing = Gauge(
            "chargewatch_webhooks_failing", "Webhook subscriptions marked failing", registry=r
        )
        self.m_failing.set_function(
            lambda: sum(1 for s in self.notifier.subscriptions.values() if s.failing)
        )
        if self._own_notifier:
            self.notifier.on_result.append(self._delivery_done)
        Gauge(
            "chargewatch_webhook_pending", "Webhook deliveries waiting or in flight", registry=r
        ).set_function(lambda: self.notifier.pending_count)

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        active = await asyncio.to_thread(self.store.load_active, self.stations)
        if self.ids is None:
            self._next_alert, self._next_event = await asyncio.to_thread(self.store.next_ids)
        else:
            await self.ids.top_up()
        for alert in active:
            self.open[alert.key] = alert
            self.by_id[alert.id] = alert
            if alert.auto_resolve and alert.clearing_since_ms is None:
                obs = Observation(alert.key, alert.severity)  # type: ignore[arg-type]
                scope = (
                    self._device_active.setdefault(alert.device_id, {})
                    if alert.device_id is not None
                    else self._station_active.setdefault(alert.station_id, {})
                )
                scope[alert.key] = obs
                self._remember(alert)
        self.m_active.set(len(self.by_id))
        if self._own_supervisor:
            await self.supervisor.__aenter__()
        try:
            if self._own_notifier:
                await self.notifier.__aenter__()
        except BaseException:
            if self._own_supervisor:
                await self.supervisor.__aexit__(None, None, None)
            raise
        try:
            self._started_ms = self.clock()
            self.supervisor.start(WRITER, self._writer)
            self.supervisor.start(TIMER, self._ticker)
            replayed = await self._replay_unobserved()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        log.info("alerts: %d unresolved restored, %d events replayed", len(active), replayed)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.supervisor.stop(TIMER)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.flush()
        await self.supervisor.stop(WRITER)
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        try:
            if self._own_notifier:
                await self.notifier.__aexit__(et, e, tb)
        finally:
            if self._own_supervisor:
                await self.supervisor.__aexit__(et, e, tb)

    def _remember(self, alert: Alert) -> None:
        """The rules' memory behind an unresolved alert restored from the store (a restart,
        or a partition taken over from another worker): a fault an event raised is active
        until an event clears it or a status no longer lists it; without this, the first
        evaluation would find it gone and resolve the alert although the device still has
        it. A door's opening time likewise, for ``door_open_long``."""
        if alert.device_id is None:
            return
        if alert.rule == "fault":
            mem = self._device_memory(alert.device_id)
            fault = (alert.code, alert.unit)
            mem.event_faults.setdefault(fault, alert.last_value)
            mem.fault_values.setdefault(fault, alert.last_value)
        elif alert.rule == "door_open_long":
            mem, twin = self._device_memory(alert.device_id), self.seen.get(alert.device_id)
            if mem.door_open_since is None and twin is not None:  # opened that long before
                long_ms = int(self.config.limits(twin.kind).door_open_s * 1000)
                mem.door_open_since = alert.opened_at_ms - long_ms

    # -- inputs ------------------------------------------------------------------------

    async def _replay_unobserved(self) -> int:
        """Observe again the events that were stored but whose alert effects never became
        durable (a stop or a crash between the batch's commit and the alert writer's): the
        rules see them now, against the restored twins, so no fault or door alert is lost."""
        pending = await asyncio.to_thread(self.store.unobserved, self.partition)
        last = 0
        for journal_id, device_id, received_ms, payload in pending:
            last = journal_id
            twin = self.seen.get(device_id)
            if twin is None:
                continue  # no longer in the catalog
            try:
                msg = decode("event", payload.encode())
            except ContractError as exc:  # stored by an older contract: nothing to judge
                log.warning("alerts: cannot replay %s's event: %s", device_id, exc)
                continue
            self.observe(twin, msg, received_ms)
        if last:
            self.observed_through(last)
        return len(pending)

    def observed_through(self, journal_id: int) -> None:
        """Pipeline hook: every journaled event up to ``journal_id`` has been observed; its
        journal entries go with the next write of the alert effects, in one transaction."""
        self._ops.unobserved_through = max(self._ops.unobserved_through, journal_id)
        self._ops.unobserved_from = journal_range(self.partition)[0]
        self._queued += 1
        self._wake.set()

    def task_failed(self, task: str, reason: str) -> None:
        """Supervisor hook: a task of the service died. A critical alert that a maintainer
        closes (a death is a bug to look at, even when the restart worked)."""
        key = Key(SERVICE_STATION, None, None, "task_failed", task)
        info = f"task {task} died: {reason}"
        self._raise(Observation(key, "critical", info=info, auto_resolve=False), self.clock())

    def observe(self, twin: Twin, msg: Message, received_ms: int) -> None:
        """Pipeline observer: one applied message, after its batch is durable."""
        self.seen[twin.device_id] = twin
        mem = self._device_memory(twin.device_id)
        raised = observe(mem, twin, msg, received_ms, self.config)
        self._evaluate_device(twin, mem, self.clock(), raised)

    def tick(self) -> None:
        """Absences, verification windows and escalation: one whole pass (the timer makes the
        same pass in slices, ``_tick_in_slices``)."""
        for _ in self.tick_steps():
            pass

    async def _tick_in_slices(self) -> None:
        """The timer's pass, giving the event loop back every ``TICK_SLICE`` devices: every
        device costs ~5-8 us, so one pass over 50,000 of them held the loop (API requests,
        ingest) ~400 ms; in slices, nothing waits longer than ~5 ms."""
        for _ in self.tick_steps():
            await asyncio.sleep(0)

    def tick_steps(self) -> Iterator[None]:
        """The pass as a generator that stops after every ``TICK_SLICE`` devices. Between
        steps ``observe`` may run: each device is read from ``seen`` when its turn comes (a
        snapshot taken before the pass could be older than what ``observe`` judged)."""
        now = self.clock()
        if now - self._started_ms >= self.config.startup_grace_s * 1000:
            for i, device_id in enumerate(list(self.seen)):
                if i and i % TICK_SLICE == 0:
                    yield
                    now = self.clock()
                twin = self.seen[device_id]
                if twin.last_seen_ms is None:
                    continue
                if not self._device_active.get(device_id) and self._due.get(device_id, 0) > now:
                    continue  # nothing active, and nothing the clock can change yet
                self._evaluate_device(twin, self._device_memory(device_id), now, [])
            weight = 0  # a station costs about as much as evaluating its devices
            for station in self.catalog.stations.values():
                if self.stations is not None and station.id not in self.stations:
                    continue
                if weight >= TICK_SLICE:
                    yield
                    now, weight = self.clock(), 0
                self._evaluate_station(station.id, now)
                weight += len(station.devices)
            if self.stations is None:
                self._evaluate_service(now)
                self._evaluate_disk(now)
        held, self._hold = self._hold, []
        for alert in held:
            if alert.active and not alert.suppressed:
                self._notify("opened", alert)
        verify_ms = self.config.verify_s * 1000
        for alert in list(self.by_id.values()):
            if alert.clearing_since_ms is not None and now - alert.clearing_since_ms >= verify_ms:
                self._resolve(alert, now, how="auto", by=SYSTEM)
            elif alert.status == "open" and not alert.suppressed:
                self._maybe_escalate(alert, now)

    # -- evaluation --------------------------------------------------------------------

    def _device_memory(self, device_id: str) -> DeviceMemory:
        # not ``setdefault(id, DeviceMemory())``: that builds a DeviceMemory on every call
        mem = self._memory.get(device_id)
        if mem is None:
            mem = self._memory[device_id] = DeviceMemory()
        return mem

    def _evaluate_device(
        self, twin: Twin, mem: DeviceMemory, now: int, raised: list[tuple[str, int | None]]
    ) -> None:
        found, frozen = device_conditions(twin, mem, now, self.config)
        before = self._device_active.get(twin.device_id, {})
        if frozen:  # offline: keep everything else as it was, neither opened nor resolved
            found = {**{k: v for k, v in before.items() if k.rule != "offline"}, **found}
        self._device_active[twin.device_id] = found
        self._due[twin.device_id] = next_change_ms(twin, mem, self.config)
        if found or before:  # the common case, nothing active now nor before: nothing to do
            self._diff(before, found, now, set(raised))

    def raise_now(self, obs: Observation) -> Alert:
        """Open (or count again) the alert of ``obs`` now: a happening another part of the
        service saw (a flagged battery appearing), not a condition the rules re-evaluate."""
        return self._raise(obs, self.clock())

    def raise_service_event(self, rule: str, severity: Severity, info: str) -> None:
        """A happening of the service itself that a maintainer must look at (it does not
        clear by itself): raised on the next tick as a manual alert, or counted again on
        the one still unresolved."""
        key = Key(SERVICE_STATION, None, None, rule, rule)
        self._service_events.append(Observation(key, severity, info=info, auto_resolve=False))

    def _evaluate_service(self, now: int) -> None:
        """The service's own conditions, alerts of station ``service``:

        - ``ingest_stalled``: connected, yet nothing arrives while devices should report.
          Every device looks quiet then, so this is the one alert that says why.
        - ``store_unavailable``: store writes fail or wait (database locked, disk full):
          nothing is acknowledged, and the broker's backlog grows. The alert store shares
          the file, so its own failing writes count too; the notification is published
          from memory, whether or not this alert can be stored.

        Both resolve once the condition is gone. Then the queued happenings
        (``raise_service_event``)."""
        found: dict[Key, Observation] = {}
        checks = (
            ("ingest_stalled", self.stall_check),
            ("store_unavailable", self._store_problem),
        )
        for rule, check in checks:
            problem = check(now) if check is not None else None
            if problem:
                key = Key(SERVICE_STATION, None, None, rule, rule)
                found[key] = Observation(key, "critical", info=problem)
        before, self._service_active = self._service_active, found
        self._diff(before, found, now, set())
        events, self._service_events = self._service_events, []
        for obs in events:
            self._raise(obs, now)

    def _store_problem(self, now: int) -> str | None:
        problem = self.store_check(now) if self.store_check is not None else None
        if problem is None and not self.store_healthy:
            problem = "alert store writes are failing (alerts are kept in memory meanwhile)"
        return problem

    def _evaluate_disk(self, now: int) -> None:
        problem = self.disk_check(now) if self.disk_check is not None else None
        key = Key(SERVICE_STATION, None, None, "disk_filling", "disk_filling")
        found = {key: Observation(key, "warning", info=problem)} if problem else {}
        before, self._disk_active = self._disk_active, found
        self._diff(before, found, now, set())

    def _evaluate_station(self, station_id: str, now: int) -> None:
        spec = self.catalog.stations[station_id]
        twins = [self.seen[d.id] for d in spec.devices]
        mem = self._station_memory.setdefault(station_id, StationMemory())
        found = station_conditions(
            spec, twins, mem, now, self.config, self.tz, self.flagged_batteries
        )
        before = self._station_active.get(station_id, {})
        self._station_active[station_id] = found
        self._diff(before, found, now, set())

    def _diff(
        self,
        before: dict[Key, Observation],
        now_active: dict[Key, Observation],
        now: int,
        repeats: set[tuple[str, int | None]],
    ) -> None:
        for key, obs in now_active.items():
            if key not in before:
                self._raise(obs, now)
            else:
                self._touch(obs, now, repeat=(key.code, key.unit) in repeats)
        for key in before.keys() - now_active.keys():
            self._clear(key, now)

    # -- transitions -------------------------------------------------------------------

    def _raise(self, obs: Observation, now: int) -> Alert:
        key = obs.key
        alert = self.open.get(key)
        if alert is not None:  # back within the verification window (or raised again)
            alert.clearing_since_ms = None
            alert.count += 1
            self._update(alert, obs, now)
            self._emit("repeated", alert, now)
            return alert
        unit_kind = None
        if key.unit is not None and key.device_id is not None:
            device = self.catalog.devices.get(key.device_id)
            unit_kind = "port" if device is not None and device.kind == "pile" else "slot"
        alert = Alert(
            id=self._new_alert_id(),
            rule=key.rule,
            code=key.code,
            severity=obs.severity,
            status="open",
            station_id=key.station_id,
            device_id=key.device_id,
            unit=key.unit,
            unit_kind=unit_kind,
            opened_at_ms=now,
            last_seen_at_ms=now,
            last_value=obs.value,
            info=obs.info,
            auto_resolve=obs.auto_resolve,
        )
        self.open[key] = alert
        self.by_id[alert.id] = alert
        self.m_opened.labels(alert.severity, alert.rule).inc()
        self.m_active.set(len(self.by_id))
        if key.rule == "offline":
            incident = self.open.get(
                Key(key.station_id, None, None, "station_offline", "station_offline")
            )
            if incident is not None:
                alert.parent_id, alert.suppressed = incident.id, True
        self._emit("opened", alert, now)
        for callback in self.on_opened:
            try:
                callback(alert)
            except Exception:  # a hook never stops an alert
                log.exception("on_opened %r failed", callback)
        if key.rule == "offline" and not alert.suppressed:
            self._hold.append(alert)  # one tick, so a station's losses can group
        elif key.rule == "station_offline":
            self._group(alert)
            self._notify("opened", alert)
        else:
            self._notify("opened", alert)
        return alert

    def _group(self, incident: Alert) -> None:
        for alert in self.by_id.values():
            if (
                alert.rule == "offline"
                and alert.station_id == incident.station_id
                and alert.parent_id is None
            ):
                alert.parent_id = incident.id
                alert.suppressed = not alert.notified
                self._save(alert)

    def _update(self, alert: Alert, obs: Observation, now: int) -> None:
        alert.last_seen_at_ms = now
        alert.last_value = obs.value
        alert.info = obs.info
        if SEVERITY_RANK[obs.severity] < SEVERITY_RANK[alert.severity]:  # type: ignore[index]
            alert.severity = obs.severity

    def _touch(self, obs: Observation, now: int, *, repeat: bool) -> None:
        alert = self.open.get(obs.key)
        if alert is None:
            self._raise(obs, now)
            return
        changed = alert.last_value != obs.value or now - alert.last_seen_at_ms >= 10_000
        self._update(alert, obs, now)
        if repeat:
            alert.count += 1
            self._emit("repeated", alert, now)
        elif changed:
            self._save(alert)

    def _clear(self, key: Key, now: int) -> None:
        alert = self.open.get(key)
        if alert is None or not alert.auto_resolve or alert.clearing_since_ms is not None:
            return
        alert.clearing_since_ms = now
        if self.config.verify_s <= 0:
            self._resolve(alert, now, how="auto", by=SYSTEM)
        else:
            self._emit("clearing", alert, now)

    def _resolve(self, alert: Alert, now: int, *, how: str, by: str) -> None:
        alert.status = "resolved"
        alert.resolved_at_ms = now
        alert.resolved_by = by
        alert.resolved_how = how
        self.open.pop(alert.key, None)
        self.by_id.pop(alert.id, None)
        self.m_active.set(len(self.by_id))
        # re-arm: a condition still present opens a new alert on the next evaluation
        scope = (
            self._device_active.get(alert.device_id, {})
            if alert.device_id is not None
            else self._station_active.get(alert.station_id, {})
        )
        scope.pop(alert.key, None)
        self._emit("resolved", alert, now)
        if alert.notified:
            self._notify("resolved", alert)
        for callback in self.on_resolved:
            try:
                callback(alert)
            except Exception:  # a follower's bug must not stop the lifecycle
                log.exception("alerts: on_resolved callback failed for alert %d", alert.id)
        if alert.rule == "station_offline":  # the incident is over: what is left stands alone
            for child in self.by_id.values():
                if child.parent_id == alert.id and child.suppressed:
                    child.suppressed = False
                    self._notify("opened", child)
                    self._save(child)

    def _maybe_escalate(self, alert: Alert, now: int) -> None:
        after = self.config.escalate_after_s(alert.severity)
        if after <= 0 or alert.escalation_level >= self.config.escalate_max:
            return
        if alert.clearing_since_ms is not None:
            return
        since = alert.escalated_at_ms or alert.opened_at_ms
        if now - since >= after * 1000:
            alert.escalation_level += 1
            alert.escalated_at_ms = now
            self._emit("escalated", alert, now)
            self._notify("escalated", alert)

    def _notify(self, event: str, alert: Alert) -> None:
        if alert.suppressed:
            return
        if event == "opened":
            if alert.notified:
                return
            alert.notified = True
            self._save(alert)
        self.notifier.publish(event, alert)

    # -- persistence and stream --------------------------------------------------------

    async def ids_top_up(self) -> None:
        """Reserve ahead the ids the next batch's observations may take (database ids)."""
        if self.ids is not None:
            await self.ids.top_up()

    def _new_alert_id(self) -> int:
        if self.ids is not None:
            return self.ids.alerts.take()
        self._next_alert += 1
        return self._next_alert - 1

    def _new_event_id(self) -> int:
        if self.ids is not None:
            event_id = self.ids.events.take()
            self._next_event = max(self._next_event, event_id + 1)
            return event_id
        self._next_event += 1
        return self._next_event - 1

    def _save(self, alert: Alert) -> None:
        self._ops.alerts[alert.id] = alert.record()
        self._queued += 1
        self._wake.set()

    def _emit(
        self, type_: str, alert: Alert, now: int, extra: dict[str, Any] | None = None
    ) -> StreamEvent:
        event_id = self._new_event_id()
        body = {"event_id": event_id, "type": type_, "at": rfc3339(now), "alert": alert_view(alert)}
        if extra:
            body.update(extra)
        event = StreamEvent(event_id, type_, json.dumps(body, separators=(",", ":")))
        self._ops.events.append((event_id, alert.id, type_, now, event.data))
        self._save(alert)
        for queue in list(self._subscribers):
            if queue.qsize() >= 10_000:  # a stuck client: end its stream; it resumes by id
                self._subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(event)
        return event

    async def _writer(self) -> None:
        """Persist the queued changes in batches. A store that cannot write now is retried
        with backoff; a batch the store refuses for good (a bug, a value out of range) is
        written piece by piece, and only the pieces refused are dropped, loudly."""
        delay = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            ops, self._ops = self._ops, Ops()
            queued = self._queued
            while True:
                try:
                    await asyncio.to_thread(
                        self.store.apply, ops, self.config.events_kept, self.fence
                    )
                    self.store_healthy, delay = True, 0.2
                    break
                except StaleLease as exc:  # the next owner has the partition's alerts
                    log.warning("alerts: %s; %d changes not written", exc, len(ops))
                    self.lost = exc
                    break
                except StoreUnavailable as exc:
                    self.store_healthy = False
                    log.error("alerts: store write failed (%s); retrying in %.1fs", exc, delay)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 30.0)
                except Exception as exc:
                    log.exception("alerts: the store refused a batch (%s); writing it apart", exc)
                    ops = await asyncio.to_thread(self._refused_apart, ops)
                    if not ops:
                        break
            async with self._written_cond:
                self._written = queued
                self._written_cond.notify_all()

    def _refused_apart(self, ops: Ops) -> Ops:
        """Apply ``ops`` one piece at a time (in a worker thread); returns what is left to
        retry because the store was unavailable, dropping what it refuses."""
        retry = Ops()
        for piece in ops.pieces():
            try:
                self.store.apply(piece, self.config.events_kept, self.fence)
            except StoreUnavailable:
                retry.merge(piece)
            except Exception:
                self.m_refused.inc()
                log.exception("alerts: the store refused %r; dropped", piece)
        return retry

    async def flush(self, timeout_s: float | None = None) -> None:
        """Return once every change made so far is in the store. With ``timeout_s``, raise
        AlertStoreBusy when that takes longer (a store outage, a dead writer): a request
        must get an answer, not hang. Raise ``StoreError`` when the partition moved
        (``lost``): the changes were dropped, and this engine's memory is no longer what
        is stored."""
        target = self._queued
        try:
            async with asyncio.timeout(timeout_s), self._written_cond:
                await self._written_cond.wait_for(lambda: self._written >= target)
        except TimeoutError:
            problems = self.supervisor.problems() or ["the alert store is not writing"]
            raise AlertStoreBusy(
                f"alert changes not saved within {timeout_s:.0f}s: {'; '.join(problems)}"
            ) from None
        if self.lost is not None:
            raise not_saved("alert changes", self.lost)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                await self.ids_top_up()
                await self._tick_in_slices()
            except Exception:
                log.exception("alerts: timer failed; continuing")

    @property
    def last_event_id(self) -> int:
        """Id of the newest change event (0: none yet)."""
        return self._next_event - 1

    def subscribe(self) -> asyncio.Queue[StreamEvent | None]:
        queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[StreamEvent | None]) -> None:
        self._subscribers.discard(queue)

    def _delivery_done(self, delivered: bool) -> None:
        self.m_webhooks.labels("delivered" if delivered else "failed").inc()

    # -- maintainers' actions ----------------------------------------------------------

    def _active(self, alert_id: int) -> Alert:
        alert = self.by_id.get(alert_id)
        if alert is None:
            raise AlertNotFound(f"no unresolved alert with id {alert_id}")
        return alert

    async def get(self, alert_id: int) -> Alert:
        alert = self.by_id.get(alert_id)
        if alert is not None:
            return alert
        await self.flush(REQUEST_FLUSH_S)
        stored = await asyncio.to_thread(self.store.get, alert_id)
        if stored is None:
            raise AlertNotFound(f"no alert with id {alert_id}")
        return stored

    async def query(self, q: AlertQuery) -> list[Alert]:
        await self.flush(REQUEST_FLUSH_S)
        alerts = await asyncio.to_thread(self.store.query, q)
        return [self.by_id.get(a.id, a) for a in alerts]

    async def acknowledge(self, alert_id: int, by: str, note: str | None = None) -> Alert:
        if alert_id not in self.by_id:
            await self.get(alert_id)  # 404 when unknown
            raise AlertConflict(f"alert {alert_id} is resolved")
        alert = self._active(alert_id)
        now = self.clock()
        if alert.status == "open":
            alert.status = "acknowledged"
            alert.acknowledged_at_ms = now
            alert.acknowledged_by = by
            self._emit("acknowledged", alert, now)
        if note:
            self._note(alert, now, by, "maintainer", note)
        await self.flush(REQUEST_FLUSH_S)
        return alert

    async def resolve(self, alert_id: int, by: str, note: str | None = None) -> Alert:
        if alert_id not in self.by_id:
            await self.get(alert_id)
            raise AlertConflict(f"alert {alert_id} is already resolved")
        alert = self._active(alert_id)
        now = self.clock()
        if note:
            self._note(alert, now, by, "maintainer", note)
        self._resolve(alert, now, how="manual", by=by)
        await self.flush(REQUEST_FLUSH_S)
        return alert

    async def add_note(self, alert_id: int, by: str, text: str) -> Alert:
        alert = await self.get(alert_id)
        self._note(alert, self.clock(), by, "maintainer", text)
        await self.flush(REQUEST_FLUSH_S)
        return alert

    def _note(self, alert: Alert, now: int, author: str, source: str, text: str) -> None:
        self._ops.notes.append((alert.id, now, author, source, text))
        self._emit("note", alert, now, {"note": {"author": author, "source": source, "text": text}})

    async def report(
        self,
        station_id: str,
        device_id: str | None,
        unit: int | None,
        category: str,
        text: str,
    ) -> tuple[Alert, bool]:
        """A rider's report: attached to the matching unresolved alert, or a new one.

        Returns (alert, attached). A hazard category (smoke, fire, water) attaches only to
        a critical alert, so a report of smoke is never hidden under, say, an offline alert.
        Reports of one category at one station while a rider report of it is open join that
        alert, whatever device or unit they name: many riders (or one forger) reporting the
        same smoke are one incident and one notification, not one per port they picked.
        """
        severity = REPORT_CATEGORIES[category]
        now = self.clock()
        match = self._match(
            station_id, device_id, unit, category, critical_only=severity == "critical"
        )
        moved = match is not None and (match.device_id, match.unit) != (device_id, unit)
        if moved and device_id is not None:  # joined an alert about another place: say where
            spec = self.catalog.devices.get(device_id)
            kind = "port" if spec is not None and spec.kind == "pile" else "slot"
            text = f"({device_id}{'' if unit is None else f' {kind} {unit}'}) {text}"
        if match is not None:
            match.reports += 1
            self._note(match, now, "rider", "rider", f"[{category}] {text}")
            await self.flush(REQUEST_FLUSH_S)
            return match, True
        key = Key(station_id, device_id, unit, "rider_report", category)
        alert = self._raise(
            Observation(key, severity, info=f"rider report: {category}", auto_resolve=False), now
        )
        alert.reports += 1
        self._note(alert, now, "rider", "rider", f"[{category}] {text}")
        await self.flush(REQUEST_FLUSH_S)
        return alert, False

    def _match(
        self,
        station_id: str,
        device_id: str | None,
        unit: int | None,
        category: str,
        *,
        critical_only: bool,
    ) -> Alert | None:
        """The unresolved alert a report joins: one of the same device (and unit, or the
        device-level one); else the station's open rider report of the same category."""

        def fits(a: Alert) -> bool:
            if a.station_id != station_id or a.device_id != device_id:
                return False
            if critical_only and a.severity != "critical":
                return False
            return unit is None or a.unit in (unit, None)

        candidates = [a for a in self.by_id.values() if fits(a)]
        if not candidates:
            same = [
                a
                for a in self.by_id.values()
                if a.station_id == station_id and a.rule == "rider_report" and a.code == category
            ]
            return min(same, key=lambda a: a.id) if same else None
        # the same port/slot first, then the most severe, then the oldest
        return min(
            candidates,
            key=lambda a: (a.unit != unit, SEVERITY_RANK.get(a.severity, 9), a.id),  # type: ignore[call-overload]
        )

    async def notes(self, alert_id: int) -> list[dict[str, Any]]:
        await self.flush(REQUEST_FLUSH_S)
        rows = await asyncio.to_thread(self.store.notes, alert_id)
        return [
            {
                "id": r["id"],
                "at": rfc3339(r["at_ms"]),
                "author": r["author"],
                "source": r["source"],
                "text": r["text"],
            }
            for r in rows
        ]

    def view(self, alert: Alert) -> dict[str, Any]:
        return alert_view(alert)
