"""work orders in partitioned workers (issue 13): the work_order_ids sequence (PostgreSQL),
so that the work orders of several workers never share an id (ingest.alerts.order_store
``reserve_ids``).

Revision ID: 0006
Revises: 0005

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return  # SQLite has one writer, which numbers its work orders itself
    op.execute("CREATE SEQUENCE work_order_ids")
    op.execute("SELECT setval('work_order_ids', coalesce(max(id), 0) + 1, false) FROM work_orders")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE work_order_ids")
