"""the action queue: maintainers' actions taken on an API replica, waiting for the worker
that owns their station (ingest.actions)

Revision ID: 0005
Revises: 0004

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    integer = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "action_queue",
        sa.Column("id", integer, sa.Identity(), nullable=False),
        sa.Column("station_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("args", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("error_kind", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("requested_at_ms", integer, nullable=False),
        sa.Column("expires_at_ms", integer, nullable=False),
        sa.Column("done_at_ms", integer, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    op.create_index("action_queue_by_state", "action_queue", ["state", "station_id"])


def downgrade() -> None:
    op.drop_index("action_queue_by_state", table_name="action_queue")
    op.drop_table("action_queue")
