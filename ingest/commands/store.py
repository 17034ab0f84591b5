"""Commands in the data dir's SQLite file, through a connection of their own (WAL lets it
share the file with the ingest and alert stores), or in PostgreSQL: the same Core
statements on either (``ingest.db.database``). Blocking: called from worker threads.

In the ingest workers (issue 13) each owned partition's ``Commands`` loads the open
commands of its devices only (``load_open(devices)``) and saves under the partition's lease
epoch (``save(fence=...)``: a stale owner's changes are refused with ``StaleLease``)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, delete, literal_column, select
from sqlalchemy.sql.expression import ColumnElement, Executable

from ingest.commands.model import COLUMNS, OPEN, CommandRecord
from ingest.db.database import CoreStatement, Database, PgDatabase
from ingest.db.dialect import dialect_of, per_dialect
from ingest.db.schema import commands
from ingest.leases import fenced_transaction
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as ingest.sqlite_store

_C = commands.c
# SQLite's LIMIT always comes with an OFFSET, a parameter of its own unless given
_NONE: ColumnElement[int] = literal_column("0")
_OPEN: list[ColumnElement[str]] = [literal_column(f"'{state}'") for state in sorted(OPEN)]


def _upsert(insert: Any) -> Executable:
    ins = insert(commands)
    upsert: Executable = ins.on_conflict_do_update(
        index_elements=[_C.id], set_={c: ins.excluded[c] for c in COLUMNS if c != "id"}
    )
    return upsert


_UPSERT = per_dialect(_upsert)
_SELECT = select(*(_C[c] for c in COLUMNS))
_PRUNE = delete(commands).where(
    _C.state.not_in(_OPEN),
    _C.requested_at_ms
    < (
        select(_C.requested_at_ms)
        .order_by(_C.requested_at_ms.desc())
        .limit(literal_column("1"))
        .offset(bindparam("b_kept"))
        .scalar_subquery()
    ),
)
_GET = _SELECT.where(_C.id == bindparam("b_id"))
_LOAD_OPEN = _SELECT.where(_C.state.in_(_OPEN)).order_by(_C.requested_at_ms)


def _recent(by_device: bool, before: bool) -> Executable:
    """Newest first: the statement for one combination of filters."""
    q = _SELECT
    if by_device:
        q = q.where(_C.device_id == bindparam("b_device_id"))
    if before:
        q = q.where(_C.requested_at_ms < bindparam("b_before_ms"))
    q = q.order_by(_C.requested_at_ms.desc(), _C.id)
    return q.limit(bindparam("b_limit")).offset(_NONE)


_RECENT = {(d, b): _recent(d, b) for d in (False, True) for b in (False, True)}


class CommandStore:
    """On a ``Database``: the embedded file (a path, ``in_dir``) or PostgreSQL
    (``on_postgresql``)."""

    def __init__(self, db: Database | str | Path, *, synchronous: str = "FULL") -> None:
        if isinstance(db, str | Path):
            db = SQLiteDB(db, synchronous=synchronous)
        self._db: Database = db
        self._upsert = _UPSERT[dialect_of(db)]

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> CommandStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    @classmethod
    def on_postgresql(cls, url: str) -> CommandStore:
        return cls(PgDatabase(url))

    def close(self) -> None:
        self._db.close()

    def save(
        self,
        records: Sequence[CommandRecord],
        kept: int | None = None,
        fence: tuple[int, int] | None = None,
    ) -> None:
        """Insert or update ``records`` in one transaction; with ``kept``, prune to the
        newest ``kept`` commands (open ones are never pruned); with ``fence`` (partition,
        epoch), only while the partition's lease is at that epoch, else ``StaleLease``."""
        statements: list[CoreStatement] = [
            (self._upsert, [dict(zip(COLUMNS, r.row(), strict=True)) for r in records])
        ]
        if kept is not None:
            statements.append((_PRUNE, [{"b_kept": kept}]))
        fenced_transaction(self._db, statements, fence)

    def get(self, command_id: str) -> CommandRecord | None:
        rows = self._db.query(_GET, {"b_id": command_id})
        return CommandRecord.from_row(rows[0]) if rows else None

    def load_open(self, devices: Collection[str] | None = None) -> list[CommandRecord]:
        """The open commands, oldest first (of ``devices`` only, when given: a partition's)."""
        found = [CommandRecord.from_row(r) for r in self._db.query(_LOAD_OPEN)]
        if devices is None:
            return found
        return [r for r in found if r.device_id in devices]

    def recent(
        self, device_id: str | None = None, *, limit: int = 100, before_ms: int | None = None
    ) -> list[CommandRecord]:
        """Newest first."""
        params: dict[str, Any] = {"b_limit": limit}
        if device_id is not None:
            params["b_device_id"] = device_id
        if before_ms is not None:
            params["b_before_ms"] = before_ms
        rows = self._db.query(_RECENT[device_id is not None, before_ms is not None], params)
        return [CommandRecord.from_row(r) for r in rows]
