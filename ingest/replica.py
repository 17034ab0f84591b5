"""The read side (``ingest.readside``) of a ``chargewatch api`` replica: everything from
PostgreSQL, written there by the ingest workers (``ingest.pg_store``).

Rider queries stay in memory: a read model of every catalog device's twin, kept current by
two paths into one ``_apply`` (serialised, so an older read never overwrites a newer one):

- LISTEN on ``pg_store.TWINS_CHANNEL``: a worker's write NOTIFYs the ids of the twins it
  changed, at commit; the replica reads those twins' records and tells its listeners (the
  station views, SSE). A lost connection is retried with capped, jittered backoff, and a
  full refresh follows each (re)connection (what was sent while it was down is lost).
- a full refresh every ``refresh_s``: the safety net for a NOTIFY that never arrived.

The catalog is the registry's (``ingest.db.registry``) as it was at start (an empty one:
the shipped district). History reads go to the InfluxDB the workers write when the config
names one (``chargewatch api --history``, ``InfluxHistory``), else to ``PostgresStore``'s
``HistoryStore`` methods (its day partitions); the workers record which in ``facts``
(``pg_store.HISTORY_FACT``), and a replica that reads the other store says so in
``/readyz`` (read at start and at each full refresh) rather than answer an empty history.
dead letters and their counts are read from the database on each request, and so are
alerts (notes, deliveries, timings), work orders, commands and battery passports: from the
stores the workers write (``AlertStore``, ``WorkOrderStore``, ``CommandStore``,
``PassportStore`` on one ``PgDatabase``), so every replica answers what the database holds.

The SSE alert stream: the alert store NOTIFYs ``ALERTS_CHANNEL`` when a batch of events
commits; the same listener wakes the fan-out, which reads the new events and puts them in
every subscriber's queue (polling every ``ALERTS_POLL_S`` while anyone listens, the safety
net). Events are read from ``EVENTS_LOOKBACK`` ids back and each is fanned out once, so an
event that commits after a higher id from another writer is not skipped.

Actions (acknowledge, resolve, notes, riders' reports, work orders, commands) are queued for
the worker that owns the station (``ingest.actions``), which applies them to the partition's
alert engine, work orders and commands as ``serve`` would: the replica waits for the outcome,
woken by the same listener, and answers 503 with the reason when no worker takes it in
time.

Webhook subscriptions are read, added and removed in PostgreSQL directly (``AlertStore``),
with serve's checks and answers (``notify.new_subscription``, ``Subscription.view``: the
secret only in the answer to the creation); each add and remove NOTIFYs
``WEBHOOKS_CHANNEL`` in its statement, and every worker's notifier follows
(``ingest.worker_alerts``). Notifications not delivered (pending, given up) are the outbox's
rows as the workers last saved them; a subscription's ``pending`` counts its pending rows
(of every worker), its other counters the sum of what the workers' notifiers saved (each
saves its increments), ``failing`` its failed attempts in a row across them.

Clearing a battery's flag is not queued: a flag belongs to no partition (the pack may be in
any cabinet, or in none), so the replica writes the clearance itself
(``PassportStore.clear``: the clearance row, the flag dropped and a NOTIFY of
``passport_store.FLAGS_CHANNEL``, in one transaction); every worker LISTENs there and drops
the flag from its partitions' indexes (``ingest.worker_passports``). The answer is
``serve``'s: the passport, 409 when the pack is not flagged, 404 when it was never seen.

Flagged packs (never a ready battery) are read from the passports at each full refresh,
on each NOTIFY of ``FLAGS_CHANNEL`` (a flag a worker wrote, a clearance on any replica),
whenever new alert events arrive (a pack is flagged as its safety alert opens), and right
after this replica cleared one; the cabinets of packs flagged or cleared since are
recomputed.

``/readyz`` problems: the database unreachable (the listener is not connected, or the last
refresh failed), the read model stale (no refresh for ``stale_s``), and the history read
from the store the workers do not write.

Exceptions: ``migrate.SchemaBehind`` / ``SchemaAhead`` at start (``chargewatch api`` refuses
the database), ``ingest.StoreUnavailable`` when the database cannot be reached at start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NoReturn, Self, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from devices.catalog import Catalog
from ingest import StoreError, StoreUnavailable, listen
from ingest.actions import ACTION_DONE_CHANNEL, WAIT_S, ActionClient, ActionQueue, libpq_url
from ingest.alerts.config import AlertsConfig
from ingest.alerts.model import (
    Alert,
    AlertError,
    AlertNotFound,
    AlertQuery,
    StreamEvent,
    Timing,
    rfc3339,
)
from ingest.alerts.notify import (
    PENDING,
    UNDELIVERED,
    Delivery,
    Subscription,
    new_subscription,
)
from ingest.alerts.order_model import OrderNotFound, OrderQuery, WorkOrder, WorkOrderError
from ingest.alerts.order_store import WorkOrderStore
from ingest.alerts.repair import repair_times
from ingest.alerts.store import ALERTS_CHANNEL, AlertStore
from ingest.commands import CommandError, CommandNotFound
from ingest.commands.model import CommandRecord
from ingest.commands.store import CommandStore
from ingest.config import IngestConfig
from ingest.db import migrate, registry
from ingest.db.database import PgDatabase
from ingest.db.schema import twins as twins_table
from ingest.passport_store import FLAGS_CHANNEL, PassportStore
from ingest.pg_store import HISTORY_FACT, TWINS_CHANNEL, PostgresStore, history_engine
from ingest.pipeline import Twins
from ingest.readside import JSON, Actions, ReadSide, Unavailable, now_ms
from ingest.store import DeadLetter, HistoryStore
from ingest.twins import Twin

log = logging.getLogger(__name__)

REFRESH_S = 30.0
"""The full refresh's period: the longest a missed NOTIFY leaves a twin behind."""
STALE_S = 3 * REFRESH_S
"""No successful refresh for this long: the read model is stale (``/readyz``)."""
PING_S = 2.0
"""How often an idle LISTEN connection is checked (a dead server shows within this)."""
GATHER_S = 0.005
"""After a notice, how long the listener gathers more before it reads the twins."""
BACKOFF_MAX_S = 10.0

ALERTS_POLL_S = 1.0
"""With SSE subscribers, how often new alert events are looked for without a NOTIFY."""
EVENTS_LOOKBACK = 1000
"""Alert events are read from this many ids before the newest seen: a writer's event that
commits after a higher id from another writer is still fanned out (once: ``_seen``)."""
SEEN_KEPT = 10_000
FLAGGED_PAGE = 1000


_S = TypeVar("_S")


def _store_of(store: _S | None) -> _S:
    if store is None:
        raise Unavailable("the replica is not started")
    return store


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.notices = Counter(
            "cw_replica_notices", "NOTIFYs of changed twins received", registry=r
        )
        self.refreshes = Counter(
            "cw_replica_refreshes", "full refreshes of the read model", ["outcome"], registry=r
        )
        self.twins_changed = Counter(
            "cw_replica_twins_changed", "twins the read model took a new state of", registry=r
        )
        self.listen_connects = Counter(
            "cw_replica_listen_connects", "LISTEN connections made", registry=r
        )
        self.listening = Gauge(
            "cw_replica_listening", "1 while the LISTEN connection is up", registry=r
        )
        self.age = Gauge(
            "cw_replica_read_model_age_seconds", "time since the last full refresh", registry=r
        )
        self.twins = Gauge("cw_replica_twins", "twins in the read model", registry=r)
        self.ready = Gauge(
            "cw_replica_ready", "1 while /readyz says ready (no problems)", registry=r
        )
        self.actions = Counter(
            "cw_replica_actions",
            "actions queued for the owning worker, by outcome (done; refused: the worker's"
            " 4xx answer; unavailable: no worker answered in time; failed)",
            ["outcome"],
            registry=r,
        )
        self.alert_events = Counter(
            "cw_replica_alert_events", "alert events fanned out to SSE streams", registry=r
        )


class ReplicaReadSide:
    """``ReadSide`` and ``Actions`` over PostgreSQL (module docstring). Use as an async
    context manager: entering checks the schema, loads the catalog and every twin, and
    starts the listener and the refresher."""

    def __init__(
        self,
        url: str,
        config: IngestConfig | None = None,
        *,
        refresh_s: float = REFRESH_S,
        stale_s: float | None = None,
        ping_s: float = PING_S,
        action_wait_s: float = WAIT_S,
    ) -> None:
        self.url = url
        self.config = config or IngestConfig()
        self.refresh_s = refresh_s
        self.stale_s = 3 * refresh_s if stale_s is None else stale_s
        self.ping_s = ping_s
        self._metrics = _Metrics()
        self._listeners: list[Callable[[list[Twin]], None]] = []
        self._records: dict[str, str] = {}  # device id -> the record last applied
        self._apply_lock = asyncio.Lock()
        self._refresh_now = asyncio.Event()
        self._listening = False
        self._listen_error: str | None = None
        self._refresh_error: str | None = None
        self._refreshed_at: float | None = None  # monotonic, last successful full refresh
        self._engine: Engine | None = None
        self._store: PostgresStore | None = None
        self._history: HistoryStore | None = None  # InfluxDB's (None: the store's)
        self._history_problem: str | None = None  # read from where the workers do not write
        self._group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[NoReturn]] = []
        self._catalog: Catalog | None = None
        self._twins: Twins | None = None
        self.action_wait_s = action_wait_s
        self._db: PgDatabase | None = None
        self._alert_store: AlertStore | None = None
        self._order_store: WorkOrderStore | None = None
        self._command_store: CommandStore | None = None
        self._passport_store: PassportStore | None = None
        self._actions: ActionClient | None = None
        self._subscribers: set[asyncio.Queue[StreamEvent | None]] = set()
        self._alerts_notice = asyncio.Event()
        self._last_event = 0  # the newest alert event fanned out
        self._seen: dict[int, None] = {}  # alert events fanned out (the newest SEEN_KEPT)
        self._flagged: set[str] = set()  # flagged packs' serials (battery passports)
        self._flagged_in: dict[str, str | None] = {}  # their cabinets, as last read
        self._flag_listeners: list[Callable[[str], None]] = []
        self._flags_stale = False  # a NOTIFY of FLAGS_CHANNEL not read yet
        self._in_flight: set[asyncio.Future[Any]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def shown_url(self) -> str:
        """The database's URL, its password masked."""
        return migrate.shown(self.url)

    async def __aenter__(self) -> Self:
        if not migrate.engine_url(self.url).startswith("postgresql"):
            raise StoreError(
                f"an API replica reads the cluster's PostgreSQL database, not {self.shown_url}"
                " (one machine: `chargewatch serve`)"
            )
        influx = None
        if self.config.history:
            from ingest.influx import InfluxHistory, InfluxSettings  # only when asked for

            influx = InfluxSettings.parse(self.config.history)  # a bad URL: refused now
        # refuses a database behind (or ahead of) this chargewatch's schema
        await asyncio.to_thread(migrate.ensure_current, self.url)
        self._engine = migrate.connect(self.url, pool_size=2, pool_pre_ping=True)
        self._store = await asyncio.to_thread(PostgresStore, self.url, pool_size=2)
        if influx is not None:
            self._history = InfluxHistory(influx)
            log.info("history: %r", self._history)
        self._db = await asyncio.to_thread(PgDatabase, self.url, check_schema=False)
        self._alert_store = AlertStore(self._db)
        self._order_store = WorkOrderStore(self._db)
        self._command_store = CommandStore(self._db)
        self._passport_store = PassportStore(self._db)
        self._actions = ActionClient(ActionQueue(self._db), wait_s=self.action_wait_s)
        try:
            _, next_event = await asyncio.to_thread(self._alert_store.next_ids)
            # the events already there are not news: only later ones are fanned out
            after = max(0, next_event - 1 - EVENTS_LOOKBACK)
            known = await asyncio.to_thread(self._alert_store.events_after, after, SEEN_KEPT)
        except StoreError as exc:
            await self._close_stores()
            raise StoreUnavailable(str(exc)) from exc
        self._last_event = next_event - 1
        self._seen = {row[0]: None for row in known}
        self._catalog = await asyncio.to_thread(self._load_catalog)
        self._twins = Twins(self._catalog, self.config.release_soc)
        await self._refresh()
        if self._refresh_error is not None:
            await self._close_stores()
            raise StoreUnavailable(self._refresh_error)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._tasks = [
            self._group.create_task(self._listen_forever(), name="replica-listen"),
            self._group.create_task(self._refresh_forever(), name="replica-refresh"),
            self._group.create_task(self._alerts_forever(), name="replica-alerts"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        group, self._group = self._group, None
        for queue in list(self._subscribers):
            queue.put_nowait(None)  # the streams end
        self._subscribers.clear()
        try:
            if group is not None:
                for task in self._tasks:
                    task.cancel()
                await group.__aexit__(None, None, None)
        finally:
            await self._close_stores()

    async def _thread(self, fn: Callable[..., _S], *args: Any, **kwargs: Any) -> _S:
        """``fn`` in a worker thread. A cancel does not stop the thread: the stores close
        (``__aexit__``) once such calls have given their connections back."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(future)

    async def _close_stores(self) -> None:
        in_flight = self._in_flight | (self._actions.in_flight if self._actions else set())
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
        if self._history is not None:
            await asyncio.to_thread(self._history.close)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.dispose)
        if self._db is not None:
            await asyncio.to_thread(self._db.close)

    def _load_catalog(self) -> Catalog:
        assert self._engine is not None
        try:
            with self._engine.connect() as conn:
                catalog = registry.load_catalog(conn)
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"{migrate.shown(self.url)}: {exc}") from exc
        if catalog is None:
            log.warning("the device registry is empty: serving the shipped district's catalog")
            return Catalog.load(self.config.catalog)
        return catalog

    # -- keeping the read model current -----------------------------------------------------

    def _read_records(self, device_ids: Collection[str] | None) -> dict[str, str]:
        """Twin records by device id: of ``device_ids``, or all (None)."""
        assert self._engine is not None
        query = select(twins_table.c.device_id, twins_table.c.record)
        if device_ids is not None:
            query = query.where(twins_table.c.device_id.in_(list(device_ids)))
        try:
            with self._engine.connect() as conn:
                return {device_id: record for device_id, record in conn.execute(query)}
        except SQLAlchemyError as exc:
            raise StoreUnavailable(f"{migrate.shown(self.url)}: {exc}") from exc

    async def _apply(self, device_ids: Collection[str] | None) -> int:
        """Read the twins of ``device_ids`` (None: all) and take those that changed; their
        listeners hear of them. Reads and applies one at a time, in order."""
        assert self._twins is not None
        async with self._apply_lock:
            records = await self._thread(self._read_records, device_ids)
            changed: list[Twin] = []
            for device_id, record in records.items():
                if self._records.get(device_id) == record:
                    continue
                if device_id not in self._twins.catalog.devices:
                    continue  # not in this replica's catalog
                try:
                    self._twins.restore([json.loads(record)])
                except (ValueError, TypeError) as exc:
                    log.warning("twin %s: unreadable record skipped: %s", device_id, exc)
                    continue
                self._records[device_id] = record
                changed.append(self._twins.by_id[device_id])
            if changed:
                self._metrics.twins_changed.inc(len(changed))
                for listener in self._listeners:
                    listener(changed)
            self._metrics.twins.set(len(self._records))
            return len(changed)

    async def _refresh(self) -> None:
        """Every twin read again (the safety net); failures are kept for ``problems``."""
        try:
            changed = await self._apply(None)
            workers = await self._thread(_store_of(self._store).fact, HISTORY_FACT)
        except StoreError as exc:
            self._refresh_error = f"database unreachable: {exc}"
            self._metrics.refreshes.labels("failed").inc()
            log.warning("read model refresh failed: %s", exc)
            return
        self._check_history(workers)
        await self._refresh_flags()
        self._refresh_error = None
        self._refreshed_at = time.monotonic()
        self._metrics.refreshes.labels("ok").inc()
        if changed:
            log.debug("full refresh: %d twins changed", changed)

    def _check_history(self, workers: str | None) -> None:
        """``workers``: where the workers write the history (None: no worker said yet)."""
        ours = history_engine(self.config.history)
        problem = None
        if workers == "influxdb" and ours == "postgresql":
            problem = (
                "history not served: the ingest workers write it to InfluxDB and this replica"
                " reads PostgreSQL; start `chargewatch api` with --history URL (or"
                " CHARGEWATCH_HISTORY), the workers' InfluxDB"
            )
        elif workers == "postgresql" and ours == "influxdb":
            problem = (
                "history not served: the ingest workers write it to PostgreSQL and this replica"
                " reads InfluxDB; start `chargewatch api` without --history (nor"
                " CHARGEWATCH_HISTORY)"
            )
        if problem is not None and problem != self._history_problem:
            log.error("%s", problem)
        self._history_problem = problem

    async def _refresh_forever(self) -> NoReturn:
        while True:
            try:
                async with asyncio.timeout(self.refresh_s):
                    await self._refresh_now.wait()
            except TimeoutError:
                pass
            self._refresh_now.clear()
            await self._refresh()

    async def _listen_forever(self) -> NoReturn:
        await listen.follow(
            libpq_url(self.url), [TWINS_CHANNEL, ALERTS_CHANNEL, ACTION_DONE_CHANNEL,
            FLAGS_CHANNEL], name="replica", on_notices=self._notices, on_state=self._listen_state,
            gather_s=GATHER_S, period_s=self.ping_s,
            ping_timeout_s=self.ping_s + 5, errors=(StoreError,), first_s=0.4, cap_s=BACKOFF_MAX_S,
        )  # fmt: skip

    def _listen_state(self, listening: bool, exc: BaseException | None) -> None:
        self._listening = listening
        self._metrics.listening.set(1 if listening else 0)
        if listening:
            self._listen_error = None
            self._metrics.listen_connects.inc()
            self._refresh_now.set()  # what was sent while we did not listen
            self._alerts_notice.set()
        elif exc is not None:
            self._listen_error = f"database unreachable (LISTEN): {exc}"

    async def _notices(self, notices: listen.Notices) -> None:
        ids: set[str] = set()
        for notice in notices:
            self._metrics.notices.inc()
            if notice.channel == TWINS_CHANNEL:
                ids.update(notice.payload.split())
            else:
                self._noticed(notice.channel, notice.payload)
        if ids:
            try:
                await self._apply(ids)
            except StoreError as exc:
                log.warning("twins %d changed, not read: %s", len(ids), exc)
                self._refresh_now.set()

    def _noticed(self, channel: str, payload: str) -> None:
        if channel == ALERTS_CHANNEL:
            self._alerts_notice.set()
        elif channel == FLAGS_CHANNEL:
            self._flags_stale = True
            self._alerts_notice.set()  # the same task reads them
        elif channel == ACTION_DONE_CHANNEL and self._actions is not None:
            try:
                self._actions.notice(int(payload))
            except ValueError:
                log.warning("action outcome notice with an unusable id %r", payload[:40])

    async def _alerts_forever(self) -> NoReturn:
        """Fan new alert events out to the SSE subscribers: on each NOTIFY of the alert
        store, and every ``ALERTS_POLL_S`` while anyone listens (the safety net)."""
        while True:
            try:
                async with asyncio.timeout(ALERTS_POLL_S if self._subscribers else None):
                    await self._alerts_notice.wait()
            except TimeoutError:
                pass
            self._alerts_notice.clear()
            try:
                flags_stale, self._flags_stale = self._flags_stale, False
                if await self._fan_out_events() or flags_stale:
                    await self._refresh_flags()  # a pack is flagged as its alert opens
            except StoreError as exc:
                log.warning("alert events not read: %s", exc)

    async def _fan_out_events(self) -> int:
        """Fan out the alert events not fanned out yet; how many there were."""
        store = _store_of(self._alert_store)
        after = max(0, self._last_event - EVENTS_LOOKBACK)
        count = 0
        while True:
            rows = await self._thread(store.events_after, after, 1000)
            new = [StreamEvent(i, t, d) for i, t, d in rows if i not in self._seen]
            count += len(new)
            self._metrics.alert_events.inc(len(new))
            for event in new:
                self._seen[event.id] = None
                self._last_event = max(self._last_event, event.id)
                for queue in list(self._subscribers):
                    if queue.qsize() >= 10_000:  # a stuck client: end it; it resumes by id
                        self._subscribers.discard(queue)
                        queue.put_nowait(None)
                    else:
                        queue.put_nowait(event)
            while len(self._seen) > SEEN_KEPT:
                del self._seen[next(iter(self._seen))]
            if len(rows) < 1000:
                return count
            after = rows[-1][0]

    # -- the district and its live state ----------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            raise Unavailable("the replica is not started")
        return self._catalog

    @property
    def release_soc(self) -> float:
        return self.config.release_soc

    @property
    def history_days(self) -> float:
        return self.config.history_days

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def twins(self) -> Mapping[str, Twin]:
        if self._twins is None:
            raise Unavailable("the replica is not started")
        return self._twins.by_id

    def on_twins_changed(self, listener: Callable[[list[Twin]], None]) -> None:
        self._listeners.append(listener)

    @property
    def flagged_batteries(self) -> Collection[str]:
        return self._flagged  # one set, kept current in place (``_refresh_flags``)

    def on_flag_change(self, listener: Callable[[str], None]) -> None:
        self._flag_listeners.append(listener)

    def _read_flagged(self) -> dict[str, str | None]:
        """Flagged packs' serials, each with the cabinet it is in (None: out of one)."""
        store = _store_of(self._passport_store)
        found: dict[str, str | None] = {}
        after: str | None = None
        while True:
            page = store.batteries(flagged=True, after=after, limit=FLAGGED_PAGE)
            found.update((str(b["serial"]), b["device_id"]) for b in page)
            if len(page) < FLAGGED_PAGE:
                return found
            after = str(page[-1]["serial"])

    async def _refresh_flags(self) -> None:
        """Take the flagged packs from the passports the workers write; the cabinets of
        those flagged or cleared since are recomputed (their packs are never ready)."""
        try:
            now = await self._thread(self._read_flagged)
        except StoreError as exc:
            log.warning("flagged batteries not read: %s", exc)
            return
        changed = now.keys() ^ self._flagged
        if not changed:
            return
        devices = {now.get(serial) or self._flagged_in.get(serial) for serial in changed}
        self._flagged.clear()
        self._flagged.update(now)
        self._flagged_in = now
        for device_id in sorted(d for d in devices if d is not None):
            for listener in self._flag_listeners:
                listener(device_id)

    @property
    def history(self) -> HistoryStore | None:
        return self._history if self._history is not None else self._store

    # -- the service itself -----------------------------------------------------------------

    def read_model_age_s(self) -> float | None:
        """Seconds since the last successful full refresh (None: never)."""
        return None if self._refreshed_at is None else time.monotonic() - self._refreshed_at

    def problems(self) -> list[str]:
        found = []
        if self._group is None:
            found.append("the replica's read model is not running")
        for task in self._tasks:
            if task.done():  # it never ends by itself: it died (logged by the group)
                found.append(f"the read model's task {task.get_name()} stopped")
        if not self._listening:
            found.append(self._listen_error or "database unreachable: not listening for changes")
        if self._refresh_error is not None:
            found.append(self._refresh_error)
        if self._history_problem is not None:
            found.append(self._history_problem)
        age = self.read_model_age_s()
        if age is None or age > self.stale_s:
            shown = "never" if age is None else f"{age:.0f} s ago"
            found.append(
                f"read model stale: last full refresh {shown} (limit {self.stale_s:.0f} s)"
            )
        return found

    def metrics(self) -> bytes:
        age = self.read_model_age_s()
        self._metrics.age.set(-1 if age is None else age)
        self._metrics.ready.set(0 if self.problems() else 1)
        return generate_latest(self._metrics.registry)

    async def dead_letters(self, limit: int) -> tuple[list[DeadLetter], dict[str, int]]:
        store = self._store
        if store is None:
            raise Unavailable("the replica is not started")
        rows, counts = await asyncio.gather(
            self._thread(store.dead_letters, limit),
            self._thread(store.dead_letter_counts),
        )
        return rows, counts

    # -- alerts, work orders, commands, batteries: read from PostgreSQL ---------------------

    @property
    def alerts_config(self) -> AlertsConfig | None:
        return self.config.alerts if self.config.alerts.enabled else None

    def clock_ms(self) -> int:
        return now_ms()

    async def alerts(self, q: AlertQuery) -> list[Alert]:
        return await self._thread(_store_of(self._alert_store).query, q)

    async def alert(self, alert_id: int) -> Alert:
        found = await self._thread(_store_of(self._alert_store).get, alert_id)
        if found is None:
            raise AlertNotFound(f"no alert with id {alert_id}")
        return found

    async def alert_notes(self, alert_id: int) -> list[JSON]:
        rows = await self._thread(_store_of(self._alert_store).notes, alert_id)
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

    async def alert_deliveries(self, alert_id: int) -> list[JSON]:
        rows = await self._thread(_store_of(self._alert_store).deliveries, alert_id)
        deadline_s = self.config.alerts.webhooks.deadline_s
        return [Delivery.from_row(row, deadline_s).log_entry() for row in rows]

    def subscribe_alerts(self) -> tuple[asyncio.Queue[StreamEvent | None], int]:
        _store_of(self._alert_store)
        queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        self._subscribers.add(queue)
        self._alerts_notice.set()  # the poll starts with the first subscriber
        return queue, self._last_event

    def unsubscribe_alerts(self, queue: asyncio.Queue[StreamEvent | None]) -> None:
        self._subscribers.discard(queue)

    async def oldest_alert_event(self) -> int | None:
        return await self._thread(_store_of(self._alert_store).oldest_event_id)

    async def alert_events_after(self, after: int, limit: int) -> list[StreamEvent]:
        store = _store_of(self._alert_store)
        rows = await self._thread(store.events_after, after, limit)
        return [StreamEvent(event_id, type_, data) for event_id, type_, data in rows]

    def _read_webhooks(self) -> list[JSON]:
        store = _store_of(self._alert_store)
        pending = store.pending_by_webhook()
        subs = [Subscription(id=i, **record) for i, record in store.webhooks()]
        for sub in subs:  # the outbox's, of every worker (a notifier counts its own)
            sub.pending = pending.get(sub.id, 0)
        return [sub.view() for sub in subs]

    async def webhooks(self) -> list[JSON]:
        return await self._thread(self._read_webhooks)

    def _notifications(self, status: str | tuple[str, ...], limit: int) -> list[JSON]:
        """Views of the outbox's deliveries in ``status``: pending ones oldest first, the
        others newest first; each names its subscription (None: removed since), as serve's."""
        store = _store_of(self._alert_store)
        newest_first = status != PENDING
        rows = store.deliveries(status=status, newest_first=newest_first, limit=limit)
        names = {i: record.get("name") for i, record in store.webhooks()}
        deadline_s = self.config.alerts.webhooks.deadline_s
        return [
            Delivery.from_row(r, deadline_s).view(names.get(int(r["webhook_id"]))) for r in rows
        ]

    async def pending_notifications(self, limit: int) -> tuple[list[JSON], int]:
        store = _store_of(self._alert_store)
        pending, counts = await asyncio.gather(
            self._thread(self._notifications, PENDING, limit),
            self._thread(store.pending_by_webhook),
        )
        return pending, sum(counts.values())

    async def undelivered_notifications(self, limit: int) -> tuple[list[JSON], bool]:
        return await self._thread(self._notifications, UNDELIVERED, limit), True

    async def repair_times(
        self, start_ms: int, end_ms: int, by: Literal["station", "code"]
    ) -> list[JSON]:
        rows = await self.alert_timings(start_ms, end_ms)
        return [g.view() for g in repair_times(rows, by)]

    async def alert_timings(self, start_ms: int, end_ms: int) -> list[Timing]:
        store = _store_of(self._alert_store)
        return await self._thread(store.timings, start_ms, end_ms)

    async def work_orders(self, q: OrderQuery) -> list[WorkOrder]:
        return await self._thread(_store_of(self._order_store).query, q)

    async def work_order(self, order_id: int) -> WorkOrder:
        found = await self._thread(_store_of(self._order_store).get, order_id)
        if found is None:
            raise OrderNotFound(f"no work order with id {order_id}")
        return found

    async def work_order_log(self, order_id: int) -> list[JSON]:
        return await self._thread(_store_of(self._order_store).log, order_id)

    async def command(self, command_id: str) -> CommandRecord | None:
        return await self._thread(_store_of(self._command_store).get, command_id)

    async def commands(self, device_id: str | None, limit: int) -> list[CommandRecord]:
        store = _store_of(self._command_store)
        return await self._thread(store.recent, device_id, limit=limit)

    async def battery(self, serial: str) -> JSON | None:
        return await self._thread(_store_of(self._passport_store).passport, serial)

    async def batteries(self, *, flagged: bool | None, after: str | None, limit: int) -> list[JSON]:
        store = _store_of(self._passport_store)
        return await self._thread(store.batteries, flagged=flagged, after=after, limit=limit)

    # -- actions: queued for the worker that owns the station (ingest.actions) ---------------

    async def _request(self, station_id: str, kind: str, args: JSON) -> JSON:
        outcome = "failed"
        try:
            done = await _store_of(self._actions).request(station_id, kind, args)
            outcome = "done"
            return done
        except Unavailable:
            outcome = "unavailable"
            raise
        except (AlertError, WorkOrderError, CommandError):
            outcome = "refused"
            raise
        finally:
            self._metrics.actions.labels(outcome).inc()

    async def _alert_action(self, kind: str, alert_id: int, args: JSON) -> Alert:
        station = (await self.alert(alert_id)).station_id  # AlertNotFound: 404 here
        done = await self._request(station, kind, {"alert_id": alert_id, **args})
        return Alert.from_record(done["alert"])

    async def acknowledge(self, alert_id: int, by: str, note: str | None) -> Alert:
        return await self._alert_action("acknowledge", alert_id, {"by": by, "note": note})

    async def resolve(self, alert_id: int, by: str, note: str | None) -> Alert:
        return await self._alert_action("resolve", alert_id, {"by": by, "note": note})

    async def add_alert_note(self, alert_id: int, by: str, text: str) -> Alert:
        return await self._alert_action("alert_note", alert_id, {"by": by, "text": text})

    async def report(
        self, station_id: str, device_id: str | None, unit: int | None, category: str, text: str
    ) -> tuple[Alert, bool]:
        args = {"device_id": device_id, "unit": unit, "category": category, "text": text}
        done = await self._request(station_id, "report", args)
        return Alert.from_record(done["alert"]), bool(done["joined"])

    # -- webhook subscriptions: in PostgreSQL, followed by the workers' notifiers ------------

    async def add_webhook(self, url: str, **options: Any) -> JSON:
        sub = new_subscription(url, **options)
        sub.id = await self._thread(_store_of(self._alert_store).add_webhook, sub.record())
        return sub.created_view()

    async def remove_webhook(self, webhook_id: int) -> bool:
        return await self._thread(_store_of(self._alert_store).delete_webhook, webhook_id)

    async def _order_action(self, kind: str, order_id: int, args: JSON) -> WorkOrder:
        station = (await self.work_order(order_id)).station_id  # OrderNotFound: 404 here
        done = await self._request(station, kind, {"order_id": order_id, **args})
        return WorkOrder.from_row(tuple(done["order"]))

    async def create_work_order(
        self,
        alert_id: int,
        by: str,
        *,
        assignee: str | None,
        due_at_ms: int | None,
        note: str | None,
    ) -> WorkOrder:
        station = (await self.alert(alert_id)).station_id
        args = {
            "alert_id": alert_id, "by": by, "assignee": assignee, "due_at_ms": due_at_ms,
            "note": note,
        }  # fmt: skip
        done = await self._request(station, "create_work_order", args)
        return WorkOrder.from_row(tuple(done["order"]))

    async def move_work_order(
        self, order_id: int, state: str, by: str, *, assignee: str | None, note: str | None
    ) -> WorkOrder:
        args = {"state": state, "by": by, "assignee": assignee, "note": note}
        return await self._order_action("move_work_order", order_id, args)

    async def add_work_order_note(self, order_id: int, by: str, text: str) -> WorkOrder:
        return await self._order_action("work_order_note", order_id, {"by": by, "text": text})

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
        device = self.catalog.devices.get(device_id)
        if device is None:
            raise CommandNotFound(f"no device with id {device_id!r}")
        args = {
            "device_id": device_id, "ctype": ctype, "unit": unit, "ttl_s": ttl_s,
            "requested_by": requested_by, "requested_key": requested_key,
        }  # fmt: skip
        done = await self._request(device.station_id, "send_command", args)
        return CommandRecord.from_row(tuple(done["command"]))

    async def clear_battery(self, serial: str, actor_id: str, actor_name: str, note: str) -> bool:
        """Written here, heard by the workers (module docstring); False: not flagged."""
        store = _store_of(self._passport_store)
        cleared = await self._thread(store.clear, serial, now_ms(), actor_id, actor_name, note)
        if cleared:
            await self._refresh_flags()  # its cabinet counts the pack as ready again
        return cleared


def as_read_and_act(side: ReplicaReadSide) -> tuple[ReadSide, Actions]:
    """``side`` typed as the two protocols (the type checker holds it to both)."""
    return side, side
