"""Commands in the data dir's SQLite file, through a connection of their own (WAL lets it
share the file with the ingest and alert stores). Blocking: called from worker threads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ingest.commands.model import COLUMNS, OPEN, CommandRecord
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as ingest.sqlite_store


_UPSERT = (
    f"INSERT INTO commands ({','.join(COLUMNS)}) VALUES ({','.join('?' for _ in COLUMNS)})"
    " ON CONFLICT (id) DO UPDATE SET " + ",".join(f"{c}=excluded.{c}" for c in COLUMNS if c != "id")
)
_SELECT = f"SELECT {','.join(COLUMNS)} FROM commands"


class CommandStore:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path, synchronous=synchronous)

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> CommandStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    def close(self) -> None:
        self._db.close()

    def save(self, records: Sequence[CommandRecord], kept: int | None = None) -> None:
        """Insert or update ``records`` in one transaction; with ``kept``, prune to the
        newest ``kept`` commands (open ones are never pruned)."""
        statements: list[tuple[str, Sequence[Sequence[Any]]]] = [
            (_UPSERT, [r.row() for r in records])
        ]
        if kept is not None:
            statements.append(
                (
                    "DELETE FROM commands WHERE state NOT IN ('pending','sent') AND"
                    " requested_at_ms < (SELECT requested_at_ms FROM commands"
                    " ORDER BY requested_at_ms DESC LIMIT 1 OFFSET ?)",
                    [(kept,)],
                )
            )
        self._db.transaction(statements)

    def get(self, command_id: str) -> CommandRecord | None:
        rows = self._db.query(f"{_SELECT} WHERE id = ?", (command_id,))
        return CommandRecord.from_row(rows[0]) if rows else None

    def load_open(self) -> list[CommandRecord]:
        marks = ",".join("?" for _ in OPEN)
        rows = self._db.query(
            f"{_SELECT} WHERE state IN ({marks}) ORDER BY requested_at_ms", tuple(OPEN)
        )
        return [CommandRecord.from_row(r) for r in rows]

    def recent(
        self, device_id: str | None = None, *, limit: int = 100, before_ms: int | None = None
    ) -> list[CommandRecord]:
        """Newest first."""
        where: list[str] = []
        args: list[Any] = []
        if device_id is not None:
            where.append("device_id = ?")
            args.append(device_id)
        if before_ms is not None:
            where.append("requested_at_ms < ?")
            args.append(before_ms)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = self._db.query(
            f"{_SELECT} {clause} ORDER BY requested_at_ms DESC, id LIMIT ?", (*args, limit)
        )
        return [CommandRecord.from_row(r) for r in rows]
