"""Alembic's entry point, driven from ``ingest.db.migrate`` (no alembic.ini): the caller puts
an open connection in ``config.attributes["connection"]``."""

from __future__ import annotations

from alembic import context

from ingest.db.migrate import include_name, include_object
from ingest.db.schema import metadata

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    include_name=include_name,
    include_object=include_object(connection.dialect.name),
    render_as_batch=connection.dialect.name == "sqlite",  # ALTERs SQLite cannot do: copy
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
