"""The audit log: who did what to what, and when. One entry per maintainer or admin action
that changes something (API keys, webhooks, alert acknowledgements, resolutions and notes,
rider reports confirmed or rejected, points reversed),
whether it came over the API (the actor is the key: id, name, role) or from the
``chargewatch keys`` command (the actor is ``cli`` and the OS user). Kept in the data
dir's SQLite file next to what it describes; admins read it at ``GET /v1/audit``.

An entry is written after its action succeeded: a refused or failed action changed
nothing and is not an entry. Details are small (ids, names, counts, a URL's host), never
secrets or note texts (those are in the alert itself).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"
DETAIL_MAX_CHARS = 2000
"""A detail's JSON is cut (and marked so) past this: an entry stays small whatever it says."""


ACTIONS = (
    "key.create",
    "key.revoke",
    "webhook.create",
    "webhook.delete",
    "alert.acknowledge",
    "alert.resolve",
    "alert.note",
    "battery.clear",
    "command.create",  # api.routes.commands
    "work_order.create",
    "work_order.state",
    "work_order.note",
    "report.confirm",  # api.routes.sentinels
    "report.reject",
    "points.reverse",
)


@dataclass(frozen=True, slots=True)
class Actor:
    id: str  # the key's id, or "cli"
    name: str  # the key's name, or the OS user
    role: str

    @classmethod
    def cli(cls) -> Actor:
        """The ``chargewatch`` command run by this OS user (it can read the data dir, so it
        holds every power an admin key has)."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid {os.getuid()}"
        return cls("cli", user, "admin")


@dataclass(frozen=True, slots=True)
class AuditQuery:
    action: str | None = None
    actor: str | None = None  # a key id, or "cli"
    target: str | None = None
    since_ms: int | None = None
    before_id: int | None = None
    limit: int = 100


class AuditLog:
    """Blocking; the API calls it from a worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path)

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> AuditLog:
        return cls(Path(data_dir) / DB_FILE)

    def close(self) -> None:
        self._db.close()

    def record(
        self, actor: Actor, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> int:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        data = json.dumps(detail or {}, ensure_ascii=False, separators=(",", ":"))
        if len(data) > DETAIL_MAX_CHARS:
            data = json.dumps({"truncated": data[:DETAIL_MAX_CHARS]}, ensure_ascii=False)
        cur = self._db.execute(
            "INSERT INTO audit_log (at_ms, actor_id, actor_name, actor_role, action, target,"
            " detail) VALUES (?,?,?,?,?,?,?)",
            (time.time_ns() // 1_000_000, actor.id, actor.name, actor.role, action, target, data),
        )
        return int(cur.lastrowid or 0)

    def query(self, q: AuditQuery) -> list[dict[str, Any]]:
        """Entries, newest first."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("action", q.action), ("actor_id", q.actor), ("target", q.target)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.since_ms is not None:
            where.append("at_ms >= ?")
            args.append(q.since_ms)
        if q.before_id is not None:
            where.append("id < ?")
            args.append(q.before_id)
        sql = (
            "SELECT id, at_ms, actor_id, actor_name, actor_role, action, target, detail"
            " FROM audit_log"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.query(sql + " ORDER BY id DESC LIMIT ?", (*args, q.limit))
        return [
            {
                "id": r[0],
                "at_ms": r[1],
                "actor": {"id": r[2], "name": r[3], "role": r[4]},
                "action": r[5],
                "target": r[6],
                "detail": json.loads(r[7]),
            }
            for r in rows
        ]


def audit_log(request: Request) -> AuditLog:
    """The app's audit log (``app.state.audit``)."""
    log: AuditLog = request.app.state.audit
    return log


async def audit(request: Request, actor: Actor, action: str, target: str, **detail: Any) -> None:
    """Record one action in the app's audit log (from a worker thread: it writes SQLite)."""
    await asyncio.to_thread(audit_log(request).record, actor, action, target, detail)
