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

All methods are blocking; the ingestor calls them from a worker thread. One connection,
guarded by a lock.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ingest.replays import RetainedReplays
from ingest.sqlite_db import BulkInsert, SQLiteDB, Statement
from ingest.store import DeadLetter, HistoryRow, TwinRecord, Unobserved

DB_FILE = "chargewatch.db"


INSERT_MESSAGES = BulkInsert(
    "INSERT OR IGNORE INTO messages (device_id, station_id, kind, type, boot, seq, ts_ms,"
    " received_ms, payload)",
    9,
)
BLOCK_MS = 3_600_000
_TYPES = "('birth', 'death', 'status', 'event')"  # every type: the (type, ts_ms) index serves
"""Statuses are compacted per device and this much device time (epoch-aligned hours)."""
_BLOCK_ROW = ("boot", "seq", "ts_ms", "received_ms", "station_id", "kind", "payload")
_UPSERT_TWINS = BulkInsert(
    "INSERT INTO twins (device_id, record)",
    2,
    "ON CONFLICT(device_id) DO UPDATE SET record = excluded.record",
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
                for row in self._db.query(
                    "SELECT digest FROM dead_letter_digests ORDER BY id DESC LIMIT ?",
                    (dead_letters_kept,),
                )[::-1]
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
        # HistoryRow's first nine fields are the columns, in this order
        return [(INSERT_MESSAGES, [r[:9] for r in rows])]

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        sql = (
            "SELECT device_id, boot, seq, type, ts_ms, received_ms, payload FROM messages"
            " WHERE device_id = ? AND ts_ms >= ? AND ts_ms < ? ORDER BY ts_ms, seq LIMIT ?"
        )
        since = 0 if since_ms is None else since_ms
        until = 2**62 if until_ms is None else until_ms
        args = (device_id, since, until, limit)
        rows = self._db.query(sql, args)
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
        marks = ",".join("?" * len(device_ids))
        blocks = self._db.query(
            f"SELECT device_id, data FROM status_blocks WHERE device_id IN ({marks})"
            " AND hour_ms > ? AND hour_ms < ? ORDER BY device_id, hour_ms",
            (*device_ids, since_ms - BLOCK_MS, until_ms),
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
        marks = ",".join("?" * len(device_ids))
        # SQLite returns the bare columns of the row that holds max(): the last status per
        # bucket, ties broken by seq the way the InfluxDB store's timestamps break them.
        # ``+type``: by device (messages_by_time), not all devices' statuses by time
        sql = (
            "SELECT device_id, ts_ms - ts_ms % ? AS bucket,"
            " max(ts_ms * 1000000 + seq % 1000000), payload FROM messages"
            f" WHERE device_id IN ({marks}) AND +type = 'status' AND ts_ms >= ? AND ts_ms < ?"
            " GROUP BY device_id, bucket ORDER BY device_id, bucket"
        )
        args = (every_ms, *device_ids, since_ms, until_ms)
        rows = self._db.query(sql, args)
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
        marks = ",".join("?" * len(device_ids))
        sql = (
            "SELECT device_id, type, ts_ms, payload FROM messages"
            f" WHERE device_id IN ({marks}) AND type != 'status' AND ts_ms >= ? AND ts_ms < ?"
            " ORDER BY ts_ms, device_id, seq LIMIT ?"
        )
        rows = self._db.query(sql, (*device_ids, since_ms, until_ms, limit))
        keys = ("device_id", "type", "ts_ms", "payload")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def write_waiting_s(self) -> float:
        """How long the oldest write in progress has been going on (0: none is)."""
        return self._db.write_waiting_s()

    def count_messages(self) -> int:
        """Messages stored (a status redelivered after its hour was compacted counts twice
        until the next ``compact``)."""
        raw = self._db.query("SELECT count(*) FROM messages")[0][0]
        compacted = self._db.query("SELECT coalesce(sum(statuses), 0) FROM status_blocks")[0][0]
        return int(raw) + int(compacted)

    def last_state_before(self, device_id: str, t_ms: int) -> tuple[str, str] | None:
        """The last birth or death of the device before ``t_ms`` as (type, payload)."""
        rows = self._db.query(
            "SELECT type, payload FROM messages WHERE device_id = ? AND ts_ms < ?"
            " AND type IN ('birth', 'death') ORDER BY ts_ms DESC, seq DESC LIMIT 1",
            (device_id, t_ms),
        )
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def active_devices(self, since_ms: int, until_ms: int) -> set[str]:
        """Devices with any message in [since_ms, until_ms) of device time."""
        raw = self._db.query(
            f"SELECT DISTINCT device_id FROM messages WHERE type IN {_TYPES}"
            " AND ts_ms >= ? AND ts_ms < ?",
            (since_ms, until_ms),
        )
        blocks = self._db.query(
            "SELECT DISTINCT device_id FROM status_blocks WHERE hour_ms > ? AND hour_ms < ?",
            (since_ms - BLOCK_MS, until_ms),
        )
        return {str(r[0]) for r in raw} | {str(r[0]) for r in blocks}

    def first_ts(self) -> int | None:
        """The oldest device time in the history (None: empty)."""
        raw = self._db.query("SELECT min(ts_ms) FROM messages")[0][0]
        block = self._db.query("SELECT min(hour_ms) FROM status_blocks")[0][0]
        known = [int(t) for t in (raw, block) if t is not None]
        return min(known) if known else None

    def save_rollups(self, rows: Sequence[tuple[str, str, int, str]], through_ms: int) -> None:
        """Upsert (scope, id, hour_ms, data) rollups, and remember that every hour before
        ``through_ms`` is rolled up, in one transaction."""
        self._db.transaction(
            [
                (
                    "INSERT INTO rollups VALUES (?, ?, ?, ?) ON CONFLICT(scope, id, hour_ms)"
                    " DO UPDATE SET data = excluded.data",
                    rows,
                ),
                (
                    "INSERT INTO facts VALUES ('rollups_through', ?) ON CONFLICT(name)"
                    " DO UPDATE SET value = excluded.value",
                    [(str(through_ms),)],
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
        marks = ",".join("?" * len(ids))
        rows = self._db.query(
            f"SELECT id, hour_ms, data FROM rollups WHERE scope = ? AND id IN ({marks})"
            " AND hour_ms >= ? AND hour_ms < ? ORDER BY id, hour_ms",
            (scope, *ids, since_ms, until_ms),
        )
        return [{"id": i, "hour_ms": int(h), "data": json.loads(d)} for i, h, d in rows]

    def compact(self, before_ms: int, max_blocks: int = 64) -> int:
        """Move the statuses of hours of device time that end at or before ``before_ms``
        into blocks, at most ``max_blocks`` (device, hour) blocks, each in its own short
        transaction so ingest's writes interleave. Idempotent; returns the blocks written
        (0: nothing left to do)."""
        cutoff = before_ms - before_ms % BLOCK_MS
        groups = self._db.query(
            "SELECT DISTINCT device_id, ts_ms - ts_ms % ? FROM messages"
            " WHERE type = 'status' AND ts_ms >= 0 AND ts_ms < ? LIMIT ?",
            (BLOCK_MS, cutoff, max_blocks),
        )
        for device_id, hour_ms in groups:
            self._compact_block(str(device_id), int(hour_ms))
        return len(groups)

    def _compact_block(self, device_id: str, hour_ms: int) -> None:
        raw = self._db.query(
            "SELECT rowid, boot, seq, ts_ms, received_ms, station_id, kind, payload"
            " FROM messages WHERE device_id = ? AND +type = 'status' AND ts_ms >= ?"
            " AND ts_ms < ?",
            (device_id, hour_ms, hour_ms + BLOCK_MS),
        )
        old = self._db.query(
            "SELECT data FROM status_blocks WHERE device_id = ? AND hour_ms = ?",
            (device_id, hour_ms),
        )
        # what was stored first wins, as INSERT OR IGNORE does for a redelivery
        rows: dict[tuple[str, int], list[Any]] = {}
        for row in [*(_unpack(old[0][0]) if old else []), *(list(r[1:]) for r in raw)]:
            rows.setdefault((row[0], row[1]), row)
        ordered = sorted(rows.values(), key=lambda r: (r[2], r[1]))
        self._db.transaction(
            [
                (
                    "INSERT INTO status_blocks VALUES (?, ?, ?, ?) ON CONFLICT(device_id, hour_ms)"
                    " DO UPDATE SET statuses = excluded.statuses, data = excluded.data",
                    [(device_id, hour_ms, len(ordered), _pack(ordered))],
                ),
                ("DELETE FROM messages WHERE rowid = ?", [(r[0],) for r in raw]),
            ]
        )

    def prune(self, before_ms: int, batch: int = 500) -> int:
        """Delete history of device time before ``before_ms``: at most ``batch`` messages
        and ``batch`` // 50 whole blocks (of hours that ended by then) in one short
        transaction. Returns what went (0: done)."""
        gone = self._db.query(
            f"SELECT rowid FROM messages WHERE type IN {_TYPES} AND ts_ms < ? LIMIT ?",
            (before_ms, batch),
        )
        blocks = self._db.query(
            "SELECT rowid FROM status_blocks WHERE hour_ms <= ? LIMIT ?",
            (before_ms - BLOCK_MS, max(1, batch // 50)),
        )
        self._db.transaction(
            [
                ("DELETE FROM messages WHERE rowid = ?", gone),
                ("DELETE FROM status_blocks WHERE rowid = ?", blocks),
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
        return int(self._db.query("SELECT coalesce(max(id), 0) FROM unobserved")[0][0])

    def _saving(
        self,
        twins: Sequence[TwinRecord],
        fresh: Sequence[tuple[DeadLetter, bytes]],
        repeats: Sequence[bytes] = (),
        unobserved: Sequence[Unobserved] = (),
    ) -> list[Statement]:
        dead_letters = [d for d, _ in fresh]
        counts: dict[str, int] = {}
        for d in dead_letters:
            counts[d.reason] = counts.get(d.reason, 0) + 1
        statements: list[Statement] = [
            (_UPSERT_TWINS, [(t.device_id, t.data.decode()) for t in twins]),
            ("INSERT OR REPLACE INTO unobserved VALUES (?,?,?,?)", unobserved),
            (
                "INSERT INTO dead_letters (received_ms, topic, reason, detail, payload, size)"
                " VALUES (?,?,?,?,?,?)",
                [
                    (d.received_ms, d.topic, d.reason, d.detail, d.payload, d.size)
                    for d in dead_letters
                ],
            ),
            (
                "INSERT INTO dead_letter_counts VALUES (?, ?) ON CONFLICT(reason) DO UPDATE"
                " SET count = count + excluded.count",
                list(counts.items()),
            ),
        ]
        if dead_letters:
            # keep the newest N for inspection; the per-reason counts keep the whole story
            statements.append(
                (
                    "DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
                    [(self.dead_letters_kept,)],
                )
            )
            statements += [
                (
                    "INSERT INTO dead_letter_digests (digest) VALUES (?) ON CONFLICT(digest)"
                    " DO NOTHING",
                    [(digest,) for _, digest in fresh],
                ),
                (
                    "DELETE FROM dead_letter_digests"
                    " WHERE id <= (SELECT max(id) FROM dead_letter_digests) - ?",
                    [(self.dead_letters_kept,)],
                ),
            ]
        if repeats:
            statements.append(
                (
                    "UPDATE dead_letter_digests SET repeats = repeats + 1 WHERE digest = ?",
                    [(digest,) for digest in repeats],
                )
            )
        return statements

    def fact(self, name: str) -> str | None:
        rows = self._db.query("SELECT value FROM facts WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def remember(self, name: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO facts VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def load_twins(self) -> list[dict[str, Any]]:
        rows = self._db.query("SELECT record FROM twins")
        return [json.loads(r[0]) for r in rows]

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.query(
            "SELECT received_ms, topic, reason, detail, payload, size, id FROM dead_letters"
            " ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [DeadLetter(*row) for row in rows]

    def dead_letter_counts(self) -> dict[str, int]:
        rows = self._db.query("SELECT reason, count FROM dead_letter_counts")
        return {reason: int(count) for reason, count in rows}

    def close(self) -> None:
        self._db.close()
