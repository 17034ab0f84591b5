"""The audit log: who did what to what, and when. One entry per maintainer or admin action
that changes something (API keys, webhooks, alert acknowledgements, resolutions and notes,
rider reports confirmed or rejected, points reversed),
whether it came over the API (the actor is the key: id, name, role) or from the
``chargewatch keys`` command (the actor is ``cli`` and the OS user). Kept in the data
dir's SQLite file next to what it describes (or in PostgreSQL); admins read it at
``GET /v1/audit``.

An entry is written after its action succeeded: a refused or failed action changed
nothing and is not an entry. Details are small (ids, names, counts, a URL's host), never
secrets or note texts (those are in the alert itself).
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, literal_column, select
from sqlalchemy.sql.expression import Executable
from starlette.requests import Request

from ingest.db.database import Database
from ingest.db.schema import audit_log as audit_table
from ingest.statedb import StateDB

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


_A = audit_table.c
_RECORD = insert(audit_table).returning(_A.id)
_FILTERS = (
    ("action", _A.action == bindparam("b_action")),
    ("actor", _A.actor_id == bindparam("b_actor")),
    ("target", _A.target == bindparam("b_target")),
    ("since_ms", _A.at_ms >= bindparam("b_since_ms")),
    ("before_id", _A.id < bindparam("b_before_id")),
)


def _query(filters: tuple[bool, ...]) -> Executable:
    """Entries newest first, with the ``_FILTERS`` that ``filters`` turns on."""
    q = select(
        _A.id, _A.at_ms, _A.actor_id, _A.actor_name, _A.actor_role, _A.action, _A.target,
        _A.detail,
    )  # fmt: skip
    for on, (_, clause) in zip(filters, _FILTERS, strict=True):
        if on:
            q = q.where(clause)
    # SQLite's LIMIT always comes with an OFFSET, a parameter of its own unless given
    return q.order_by(_A.id.desc()).limit(bindparam("b_limit")).offset(literal_column("0"))


_QUERIES = {
    on: _query(on) for on in itertools.product((False, True), repeat=len(_FILTERS))
}  # every combination of filters, compiled once each


class AuditLog:
    """Blocking; the API calls it from a worker thread. On a ``Database`` of the state
    store (``ingest.statedb``): serve's, a replica's, or the data dir's file (``in_dir``)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> AuditLog:
        return cls(StateDB.of(None, data_dir).database())

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
        done = self._db.execute(
            _RECORD,
            {
                "at_ms": time.time_ns() // 1_000_000,
                "actor_id": actor.id,
                "actor_name": actor.name,
                "actor_role": actor.role,
                "action": action,
                "target": target,
                "detail": data,
            },
        )
        return int(done.rows[0][0])

    def query(self, q: AuditQuery) -> list[dict[str, Any]]:
        """Entries, newest first."""
        values = {
            "action": q.action,
            "actor": q.actor,
            "target": q.target,
            "since_ms": q.since_ms,
            "before_id": q.before_id,
        }
        on = tuple(values[name] is not None for name, _ in _FILTERS)
        params = {f"b_{name}": v for name, v in values.items() if v is not None}
        rows = self._db.query(_QUERIES[on], {**params, "b_limit": q.limit})
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
