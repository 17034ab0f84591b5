"""SQLite's twins as a rowid table (was WITHOUT ROWID): a twin's record is 1.7-2.3 KB, more
than a clustered index keeps in a cell (~1 KB of a 4 KiB page), so each upsert wrote
overflow pages; in a rowid table the record stays in its cell. Measured with the store's
own write: the SQLite write stage took ~40% fewer instructions a message (docs/benchmarks.md,
"The embedded store on SQLAlchemy Core"). The rows are copied; PostgreSQL: nothing to do.

Revision ID: 0007
Revises: 0006

"""

from collections.abc import Sequence

from alembic import op

from ingest.db.migrate import sqlite_twins_shape

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        sqlite_twins_shape(op.get_bind(), rowid=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        sqlite_twins_shape(op.get_bind(), rowid=False)
