"""Every table and index of the state store, once, for SQLite (``serve``) and PostgreSQL
(the cluster): one SQLAlchemy ``MetaData``. The migrations (``ingest.db.migrations``) bring a
database to it; the stores never create tables themselves.

Portable types: ids and epoch-millisecond times are ``BigInteger`` on PostgreSQL and
``INTEGER`` on SQLite (its rowid alias and 64-bit integers), payloads ``LargeBinary``
(``BLOB`` / ``bytea``), reals ``DOUBLE PRECISION`` / ``REAL``. Ids the database numbers are
identity columns on PostgreSQL; ids the service numbers itself (alerts, their events, work
orders, the event journal) are plain keys. SQLite-only shape (``WITHOUT ROWID``,
``AUTOINCREMENT``) is a dialect option, so a SQLite file has the tables, keys, rowid aliases
and indexes the stores made before migrations existed (``ingest.db.migrate`` adopts such a
file; tests/db/pre_alembic_schema.sql is their DDL), but for ``twins``, a rowid table since
migration 0007 (WITHOUT ROWID before it; Alembic's comparison does not see the shape).

History (``messages``) is one table on both engines: on PostgreSQL it is range-partitioned
by device time, a partition per day (``messages_pYYYYMMDD``, made ahead and dropped whole
by the store, never by the migrations), and its unique key includes ``ts_ms`` as a key of a
partitioned table must.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.types import TypeEngine

metadata = MetaData()

Int: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")
"""An integer that holds epoch milliseconds (and seq < 2^53): bigint, INTEGER on SQLite."""
Real: TypeEngine[float] = Double().with_variant(sqlite.REAL(), "sqlite")
Blob = LargeBinary()


def _id(*, numbered_by_db: bool) -> Column[int]:
    """``id``, the primary key: an identity on PostgreSQL when the database numbers the rows
    (SQLite's rowid alias does the same there)."""
    if numbered_by_db:
        return Column("id", Int, Identity(), primary_key=True)
    return Column("id", Int, primary_key=True, autoincrement=False)


# -- history and state of ingest (ingest.sqlite_store) ----------------------------------

messages = Table(
    "messages",
    metadata,
    Column("device_id", Text, nullable=False),
    Column("boot", Text, nullable=False),
    Column("seq", Int, nullable=False),
    Column("type", Text, nullable=False),
    Column("station_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("ts_ms", Int, nullable=False),
    Column("received_ms", Int, nullable=False),
    Column("payload", Text, nullable=False),
    postgresql_partition_by="RANGE (ts_ms)",
)
# SQLite: a rowid table with a unique index, not WITHOUT ROWID: rows carry a ~0.3-1 KiB
# payload, and inserting them into a clustered index measured 4x slower (50 vs 13 us a row).
# PostgreSQL: a partitioned table's unique key must hold the partition key (ts_ms); a death
# (stamped with its arrival time) is kept once by the store instead (ingest.pg_store).
Index("messages_key", messages.c.device_id, messages.c.boot, messages.c.seq, messages.c.type,
      unique=True).ddl_if(dialect="sqlite")  # fmt: skip
Index("messages_key_pg", messages.c.device_id, messages.c.boot, messages.c.seq,
      messages.c.type, messages.c.ts_ms, unique=True).ddl_if(dialect="postgresql")  # fmt: skip
Index("messages_by_time", messages.c.device_id, messages.c.ts_ms)
# housekeeping's reads by time without scanning the table while ingest waits
Index("messages_by_type_time", messages.c.type, messages.c.ts_ms)

# SQLite: a rowid table (migration 0007), not WITHOUT ROWID: a record (1.7-2.3 KB) is more
# than a clustered index keeps in a cell, and upserts writing overflow pages cost the write
# ~40% more instructions a message (docs/benchmarks.md)
twins = Table(
    "twins",
    metadata,
    Column("device_id", Text, primary_key=True),
    Column("record", Text, nullable=False),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    _id(numbered_by_db=True),
    Column("received_ms", Int, nullable=False),
    Column("topic", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("payload", Blob, nullable=False),
    Column("size", Int, nullable=False),
    sqlite_autoincrement=True,
)

dead_letter_counts = Table(
    "dead_letter_counts",
    metadata,
    Column("reason", Text, primary_key=True),
    Column("count", Int, nullable=False),
    sqlite_with_rowid=False,
)

# what was dead-lettered, by digest of (topic, size, payload kept): a retained message
# replayed on every subscribe is recognised and counted here instead of stored again
dead_letter_digests = Table(
    "dead_letter_digests",
    metadata,
    _id(numbered_by_db=True),
    Column("digest", Blob, nullable=False, unique=True),
    Column("repeats", Int, nullable=False, server_default=text("0")),
    sqlite_autoincrement=True,
)

# the statuses of one device and hour of device time, once the hour is over (SQLite)
status_blocks = Table(
    "status_blocks",
    metadata,
    Column("device_id", Text, nullable=False),
    Column("hour_ms", Int, nullable=False),
    Column("statuses", Int, nullable=False),
    Column("data", Blob, nullable=False),
)
Index("status_blocks_key", status_blocks.c.device_id, status_blocks.c.hour_ms, unique=True)
Index("status_blocks_by_hour", status_blocks.c.hour_ms)

# hourly rollups (devices.rollup) of a device or a station, kept for years
rollups = Table(
    "rollups",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("id", Text, primary_key=True),
    Column("hour_ms", Int, primary_key=True),
    Column("data", Text, nullable=False),
    sqlite_with_rowid=False,
)

# facts the service must remember across restarts (e.g. that the broker gave us a session)
facts = Table(
    "facts",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
    sqlite_with_rowid=False,
)

# events stored whose alert effects are not durable yet (ingest.alerts.engine)
unobserved = Table(
    "unobserved",
    metadata,
    _id(numbered_by_db=False),
    Column("device_id", Text, nullable=False),
    Column("received_ms", Int, nullable=False),
    Column("payload", Text, nullable=False),
)

# -- alerts (ingest.alerts.store) -------------------------------------------------------

alerts = Table(
    "alerts",
    metadata,
    _id(numbered_by_db=False),
    Column("rule", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("severity", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("station_id", Text, nullable=False),
    Column("device_id", Text),
    Column("unit", Int),
    Column("unit_kind", Text),
    Column("opened_at_ms", Int, nullable=False),
    Column("last_seen_at_ms", Int, nullable=False),
    Column("count", Int, nullable=False),
    Column("last_value", Real),
    Column("info", Text),
    Column("acknowledged_at_ms", Int),
    Column("acknowledged_by", Text),
    Column("resolved_at_ms", Int),
    Column("resolved_by", Text),
    Column("resolved_how", Text),
    Column("clearing_since_ms", Int),
    Column("escalation_level", Int, nullable=False),
    Column("escalated_at_ms", Int),
    Column("parent_id", Int),
    Column("suppressed", Int, nullable=False),
    Column("notified", Int, nullable=False),
    Column("reports", Int, nullable=False),
    Column("auto_resolve", Int, nullable=False),
)
Index("alerts_by_status", alerts.c.status, alerts.c.id)
Index("alerts_by_device", alerts.c.device_id, alerts.c.id)
Index("alerts_by_station", alerts.c.station_id, alerts.c.id)

alert_events = Table(
    "alert_events",
    metadata,
    _id(numbered_by_db=False),
    Column("alert_id", Int, nullable=False),
    Column("type", Text, nullable=False),
    Column("at_ms", Int, nullable=False),
    Column("data", Text, nullable=False),
)

alert_notes = Table(
    "alert_notes",
    metadata,
    _id(numbered_by_db=True),
    Column("alert_id", Int, nullable=False),
    Column("at_ms", Int, nullable=False),
    Column("author", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("text", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("notes_by_alert", alert_notes.c.alert_id, alert_notes.c.id)

webhooks = Table(
    "webhooks",
    metadata,
    _id(numbered_by_db=True),
    Column("record", Text, nullable=False),
    sqlite_autoincrement=True,
)

# the webhook outbox: rows ``pending`` until delivered or given up
deliveries = Table(
    "deliveries",
    metadata,
    _id(numbered_by_db=True),
    Column("webhook_id", Int, nullable=False),
    Column("alert_id", Int, nullable=False),
    Column("event", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempts", Int, nullable=False),
    Column("http_status", Int),
    Column("error", Text),
    Column("created_at_ms", Int, nullable=False),
    Column("finished_at_ms", Int),
    Column("body", Text, nullable=False),
    Column("next_try_at_ms", Int),
    Column("deadline_at_ms", Int),
    Column("last_attempt_at_ms", Int),
    # a pending delivery is being sent by the writer that claimed it until then (None: by
    # none; ingest.alerts.store ``claim_deliveries``)
    Column("claimed_until_ms", Int),
    sqlite_autoincrement=True,
)
Index("deliveries_by_alert", deliveries.c.alert_id, deliveries.c.id)
Index("deliveries_pending", deliveries.c.status)

# alert ids on PostgreSQL, unique across the writers (ingest.alerts.store ``reserve_alert_ids``)
alert_ids = Sequence("alert_ids", metadata=metadata)
# change event ids and webhook delivery ids on PostgreSQL, likewise (migration 0004)
alert_event_ids = Sequence("alert_event_ids", metadata=metadata)
delivery_ids = Sequence("delivery_ids", metadata=metadata)

# -- work orders (ingest.alerts.order_store) --------------------------------------------

work_orders = Table(
    "work_orders",
    metadata,
    _id(numbered_by_db=False),
    Column("alert_id", Int, nullable=False),
    Column("station_id", Text, nullable=False),
    Column("device_id", Text),
    Column("rule", Text, nullable=False),
    Column("code", Text, nullable=False),
    Column("severity", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("assignee", Text),
    Column("created_by", Text, nullable=False),
    Column("created_at_ms", Int, nullable=False),
    Column("due_at_ms", Int, nullable=False),
    Column("assigned_at_ms", Int),
    Column("on_site_at_ms", Int),
    Column("on_site_how", Text),
    Column("fixed_at_ms", Int),
    Column("closed_at_ms", Int),
    Column("closed_by", Text),
    Column("overdue_notices", Int, nullable=False),
    Column("overdue_at_ms", Int),
    Column("updated_at_ms", Int, nullable=False),
)
# one order per alert while it is not closed, said to any writer
_open_order = work_orders.c.state != text("'closed'")
Index("work_orders_one_per_alert", work_orders.c.alert_id, unique=True,
      sqlite_where=_open_order, postgresql_where=_open_order)  # fmt: skip
Index("work_orders_by_state", work_orders.c.state, work_orders.c.id)
# work order ids on PostgreSQL, unique across the ingest workers (migration 0006; the
# order store's ``reserve_ids``); SQLite's one writer numbers them itself
work_order_ids = Sequence("work_order_ids", metadata=metadata)

work_order_log = Table(
    "work_order_log",
    metadata,
    _id(numbered_by_db=True),
    Column("order_id", Int, nullable=False),
    Column("at_ms", Int, nullable=False),
    Column("actor", Text, nullable=False),
    Column("what", Text, nullable=False),
    Column("note", Text),
    sqlite_autoincrement=True,
)
Index("work_order_log_by_order", work_order_log.c.order_id, work_order_log.c.id)

# -- battery passports (ingest.passport_store) ------------------------------------------

battery = Table(
    "battery",
    metadata,
    Column("serial", Text, primary_key=True),
    Column("flagged", Int, nullable=False, server_default=text("0")),
    Column("flagged_at_ms", Int),
    Column("flag_reason", Text),
    Column("max_temp_c", Real),
    Column("max_rise_c_per_min", Real),
    Column("first_seen_ms", Int, nullable=False),
    Column("device_id", Text),
    Column("slot", Int),
    Column("since_ms", Int),
)
Index("battery_flagged", battery.c.flagged, battery.c.serial)

battery_stays = Table(
    "battery_stays",
    metadata,
    _id(numbered_by_db=True),
    Column("serial", Text, nullable=False),
    Column("device_id", Text, nullable=False),
    Column("slot", Int, nullable=False),
    Column("from_ms", Int, nullable=False),
    Column("to_ms", Int),
)
Index("stays_by_serial", battery_stays.c.serial, battery_stays.c.from_ms)

battery_events = Table(
    "battery_events",
    metadata,
    _id(numbered_by_db=True),
    Column("serial", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("alert_id", Int),
    Column("at_ms", Int, nullable=False),
    Column("device_id", Text),
    Column("slot", Int),
    Column("detail", Text),
)
Index("battery_events_by_serial", battery_events.c.serial, battery_events.c.id)

battery_clearances = Table(
    "battery_clearances",
    metadata,
    _id(numbered_by_db=True),
    Column("serial", Text, nullable=False),
    Column("at_ms", Int, nullable=False),
    Column("actor_id", Text, nullable=False),
    Column("actor_name", Text, nullable=False),
    Column("note", Text, nullable=False),
    Column("flagged_at_ms", Int),
    Column("flag_reason", Text),
)
Index("clearances_by_serial", battery_clearances.c.serial, battery_clearances.c.id)

# -- remote commands (ingest.commands.store) --------------------------------------------

commands = Table(
    "commands",
    metadata,
    Column("id", Text, primary_key=True),
    Column("device_id", Text, nullable=False),
    Column("station_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("unit", Int),
    Column("state", Text, nullable=False),
    Column("requested_by", Text, nullable=False),
    Column("requested_key", Text),
    Column("requested_at_ms", Int, nullable=False),
    Column("expires_at_ms", Int, nullable=False),
    Column("payload", Text, nullable=False),
    Column("sends", Int, nullable=False),
    Column("sent_at_ms", Int),
    Column("last_sent_at_ms", Int),
    Column("result", Text),
    Column("info", Text),
    Column("result_at_ms", Int),
    Column("late_result", Text),
    Column("late_info", Text),
    Column("late_result_at_ms", Int),
    Column("repeats", Int, nullable=False),
    Column("updated_at_ms", Int, nullable=False),
    sqlite_with_rowid=False,
)
Index("commands_by_device", commands.c.device_id, commands.c.requested_at_ms)
Index("commands_by_time", commands.c.requested_at_ms)
Index("commands_by_state", commands.c.state)

# -- API keys, audit log, riders (api.auth, api.audit, api.sentinels) -------------------

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("hash", Text, nullable=False),
    Column("created_at_ms", Int, nullable=False),
    Column("revoked_at_ms", Int),
    Column("expires_at_ms", Int),
    sqlite_with_rowid=False,
)

audit_log = Table(
    "audit_log",
    metadata,
    _id(numbered_by_db=True),
    Column("at_ms", Int, nullable=False),
    Column("actor_id", Text, nullable=False),
    Column("actor_name", Text, nullable=False),
    Column("actor_role", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("detail", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("audit_by_actor", audit_log.c.actor_id, audit_log.c.id)
Index("audit_by_action", audit_log.c.action, audit_log.c.id)

riders = Table(
    "riders",
    metadata,
    Column("id", Text, primary_key=True),
    Column("hash", Text, nullable=False),
    Column("nickname", Text, nullable=False),
    Column("station_id", Text, nullable=False),
    Column("created_at_ms", Int, nullable=False),
    sqlite_with_rowid=False,
)

rider_reports = Table(
    "rider_reports",
    metadata,
    _id(numbered_by_db=True),
    Column("rider_id", Text),
    Column("station_id", Text, nullable=False),
    Column("device_id", Text),
    Column("unit", Int),
    Column("unit_kind", Text),
    Column("category", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("alert_id", Int, nullable=False),
    Column("at_ms", Int, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("decided_at_ms", Int),
    Column("decided_by", Text),
    Column("decided_role", Text),
    Column("decision_note", Text),
    Column("confirmed_by_alert", Int),
    Column("duplicate_of", Int),
    Column("no_points", Text),
    sqlite_autoincrement=True,
)
Index("rider_reports_by_rider", rider_reports.c.rider_id, rider_reports.c.id)
Index("rider_reports_by_outcome", rider_reports.c.outcome, rider_reports.c.id)
Index("rider_reports_by_station", rider_reports.c.station_id, rider_reports.c.id)
Index("rider_reports_by_time", rider_reports.c.at_ms)  # the hourly rollups count them

rider_points = Table(
    "rider_points",
    metadata,
    _id(numbered_by_db=True),
    Column("rider_id", Text, nullable=False),
    Column("delta", Int, nullable=False),
    Column("reason", Text, nullable=False),
    Column("note", Text),
    Column("report_id", Int),
    Column("alert_id", Int),
    Column("incident_id", Int),
    Column("reverses", Int),
    Column("at_ms", Int, nullable=False),
    Column("actor", Text, nullable=False),
    Column("actor_role", Text, nullable=False),
    sqlite_autoincrement=True,
)
Index("rider_points_by_rider", rider_points.c.rider_id, rider_points.c.id)
Index("rider_points_by_report", rider_points.c.report_id)
_first_award = rider_points.c.reverses.is_(None)
_reversal = rider_points.c.reverses.is_not(None)
Index("rider_points_once_per_incident", rider_points.c.rider_id, rider_points.c.incident_id,
      unique=True, sqlite_where=_first_award, postgresql_where=_first_award)  # fmt: skip
Index("rider_points_reversed_once", rider_points.c.reverses, unique=True,
      sqlite_where=_reversal, postgresql_where=_reversal)  # fmt: skip

# -- the device registry: the catalog (devices.catalog), importable from its JSON -------

stations = Table(
    "stations",
    metadata,
    Column("id", Text, primary_key=True),
    Column("position", Int, nullable=False),  # the catalog's order
    Column("spec", Text, nullable=False),  # the station's JSON without its devices
    sqlite_with_rowid=False,
)

devices = Table(
    "devices",
    metadata,
    Column("id", Text, primary_key=True),
    Column("station_id", Text, nullable=False),
    Column("position", Int, nullable=False),  # the order within its station
    Column("kind", Text, nullable=False),
    Column("spec", Text, nullable=False),  # the device's JSON (devices.catalog.DeviceSpec)
    sqlite_with_rowid=False,
)
Index("devices_by_station", devices.c.station_id, devices.c.position)

# -- the ingest cluster (ingest.leases): partition leases and members ------------------

# a partition's fencing epoch, bumped by each owner that takes it (ingest.leases.check_fence)
partition_leases = Table(
    "partition_leases",
    metadata,
    Column("partition", Integer, CheckConstraint("partition >= 0"), primary_key=True,
           autoincrement=False),
    Column("epoch", BigInteger, CheckConstraint("epoch > 0"), nullable=False),
    Column("owner", Text, nullable=False),
    Column("acquired_at", DateTime(timezone=True), nullable=False),
)  # fmt: skip

# workers that joined; a member is live while its advisory lock is held (ingest.leases)
ingest_member_ids = Sequence("ingest_member_ids", metadata=metadata, data_type=Integer)
ingest_members = Table(
    "ingest_members",
    metadata,
    Column("member_id", Integer, primary_key=True, autoincrement=False),
    Column("name", Text, nullable=False),
    Column("joined_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# maintainers' actions taken on an API replica, waiting for the worker that owns their
# station (ingest.actions): queued -> applying -> done | failed, or expired when the replica
# stopped waiting before a worker took it
action_queue = Table(
    "action_queue",
    metadata,
    _id(numbered_by_db=True),
    Column("station_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("args", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("result", Text),
    Column("error_kind", Text),
    Column("error", Text),
    Column("requested_at_ms", Int, nullable=False),
    Column("expires_at_ms", Int, nullable=False),
    Column("done_at_ms", Int),
    sqlite_autoincrement=True,
)
Index("action_queue_by_state", action_queue.c.state, action_queue.c.station_id)

CLUSTER_TABLES = frozenset({"partition_leases", "ingest_members", "action_queue"})
"""Used on PostgreSQL only (``chargewatch ingest``); made on SQLite too, one schema for both."""

LEGACY_TABLES = frozenset(metadata.tables) - {"stations", "devices"} - CLUSTER_TABLES
"""The tables the stores created themselves before migrations (a file to adopt has them)."""
