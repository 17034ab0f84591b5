"""The embedded store: one SQLite file under the data dir, for history and state alike.

SQLite because it ships with Python, survives ``kill -9`` with WAL, and one district
(~13 messages/s) is far below what it writes (see docs/benchmarks.md). ``synchronous=FULL``
by default: a batch that ``append``/``save`` returned for is on disk, so acknowledging it to
the broker cannot lose it even on power loss.

Statuses are most of what a device sends (one per heartbeat, ~0.8-1 KiB each for a 10-port
pile) and differ from the previous one in a few numbers. Once their hour of device time is
over, ``compact`` moves them from ``messages`` into one zlib block per device and hour
(``status_blocks``): every status stays byte-exact, with its boot, seq, device time and
arrival time (a heartbeat's liveness), at ~40-50 bytes instead of ~1 KiB (docs/benchmarks.md).
Readers take the union of both tables; a status redelivered after its hour was compacted
lands in ``messages`` again and is folded in (once) by the next ``compact``.
``prune`` drops what is older than the retention, in small batches.

Every statement is SQLAlchemy Core over the tables of ``ingest.db.schema``, a module
constant compiled for SQLite once (``ingest.db.database.sqlite_sql``) and run on the plain
sqlite3 connection of ``SQLiteDB``: no SQLAlchemy on the way of a call. The statements of
state that mean the same on PostgreSQL (twins, the event journal, dead letters, rollups,
facts) are ``ingest.db.state_sql``'s, shared with ``ingest.pg_store``; what only this store
does (``INSERT OR IGNORE`` of history, compaction, its history reads) is here. The two
inserts of every batch (history rows, twins) run as multi-row ``BulkInsert``s made from
their Core statements. A read by a list of ids binds the next power of two of parameters
(the rest NULL), so it is compiled once per size class.

All methods are blocking; the ingestor calls them from a worker thread. One connection,
guarded by a lock.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Table,
    bindparam,
    delete,
    func,
    literal_column,
    select,
)

from ingest.db import state_sql as sql
from ingest.db.dialect import upsert
from ingest.db.schema import messages as _messages
from ingest.db.schema import rollups as _rollup_table
from ingest.db.schema import status_blocks as _blocks
from ingest.replays import RetainedReplays
from ingest.sqlite_db import BulkInsert, SQLiteDB, Statement
from ingest.store import DeadLetter, HistoryRow, TwinRecord, Unobserved

DB_FILE = "chargewatch.db"

BLOCK_MS = 3_600_000
"""Statuses are compacted per device and this much device time (epoch-aligned hours)."""
_BLOCK_ROW = ("boot", "seq", "ts_ms", "received_ms", "station_id", "kind", "payload")
_HISTORY_KEYS = ("device_id", "station_id", "kind", "type", "boot", "seq", "ts_ms",
                 "received_ms", "payload")  # fmt: skip
"""HistoryRow's first nine fields: the columns, in this order."""

# -- the statements, compiled once for SQLite (ingest.db.database ``sqlite_sql``) ----------

_M = _messages.c
_B = _blocks.c
_ZERO: Any = literal_column("0")  # SQLite renders LIMIT with an OFFSET: 0, not a parameter
_STATUS: Any = literal_column("'status'")
# every type, written out: the (type, ts_ms) index serves a read by time of all of them
_ANY_TYPE = _M.type.in_([literal_column(f"'{t}'") for t in ("birth", "death", "status", "event")])


def _rowid(table: Table) -> ColumnElement[int]:
    return literal_column(f"{table.name}.rowid", Integer)


# ``+type``: the unary plus keeps SQLite from reading by the (type, ts_ms) index, so it reads
# by device (messages_by_time) instead of every device's statuses by time
_UNINDEXED_TYPE: Any = literal_column("+type")

INSERT_MESSAGES = BulkInsert.of(_messages.insert().prefix_with("OR IGNORE"), _HISTORY_KEYS)
message_row = itemgetter(*(_HISTORY_KEYS.index(n) for n in INSERT_MESSAGES.names))
"""A HistoryRow's values in the insert's column order."""
_UPSERT_TWINS = BulkInsert.of(sql.UPSERT_TWINS.for_("sqlite"), ("device_id", "record"))
_MESSAGES = (
    select(_M.device_id, _M.boot, _M.seq, _M.type, _M.ts_ms, _M.received_ms, _M.payload)
    .where(
        _M.device_id == bindparam("b_device"),
        _M.ts_ms >= bindparam("b_since"),
        _M.ts_ms < bindparam("b_until"),
    )
    .order_by(_M.ts_ms, _M.seq)
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
_COUNT_MESSAGES = select(func.count()).select_from(_messages)
_COUNT_COMPACTED = select(func.coalesce(func.sum(_B.statuses), _ZERO))
_LAST_STATE = (
    select(_M.type, _M.payload)
    .where(
        _M.device_id == bindparam("b_device"),
        _M.ts_ms < bindparam("b_before"),
        _M.type.in_([literal_column("'birth'"), literal_column("'death'")]),
    )
    .order_by(_M.ts_ms.desc(), _M.seq.desc())
    .limit(literal_column("1"))
    .offset(_ZERO)
)
_ACTIVE_RAW = (
    select(_M.device_id)
    .distinct()
    .where(_ANY_TYPE, _M.ts_ms >= bindparam("b_since"), _M.ts_ms < bindparam("b_until"))
)
_ACTIVE_COMPACTED = (
    select(_B.device_id)
    .distinct()
    .where(_B.hour_ms > bindparam("b_after"), _B.hour_ms < bindparam("b_until"))
)
_FIRST_RAW = select(func.min(_M.ts_ms))
_FIRST_COMPACTED = select(func.min(_B.hour_ms))
_BLOCK_OF: Any = _M.ts_ms - _M.ts_ms % literal_column(str(BLOCK_MS))
_TO_COMPACT = (
    select(_M.device_id, _BLOCK_OF)
    .distinct()
    .where(_M.type == _STATUS, _M.ts_ms >= _ZERO, _M.ts_ms < bindparam("b_cutoff"))
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
_BLOCK_STATUSES = select(
    _rowid(_messages), _M.boot, _M.seq, _M.ts_ms, _M.received_ms, _M.station_id, _M.kind, _M.payload
).where(
    _M.device_id == bindparam("b_device"),
    _UNINDEXED_TYPE == _STATUS,
    _M.ts_ms >= bindparam("b_since"),
    _M.ts_ms < bindparam("b_until"),
)
_BLOCK = select(_B.data).where(
    _B.device_id == bindparam("b_device"), _B.hour_ms == bindparam("b_hour")
)
_UPSERT_BLOCK = upsert(_blocks, "sqlite", key=("device_id", "hour_ms"))
_DELETE_MESSAGE = delete(_messages).where(_rowid(_messages) == bindparam("b_rowid"))
_DELETE_BLOCK = delete(_blocks).where(_rowid(_blocks) == bindparam("b_rowid"))
_PRUNABLE_MESSAGES = (
    select(_rowid(_messages))
    .select_from(_messages)
    .where(_ANY_TYPE, _M.ts_ms < bindparam("b_before"))
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
_PRUNABLE_BLOCKS = (
    select(_rowid(_blocks))
    .select_from(_blocks)
    .where(_B.hour_ms <= bindparam("b_before"))
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
_MOST_SLOTS = 16_384
"""An IN list of more values than this gets exactly as many (SQLite takes 32,766)."""


def _slots(n: int) -> int:
    """How many ``?`` an IN list of ``n`` values gets: the next power of two, the unused
    ones NULL (which matches nothing), so a query is compiled once per size class."""
    slots = 1 << max(0, n - 1).bit_length()
    return slots if slots <= _MOST_SLOTS else n


def _one_of(column: ColumnElement[Any], slots: int) -> ColumnElement[bool]:
    return column.in_([bindparam(f"b_id{i}") for i in range(slots)])


def _ids(values: Sequence[str], slots: int) -> dict[str, Any]:
    """The parameters of ``_one_of``: the values, then NULL."""
    return {f"b_id{i}": values[i] if i < len(values) else None for i in range(slots)}


@functools.cache
def _compacted_blocks(slots: int) -> Select[Any]:
    return (
        select(_B.device_id, _B.data)
        .where(
            _one_of(_B.device_id, slots),
            _B.hour_ms > bindparam("b_after"),
            _B.hour_ms < bindparam("b_until"),
        )
        .order_by(_B.device_id, _B.hour_ms)
    )


@functools.cache
def _status_samples(slots: int) -> Select[Any]:
    # SQLite returns the bare columns of the row that holds max(): the last status per
    # bucket, ties broken by seq the way the InfluxDB store's timestamps break them
    bucket = (_M.ts_ms - _M.ts_ms % bindparam("b_every")).label("bucket")
    return (
        select(
            _M.device_id,
            bucket,
            func.max(_M.ts_ms * literal_column("1000000") + _M.seq % literal_column("1000000")),
            _M.payload,
        )
        .where(
            _one_of(_M.device_id, slots),
            _UNINDEXED_TYPE == _STATUS,
            _M.ts_ms >= bindparam("b_since"),
            _M.ts_ms < bindparam("b_until"),
        )
        .group_by(_M.device_id, literal_column("bucket"))
        .order_by(_M.device_id, literal_column("bucket"))
    )


@functools.cache
def _happenings(slots: int) -> Select[Any]:
    return (
        select(_M.device_id, _M.type, _M.ts_ms, _M.payload)
        .where(
            _one_of(_M.device_id, slots),
            _M.type != _STATUS,
            _M.ts_ms >= bindparam("b_since"),
            _M.ts_ms < bindparam("b_until"),
        )
        .order_by(_M.ts_ms, _M.device_id, _M.seq)
        .limit(bindparam("b_limit"))
        .offset(_ZERO)
    )


@functools.cache
def _rollups(slots: int) -> Select[Any]:
    r = _rollup_table.c
    return (
        select(r.id, r.hour_ms, r.data)
        .where(
            r.scope == bindparam("b_scope"),
            _one_of(r.id, slots),
            r.hour_ms >= bindparam("b_since"),
            r.hour_ms < bindparam("b_until"),
        )
        .order_by(r.id, r.hour_ms)
    )


def _pack(rows: list[list[Any]]) -> bytes:
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 9)


def _unpack(data: bytes) -> list[list[Any]]:
    rows: list[list[Any]] = json.loads(zlib.decompress(data))
    return rows


def _once(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (device, boot, seq, type) once, the first one kept."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in rows:
        key = (r["device_id"], r["boot"], r["seq"], r["type"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


class SQLiteStore:
    """History and state in one SQLite file (implements HistoryStore and StateStore)."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        dead_letters_kept: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.dead_letters_kept = dead_letters_kept
        self._db = SQLiteDB(self.path, synchronous=synchronous)
        # digests of the newest ``dead_letters_kept`` dead letters
        self._replays = RetainedReplays(
            dead_letters_kept,
            (
                bytes(row[0])
                for row in self._db.query(sql.NEWEST_DIGESTS, {"b_limit": dead_letters_kept})[::-1]
            ),
        )

    @property
    def retained_repeats(self) -> int:
        """Retained replays of dead letters, since this start."""
        return self._replays.repeats

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> SQLiteStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    # -- HistoryStore -------------------------------------------------------------------

    def append(self, rows: Sequence[HistoryRow]) -> None:
        self._db.transaction(self._appending(rows))

    @staticmethod
    def _appending(rows: Sequence[HistoryRow]) -> list[Statement]:
        return [(INSERT_MESSAGES, [message_row(r) for r in rows])]

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        since = 0 if since_ms is None else since_ms
        until = 2**62 if until_ms is None else until_ms
        args = {"b_device": device_id, "b_since": since, "b_until": until, "b_limit": limit}
        rows = self._db.query(_MESSAGES, args)
        keys = ("device_id", "boot", "seq", "type", "ts_ms", "received_ms", "payload")
        raw = [dict(zip(keys, row, strict=True)) for row in rows]
        compacted = [{k: s[k] for k in keys} for s in self._compacted([device_id], since, until)]
        if not compacted:
            return raw
        merged = _once(compacted + raw)
        merged.sort(key=lambda m: (m["ts_ms"], m["seq"]))
        return merged[:limit]

    def _compacted(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int
    ) -> list[dict[str, Any]]:
        """The compacted statuses of the devices in [since_ms, until_ms) of device time, as
        ``messages`` rows, by device and block."""
        if not device_ids:
            return []
        slots = _slots(len(device_ids))
        blocks = self._db.query(
            _compacted_blocks(slots),
            _ids(device_ids, slots) | {"b_after": since_ms - BLOCK_MS, "b_until": until_ms},
        )
        out = []
        for device_id, data in blocks:
            for row in _unpack(data):
                status = dict(zip(_BLOCK_ROW, row, strict=True))
                if since_ms <= status["ts_ms"] < until_ms:
                    status["device_id"] = device_id
                    status["type"] = "status"
                    out.append(status)
        return out

    def status_samples(
        self, device_ids: Sequence[str], since_ms: int, until_ms: int, every_ms: int
    ) -> list[dict[str, Any]]:
        if not device_ids or every_ms <= 0:
            return []
        slots = _slots(len(device_ids))
        args = _ids(device_ids, slots) | {
            "b_every": every_ms,
            "b_since": since_ms,
            "b_until": until_ms,
        }
        rows = self._db.query(_status_samples(slots), args)
        last: dict[tuple[str, int], tuple[int, str]] = {
            (device, int(bucket)): (int(key), payload) for device, bucket, key, payload in rows
        }
        for s in self._compacted(device_ids, since_ms, until_ms):
            ts = s["ts_ms"]
            at = (s["device_id"], ts - ts % every_ms)
            key = ts * 1_000_000 + s["seq"] % 1_000_000
            held = last.get(at)
            if held is None or key > held[0]:
                last[at] = (key, s["payload"])
        return [
            {"device_id": device, "bucket_ms": bucket, "payload": payload}
            for (device, bucket), (_, payload) in sorted(last.items())
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
        slots = _slots(len(device_ids))
        args = _ids(device_ids, slots) | {
            "b_since": since_ms,
            "b_until": until_ms,
            "b_limit": limit,
        }
        rows = self._db.query(_happenings(slots), args)
        keys = ("device_id", "type", "ts_ms", "payload")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def write_waiting_s(self) -> float:
        """How long the oldest write in progress has been going on (0: none is)."""
        return self._db.write_waiting_s()

    def count_messages(self) -> int:
        """Messages stored (a status redelivered after its hour was compacted counts twice
        until the next ``compact``)."""
        raw = self._db.query(_COUNT_MESSAGES)[0][0]
        compacted = self._db.query(_COUNT_COMPACTED)[0][0]
        return int(raw) + int(compacted)

    def last_state_before(self, device_id: str, t_ms: int) -> tuple[str, str] | None:
        """The last birth or death of the device before ``t_ms`` as (type, payload)."""
        rows = self._db.query(_LAST_STATE, {"b_device": device_id, "b_before": t_ms})
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def active_devices(self, since_ms: int, until_ms: int) -> set[str]:
        """Devices with any message in [since_ms, until_ms) of device time."""
        raw = self._db.query(_ACTIVE_RAW, {"b_since": since_ms, "b_until": until_ms})
        blocks = self._db.query(
            _ACTIVE_COMPACTED, {"b_after": since_ms - BLOCK_MS, "b_until": until_ms}
        )
        return {str(r[0]) for r in raw} | {str(r[0]) for r in blocks}

    def first_ts(self) -> int | None:
        """The oldest device time in the history (None: empty)."""
        raw = self._db.query(_FIRST_RAW)[0][0]
        block = self._db.query(_FIRST_COMPACTED)[0][0]
        known = [int(t) for t in (raw, block) if t is not None]
        return min(known) if known else None

    def save_rollups(self, rows: Sequence[tuple[str, str, int, str]], through_ms: int) -> None:
        """Upsert (scope, id, hour_ms, data) rollups, and remember that every hour before
        ``through_ms`` is rolled up, in one transaction."""
        self._db.transaction(
            [
                (
                    sql.UPSERT_ROLLUPS.for_("sqlite"),
                    [
                        {"scope": scope, "id": id_, "hour_ms": hour_ms, "data": data}
                        for scope, id_, hour_ms, data in rows
                    ],
                ),
                (
                    sql.REMEMBER.for_("sqlite"),
                    [{"name": "rollups_through", "value": str(through_ms)}],
                ),
            ]
        )

    def rolled_through(self) -> int | None:
        mark = self.fact("rollups_through")
        return None if mark is None else int(mark)

    def rollups(
        self, scope: str, ids: Sequence[str], since_ms: int, until_ms: int
    ) -> list[dict[str, Any]]:
        """Rollups of the hours starting in [since_ms, until_ms), by id then hour, as
        ``{id, hour_ms, data}``."""
        if not ids:
            return []
        slots = _slots(len(ids))
        rows = self._db.query(
            _rollups(slots),
            _ids(ids, slots) | {"b_scope": scope, "b_since": since_ms, "b_until": until_ms},
        )
        return [{"id": i, "hour_ms": int(h), "data": json.loads(d)} for i, h, d in rows]

    def compact(self, before_ms: int, max_blocks: int = 64) -> int:
        """Move the statuses of hours of device time that end at or before ``before_ms``
        into blocks, at most ``max_blocks`` (device, hour) blocks, each in its own short
        transaction so ingest's writes interleave. Idempotent; returns the blocks written
        (0: nothing left to do)."""
        cutoff = before_ms - before_ms % BLOCK_MS
        groups = self._db.query(_TO_COMPACT, {"b_cutoff": cutoff, "b_limit": max_blocks})
        for device_id, hour_ms in groups:
            self._compact_block(str(device_id), int(hour_ms))
        return len(groups)

    def _compact_block(self, device_id: str, hour_ms: int) -> None:
        raw = self._db.query(
            _BLOCK_STATUSES,
            {"b_device": device_id, "b_since": hour_ms, "b_until": hour_ms + BLOCK_MS},
        )
        old = self._db.query(_BLOCK, {"b_device": device_id, "b_hour": hour_ms})
        # what was stored first wins, as INSERT OR IGNORE does for a redelivery
        rows: dict[tuple[str, int], list[Any]] = {}
        for row in [*(_unpack(old[0][0]) if old else []), *(list(r[1:]) for r in raw)]:
            rows.setdefault((row[0], row[1]), row)
        ordered = sorted(rows.values(), key=lambda r: (r[2], r[1]))
        block = {
            "device_id": device_id,
            "hour_ms": hour_ms,
            "statuses": len(ordered),
            "data": _pack(ordered),
        }
        self._db.transaction(
            [
                (_UPSERT_BLOCK, [block]),
                (_DELETE_MESSAGE, [{"b_rowid": r[0]} for r in raw]),
            ]
        )

    def prune(self, before_ms: int, batch: int = 500) -> int:
        """Delete history of device time before ``before_ms``: at most ``batch`` messages
        and ``batch`` // 50 whole blocks (of hours that ended by then) in one short
        transaction. Returns what went (0: done)."""
        gone = self._db.query(_PRUNABLE_MESSAGES, {"b_before": before_ms, "b_limit": batch})
        blocks = self._db.query(
            _PRUNABLE_BLOCKS, {"b_before": before_ms - BLOCK_MS, "b_limit": max(1, batch // 50)}
        )
        self._db.transaction(
            [
                (_DELETE_MESSAGE, [{"b_rowid": r[0]} for r in gone]),
                (_DELETE_BLOCK, [{"b_rowid": r[0]} for r in blocks]),
            ]
        )
        return len(gone) + len(blocks)

    # -- StateStore ---------------------------------------------------------------------

    def save(
        self,
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        fresh, repeats = self._replays.sort_out(dead_letters)
        self._db.transaction(self._saving(twins, fresh, repeats, unobserved))
        self._replays.remember(fresh, repeats)

    def write(
        self,
        rows: Sequence[HistoryRow],
        twins: Sequence[TwinRecord],
        dead_letters: Sequence[DeadLetter],
        unobserved: Sequence[Unobserved] = (),
    ) -> None:
        """``append`` and ``save`` in one transaction: one commit (and one fsync) per batch
        instead of two, and history never on disk without the twins it made (ingest uses it
        when this store keeps both)."""
        fresh, repeats = self._replays.sort_out(dead_letters)
        self._db.transaction(
            self._appending(rows) + self._saving(twins, fresh, repeats, unobserved)
        )
        self._replays.remember(fresh, repeats)

    def unobserved_max(self) -> int:
        """The journal's highest id (0: empty): the pipeline numbers new entries after it."""
        return int(self._db.query(sql.UNOBSERVED_MAX)[0][0])

    def _saving(
        self,
        twins: Sequence[TwinRecord],
        fresh: Sequence[tuple[DeadLetter, bytes]],
        repeats: Sequence[bytes] = (),
        unobserved: Sequence[Unobserved] = (),
    ) -> list[Statement]:
        statements: list[Statement] = [
            (_UPSERT_TWINS, [(t.device_id, t.data.decode()) for t in twins]),
            (sql.UPSERT_UNOBSERVED.for_("sqlite"), [u._asdict() for u in unobserved]),
        ]
        statements += sql.dead_letter_writes("sqlite", fresh, repeats, self.dead_letters_kept)
        return statements

    def fact(self, name: str) -> str | None:
        rows = self._db.query(sql.FACT, {"b_name": name})
        return str(rows[0][0]) if rows else None

    def remember(self, name: str, value: str) -> None:
        self._db.execute(sql.REMEMBER.for_("sqlite"), {"name": name, "value": value})

    def load_twins(self) -> list[dict[str, Any]]:
        rows = self._db.query(sql.LOAD_TWINS)
        return [json.loads(r[0]) for r in rows]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.query(sql.NEWEST_DEAD_LETTERS, {"b_limit": limit})
        return [DeadLetter(*row) for row in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        rows = self._db.query(sql.DEAD_LETTER_COUNTS)
        return {reason: int(count) for reason, count in rows}

    def close(self) -> None:
        self._db.close()
