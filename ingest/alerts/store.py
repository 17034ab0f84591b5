"""Alerts, their change events, notes, webhook subscriptions and deliveries (the webhook
outbox: rows ``pending`` until delivered or given up), in the data dir's SQLite file through
a connection of their own (WAL lets it share the file with the ingest store). Blocking: the
engine and the notifier call it from a worker thread.

A file written by an earlier release is brought up to date when it is opened, by the
migrations (``ingest.db``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.alerts.model import ALERT_COLUMNS, Alert, AlertQuery, Timing
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as ingest.sqlite_store


DELIVERY_COLUMNS = (
    "id", "webhook_id", "alert_id", "event", "status", "attempts", "http_status", "error",
    "created_at_ms", "finished_at_ms", "body", "next_try_at_ms", "deadline_at_ms",
    "last_attempt_at_ms",
)  # fmt: skip
_DELIVERY_UPSERT = (
    f"INSERT INTO deliveries ({','.join(DELIVERY_COLUMNS)})"
    f" VALUES ({','.join('?' for _ in DELIVERY_COLUMNS)})"
    " ON CONFLICT (id) DO UPDATE SET "
    + ",".join(f"{c}=excluded.{c}" for c in DELIVERY_COLUMNS if c not in ("id", "body"))
)


@dataclass
class Ops:
    """One batch of writes from the engine, applied in one transaction."""

    alerts: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, int, str, int, str]] = field(default_factory=list)
    notes: list[tuple[int, int, str, str, str]] = field(default_factory=list)
    # the journal of events stored but not yet observed (ingest.sqlite_store) up to this id
    # is done with once these changes are durable: deleted in the same transaction
    unobserved_through: int = 0

    def __len__(self) -> int:
        return len(self.alerts) + len(self.events) + len(self.notes) + (self.unobserved_through > 0)

    def pieces(self) -> list[Ops]:
        """Each change on its own, to find the one a store refuses."""
        out = [Ops(alerts={i: rec}) for i, rec in self.alerts.items()]
        out += [Ops(events=[e]) for e in self.events]
        out += [Ops(notes=[n]) for n in self.notes]
        if self.unobserved_through:
            out.append(Ops(unobserved_through=self.unobserved_through))
        return out

    def merge(self, other: Ops) -> None:
        self.alerts.update(other.alerts)
        self.events += other.events
        self.notes += other.notes
        self.unobserved_through = max(self.unobserved_through, other.unobserved_through)


class AlertStore:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path, synchronous=synchronous)

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> AlertStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    def close(self) -> None:
        self._db.close()

    def _tx(self, statements: list[tuple[str, Sequence[Sequence[Any]]]]) -> None:
        self._db.transaction(statements)

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.query(sql, args)

    # -- alerts ------------------------------------------------------------------------

    def apply(self, ops: Ops, events_kept: int) -> None:
        cols = ",".join(ALERT_COLUMNS)
        marks = ",".join("?" for _ in ALERT_COLUMNS)
        statements: list[tuple[str, Sequence[Sequence[Any]]]] = [
            (
                f"INSERT OR REPLACE INTO alerts ({cols}) VALUES ({marks})",
                [tuple(rec[c] for c in ALERT_COLUMNS) for rec in ops.alerts.values()],
            ),
            ("INSERT INTO alert_events VALUES (?,?,?,?,?)", ops.events),
            (
                "INSERT INTO alert_notes (alert_id, at_ms, author, source, text)"
                " VALUES (?,?,?,?,?)",
                ops.notes,
            ),
        ]
        if ops.events:
            statements.append(
                (
                    "DELETE FROM alert_events WHERE id <= (SELECT max(id) FROM alert_events) - ?",
                    [(events_kept,)],
                )
            )
        if ops.unobserved_through:
            statements.append(("DELETE FROM unobserved WHERE id <= ?", [(ops.unobserved_through,)]))
        self._tx(statements)

    def unobserved(self) -> list[tuple[int, str, int, str]]:
        """The journal of stored events whose alert effects are not durable yet, oldest
        first, as (id, device_id, received_ms, payload)."""
        rows = self._query("SELECT id, device_id, received_ms, payload FROM unobserved ORDER BY id")
        return [(int(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]

    def _alerts(self, where: str, args: Sequence[Any]) -> list[Alert]:
        rows = self._query(f"SELECT {','.join(ALERT_COLUMNS)} FROM alerts {where}", args)
        return [Alert.from_record(dict(zip(ALERT_COLUMNS, row, strict=True))) for row in rows]

    def load_active(self) -> list[Alert]:
        return self._alerts("WHERE status != 'resolved' ORDER BY id", ())

    def next_ids(self) -> tuple[int, int]:
        (alert_max,) = self._query("SELECT coalesce(max(id), 0) FROM alerts")[0]
        (event_max,) = self._query("SELECT coalesce(max(id), 0) FROM alert_events")[0]
        return int(alert_max) + 1, int(event_max) + 1

    def get(self, alert_id: int) -> Alert | None:
        found = self._alerts("WHERE id = ?", (alert_id,))
        return found[0] if found else None

    def query(self, q: AlertQuery) -> list[Alert]:
        where: list[str] = []
        args: list[Any] = []
        if q.status:
            where.append(f"status IN ({','.join('?' for _ in q.status)})")
            args.extend(q.status)
        if q.severity:
            where.append(f"severity IN ({','.join('?' for _ in q.severity)})")
            args.extend(q.severity)
        for column, value in (("station_id", q.station), ("device_id", q.device)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.rule is not None:
            where.append("(rule = ? OR code = ?)")
            args.extend([q.rule, q.rule])
        if q.since_ms is not None:
            where.append("(opened_at_ms >= ? OR last_seen_at_ms >= ? OR resolved_at_ms >= ?)")
            args.extend([q.since_ms] * 3)
        if q.before_id is not None:
            where.append("id < ?")
            args.append(q.before_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._alerts(f"{clause} ORDER BY id DESC LIMIT ?", [*args, q.limit])

    def timings(self, from_ms: int, to_ms: int) -> list[Timing]:
        """Station, code, opened, acknowledged, resolved (ms) and device of the alerts
        opened in [from_ms, to_ms) (ingest.alerts.repair)."""
        rows = self._query(
            "SELECT station_id, code, opened_at_ms, acknowledged_at_ms, resolved_at_ms,"
            " device_id FROM alerts WHERE opened_at_ms >= ? AND opened_at_ms < ? ORDER BY id",
            (from_ms, to_ms),
        )
        return [Timing(str(r[0]), str(r[1]), int(r[2]), r[3], r[4], r[5]) for r in rows]

    def notes(self, alert_id: int) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT id, at_ms, author, source, text FROM alert_notes WHERE alert_id = ?"
            " ORDER BY id",
            (alert_id,),
        )
        keys = ("id", "at_ms", "author", "source", "text")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def events_after(self, after_id: int, limit: int = 1000) -> list[tuple[int, str, str]]:
        rows = self._query(
            "SELECT id, type, data FROM alert_events WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def oldest_event_id(self) -> int | None:
        (oldest,) = self._query("SELECT min(id) FROM alert_events")[0]
        return None if oldest is None else int(oldest)

    # -- webhooks ----------------------------------------------------------------------

    def add_webhook(self, record: dict[str, Any]) -> int:
        cur = self._db.execute("INSERT INTO webhooks (record) VALUES (?)", (json.dumps(record),))
        return int(cur.lastrowid or 0)

    def delete_webhook(self, webhook_id: int) -> bool:
        cur = self._db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
        return cur.rowcount > 0

    def webhooks(self) -> list[tuple[int, dict[str, Any]]]:
        rows = self._query("SELECT id, record FROM webhooks ORDER BY id")
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    def save_outbox(
        self,
        deliveries: Sequence[Sequence[Any]],
        webhooks: Sequence[tuple[int, dict[str, Any]]] = (),
    ) -> None:
        """Upsert deliveries (rows in ``DELIVERY_COLUMNS`` order; the body is written once)
        and subscription records, in one transaction."""
        self._tx(
            [
                (_DELIVERY_UPSERT, deliveries),
                (
                    "UPDATE webhooks SET record = ? WHERE id = ?",
                    [(json.dumps(record), webhook_id) for webhook_id, record in webhooks],
                ),
            ]
        )

    def max_delivery_id(self) -> int:
        (top,) = self._query("SELECT coalesce(max(id), 0) FROM deliveries")[0]
        return int(top)

    def deliveries(
        self,
        alert_id: int | None = None,
        *,
        status: str | Sequence[str] | None = None,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[Any] = []
        if alert_id is not None:
            where.append("alert_id = ?")
            args.append(alert_id)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            where.append(f"status IN ({','.join('?' for _ in statuses)})")
            args.extend(statuses)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        clause += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            clause += " LIMIT ?"
            args.append(limit)
        rows = self._query(f"SELECT {','.join(DELIVERY_COLUMNS)} FROM deliveries {clause}", args)
        return [dict(zip(DELIVERY_COLUMNS, row, strict=True)) for row in rows]
