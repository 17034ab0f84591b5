"""baseline: the 26 tables the stores made themselves, and the device registry

Revision ID: 0001
Revises:

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "alert_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "alert_notes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("author", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("alert_notes", schema=None) as batch_op:
        batch_op.create_index("notes_by_alert", ["alert_id", "id"], unique=False)

    op.create_table(
        "alerts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("unit", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("unit_kind", sa.Text(), nullable=True),
        sa.Column(
            "opened_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "last_seen_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("count", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("last_value", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=True),
        sa.Column("info", sa.Text(), nullable=True),
        sa.Column(
            "acknowledged_at_ms",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column("acknowledged_by", sa.Text(), nullable=True),
        sa.Column(
            "resolved_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("resolved_by", sa.Text(), nullable=True),
        sa.Column("resolved_how", sa.Text(), nullable=True),
        sa.Column(
            "clearing_since_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "escalation_level", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "escalated_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("parent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "suppressed", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("notified", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("reports", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "auto_resolve", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("alerts_by_device", ["device_id", "id"], unique=False)
        batch_op.create_index("alerts_by_station", ["station_id", "id"], unique=False)
        batch_op.create_index("alerts_by_status", ["status", "id"], unique=False)

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.Column(
            "created_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "revoked_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "expires_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.PrimaryKeyConstraint("id"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "audit_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("actor_id", sa.Text(), nullable=False),
        sa.Column("actor_name", sa.Text(), nullable=False),
        sa.Column("actor_role", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index("audit_by_action", ["action", "id"], unique=False)
        batch_op.create_index("audit_by_actor", ["actor_id", "id"], unique=False)

    op.create_table(
        "battery",
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column(
            "flagged",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.Column(
            "flagged_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("flag_reason", sa.Text(), nullable=True),
        sa.Column("max_temp_c", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=True),
        sa.Column(
            "max_rise_c_per_min", sa.Double().with_variant(sa.REAL(), "sqlite"), nullable=True
        ),
        sa.Column(
            "first_seen_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("slot", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("since_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    with op.batch_alter_table("battery", schema=None) as batch_op:
        batch_op.create_index("battery_flagged", ["flagged", "serial"], unique=False)

    op.create_table(
        "battery_clearances",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("actor_id", sa.Text(), nullable=False),
        sa.Column("actor_name", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column(
            "flagged_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("flag_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("battery_clearances", schema=None) as batch_op:
        batch_op.create_index("clearances_by_serial", ["serial", "id"], unique=False)

    op.create_table(
        "battery_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("slot", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("battery_events", schema=None) as batch_op:
        batch_op.create_index("battery_events_by_serial", ["serial", "id"], unique=False)

    op.create_table(
        "battery_stays",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("serial", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("slot", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("from_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("to_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("battery_stays", schema=None) as batch_op:
        batch_op.create_index("stays_by_serial", ["serial", "from_ms"], unique=False)

    op.create_table(
        "commands",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("unit", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.Text(), nullable=False),
        sa.Column("requested_key", sa.Text(), nullable=True),
        sa.Column(
            "requested_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "expires_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("sends", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "sent_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "last_sent_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("info", sa.Text(), nullable=True),
        sa.Column(
            "result_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("late_result", sa.Text(), nullable=True),
        sa.Column("late_info", sa.Text(), nullable=True),
        sa.Column(
            "late_result_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("repeats", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "updated_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.create_index("commands_by_device", ["device_id", "requested_at_ms"], unique=False)
        batch_op.create_index("commands_by_state", ["state"], unique=False)
        batch_op.create_index("commands_by_time", ["requested_at_ms"], unique=False)

    op.create_table(
        "dead_letter_counts",
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("count", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.PrimaryKeyConstraint("reason"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "dead_letter_digests",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column(
            "repeats",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            server_default=sa.text("0"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "dead_letters",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column(
            "received_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "deliveries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column(
            "webhook_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("attempts", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "http_status", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "created_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "finished_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column(
            "next_try_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "deadline_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "last_attempt_at_ms",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index("deliveries_by_alert", ["alert_id", "id"], unique=False)
        batch_op.create_index("deliveries_pending", ["status"], unique=False)

    op.create_table(
        "devices",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index("devices_by_station", ["station_id", "position"], unique=False)

    op.create_table(
        "facts",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "messages",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("boot", sa.Text(), nullable=False),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("ts_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "received_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("payload", sa.Text(), nullable=False),
        postgresql_partition_by="RANGE (ts_ms)",
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("messages_by_time", ["device_id", "ts_ms"], unique=False)
        batch_op.create_index("messages_by_type_time", ["type", "ts_ms"], unique=False)

    # the unique key of a redelivery: a partitioned table's (PostgreSQL) holds its partition key
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "messages_key_pg",
            "messages",
            ["device_id", "boot", "seq", "type", "ts_ms"],
            unique=True,
        )
    else:
        op.create_index(
            "messages_key", "messages", ["device_id", "boot", "seq", "type"], unique=True
        )

    op.create_table(
        "rider_points",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("rider_id", sa.Text(), nullable=False),
        sa.Column("delta", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("report_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "incident_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("reverses", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("actor_role", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("rider_points", schema=None) as batch_op:
        batch_op.create_index("rider_points_by_report", ["report_id"], unique=False)
        batch_op.create_index("rider_points_by_rider", ["rider_id", "id"], unique=False)
        batch_op.create_index(
            "rider_points_once_per_incident",
            ["rider_id", "incident_id"],
            unique=True,
            sqlite_where=sa.text("reverses IS NULL"),
            postgresql_where=sa.text("reverses IS NULL"),
        )
        batch_op.create_index(
            "rider_points_reversed_once",
            ["reverses"],
            unique=True,
            sqlite_where=sa.text("reverses IS NOT NULL"),
            postgresql_where=sa.text("reverses IS NOT NULL"),
        )

    op.create_table(
        "rider_reports",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("rider_id", sa.Text(), nullable=True),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("unit", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("unit_kind", sa.Text(), nullable=True),
        sa.Column("category", sa.Text(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column(
            "decided_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("decided_by", sa.Text(), nullable=True),
        sa.Column("decided_role", sa.Text(), nullable=True),
        sa.Column("decision_note", sa.Text(), nullable=True),
        sa.Column(
            "confirmed_by_alert",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=True,
        ),
        sa.Column(
            "duplicate_of", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("no_points", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("rider_reports", schema=None) as batch_op:
        batch_op.create_index("rider_reports_by_outcome", ["outcome", "id"], unique=False)
        batch_op.create_index("rider_reports_by_rider", ["rider_id", "id"], unique=False)
        batch_op.create_index("rider_reports_by_station", ["station_id", "id"], unique=False)
        batch_op.create_index("rider_reports_by_time", ["at_ms"], unique=False)

    op.create_table(
        "riders",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.Column("nickname", sa.Text(), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column(
            "created_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "rollups",
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("hour_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "id", "hour_ms"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "stations",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "status_blocks",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("hour_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("statuses", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    with op.batch_alter_table("status_blocks", schema=None) as batch_op:
        batch_op.create_index("status_blocks_by_hour", ["hour_ms"], unique=False)
        batch_op.create_index("status_blocks_key", ["device_id", "hour_ms"], unique=True)

    op.create_table(
        "twins",
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "unobserved",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column(
            "received_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "webhooks",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("record", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "work_order_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(always=False),
            nullable=False,
        ),
        sa.Column("order_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("what", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("work_order_log", schema=None) as batch_op:
        batch_op.create_index("work_order_log_by_order", ["order_id", "id"], unique=False)

    op.create_table(
        "work_orders",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=False,
            nullable=False,
        ),
        sa.Column("alert_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("code", sa.Text(), nullable=False),
        sa.Column("severity", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("assignee", sa.Text(), nullable=True),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column(
            "created_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "due_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "assigned_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "on_site_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("on_site_how", sa.Text(), nullable=True),
        sa.Column(
            "fixed_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "closed_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("closed_by", sa.Text(), nullable=True),
        sa.Column(
            "overdue_notices", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "overdue_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "updated_at_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("work_orders", schema=None) as batch_op:
        batch_op.create_index("work_orders_by_state", ["state", "id"], unique=False)
        batch_op.create_index(
            "work_orders_one_per_alert",
            ["alert_id"],
            unique=True,
            sqlite_where=sa.text("state != 'closed'"),
            postgresql_where=sa.text("state != 'closed'"),
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("work_orders", schema=None) as batch_op:
        batch_op.drop_index(
            "work_orders_one_per_alert",
            sqlite_where=sa.text("state != 'closed'"),
            postgresql_where=sa.text("state != 'closed'"),
        )
        batch_op.drop_index("work_orders_by_state")

    op.drop_table("work_orders")
    with op.batch_alter_table("work_order_log", schema=None) as batch_op:
        batch_op.drop_index("work_order_log_by_order")

    op.drop_table("work_order_log")
    op.drop_table("webhooks")
    op.drop_table("unobserved")
    op.drop_table("twins")
    with op.batch_alter_table("status_blocks", schema=None) as batch_op:
        batch_op.drop_index("status_blocks_key")
        batch_op.drop_index("status_blocks_by_hour")

    op.drop_table("status_blocks")
    op.drop_table("stations")
    op.drop_table("rollups")
    op.drop_table("riders")
    with op.batch_alter_table("rider_reports", schema=None) as batch_op:
        batch_op.drop_index("rider_reports_by_time")
        batch_op.drop_index("rider_reports_by_station")
        batch_op.drop_index("rider_reports_by_rider")
        batch_op.drop_index("rider_reports_by_outcome")

    op.drop_table("rider_reports")
    with op.batch_alter_table("rider_points", schema=None) as batch_op:
        batch_op.drop_index(
            "rider_points_reversed_once",
            sqlite_where=sa.text("reverses IS NOT NULL"),
            postgresql_where=sa.text("reverses IS NOT NULL"),
        )
        batch_op.drop_index(
            "rider_points_once_per_incident",
            sqlite_where=sa.text("reverses IS NULL"),
            postgresql_where=sa.text("reverses IS NULL"),
        )
        batch_op.drop_index("rider_points_by_rider")
        batch_op.drop_index("rider_points_by_report")

    op.drop_table("rider_points")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("messages_by_type_time")
        batch_op.drop_index("messages_by_time")

    op.drop_table("messages")
    op.drop_table("facts")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index("devices_by_station")

    op.drop_table("devices")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("deliveries_pending")
        batch_op.drop_index("deliveries_by_alert")

    op.drop_table("deliveries")
    op.drop_table("dead_letters")
    op.drop_table("dead_letter_digests")
    op.drop_table("dead_letter_counts")
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.drop_index("commands_by_time")
        batch_op.drop_index("commands_by_state")
        batch_op.drop_index("commands_by_device")

    op.drop_table("commands")
    with op.batch_alter_table("battery_stays", schema=None) as batch_op:
        batch_op.drop_index("stays_by_serial")

    op.drop_table("battery_stays")
    with op.batch_alter_table("battery_events", schema=None) as batch_op:
        batch_op.drop_index("battery_events_by_serial")

    op.drop_table("battery_events")
    with op.batch_alter_table("battery_clearances", schema=None) as batch_op:
        batch_op.drop_index("clearances_by_serial")

    op.drop_table("battery_clearances")
    with op.batch_alter_table("battery", schema=None) as batch_op:
        batch_op.drop_index("battery_flagged")

    op.drop_table("battery")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index("audit_by_actor")
        batch_op.drop_index("audit_by_action")

    op.drop_table("audit_log")
    op.drop_table("api_keys")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("alerts_by_status")
        batch_op.drop_index("alerts_by_station")
        batch_op.drop_index("alerts_by_device")

    op.drop_table("alerts")
    with op.batch_alter_table("alert_notes", schema=None) as batch_op:
        batch_op.drop_index("notes_by_alert")

    op.drop_table("alert_notes")
    op.drop_table("alert_events")
