"""the ingest cluster's tables: partition leases (fencing epochs) and members

Revision ID: 0002
Revises: 0001

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "partition_leases",
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("partition >= 0"),
        sa.CheckConstraint("epoch > 0"),
        sa.PrimaryKeyConstraint("partition"),
    )
    op.create_table(
        "ingest_members",
        sa.Column("member_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "joined_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()")
            if op.get_bind().dialect.name == "postgresql"
            else sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("member_id"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            sa.schema.CreateSequence(sa.Sequence("ingest_member_ids", data_type=sa.Integer()))
        )


def downgrade() -> None:
    """Downgrade schema."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(sa.schema.DropSequence(sa.Sequence("ingest_member_ids")))
    op.drop_table("ingest_members")
    op.drop_table("partition_leases")
