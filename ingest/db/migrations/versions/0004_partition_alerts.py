"""alerts in partitioned workers (issue 13): the alert_event_ids and delivery_ids sequences
(PostgreSQL), so that the change events and the webhook deliveries of several workers never
share an id. Each partition's event journal is its own id range of ``unobserved``
(``ingest.alerts.store.journal_range``): no column is needed.

Revision ID: 0004
Revises: 0003

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has one writer, which numbers its events and deliveries itself
    op.execute("CREATE SEQUENCE alert_event_ids")
    op.execute(
        "SELECT setval('alert_event_ids', coalesce(max(id), 0) + 1, false) FROM alert_events"
    )
    # delivery ids were the creation time in µs-sized steps (ingest.alerts.notify): the
    # sequence goes on after both the highest stored and the present time, so ids keep
    # increasing with creation time across the change
    op.execute("CREATE SEQUENCE delivery_ids")
    op.execute(
        "SELECT setval('delivery_ids', greatest(coalesce(max(id), 0),"
        " (extract(epoch from clock_timestamp()) * 1000000)::bigint) + 1, false)"
        " FROM deliveries"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE delivery_ids")
        op.execute("DROP SEQUENCE alert_event_ids")
