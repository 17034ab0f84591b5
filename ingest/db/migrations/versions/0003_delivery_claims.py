"""delivery claims and alert ids across workers: deliveries.claimed_until_ms (the outbox's
claim, ingest.alerts.store), the alert_ids sequence (PostgreSQL)

Revision ID: 0003
Revises: 0002

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "deliveries",
        sa.Column(
            "claimed_until_ms", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE alert_ids")
        op.execute("SELECT setval('alert_ids', coalesce(max(id), 0) + 1, false) FROM alerts")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE alert_ids")
    op.drop_column("deliveries", "claimed_until_ms")
