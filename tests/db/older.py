"""A database as the release before this one left it: migrated to the revision before this
chargewatch's head, and what it holds (a command that refuses it must write nothing)."""

from __future__ import annotations

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, table

from ingest.db import migrate


def previous_revision() -> str:
    """The revision before ``migrate.head()`` (one migration behind)."""
    script = ScriptDirectory.from_config(migrate._config()).get_revision(migrate.head())
    assert script is not None
    assert isinstance(script.down_revision, str), script.down_revision
    return script.down_revision


def migrated_behind(url: str) -> str:
    """``url`` upgraded to ``previous_revision()``, as ``chargewatch db upgrade`` of the
    release before would leave it; that revision."""
    revision = previous_revision()
    engine = migrate.connect(url)
    try:
        with engine.begin() as conn:
            cfg = migrate._config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
    assert migrate.revision_of(url) == revision
    return revision


def contents(url: str) -> dict[str, int]:
    """Rows per table (the table list with them)."""
    engine = migrate.connect(url)
    try:
        with engine.connect() as conn:
            return {
                name: conn.execute(select(func.count()).select_from(table(name))).scalar_one()
                for name in inspect(conn).get_table_names()
            }
    finally:
        engine.dispose()
