"""Alerts, their change events, notes, webhook subscriptions and deliveries (the webhook
outbox: rows ``pending`` until delivered or given up), through a ``Database``
(``ingest.db.database``): the data dir's SQLite file, on a connection of its own (WAL lets
it share the file with the ingest store), or PostgreSQL (``on_postgresql``). Blocking: the
engine and the notifier call it from a worker thread.

Every statement is a SQLAlchemy Core statement over ``ingest.db.schema``, built once: the
constant ones at module level, the filtered reads once per shape of filter (``_shape``).
A SQLite file written by an earlier release is brought up to date when it is opened, by
the migrations (``ingest.db``); a PostgreSQL database by ``chargewatch db upgrade``."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Text,
    Update,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql.expression import Executable

from ingest.alerts.model import ALERT_COLUMNS, Alert, AlertQuery, Timing
from ingest.db.database import CoreStatement, Database, Params, PgDatabase
from ingest.db.dialect import Upserts, dialect_of
from ingest.db.schema import (
    alert_event_ids,
    alert_events,
    alert_ids,
    alert_notes,
    alerts,
    deliveries,
    delivery_ids,
    unobserved,
    webhooks,
)
from ingest.leases import fenced_transaction
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as ingest.sqlite_store
ALERTS_CHANNEL = "cw_alerts"
"""The NOTIFY channel of stored alert events (PostgreSQL): each payload is the highest
event id a committed batch wrote (API replicas fan the events out: ingest.replica)."""

WEBHOOKS_CHANNEL = "cw_webhooks"
"""The NOTIFY channel of webhook subscriptions (PostgreSQL): each added or removed one is
announced with its id, in the transaction that adds or removes it (ingest workers' notifiers
follow it: ingest.worker_alerts)."""

JOURNAL_SPAN = 1 << 40
"""Ids of the event journal (``unobserved``) per partition of the ingest workers: partition
p journals under ids p * JOURNAL_SPAN + 1 and up (``journal_range``), so partitions owned by
different workers never overwrite nor delete each other's entries."""


def journal_range(partition: int) -> tuple[int, int]:
    """The journal ids [lo, hi) of ``partition``'s events (``serve``: partition 0)."""
    if not 0 <= partition < 1 << 20:
        raise ValueError(f"partition {partition} out of range 0..{(1 << 20) - 1}")
    return partition * JOURNAL_SPAN, (partition + 1) * JOURNAL_SPAN


DELIVERY_COLUMNS = (
    "id", "webhook_id", "alert_id", "event", "status", "attempts", "http_status", "error",
    "created_at_ms", "finished_at_ms", "body", "next_try_at_ms", "deadline_at_ms",
    "last_attempt_at_ms",
)  # fmt: skip
EVENT_COLUMNS = ("id", "alert_id", "type", "at_ms", "data")
_FLAGS = ("suppressed", "notified", "auto_resolve")
NOTE_COLUMNS = ("alert_id", "at_ms", "author", "source", "text")

_ZERO: ColumnElement[int] = literal_column("0")  # a constant, not a parameter
# SQLite renders LIMIT with an OFFSET: 0 is written out, not left a nameless parameter
_LIMIT: Any = bindparam("b_limit")
_UPSERT_ALERT = Upserts(alerts)
# the body is written once; a claim is the claimer's (``claim_deliveries``), not a save's
_UPSERT_DELIVERY = Upserts(deliveries, kept=("body", "claimed_until_ms"))
_INSERT_EVENT = insert(alert_events)
_INSERT_NOTE = insert(alert_notes)
_TRIM_EVENTS = delete(alert_events).where(
    alert_events.c.id <= select(func.max(alert_events.c.id)).scalar_subquery() - bindparam("b_kept")
)
_DELETE_UNOBSERVED = delete(unobserved).where(
    unobserved.c.id >= bindparam("b_from"), unobserved.c.id <= bindparam("b_through")
)
_IN_JOURNAL = and_(unobserved.c.id >= bindparam("b_lo"), unobserved.c.id < bindparam("b_hi"))
_UNOBSERVED = (
    select(unobserved.c.id, unobserved.c.device_id, unobserved.c.received_ms, unobserved.c.payload)
    .where(_IN_JOURNAL)
    .order_by(unobserved.c.id)
)
_JOURNAL_LAST = select(func.max(unobserved.c.id)).where(_IN_JOURNAL)
_ALERT = select(*(alerts.c[c] for c in ALERT_COLUMNS))
_ACTIVE = _ALERT.where(alerts.c.status != literal_column("'resolved'")).order_by(alerts.c.id)
_BY_ID = _ALERT.where(alerts.c.id == bindparam("b_id"))
_MAX_ALERT = select(func.coalesce(func.max(alerts.c.id), _ZERO))
_MAX_EVENT = select(func.coalesce(func.max(alert_events.c.id), _ZERO))
_TIMINGS = (
    select(
        alerts.c.station_id,
        alerts.c.code,
        alerts.c.opened_at_ms,
        alerts.c.acknowledged_at_ms,
        alerts.c.resolved_at_ms,
        alerts.c.device_id,
    )
    .where(alerts.c.opened_at_ms >= bindparam("b_from"), alerts.c.opened_at_ms < bindparam("b_to"))
    .order_by(alerts.c.id)
)
_NOTES = (
    select(alert_notes.c.id, *(alert_notes.c[c] for c in NOTE_COLUMNS[1:]))
    .where(alert_notes.c.alert_id == bindparam("b_alert"))
    .order_by(alert_notes.c.id)
)
_EVENTS_AFTER = (
    select(alert_events.c.id, alert_events.c.type, alert_events.c.data)
    .where(alert_events.c.id > bindparam("b_after"))
    .order_by(alert_events.c.id)
    .limit(_LIMIT)
    .offset(_ZERO)
)
_OLDEST_EVENT = select(func.min(alert_events.c.id))
_ADD_WEBHOOK = insert(webhooks).values(record=bindparam("b_record")).returning(webhooks.c.id)
_DELETE_WEBHOOK = delete(webhooks).where(webhooks.c.id == bindparam("b_id"))


def _announced(change: Any) -> Select[tuple[int, Any]]:
    """``change`` (an INSERT or DELETE returning the subscription's id) in one statement that
    NOTIFYs ``WEBHOOKS_CHANNEL`` with that id (PostgreSQL: heard at commit)."""
    changed = change.cte("changed")
    notify = func.pg_notify(literal_column(f"'{WEBHOOKS_CHANNEL}'"), cast(changed.c.id, Text))
    return select(changed.c.id, notify)


_WEBHOOK_CHANGES: dict[str, dict[str, Executable]] = {
    "sqlite": {"add": _ADD_WEBHOOK, "delete": _DELETE_WEBHOOK},
    "postgresql": {
        "add": _announced(_ADD_WEBHOOK),
        "delete": _announced(_DELETE_WEBHOOK.returning(webhooks.c.id)),
    },
}
_PENDING_BY_WEBHOOK = (
    select(deliveries.c.webhook_id, func.count())
    .where(deliveries.c.status == literal_column("'pending'"))
    .group_by(deliveries.c.webhook_id)
)
_WEBHOOKS = select(webhooks.c.id, webhooks.c.record).order_by(webhooks.c.id)


@dataclass(frozen=True, kw_only=True, slots=True)
class WebhookCounts:
    """What one notifier counted of a subscription's deliveries since its last save (or its
    start), added to the stored record in the save's transaction (``save_outbox``): with
    several writers (the ingest workers) each saves its own increments, and the record holds
    their sum. Serve, the one writer, keeps its exact counts this way too."""

    failing_after: int  # failed attempts in a row that mark the subscription failing
    delivered: int = 0
    failed: int = 0
    expired: int = 0
    dropped: int = 0
    failures: int = 0  # failed attempts since the last save, after ``success_at_ms`` if any
    success_at_ms: int | None = None  # the newest successful attempt since the last save
    failure_at_ms: int | None = None  # the newest failed attempt since the last save
    error: str | None = None  # that attempt's error

    def params(self, webhook_id: int) -> dict[str, Any]:
        return {
            "b_id": webhook_id, "b_delivered": self.delivered, "b_failed": self.failed,
            "b_expired": self.expired, "b_dropped": self.dropped, "b_failures": self.failures,
            "b_success_at": self.success_at_ms, "b_failure_at": self.failure_at_ms,
            "b_error": self.error, "b_failing_after": self.failing_after,
        }  # fmt: skip


_WEBHOOK_COUNTERS = ("delivered", "failed", "expired", "dropped")


def _counted(
    number: Callable[[str], ColumnElement[Any]], word: Callable[[str], ColumnElement[Any]]
) -> dict[str, ColumnElement[Any]]:
    """A subscription record's counted fields after adding one ``WebhookCounts`` (its
    binds), from the stored ones (``number``, ``word``: a field of the stored record).

    Failed attempts in a row are those since the newest success any writer saved: a save
    with a newer success starts the count again from its failures after it; a save whose
    newest failure is not older than the stored success adds its failures; any other (its
    failures all before a success saved meanwhile) leaves it. Writers' saves interleave, so
    the count is as exact as the order of the saves: for one writer (serve), exactly its own.
    ``failing``: at least ``failing_after`` of them."""

    def bound(name: str) -> ColumnElement[Any]:
        return cast(bindparam(name), BigInteger)

    def stored(name: str) -> ColumnElement[Any]:
        return func.coalesce(number(name), _ZERO)

    success_at, failure_at, failures = (
        bound("b_success_at"),
        bound("b_failure_at"),
        bound("b_failures"),
    )
    newer_success = and_(success_at.is_not(None), success_at >= stored("last_success_at_ms"))
    newer_failure = and_(failure_at.is_not(None), failure_at >= stored("last_failure_at_ms"))
    in_a_row = case(
        (newer_success, failures),
        (
            and_(failure_at.is_not(None), failure_at >= stored("last_success_at_ms")),
            stored("consecutive_failures") + failures,
        ),
        else_=stored("consecutive_failures"),
    )
    counted = {name: stored(name) + bound(f"b_{name}") for name in _WEBHOOK_COUNTERS}
    return counted | {
        "consecutive_failures": in_a_row,
        "failing": in_a_row >= bound("b_failing_after"),
        "last_success_at_ms": case((newer_success, success_at), else_=number("last_success_at_ms")),
        "last_failure_at_ms": case((newer_failure, failure_at), else_=number("last_failure_at_ms")),
        "last_error": case(
            (newer_failure, cast(bindparam("b_error"), Text)), else_=word("last_error")
        ),
    }


def _add_counts_sqlite() -> Update:
    """``_counted`` into the record with SQLite's JSON functions (one UPDATE: the file's one
    writer at a time)."""
    record = webhooks.c.record

    def field(name: str) -> ColumnElement[Any]:
        return func.json_extract(record, literal_column(f"'$.{name}'"))

    pairs: list[Any] = []
    for name, value in _counted(field, field).items():
        if name == "failing":  # a JSON true or false, not SQLite's 1 or 0
            value = func.json(
                case((value, literal_column("'true'")), else_=literal_column("'false'"))
            )
        pairs += [literal_column(f"'$.{name}'"), value]
    return (
        update(webhooks)
        .where(webhooks.c.id == bindparam("b_id"))
        .values(record=func.json_set(record, *pairs))
    )


def _add_counts_postgresql() -> Update:
    """``_counted`` into the record as jsonb (one UPDATE: a concurrent writer's UPDATE of the
    row waits for this one's commit and then adds to its result)."""
    record = cast(webhooks.c.record, JSONB)

    def word(name: str) -> ColumnElement[Any]:
        text: ColumnElement[Any] = record[name].astext
        return text

    def number(name: str) -> ColumnElement[Any]:
        return cast(word(name), BigInteger)

    pairs: list[Any] = []
    for name, value in _counted(number, word).items():
        pairs += [literal_column(f"'{name}'"), value]
    merged = record.op("||")(func.jsonb_build_object(*pairs))
    return (
        update(webhooks).where(webhooks.c.id == bindparam("b_id")).values(record=cast(merged, Text))
    )


_ADD_COUNTS: dict[str, Update] = {
    "sqlite": _add_counts_sqlite(),
    "postgresql": _add_counts_postgresql(),
}
_MAX_DELIVERY = select(func.coalesce(func.max(deliveries.c.id), _ZERO))
_DELIVERY = select(*(deliveries.c[c] for c in DELIVERY_COLUMNS))
_CLAIMABLE = and_(
    deliveries.c.status == literal_column("'pending'"),
    or_(
        deliveries.c.claimed_until_ms.is_(None), deliveries.c.claimed_until_ms <= bindparam("b_now")
    ),
)
# one statement: a row another writer has locked is skipped (PostgreSQL), one it claimed
# meanwhile no longer matches (re-checked on the row's newest version); SQLite has one
# writer at a time and ignores FOR UPDATE. The claimable rows are a MATERIALIZED CTE: as a
# plain ``IN (subquery)`` PostgreSQL may run the subquery again per row and claim past
# the limit (seen: 5 rows for a limit of 2).
_CLAIMED = (
    select(deliveries.c.id)
    .where(_CLAIMABLE)
    .order_by(deliveries.c.id)
    .limit(_LIMIT)
    .offset(_ZERO)
    .with_for_update(skip_locked=True)
    .cte("claimed")
    .prefix_with("MATERIALIZED")
)
_CLAIM = (
    update(deliveries)
    .where(deliveries.c.id.in_(select(_CLAIMED.c.id)), _CLAIMABLE)
    .values(claimed_until_ms=bindparam("b_until"))
    .returning(*(deliveries.c[c] for c in DELIVERY_COLUMNS))
)
_RESERVE = {
    name: select(sequence.next_value()).select_from(
        func.generate_series(literal_column("1"), bindparam("b_n"))
    )
    for name, sequence in (
        ("alert", alert_ids),
        ("event", alert_event_ids),
        ("delivery", delivery_ids),
    )
}
_RENEW_CLAIMS = (
    update(deliveries)
    .where(
        deliveries.c.id.in_(bindparam("b_ids", expanding=True)),
        deliveries.c.status == literal_column("'pending'"),
        deliveries.c.claimed_until_ms > bindparam("b_now"),
    )
    .values(claimed_until_ms=bindparam("b_until"))
    .returning(deliveries.c.id)
)
_NOTIFY_EVENTS = select(func.pg_notify(literal_column(f"'{ALERTS_CHANNEL}'"), bindparam("b_top")))


def _one_of(column: ColumnElement[Any], name: str, n: int) -> ColumnElement[bool]:
    """``column IN (:name0, .., :name{n-1})``: one bind per value, so a statement is built
    once per number of values (``_shape``), not per call."""
    return column.in_([bindparam(f"{name}{i}") for i in range(n)])


def _alert_row(record: dict[str, Any]) -> dict[str, Any]:
    """An alert's record as its row: flags as the integers both engines store (PostgreSQL
    does not take a bool for a bigint; SQLite stored them as 1 and 0 already)."""
    return record | {flag: int(record[flag]) for flag in _FLAGS}


def _values(name: str, values: Sequence[Any]) -> dict[str, Any]:
    return {f"{name}{i}": v for i, v in enumerate(values)}


@functools.cache
def _alert_query(
    statuses: int, severities: int, station: bool, device: bool, rule: bool, since: bool,
    before: bool,
) -> Select[Any]:  # fmt: skip
    """The read of ``AlertStore.query`` for one shape of filter (cached: a handful of
    shapes, the HTTP query's values are checked against the domain's few)."""
    where: list[ColumnElement[bool]] = []
    if statuses:
        where.append(_one_of(alerts.c.status, "b_status", statuses))
    if severities:
        where.append(_one_of(alerts.c.severity, "b_severity", severities))
    if station:
        where.append(alerts.c.station_id == bindparam("b_station"))
    if device:
        where.append(alerts.c.device_id == bindparam("b_device"))
    if rule:
        where.append(
            or_(alerts.c.rule == bindparam("b_rule"), alerts.c.code == bindparam("b_rule"))
        )
    if since:
        since_ms: Any = bindparam("b_since")
        where.append(
            or_(
                alerts.c.opened_at_ms >= since_ms,
                alerts.c.last_seen_at_ms >= since_ms,
                alerts.c.resolved_at_ms >= since_ms,
            )
        )
    if before:
        where.append(alerts.c.id < bindparam("b_before"))
    return _ALERT.where(*where).order_by(alerts.c.id.desc()).limit(_LIMIT).offset(_ZERO)


@functools.cache
def _delivery_query(
    by_alert: bool, statuses: int, newest_first: bool, limited: bool
) -> Select[Any]:
    """The read of ``AlertStore.deliveries`` for one shape of filter (cached)."""
    q = _DELIVERY
    if by_alert:
        q = q.where(deliveries.c.alert_id == bindparam("b_alert"))
    if statuses:
        q = q.where(_one_of(deliveries.c.status, "b_status", statuses))
    q = q.order_by(deliveries.c.id.desc() if newest_first else deliveries.c.id)
    return q.limit(_LIMIT).offset(_ZERO) if limited else q


@dataclass
class Ops:
    """One batch of writes from the engine, applied in one transaction."""

    alerts: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, int, str, int, str]] = field(default_factory=list)
    notes: list[tuple[int, int, str, str, str]] = field(default_factory=list)
    # the journal of events stored but not yet observed (ingest.sqlite_store) up to this id
    # (from ``unobserved_from``: a partition's own range) is done with once these changes
    # are durable: deleted in the same transaction
    unobserved_through: int = 0
    unobserved_from: int = 0

    def __len__(self) -> int:
        return len(self.alerts) + len(self.events) + len(self.notes) + (self.unobserved_through > 0)

    def pieces(self) -> list[Ops]:
        """Each change on its own, to find the one a store refuses."""
        out = [Ops(alerts={i: rec}) for i, rec in self.alerts.items()]
        out += [Ops(events=[e]) for e in self.events]
        out += [Ops(notes=[n]) for n in self.notes]
        if self.unobserved_through:
            out.append(
                Ops(
                    unobserved_through=self.unobserved_through, unobserved_from=self.unobserved_from
                )
            )
        return out

    def merge(self, other: Ops) -> None:
        self.alerts.update(other.alerts)
        self.events += other.events
        self.notes += other.notes
        self.unobserved_through = max(self.unobserved_through, other.unobserved_through)
        self.unobserved_from = max(self.unobserved_from, other.unobserved_from)


class AlertStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._dialect = dialect_of(db)
        self.path: Path | None = db.path if isinstance(db, SQLiteDB) else None

    @classmethod
    def at(cls, path: str | Path, *, synchronous: str = "FULL") -> AlertStore:
        """On the embedded SQLite file at ``path``."""
        return cls(SQLiteDB(path, synchronous=synchronous))

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> AlertStore:
        return cls.at(Path(data_dir) / DB_FILE, **options)

    @classmethod
    def on_postgresql(cls, url: str, **options: Any) -> AlertStore:
        """On PostgreSQL at ``url`` (its schema current: ``chargewatch db upgrade``)."""
        return cls(PgDatabase(url, **options))

    def close(self) -> None:
        self._db.close()

    def _query(self, statement: Executable, params: Params | None = None) -> list[tuple[Any, ...]]:
        return self._db.query(statement, params)

    # -- alerts ------------------------------------------------------------------------

    def apply(self, ops: Ops, events_kept: int, fence: tuple[int, int] | None = None) -> None:
        """The changes in one transaction. With ``fence`` (partition, epoch; PostgreSQL),
        only while that partition's lease is at that epoch: else ``StaleLease``, and
        nothing is written (a worker that lost the partition writes no more of its
        alerts)."""
        statements: list[CoreStatement] = [
            (_UPSERT_ALERT.for_(self._dialect), [_alert_row(r) for r in ops.alerts.values()]),
            (_INSERT_EVENT, [dict(zip(EVENT_COLUMNS, e, strict=True)) for e in ops.events]),
            (_INSERT_NOTE, [dict(zip(NOTE_COLUMNS, n, strict=True)) for n in ops.notes]),
        ]
        if ops.events:
            statements.append((_TRIM_EVENTS, [{"b_kept": events_kept}]))
            if self._dialect == "postgresql":  # heard at commit, not before
                top = max(e[0] for e in ops.events)
                statements.append((_NOTIFY_EVENTS, [{"b_top": str(top)}]))
        if ops.unobserved_through:
            statements.append(
                (
                    _DELETE_UNOBSERVED,
                    [{"b_from": ops.unobserved_from, "b_through": ops.unobserved_through}],
                )
            )
        fenced_transaction(self._db, statements, fence)

    def unobserved(self, partition: int = 0) -> list[tuple[int, str, int, str]]:
        """The journal of stored events whose alert effects are not durable yet, oldest
        first, as (id, device_id, received_ms, payload): ``partition``'s (``journal_range``;
        ``serve`` journals as partition 0)."""
        lo, hi = journal_range(partition)
        rows = self._query(_UNOBSERVED, {"b_lo": lo, "b_hi": hi})
        return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    def journal_last(self, partition: int) -> int:
        """The highest journal id of ``partition``, or the one below its range when it has
        none: its pipeline numbers new entries after it."""
        lo, hi = journal_range(partition)
        (top,) = self._query(_JOURNAL_LAST, {"b_lo": lo, "b_hi": hi})[0]
        return lo if top is None else int(top)

    def _alerts(self, statement: Executable, params: Params | None = None) -> list[Alert]:
        rows = self._query(statement, params)
        return [Alert.from_record(dict(zip(ALERT_COLUMNS, row, strict=True))) for row in rows]

    def load_active(self, stations: Collection[str] | None = None) -> list[Alert]:
        """The unresolved alerts (of ``stations`` only, when given: a partition's)."""
        found = self._alerts(_ACTIVE)
        if stations is None:
            return found
        return [a for a in found if a.station_id in stations]

    def next_ids(self) -> tuple[int, int]:
        (alert_max,) = self._query(_MAX_ALERT)[0]
        (event_max,) = self._query(_MAX_EVENT)[0]
        return int(alert_max) + 1, int(event_max) + 1

    def reserve_alert_ids(self, n: int) -> list[int]:
        """``n`` alert ids no other writer gets, increasing (PostgreSQL: the ``alert_ids``
        sequence, shared by every writer on the database). On SQLite, the file's one writer
        numbers its alerts itself from ``next_ids``, as ever: the ids after the highest."""
        if not 1 <= n <= 10_000:
            raise ValueError(f"reserve 1 to 10000 alert ids at once, not {n}")
        if self._dialect == "postgresql":
            return self.reserve_ids("alert", n)
        first, _ = self.next_ids()
        return list(range(first, first + n))

    def reserve_ids(self, kind: str, n: int) -> list[int]:
        """``n`` ids no other writer gets, increasing, from PostgreSQL's sequence of
        ``kind``: "alert", "event" (change events) or "delivery" (webhook deliveries).
        SQLite has one writer, numbering them itself: refused there."""
        if not 1 <= n <= 10_000:
            raise ValueError(f"reserve 1 to 10000 ids at once, not {n}")
        if self._dialect != "postgresql":
            raise ValueError("ids are reserved from PostgreSQL's sequences only")
        statement = _RESERVE.get(kind)
        if statement is None:
            raise ValueError(f"no sequence of {kind!r} ids: alert, event or delivery")
        return sorted(int(r[0]) for r in self._query(statement, {"b_n": n}))

    def get(self, alert_id: int) -> Alert | None:
        found = self._alerts(_BY_ID, {"b_id": alert_id})
        return found[0] if found else None

    def query(self, q: AlertQuery) -> list[Alert]:
        statuses, severities = tuple(dict.fromkeys(q.status)), tuple(dict.fromkeys(q.severity))
        statement = _alert_query(
            len(statuses), len(severities), q.station is not None, q.device is not None,
            q.rule is not None, q.since_ms is not None, q.before_id is not None,
        )  # fmt: skip
        params = {
            **_values("b_status", statuses),
            **_values("b_severity", severities),
            "b_station": q.station,
            "b_device": q.device,
            "b_rule": q.rule,
            "b_since": q.since_ms,
            "b_before": q.before_id,
            "b_limit": q.limit,
        }
        return self._alerts(statement, params)

    def timings(self, from_ms: int, to_ms: int) -> list[Timing]:
        """Station, code, opened, acknowledged, resolved (ms) and device of the alerts
        opened in [from_ms, to_ms) (ingest.alerts.repair)."""
        rows = self._query(_TIMINGS, {"b_from": from_ms, "b_to": to_ms})
        return [Timing(str(r[0]), str(r[1]), int(r[2]), r[3], r[4], r[5]) for r in rows]

    def notes(self, alert_id: int) -> list[dict[str, Any]]:
        rows = self._query(_NOTES, {"b_alert": alert_id})
        keys = ("id", "at_ms", "author", "source", "text")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def events_after(self, after_id: int, limit: int = 1000) -> list[tuple[int, str, str]]:
        rows = self._query(_EVENTS_AFTER, {"b_after": after_id, "b_limit": limit})
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def oldest_event_id(self) -> int | None:
        (oldest,) = self._query(_OLDEST_EVENT)[0]
        return None if oldest is None else int(oldest)

    # -- webhooks ----------------------------------------------------------------------

    def add_webhook(self, record: dict[str, Any]) -> int:
        """Store a subscription; its id. Announced on ``WEBHOOKS_CHANNEL`` (PostgreSQL)."""
        statement = _WEBHOOK_CHANGES[self._dialect]["add"]
        done = self._db.execute(statement, {"b_record": json.dumps(record)})
        return int(done.rows[0][0])

    def delete_webhook(self, webhook_id: int) -> bool:
        """Remove a subscription (its deliveries stay, for the log); whether it was there.
        Announced on ``WEBHOOKS_CHANNEL`` (PostgreSQL)."""
        statement = _WEBHOOK_CHANGES[self._dialect]["delete"]
        done = self._db.execute(statement, {"b_id": webhook_id})
        return bool(done.rows) or done.rowcount > 0

    def webhooks(self) -> list[tuple[int, dict[str, Any]]]:
        rows = self._query(_WEBHOOKS)
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    def pending_by_webhook(self) -> dict[int, int]:
        """Deliveries pending (waiting or in flight, in any writer), by subscription."""
        return {int(webhook_id): int(n) for webhook_id, n in self._query(_PENDING_BY_WEBHOOK)}

    def save_outbox(
        self,
        deliveries: Sequence[Sequence[Any]],
        webhooks: Sequence[tuple[int, WebhookCounts]] = (),
        *,
        claim_until_ms: int | None = None,
    ) -> None:
        """Upsert deliveries (rows in ``DELIVERY_COLUMNS`` order; the body is written once)
        and add subscriptions' counts to their records (``WebhookCounts``; a subscription
        removed meanwhile is skipped), in one transaction. A new row is claimed by its
        writer until ``claim_until_ms`` (None: by nobody); a saved row keeps its claim."""
        self._db.transaction(
            [
                (
                    _UPSERT_DELIVERY.for_(self._dialect),
                    [
                        {
                            **dict(zip(DELIVERY_COLUMNS, d, strict=True)),
                            "claimed_until_ms": claim_until_ms,
                        }
                        for d in deliveries
                    ],
                ),
                (_ADD_COUNTS[self._dialect], [counts.params(i) for i, counts in webhooks]),
            ]
        )

    def claim_deliveries(
        self, now_ms: int, lease_ms: int, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Take up to ``limit`` pending deliveries, oldest first, that no writer holds (never
        claimed, or its claim ran out by ``now_ms``), for ``lease_ms``: atomically, so two
        writers on one database never take the same one; a writer that dies lets its
        claims run out for another to take them."""
        done = self._db.execute(
            _CLAIM, {"b_now": now_ms, "b_until": now_ms + lease_ms, "b_limit": limit}
        )
        rows = sorted(done.rows, key=lambda r: int(r[0]))
        return [dict(zip(DELIVERY_COLUMNS, row, strict=True)) for row in rows]

    def renew_claims(self, ids: Sequence[int], now_ms: int, lease_ms: int) -> set[int]:
        """Extend this writer's claims on the pending deliveries ``ids`` to ``now_ms +
        lease_ms``; returns those renewed. One whose claim ran out (another writer may have
        taken it) is left alone: the caller stops sending it."""
        if not ids:
            return set()
        done = self._db.execute(
            _RENEW_CLAIMS, {"b_ids": list(ids), "b_now": now_ms, "b_until": now_ms + lease_ms}
        )
        return {int(r[0]) for r in done.rows}

    def max_delivery_id(self) -> int:
        (top,) = self._query(_MAX_DELIVERY)[0]
        return int(top)

    def deliveries(
        self,
        alert_id: int | None = None,
        *,
        status: str | Sequence[str] | None = None,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        statuses: tuple[str, ...] = ()
        if status is not None:
            statuses = tuple(dict.fromkeys([status] if isinstance(status, str) else status))
        statement = _delivery_query(
            alert_id is not None, len(statuses), newest_first, limit is not None
        )
        params = {**_values("b_status", statuses), "b_alert": alert_id, "b_limit": limit}
        rows = self._query(statement, params)
        return [dict(zip(DELIVERY_COLUMNS, row, strict=True)) for row in rows]
