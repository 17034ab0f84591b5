"""The state store (and history, when no InfluxDB is given) in PostgreSQL, for the cluster:
SQLAlchemy Core over psycopg 3 (the driver measured in docs/benchmarks.md), the tables of
``ingest.db.schema``. It implements what the embedded store does for ingest: ``BatchStore``
(a batch's history, twins, dead letters and event journal in one transaction), the
``StateStore`` reads, and the ``HistoryStore`` reads. The statements of state whose meaning
is the same in the embedded store (twins, the event journal, dead letters, facts) are
``ingest.db.state_sql``'s, each engine's upsert picked from it.

History is ``messages``, range-partitioned by device time, a partition per UTC day
(``messages_pYYYYMMDD``): the partitions of the days a batch needs are made before it is
written (and ``days_ahead`` days past today at start), and ``prune`` drops whole partitions
of days that ended before the retention, at the cost of keeping up to a day more than it.
A redelivery is skipped by the unique key (device, boot, seq, type, ts_ms); a death carries
its arrival time, so a redelivered death is recognised by (device, boot, seq) alone.

Blocking, like the embedded store; ingest calls it from a worker thread. Database errors
are translated here: a connection that fails is ``StoreUnavailable`` (retry, ack nothing),
anything else ``StoreError``. The database must be at this chargewatch's schema
(``chargewatch db upgrade``): one behind is refused at start (``SchemaBehind``).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    and_,
    exists,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import distinct_on, insert
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from ingest import StoreError, StoreUnavailable
from ingest.db import migrate
from ingest.db import state_sql as sql
from ingest.db.schema import (
    messages,
    twins,
)
from ingest.replays import RetainedReplays
from ingest.store import DeadLetter, HistoryRow, TwinRecord, Unobserved

DAY_MS = 86_400_000
TWINS_CHANNEL = "cw_twins"
"""The NOTIFY channel of changed twins: each payload is device ids separated by spaces
(``twin_notices``), sent inside the transaction that wrote them (delivered at commit)."""
NOTICE_MAX_BYTES = 7_900
"""PostgreSQL refuses a NOTIFY payload of 8000 bytes or more: a batch's ids are split."""
HISTORY_FACT = "history"
"""The ``facts`` row where the ingest workers say where they write the history
(``history_engine``): an API replica that reads the other one would answer every history
query with nothing (``ingest.replica`` reports it in ``/readyz``)."""
_PARTITION_LOCK = 0x6377_7061  # "cwpa"
_HISTORY_KEYS = ("device_id", "station_id", "kind", "type", "boot", "seq", "ts_ms",
                 "received_ms", "payload")  # fmt: skip
_INSERT_HISTORY = insert(messages).on_conflict_do_nothing()
_UPSERT_TWINS = sql.UPSERT_TWINS.for_("postgresql")
_UPSERT_UNOBSERVED = sql.UPSERT_UNOBSERVED.for_("postgresql")
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
_REMEMBER = sql.REMEMBER.for_("postgresql")


def twin_notices(device_ids: Iterable[str]) -> list[str]:
    """The NOTIFY payloads naming ``device_ids`` (space separated, none longer than
    ``NOTICE_MAX_BYTES``; device ids are ASCII without spaces, ``devices.topics``)."""
    notices: list[str] = []
    current: list[str] = []
    size = 0
    for device_id in dict.fromkeys(device_ids):
        if current and size + 1 + len(device_id) > NOTICE_MAX_BYTES:
            notices.append(" ".join(current))
            current, size = [], 0
        size += len(device_id) + (1 if current else 0)
        current.append(device_id)
    if current:
        notices.append(" ".join(current))
    return notices


def history_engine(url: str | None) -> str:
    """Where a history URL (``--history``) puts the history: ``influxdb``, or ``postgresql``
    (None or empty). Never the URL itself, which may hold a token or a password."""
    return "influxdb" if url else "postgresql"


def partition_name(day: int) -> str:
    """``messages_pYYYYMMDD`` of the UTC day ``day`` (days since the epoch)."""
    date = dt.datetime.fromtimestamp(day * 86_400, dt.UTC)
    return f"{migrate.PARTITION_PREFIX}{date:%Y%m%d}"


class Part(NamedTuple):
    """One partition's batch for ``PostgresStore.write_fenced``: written only while the
    lease ``fence`` (partition, epoch) holds; None: unfenced."""

    fence: tuple[int, int] | None
    rows: Sequence[HistoryRow]
    twins: Sequence[TwinRecord]
    dead_letters: Sequence[DeadLetter]
    unobserved: Sequence[Unobserved] = ()


def _unfenced(conn: Connection, fence: tuple[int, int]) -> bool:
    return True


class PostgresStore:
    """History and state in PostgreSQL (implements BatchStore, StateStore, HistoryStore)."""

    def __init__(
        self,
        url: str,
        *,
        dead_letters_kept: int = 10_000,
        days_ahead: int = 2,
        pool_size: int = 4,
        now_ms: int | None = None,
    ) -> None:
        self.url = url
        self.dead_letters_kept = dead_letters_kept
        self.days_ahead = days_ahead
        migrate.ensure_current(url)
        self._engine = migrate.connect(url, pool_size=pool_size, pool_pre_ping=True)
        self._days: set[int] = set()  # days whose partition exists
        self._days_lock = threading.Lock()
        with self._connection() as conn:
            known = conn.execute(sql.NEWEST_DIGESTS, {"b_limit": dead_letters_kept}).scalars()
            self._replays = RetainedReplays(dead_letters_kept, [bytes(d) for d in known][::-1])
            self._days = self._existing_days(conn)
        today = dt.datetime.now(dt.UTC).timestamp() * 1000 if now_ms is None else now_ms
        first = int(today) // DAY_MS
        self.ensure_partitions(range(first, first + days_ahead + 1))

    # -- plumbing -------------------------------------------------------------------------

    @contextmanager
    def _connection(self, *, write: bool = False) -> Iterator[Connection]:
        """A connection in a transaction (committed on leaving), errors translated."""
        try:
            with self._engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailable(f"{migrate.shown(self.url)}: {exc.orig or exc}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise StoreUnavailable(f"{migrate.shown(self.url)}: {exc.orig}") from exc
            raise StoreError(f"{migrate.shown(self.url)}: {exc.orig or exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"{migrate.shown(self.url)}: {exc}") from exc

    @staticmethod
    def _existing_days(conn: Connection) -> set[int]:
        names = conn.execute(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'messages'::regclass"
            )
        ).scalars()
        days = set()
        for name in names:
            stamp = name.removeprefix(migrate.PARTITION_PREFIX)
            date = dt.datetime.strptime(stamp, "%Y%m%d").replace(tzinfo=dt.UTC)
            days.add(int(date.timestamp()) // 86_400)
        return days

    def ensure_partitions(self, days: Iterable[int]) -> None:
        """The partitions of ``days`` (days since the epoch, UTC) exist."""
        with self._days_lock:
            missing = sorted(set(days) - self._days)
        if not missing:
            return
        with self._connection() as conn:
            # workers making the same day's partition take turns (two concurrent CREATE ..
            # IF NOT EXISTS can still collide in the catalog); released at commit
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PARTITION_LOCK})
            for day in missing:
                conn.execute(
                    text(
                        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF messages"
                        f" FOR VALUES FROM ({day * DAY_MS}) TO ({(day + 1) * DAY_MS})"
                    )
                )
        with self._days_lock:
            self._days.update(missing)

    def partitions(self) -> list[str]:
        with self._connection() as conn:
            return sorted(partition_name(d) for d in self._existing_days(conn))

    def close(self) -> None:
        self._engine.dispose()

    # -- BatchStore, HistoryStore, StateStore writes ----------------------------------------

    def write(
        self,
        rows: Sequence[HistoryRow],
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        """History, twins, dead letters and the event journal of a batch in one transaction."""
        self.write_fenced([Part(None, rows, twins, dead_letters, unobserved)], _unfenced)

    def write_fenced(
        self, parts: Sequence[Part], holds: Callable[[Connection, tuple[int, int]], bool]
    ) -> set[int]:
        """The batches of several partitions in one transaction, each only while its lease
        is at its epoch (``holds``, run first in the transaction for each fenced part, in
        partition order: ``ingest.leases.holds``). Returns the indexes of the parts refused
        (a stale owner's), of which nothing is written; the others are committed together."""
        self.ensure_partitions({r.ts_ms // DAY_MS for p in parts for r in p.rows})
        order = sorted(range(len(parts)), key=lambda i: parts[i].fence or (-1, 0))
        with self._connection() as conn:
            stale = set()
            for i in order:
                fence = parts[i].fence
                if fence is not None and not holds(conn, fence):
                    stale.add(i)
            live = [p for i, p in enumerate(parts) if i not in stale]
            fresh, repeats = self._replays.sort_out([d for p in live for d in p.dead_letters])
            self._append(conn, [r for p in live for r in p.rows])
            self._save(
                conn,
                [t for p in live for t in p.twins],
                fresh,
                repeats,
                [u for p in live for u in p.unobserved],
            )
        self._replays.remember(fresh, repeats)
        return stale

    def append(self, rows: Sequence[HistoryRow]) -> None:
        self.write(rows, (), ())

    def save(
        self,
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        self.write((), twins, dead_letters, unobserved)

    @staticmethod
    def _append(conn: Connection, rows: Sequence[HistoryRow]) -> None:
        lives = [dict(zip(_HISTORY_KEYS, r[:9], strict=True)) for r in rows if r.type != "death"]
        if lives:
            conn.execute(_INSERT_HISTORY, lives)
        for r in rows:
            if r.type == "death":  # stamped on arrival: the same death again has another ts
                seen = exists().where(
                    messages.c.device_id == r.device_id,
                    messages.c.boot == r.boot,
                    messages.c.seq == r.seq,
                    messages.c.type == "death",
                )
                values = select(*(literal(v) for v in r[:9])).where(~seen)
                conn.execute(messages.insert().from_select(list(_HISTORY_KEYS), values))

    def _save(
        self,
        conn: Connection,
        twin_records: Sequence[TwinRecord],
        fresh: Sequence[tuple[DeadLetter, bytes]],
        repeats: Sequence[bytes],
        journal: Sequence[Unobserved],
    ) -> None:
        if twin_records:
            conn.execute(
                _UPSERT_TWINS,
                [{"device_id": t.device_id, "record": t.data.decode()} for t in twin_records],
            )
            # API replicas (ingest.replica) hear which twins changed, once this commits
            conn.execute(
                _NOTIFY,
                [
                    {"channel": TWINS_CHANNEL, "payload": p}
                    for p in twin_notices(t.device_id for t in twin_records)
                ],
            )
        if journal:
            conn.execute(_UPSERT_UNOBSERVED, [u._asdict() for u in journal])
        for statement, rows in sql.dead_letter_writes(
            "postgresql", fresh, repeats, self.dead_letters_kept
        ):
            conn.execute(statement, rows)

    @property
    def retained_repeats(self) -> int:
        return self._replays.repeats

    def unobserved_max(self) -> int:
        with self._connection() as conn:
            return int(conn.execute(sql.UNOBSERVED_MAX).scalar_one())

    def fact(self, name: str) -> str | None:
        with self._connection() as conn:
            value = conn.execute(sql.FACT, {"b_name": name}).scalar()
        return None if value is None else str(value)

    def remember(self, name: str, value: str) -> None:
        with self._connection() as conn:
            conn.execute(_REMEMBER, {"name": name, "value": value})

    def prune(self, before_ms: int, *, lock: int | None = None) -> int | None:
        """Drop the partitions of days that ended by ``before_ms``; returns how many went.
        With ``lock`` (an advisory lock key), only if no other session holds it (None: one
        does, nothing dropped here). Either way this store forgets those days: a late row
        for one of them makes its partition again (``ensure_partitions``)."""
        ended = {d for d in self._days if (d + 1) * DAY_MS <= before_ms}
        with self._connection() as conn:
            try_lock = text("SELECT pg_try_advisory_xact_lock(:k)")  # released at commit
            if lock is not None and not conn.execute(try_lock, {"k": lock}).scalar():
                gone = None
            else:
                gone = sorted(d for d in self._existing_days(conn) if (d + 1) * DAY_MS <= before_ms)
                for day in gone:
                    conn.execute(text(f"DROP TABLE IF EXISTS {partition_name(day)}"))
        with self._days_lock:
            self._days.difference_update(ended, gone or ())
        return None if gone is None else len(gone)

    # -- StateStore reads -----------------------------------------------------------------

    def load_twins(self, device_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every twin, or those of ``device_ids`` (a partition's devices)."""
        query = sql.LOAD_TWINS
        if device_ids is not None:
            query = query.where(twins.c.device_id.in_(list(device_ids)))
        with self._connection() as conn:
            return [json.loads(r) for r in conn.execute(query).scalars()]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        with self._connection() as conn:
            rows = conn.execute(sql.NEWEST_DEAD_LETTERS, {"b_limit": limit}).all()
        return [DeadLetter(r[0], r[1], r[2], r[3], bytes(r[4]), r[5], r[6]) for r in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        with self._connection() as conn:
            rows = conn.execute(sql.DEAD_LETTER_COUNTS)
            return {reason: int(count) for reason, count in rows}

    # -- HistoryStore reads ---------------------------------------------------------------

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        m = messages.c
        query = (
            select(m.device_id, m.boot, m.seq, m.type, m.ts_ms, m.received_ms, m.payload)
            .where(
                m.device_id == device_id,
                m.ts_ms >= (0 if since_ms is None else since_ms),
                m.ts_ms < (2**62 if until_ms is None else until_ms),
            )
            .order_by(m.ts_ms, m.seq)
            .limit(limit)
        )
        with self._connection() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def status_samples(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int, every_ms: int
    ) -> list[dict[str, Any]]:
        if not device_ids or every_ms <= 0:
            return []
        m = messages.c
        bucket = (m.ts_ms - m.ts_ms % every_ms).label("bucket_ms")
        query = (
            select(m.device_id, bucket, m.payload)
            .where(
                m.device_id.in_(device_ids),
                m.type == "status",
                m.ts_ms >= since_ms,
                m.ts_ms < until_ms,
            )
            .ext(distinct_on(m.device_id, bucket))
            # the last status per bucket, ties broken by seq (as the other stores do)
            .order_by(m.device_id, bucket, m.ts_ms.desc(), (m.seq % 1_000_000).desc())
        )
        with self._connection() as conn:
            return [
                {"device_id": d, "bucket_ms": int(b), "payload": p}
                for d, b, p in conn.execute(query)
            ]

    def happenings(
        self,
        device_ids: Sequence[str],
        since_ms: int,
        until_ms: int,
        limit: int = 100_000,
    ) -> list[dict[str, Any]]:
        if not device_ids:
            return []
        m = messages.c
        query = (
            select(m.device_id, m.type, m.ts_ms, m.payload)
            .where(
                and_(
                    m.device_id.in_(device_ids),
                    m.type != "status",
                    m.ts_ms >= since_ms,
                    m.ts_ms < until_ms,
                )
            )
            .order_by(m.ts_ms, m.device_id, m.seq)
            .limit(limit)
        )
        with self._connection() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
