"""Work orders and their log, in the data dir's SQLite file (a connection of their own, as
every store there). Blocking: ``WorkOrders`` calls it from a worker thread.

One order per alert while it is not closed: a partial unique index says so to any writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ingest.alerts.order_model import ORDER_COLUMNS, OrderQuery, WorkOrder
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as the other stores


LOG_COLUMNS = ("id", "order_id", "at_ms", "actor", "what", "note")


class WorkOrderStore:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path, synchronous=synchronous)

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> WorkOrderStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    def close(self) -> None:
        self._db.close()

    def save(
        self, orders: Sequence[WorkOrder], log: Sequence[tuple[int, int, str, str, str | None]]
    ) -> None:
        """Upsert ``orders`` and append ``log`` rows (order_id, at_ms, actor, what, note),
        in one transaction."""
        cols = ",".join(ORDER_COLUMNS)
        marks = ",".join("?" for _ in ORDER_COLUMNS)
        self._db.transaction(
            [
                (
                    f"INSERT OR REPLACE INTO work_orders ({cols}) VALUES ({marks})",
                    [o.row() for o in orders],
                ),
                (
                    "INSERT INTO work_order_log (order_id, at_ms, actor, what, note)"
                    " VALUES (?,?,?,?,?)",
                    log,
                ),
            ]
        )

    def _orders(self, where: str, args: Sequence[Any]) -> list[WorkOrder]:
        rows = self._db.query(f"SELECT {','.join(ORDER_COLUMNS)} FROM work_orders {where}", args)
        return [WorkOrder.from_row(row) for row in rows]

    def load_unclosed(self) -> list[WorkOrder]:
        return self._orders("WHERE state != 'closed' ORDER BY id", ())

    def next_id(self) -> int:
        (top,) = self._db.query("SELECT coalesce(max(id), 0) FROM work_orders")[0]
        return int(top) + 1

    def get(self, order_id: int) -> WorkOrder | None:
        found = self._orders("WHERE id = ?", (order_id,))
        return found[0] if found else None

    def query(self, q: OrderQuery) -> list[WorkOrder]:
        where: list[str] = []
        args: list[Any] = []
        if q.states:
            where.append(f"state IN ({','.join('?' for _ in q.states)})")
            args.extend(q.states)
        for column, value in (("assignee", q.assignee), ("station_id", q.station)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.before_id is not None:
            where.append("id < ?")
            args.append(q.before_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._orders(f"{clause} ORDER BY id DESC LIMIT ?", [*args, q.limit])

    def log(self, order_id: int) -> list[dict[str, Any]]:
        rows = self._db.query(
            f"SELECT {','.join(LOG_COLUMNS)} FROM work_order_log WHERE order_id = ? ORDER BY id",
            (order_id,),
        )
        return [dict(zip(LOG_COLUMNS, row, strict=True)) for row in rows]
