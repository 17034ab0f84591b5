"""Maintainers' actions taken on an API replica, applied by the ingest worker that owns
them (issue 13): "actions go to PostgreSQL and reach the owning worker by NOTIFY".

An action (acknowledge, resolve, a note, a rider's report, a work order's change, a remote
command) changes state that lives in one partition's engines: the alert engine, the work
orders and the commands of the partition of the action's **station**. So a replica does not
change it itself; it queues the action and waits for its owner:

1. the replica (``ActionClient.request``) inserts a row into ``action_queue`` (``queued``,
   with the station, the kind, the arguments as JSON and when it stops waiting) and
   NOTIFYs ``ACTIONS_CHANNEL`` with the station id, in one transaction;
2. the applier of the partition that owns the station (``ActionApplier``, one per
   partition in the worker) claims its stations' queued rows (``applying``: one UPDATE with
   ``FOR UPDATE SKIP LOCKED``, so one applier takes a row), applies each to its engines, and
   writes the outcome (``done`` with the result, or ``failed`` with the error's kind and
   message) with a NOTIFY of ``ACTION_DONE_CHANNEL`` (the row's id), in one transaction.
   It claims when woken: in a worker, by the worker's one ``ActionNotices``, which LISTENs on
   that channel and wakes the applier of the notice's station, and, as the safety net, on
   every connect and every ``poll_s`` looks which stations have queued actions (one query)
   and wakes theirs; an applier on its own (``notices=None``) LISTENs itself and claims
   every ``poll_s``. (One listener a worker: a LISTEN connection and a claim a second per
   partition cost a worker doing nothing ~2 % of a core, and a PostgreSQL backend each;
   docs/benchmarks.md, the cluster section.)
3. the replica, woken by that NOTIFY (or by its own bounded polling), reads the outcome and
   answers as ``serve`` would (the record, or the same exception: 404, 409, 422, 429).

An owner that lost the partition without having heard yet (another worker took it) applies
an action in memory, but the lease fence drops its writes: the engine's ``flush`` raises
``StoreError`` (``ingest.leases.not_saved``), so the action fails with the reason and the
replica answers 503, never as saved. From then on that applier claims nothing, and the
partition's next owner takes what is queued.

When no applier takes the row in time (no worker owns the partition, or it is down; time
by the database's clock, so machines' clocks need not agree), the replica marks the row
``expired`` (only if still ``queued``: atomic with a claim, so an
action answered 503 is never applied later) and raises ``Unavailable`` with the reason. A
row claimed but with no outcome in time (the worker died while applying) is answered 503
too, saying the action may have been applied.

Blocking methods (``ActionQueue``) run in worker threads; ``ActionClient`` and
``ActionApplier`` run on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn, Self, TypeVar

import psycopg
from sqlalchemy import BigInteger, bindparam, cast, func, insert, literal_column, select, update
from sqlalchemy.engine import make_url

from ingest import StoreError, listen
from ingest.alerts.engine import AlertEngine
from ingest.alerts.model import Alert, AlertConflict, AlertNotFound
from ingest.alerts.order_model import OrderConflict, OrderInvalid, OrderNotFound, WorkOrder
from ingest.alerts.orders import WorkOrders
from ingest.commands import CommandInvalid, CommandNotFound, TooManyCommands
from ingest.commands.model import CommandRecord
from ingest.commands.service import Commands
from ingest.db import migrate
from ingest.db.database import Database, PgDatabase
from ingest.db.schema import action_queue
from ingest.leases import StaleLease
from ingest.readside import JSON, Unavailable, now_ms

log = logging.getLogger(__name__)
_T = TypeVar("_T")

ACTIONS_CHANNEL = "cw_actions"
"""NOTIFY of a queued action: the payload is its station id."""
ACTION_DONE_CHANNEL = "cw_action_done"
"""NOTIFY of an action's outcome: the payload is the queue row's id."""
WAIT_S = 5.0
"""How long a replica waits for a worker to take an action before it answers 503."""
APPLYING_GRACE_S = 10.0
"""How much longer it waits once a worker has taken it (the engines' own flush bound)."""
POLL_S = 1.0
"""The applier's safety net: how often it looks for queued actions without a NOTIFY."""
RECHECK_S = 0.25
"""The replica's safety net: how often a waiting request reads its row without a NOTIFY."""
CLAIM_MAX = 100
KEPT_S = 24 * 3600.0
"""Finished actions are kept this long (to look into), then pruned by the appliers."""
PRUNE_EVERY_S = 3600.0

# the errors an outcome may carry, by name: raised on the replica as the worker raised them
ERRORS: dict[str, Callable[[str], Exception]] = {
    cls.__name__: cls
    for cls in (
        AlertNotFound, AlertConflict, OrderNotFound, OrderConflict, OrderInvalid,
        CommandNotFound, CommandInvalid, TooManyCommands,
    )
}  # fmt: skip

KINDS = frozenset(
    {
        "acknowledge", "resolve", "alert_note", "report", "create_work_order",
        "move_work_order", "work_order_note", "send_command",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Request:
    """A claimed action: what the applier applies."""

    id: int
    station_id: str
    kind: str
    args: JSON
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # queued, applying, done, failed, expired
    result: JSON | None
    error_kind: str | None
    error: str | None


_Q = action_queue.c
_NOTIFY = select(func.pg_notify(bindparam("b_channel"), bindparam("b_payload")))
# one statement, so one transaction: the row and the NOTIFY of its station
# the database's clock, not a machine's: a replica and a worker whose clocks differ agree
# on when an action stops being taken
_DB_NOW_MS: Any = cast(
    func.floor(func.extract("epoch", func.clock_timestamp()) * literal_column("1000")),
    BigInteger,
)
_INSERTED = (
    insert(action_queue)
    .values(
        station_id=bindparam("b_station"),
        kind=bindparam("b_kind"),
        args=bindparam("b_args"),
        state=literal_column("'queued'"),
        requested_at_ms=_DB_NOW_MS,
        expires_at_ms=_DB_NOW_MS + bindparam("b_wait"),
    )
    .returning(_Q.id, _Q.station_id)
    .cte("inserted")
)
_SUBMIT = select(
    _INSERTED.c.id, func.pg_notify(literal_column(f"'{ACTIONS_CHANNEL}'"), _INSERTED.c.station_id)
)
_OUTCOME = select(_Q.state, _Q.result, _Q.error_kind, _Q.error).where(_Q.id == bindparam("b_id"))
_EXPIRE = (
    update(action_queue)
    .where(_Q.id == bindparam("b_id"), _Q.state == literal_column("'queued'"))
    .values(state="expired", done_at_ms=bindparam("b_now"))
)
_CLAIMABLE = (
    (_Q.state == literal_column("'queued'"))
    & _Q.station_id.in_(bindparam("b_stations", expanding=True))
    & (_Q.expires_at_ms > _DB_NOW_MS)
)
_CLAIMED = (
    select(_Q.id)
    .where(_CLAIMABLE)
    .order_by(_Q.id)
    .limit(bindparam("b_limit"))
    .with_for_update(skip_locked=True)
    .cte("claimed")
    .prefix_with("MATERIALIZED")
)
_CLAIM = (
    update(action_queue)
    .where(_Q.id.in_(select(_CLAIMED.c.id)), _CLAIMABLE)
    .values(state="applying")
    .returning(_Q.id, _Q.station_id, _Q.kind, _Q.args, _Q.expires_at_ms)
)
_FINISH = (
    update(action_queue)
    .where(_Q.id == bindparam("b_id"), _Q.state == literal_column("'applying'"))
    .values(
        state=bindparam("b_state"),
        result=bindparam("b_result"),
        error_kind=bindparam("b_error_kind"),
        error=bindparam("b_error"),
        done_at_ms=bindparam("b_now"),
    )
)
_PRUNE = action_queue.delete().where(
    _Q.state.in_(["done", "failed", "expired"]), _Q.requested_at_ms < bindparam("b_before")
)


def libpq_url(url: str) -> str:
    """``url`` as libpq takes it (``postgresql://``, no SQLAlchemy driver name)."""
    return (
        make_url(migrate.engine_url(url))
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )


class ActionQueue:
    """The ``action_queue`` table (PostgreSQL; module docstring). Blocking."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    def on_postgresql(cls, url: str, **options: Any) -> ActionQueue:
        return cls(PgDatabase(url, **options))

    def close(self) -> None:
        self._db.close()

    def submit(self, station_id: str, kind: str, args: JSON, wait_ms: int) -> int:
        """Queue an action and NOTIFY the station's owner, at commit; its id. No applier
        takes it ``wait_ms`` after now (the database's clock)."""
        if kind not in KINDS:
            raise ValueError(f"unknown action {kind!r}")
        row = {
            "b_station": station_id, "b_kind": kind, "b_args": json.dumps(args), "b_wait": wait_ms
        }  # fmt: skip
        done = self._db.execute(_SUBMIT, row)  # the NOTIFY is heard at commit
        return int(done.rows[0][0])

    def outcome(self, request_id: int) -> Outcome | None:
        rows = self._db.query(_OUTCOME, {"b_id": request_id})
        if not rows:
            return None
        state, result, error_kind, error = rows[0]
        return Outcome(
            str(state), None if result is None else json.loads(result), error_kind, error
        )

    def expire(self, request_id: int, now: int) -> bool:
        """``queued`` -> ``expired``; False when a worker has taken it (or it is done)."""
        return self._db.execute(_EXPIRE, {"b_id": request_id, "b_now": now}).rowcount > 0

    def claim(self, stations: Collection[str], now: int, limit: int = CLAIM_MAX) -> list[Request]:
        """Take the queued, unexpired actions of ``stations``, oldest first (no other
        claimer gets them). ``now`` is only kept for the record: expiry is judged by the
        database's clock."""
        if not stations:
            return []
        done = self._db.execute(
            _CLAIM, {"b_stations": sorted(stations), "b_now": now, "b_limit": limit}
        )
        return sorted(
            (
                Request(int(r[0]), str(r[1]), str(r[2]), json.loads(r[3]), int(r[4]))
                for r in done.rows
            ),
            key=lambda r: r.id,
        )

    def finish(
        self,
        request_id: int,
        now: int,
        *,
        result: JSON | None = None,
        error_kind: str | None = None,
        error: str | None = None,
    ) -> None:
        """Write a claimed action's outcome (``failed`` when ``error_kind`` is given) and
        NOTIFY the replica waiting for it, in one transaction."""
        params = {
            "b_id": request_id, "b_now": now,
            "b_state": "done" if error_kind is None else "failed",
            "b_result": None if result is None else json.dumps(result),
            "b_error_kind": error_kind, "b_error": error,
        }  # fmt: skip
        notice = {"b_channel": ACTION_DONE_CHANNEL, "b_payload": str(request_id)}
        self._db.transaction([(_FINISH, [params]), (_NOTIFY, [notice])])

    def prune(self, before_ms: int) -> int:
        """Forget the finished actions requested before ``before_ms``."""
        return self._db.execute(_PRUNE, {"b_before": before_ms}).rowcount


class ActionClient:
    """The replica's side: queue an action, wait for its outcome (module docstring).
    ``notice`` is fed with the ids of ``ACTION_DONE_CHANNEL`` by the replica's listener."""

    def __init__(
        self,
        queue: ActionQueue,
        *,
        wait_s: float = WAIT_S,
        applying_grace_s: float = APPLYING_GRACE_S,
        recheck_s: float = RECHECK_S,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.queue = queue
        self.wait_s = wait_s
        self.applying_grace_s = applying_grace_s
        self.recheck_s = recheck_s
        self.clock = clock
        self._waiting: dict[int, asyncio.Event] = {}
        self.in_flight: set[asyncio.Future[Any]] = set()  # calls in worker threads

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn`` in a worker thread; its owner closes the queue once ``in_flight`` is
        done (a cancelled request does not stop the thread)."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self.in_flight.add(future)
        future.add_done_callback(self.in_flight.discard)
        return await asyncio.shield(future)

    def notice(self, request_id: int) -> None:
        event = self._waiting.get(request_id)
        if event is not None:
            event.set()

    async def request(self, station_id: str, kind: str, args: JSON) -> JSON:
        """The action's result, as its owner answered; raises what it raised, or
        ``Unavailable`` when no worker answered in time."""
        request_id = await self._call(
            self.queue.submit, station_id, kind, args, int(self.wait_s * 1000)
        )
        event = self._waiting[request_id] = asyncio.Event()
        try:
            outcome = await self._wait(request_id, event, self.wait_s)
            if outcome is None or outcome.state == "queued":
                if await self._call(self.queue.expire, request_id, self.clock()):
                    raise Unavailable(
                        f"no ingest worker took the action ({kind}) for station {station_id}"
                        f" within {self.wait_s:.0f} s: is a worker running and holding its"
                        " partition? Nothing was changed."
                    )
                outcome = await self._wait(request_id, event, self.applying_grace_s)
            if outcome is None or outcome.state in ("queued", "applying"):
                raise Unavailable(
                    f"the ingest worker that took the action ({kind}) for station {station_id}"
                    f" did not answer within {self.wait_s + self.applying_grace_s:.0f} s; it"
                    " may yet be applied: look before trying again"
                )
        finally:
            self._waiting.pop(request_id, None)
        if outcome.state == "done":
            return outcome.result or {}
        error = outcome.error or "the worker could not apply the action"
        raise_as = ERRORS.get(outcome.error_kind or "")
        if raise_as is not None:
            raise raise_as(error)
        raise StoreError(f"the ingest worker could not apply the action ({kind}): {error}")

    async def _wait(self, request_id: int, event: asyncio.Event, wait_s: float) -> Outcome | None:
        """The outcome once it is final, or the last read of it after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        while True:
            outcome = await self._call(self.queue.outcome, request_id)
            if outcome is not None and outcome.state not in ("queued", "applying"):
                return outcome
            left = deadline - time.monotonic()
            if left <= 0:
                return outcome
            try:
                async with asyncio.timeout(min(left, self.recheck_s)):
                    await event.wait()
            except TimeoutError:
                pass
            event.clear()


def _alert(alert: Alert) -> JSON:
    return {"alert": alert.record()}


def _order(order: WorkOrder) -> JSON:
    return {"order": list(order.row())}


def _command(record: CommandRecord) -> JSON:
    return {"command": list(record.row())}


_QUEUED_STATIONS = (  # the listener's own psycopg connection: SQL as text, clock as _DB_NOW_MS
    "SELECT DISTINCT station_id FROM action_queue WHERE state = 'queued'"
    " AND expires_at_ms > floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
)


class ActionNotices:
    """A worker's one LISTEN on ``ACTIONS_CHANNEL`` for all its appliers (module docstring):
    a notice wakes the appliers of its station; on every connect and every ``poll_s`` one
    query of the stations with queued, unexpired actions wakes theirs. Run ``run()`` as a
    supervised task for the worker's life; appliers ``register`` while they run."""

    def __init__(self, url: str, *, poll_s: float = POLL_S) -> None:
        self.url = url
        self.poll_s = poll_s
        self.listening = False
        self._wakes: dict[str, set[asyncio.Event]] = {}

    def register(self, stations: Collection[str], wake: asyncio.Event) -> Callable[[], None]:
        """Set ``wake`` for actions of ``stations``; returns the call that stops it."""
        for station in stations:
            self._wakes.setdefault(station, set()).add(wake)

        def unregister() -> None:
            for station in stations:
                events = self._wakes.get(station, set())
                events.discard(wake)
                if not events:
                    self._wakes.pop(station, None)

        return unregister

    def _wake(self, stations: Iterable[str]) -> None:
        for station in stations:
            for wake in self._wakes.get(station, ()):
                wake.set()

    async def run(self) -> NoReturn:
        await listen.follow(
            libpq_url(self.url), [ACTIONS_CHANNEL], name="actions", catch_up=self._scan,
            on_notices=self._noticed, period_s=self.poll_s, on_state=self._state,
            ping_timeout_s=None, first_s=1.0, cap_s=1.0,
        )  # fmt: skip

    async def _scan(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """What no notice announced (before we listened, or lost): one query."""
        cur = await conn.execute(_QUEUED_STATIONS)
        self._wake(str(r[0]) for r in await cur.fetchall())

    async def _noticed(self, notices: listen.Notices) -> None:
        self._wake(n.payload for n in notices)

    def _state(self, listening: bool, _: BaseException | None) -> None:
        self.listening = listening


class ActionApplier:
    """The worker's side for one partition: applies the queued actions of ``stations`` to
    the partition's engines (module docstring). ``async with`` it, then run ``run()`` as a
    task for as long as the partition is held; ``apply_pending`` applies what is queued
    now. The partition consumer (``ingest.partition_consumer``) gives it the partition's
    alert engine, work orders and commands; one made without work orders or commands fails
    those actions with a clear error rather than leaving them to wait for nobody."""

    def __init__(
        self,
        url: str,
        stations: Collection[str],
        *,
        alerts: AlertEngine,
        orders: WorkOrders | None = None,
        commands: Commands | None = None,
        poll_s: float = POLL_S,
        clock: Callable[[], int] = now_ms,
        notices: ActionNotices | None = None,
    ) -> None:
        self.url = url
        self.notices = notices  # the worker's listener; None: LISTEN and poll on its own
        self.stations = frozenset(stations)
        self.alerts = alerts
        self.orders = orders
        self.commands = commands
        self.poll_s = poll_s
        self.clock = clock
        self.applied = 0
        self._queue: ActionQueue | None = None
        self._lock = asyncio.Lock()
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._pruned_at = 0.0  # monotonic
        self._left = False  # the partition moved: said once (``_moved``)

    async def __aenter__(self) -> Self:
        self._queue = await asyncio.to_thread(
            ActionQueue.on_postgresql, self.url, pool_size=2, check_schema=False
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        queue, self._queue = self._queue, None
        if self._in_flight:  # a cancelled run() leaves its thread's call to finish first
            await asyncio.wait(self._in_flight, timeout=30)
        if queue is not None:
            await asyncio.to_thread(queue.close)

    async def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """``fn`` in a worker thread; a cancel does not stop the thread, so the queue is
        closed (``__aexit__``) only once its calls have returned their connections."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)
        return await asyncio.shield(future)

    async def run(self) -> NoReturn:
        """Apply the queued actions of our stations, now and whenever woken: by the
        worker's ``notices``, or (without) by our own LISTEN and every ``poll_s``. A failed
        claim or a lost connection is retried."""
        if self.notices is not None:
            await self._run_woken(self.notices)

        async def noticed(notices: listen.Notices) -> None:
            if any(n.payload in self.stations for n in notices):
                await self._claim()

        await listen.follow(
            libpq_url(self.url), [ACTIONS_CHANNEL], name="actions (applier)", on_notices=noticed,
            catch_up=lambda _: self._claim(), period_s=self.poll_s, errors=(StoreError,),
            ping_timeout_s=None, first_s=1.0, cap_s=1.0,
        )  # fmt: skip

    async def _run_woken(self, notices: ActionNotices) -> NoReturn:
        wake = asyncio.Event()
        unregister = notices.register(self.stations, wake)
        try:
            while True:
                wake.clear()  # before the claim: a notice meanwhile makes another round
                try:
                    await self._claim()
                except (psycopg.Error, OSError, StoreError) as exc:
                    log.warning("actions: claim failed (%s); again in %.1f s", exc, 1.0)
                    await asyncio.sleep(1.0)
                    continue
                await wake.wait()
        finally:
            unregister()

    async def _claim(self) -> None:
        await self.apply_pending()
        await self._prune()

    async def _prune(self) -> None:
        if time.monotonic() - self._pruned_at < PRUNE_EVERY_S or self._queue is None:
            return
        self._pruned_at = time.monotonic()
        pruned = await self._call(self._queue.prune, self.clock() - int(KEPT_S * 1000))
        if pruned:
            log.info("actions: %d finished actions older than %.0f h pruned", pruned, KEPT_S / 3600)

    async def apply_pending(self) -> int:
        """Claim and apply every queued action of our stations; how many were applied."""
        queue = self._queue
        if queue is None:
            raise RuntimeError("ActionApplier used outside `async with`")
        count = 0
        async with self._lock:
            while not self._moved():
                claimed = await self._call(queue.claim, self.stations, self.clock())
                for request in claimed:
                    await self._apply_one(queue, request)
                count += len(claimed)
                if len(claimed) < CLAIM_MAX:
                    break
        self.applied += count
        return count

    def _moved(self) -> bool:
        """True once the engines' writes were refused because the partition moved (their
        ``lost``): what this applier applies is not saved any more, so it claims nothing
        and leaves the actions queued for the partition's next owner."""
        lost = self.alerts.lost or (self.orders.lost if self.orders is not None else None)
        if lost is not None and not self._left:
            self._left = True
            log.warning("actions: %s; the actions of %d stations are left to the next owner",
                        lost, len(self.stations))  # fmt: skip
        return lost is not None

    async def _apply_one(self, queue: ActionQueue, request: Request) -> None:
        try:
            result = await self._apply(request)
        except tuple(ERRORS.values()) as exc:  # type: ignore[misc]
            await self._call(
                queue.finish, request.id, self.clock(), error_kind=type(exc).__name__,
                error=str(exc),
            )  # fmt: skip
            return
        except (ValueError, TypeError, KeyError) as exc:
            await self._call(
                queue.finish, request.id, self.clock(), error_kind="invalid",
                error=f"unusable action {request.kind}: {exc}",
            )  # fmt: skip
            return
        except (StoreError, StaleLease) as exc:  # stale: the partition moved meanwhile
            await self._call(
                queue.finish, request.id, self.clock(), error_kind="store", error=str(exc)
            )
            return
        await self._call(queue.finish, request.id, self.clock(), result=result)

    async def _apply(self, r: Request) -> JSON:
        a = r.args
        match r.kind:
            case "acknowledge":
                return _alert(await self.alerts.acknowledge(int(a["alert_id"]), a["by"], a["note"]))
            case "resolve":
                return _alert(await self.alerts.resolve(int(a["alert_id"]), a["by"], a["note"]))
            case "alert_note":
                return _alert(await self.alerts.add_note(int(a["alert_id"]), a["by"], a["text"]))
            case "report":
                alert, joined = await self.alerts.report(
                    r.station_id, a["device_id"], a["unit"], a["category"], a["text"]
                )
                return {**_alert(alert), "joined": joined}
            case "create_work_order":
                return _order(
                    await self._orders().create(
                        int(a["alert_id"]), a["by"], assignee=a["assignee"],
                        due_at_ms=a["due_at_ms"], note=a["note"],
                    )
                )  # fmt: skip
            case "move_work_order":
                return _order(
                    await self._orders().move(
                        int(a["order_id"]), a["state"], a["by"], assignee=a["assignee"],
                        note=a["note"],
                    )
                )  # fmt: skip
            case "work_order_note":
                return _order(await self._orders().add_note(int(a["order_id"]), a["by"], a["text"]))
            case "send_command":
                return _command(
                    await self._commands().create(
                        a["device_id"], a["ctype"], a["unit"], ttl_s=a["ttl_s"],
                        requested_by=a["requested_by"], requested_key=a["requested_key"],
                    )
                )  # fmt: skip
        raise ValueError(f"unknown action {r.kind!r}")

    def _orders(self) -> WorkOrders:
        if self.orders is None:
            raise StoreError("work orders do not run in this worker")
        return self.orders

    def _commands(self) -> Commands:
        if self.commands is None:
            raise StoreError("remote commands do not run in this worker")
        return self.commands
