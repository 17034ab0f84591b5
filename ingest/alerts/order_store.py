"""Work orders and their log, through a ``Database`` (``ingest.db.database``): the data
dir's SQLite file (a connection of their own, as every store there) or PostgreSQL
(``on_postgresql``). Blocking: ``WorkOrders`` calls it from a worker thread.

One order per alert while it is not closed: a partial unique index says so to any writer
(an upsert by id that would make a second one is refused, on both engines).

In the ingest workers (issue 13) each owned partition runs its own ``WorkOrders`` on one
PostgreSQL store per worker: it loads its stations' unclosed orders only
(``load_unclosed(stations)``), numbers new orders from the ``work_order_ids`` sequence
(``reserve_ids``, migration 0006) and saves under the partition's lease epoch
(``save(fence=...)``: a stale owner's changes are refused with ``StaleLease``).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, func, insert, literal_column, select
from sqlalchemy.sql.expression import Executable

from ingest.alerts.order_model import ORDER_COLUMNS, OrderQuery, WorkOrder
from ingest.db.database import Database, Params, PgDatabase
from ingest.db.dialect import Upserts, dialect_of
from ingest.db.schema import work_order_ids, work_order_log, work_orders
from ingest.leases import fenced_transaction
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as the other stores


LOG_COLUMNS = ("id", "order_id", "at_ms", "actor", "what", "note")

_ZERO: ColumnElement[int] = literal_column("0")  # a constant, not a parameter
_LIMIT: Any = bindparam("b_limit")  # SQLite renders an OFFSET with it: 0, written out
_UPSERT_ORDER = Upserts(work_orders)
_INSERT_LOG = insert(work_order_log)
_ORDER = select(*(work_orders.c[c] for c in ORDER_COLUMNS))
_UNCLOSED = _ORDER.where(work_orders.c.state != literal_column("'closed'")).order_by(
    work_orders.c.id
)
_BY_ID = _ORDER.where(work_orders.c.id == bindparam("b_id"))
_MAX_ID = select(func.coalesce(func.max(work_orders.c.id), _ZERO))
_RESERVE = select(work_order_ids.next_value()).select_from(
    func.generate_series(literal_column("1"), bindparam("b_n"))
)
_LOG = (
    select(*(work_order_log.c[c] for c in LOG_COLUMNS))
    .where(work_order_log.c.order_id == bindparam("b_order"))
    .order_by(work_order_log.c.id)
)


@functools.cache
def _order_query(states: int, assignee: bool, station: bool, before: bool) -> Select[Any]:
    """The read of ``WorkOrderStore.query`` for one shape of filter (cached: the states'
    values are checked against the domain's few)."""
    where: list[ColumnElement[bool]] = []
    if states:
        where.append(work_orders.c.state.in_([bindparam(f"b_state{i}") for i in range(states)]))
    if assignee:
        where.append(work_orders.c.assignee == bindparam("b_assignee"))
    if station:
        where.append(work_orders.c.station_id == bindparam("b_station"))
    if before:
        where.append(work_orders.c.id < bindparam("b_before"))
    return _ORDER.where(*where).order_by(work_orders.c.id.desc()).limit(_LIMIT).offset(_ZERO)


class WorkOrderStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._dialect = dialect_of(db)
        self.path: Path | None = db.path if isinstance(db, SQLiteDB) else None

    @classmethod
    def at(cls, path: str | Path, *, synchronous: str = "FULL") -> WorkOrderStore:
        """On the embedded SQLite file at ``path``."""
        return cls(SQLiteDB(path, synchronous=synchronous))

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> WorkOrderStore:
        return cls.at(Path(data_dir) / DB_FILE, **options)

    @classmethod
    def on_postgresql(cls, url: str, **options: Any) -> WorkOrderStore:
        """On PostgreSQL at ``url`` (its schema current: ``chargewatch db upgrade``)."""
        return cls(PgDatabase(url, **options))

    def close(self) -> None:
        self._db.close()

    def save(
        self,
        orders: Sequence[WorkOrder],
        log: Sequence[tuple[int, int, str, str, str | None]],
        fence: tuple[int, int] | None = None,
    ) -> None:
        """Upsert ``orders`` and append ``log`` rows (order_id, at_ms, actor, what, note),
        in one transaction; with ``fence`` (partition, epoch), only while the partition's
        lease is at that epoch, else ``StaleLease`` and nothing is written."""
        statements = [
            (
                _UPSERT_ORDER.for_(self._dialect),
                [dict(zip(ORDER_COLUMNS, o.row(), strict=True)) for o in orders],
            ),
            (_INSERT_LOG, [dict(zip(LOG_COLUMNS[1:], r, strict=True)) for r in log]),
        ]
        fenced_transaction(self._db, statements, fence)

    def _orders(self, statement: Executable, params: Params | None = None) -> list[WorkOrder]:
        return [WorkOrder.from_row(row) for row in self._db.query(statement, params)]

    def load_unclosed(self, stations: Collection[str] | None = None) -> list[WorkOrder]:
        """The orders not closed (of ``stations`` only, when given: a partition's)."""
        found = self._orders(_UNCLOSED)
        if stations is None:
            return found
        return [o for o in found if o.station_id in stations]

    def next_id(self) -> int:
        """The id after the highest: the one writer of a SQLite file numbers so."""
        (top,) = self._db.query(_MAX_ID)[0]
        return int(top) + 1

    def reserve_ids(self, n: int) -> list[int]:
        """``n`` order ids no other writer gets, increasing, from PostgreSQL's
        ``work_order_ids`` sequence (refused on SQLite, which has one writer)."""
        if not 1 <= n <= 10_000:
            raise ValueError(f"reserve 1 to 10000 ids at once, not {n}")
        if self._dialect != "postgresql":
            raise ValueError("ids are reserved from PostgreSQL's sequences only")
        return sorted(int(r[0]) for r in self._db.query(_RESERVE, {"b_n": n}))

    def get(self, order_id: int) -> WorkOrder | None:
        found = self._orders(_BY_ID, {"b_id": order_id})
        return found[0] if found else None

    def query(self, q: OrderQuery) -> list[WorkOrder]:
        states = tuple(dict.fromkeys(q.states))
        statement = _order_query(
            len(states), q.assignee is not None, q.station is not None, q.before_id is not None
        )
        params = {
            **{f"b_state{i}": s for i, s in enumerate(states)},
            "b_assignee": q.assignee,
            "b_station": q.station,
            "b_before": q.before_id,
            "b_limit": q.limit,
        }
        return self._orders(statement, params)

    def log(self, order_id: int) -> list[dict[str, Any]]:
        rows = self._db.query(_LOG, {"b_order": order_id})
        return [dict(zip(LOG_COLUMNS, row, strict=True)) for row in rows]
