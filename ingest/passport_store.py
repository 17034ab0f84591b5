"""Battery passports on disk: each pack's summary, its stays in slots, its safety events
and the clearances of its flag, in the data dir's SQLite file through a connection of their
own (WAL lets it share the file). Blocking: the passports' writer task calls it from a
worker thread, the API too.

Tables:

- ``battery``: one row per serial: flag (since, why), the highest temperature and fastest
  rise seen, where it is now (device, slot, since; null when in no slot).
- ``battery_stays``: (serial, device, slot, from, to): ``to`` null while it is there.
- ``battery_events``: safety events while it sat in a slot (the alert that said so).
- ``battery_clearances``: a maintainer cleared the flag, with a note.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as ingest.sqlite_store


STAYS_SHOWN = 200
"""Stays and events one passport answer lists (newest first)."""


@dataclass(slots=True)
class PassportOps:
    """What the writer task has to write, in order of happening."""

    # serial -> (first seen, device, slot, since, max temp, max rise): the battery row's
    # current values; the maxima only ever raise the stored ones
    batteries: dict[
        str, tuple[int, str | None, int | None, int | None, float | None, float | None]
    ] = field(default_factory=dict)
    opened: list[tuple[str, str, int, int]] = field(default_factory=list)  # stays begun
    closed: list[tuple[int, str, str, int, int]] = field(default_factory=list)  # (to, key...)
    events: list[tuple[str, str, int | None, int, str | None, int | None, str | None]] = field(
        default_factory=list
    )
    flags: list[tuple[int, str, str]] = field(default_factory=list)  # (at, reason, serial)

    def __len__(self) -> int:
        return (
            len(self.batteries)
            + len(self.opened)
            + len(self.closed)
            + len(self.events)
            + len(self.flags)
        )

    def merge(self, later: PassportOps) -> None:
        """``later``'s operations after these (a failed write retried with what came since)."""
        for serial, row in later.batteries.items():
            self.batteries[serial] = row
        self.opened += later.opened
        self.closed += later.closed
        self.events += later.events
        self.flags += later.flags


@dataclass(frozen=True, slots=True)
class Restored:
    """What the index needs back after a restart."""

    flagged: dict[str, tuple[int | None, str | None]]  # serial -> (flagged at, reason)
    placed: list[tuple[str, str, int, int, float | None, float | None]]  # serial, dev, slot, since


class PassportStore:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path, synchronous=synchronous)

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> PassportStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    def close(self) -> None:
        self._db.close()

    def apply(self, ops: PassportOps) -> None:
        """Everything in one transaction: the battery rows (maxima never go down), stays
        begun, then stays ended (a stay may begin and end within one batch)."""
        self._db.transaction(
            [
                (
                    "INSERT INTO battery (serial, first_seen_ms, device_id, slot, since_ms,"
                    " max_temp_c, max_rise_c_per_min) VALUES (?,?,?,?,?,?,?)"
                    " ON CONFLICT(serial) DO UPDATE SET device_id = excluded.device_id,"
                    " slot = excluded.slot, since_ms = excluded.since_ms,"
                    " max_temp_c = CASE WHEN max_temp_c IS NULL OR excluded.max_temp_c"
                    " > max_temp_c THEN coalesce(excluded.max_temp_c, max_temp_c)"
                    " ELSE max_temp_c END,"
                    " max_rise_c_per_min = CASE WHEN max_rise_c_per_min IS NULL OR"
                    " excluded.max_rise_c_per_min > max_rise_c_per_min THEN"
                    " coalesce(excluded.max_rise_c_per_min, max_rise_c_per_min)"
                    " ELSE max_rise_c_per_min END",
                    [(serial, *row) for serial, row in ops.batteries.items()],
                ),
                (
                    "INSERT INTO battery_stays (serial, device_id, slot, from_ms) VALUES (?,?,?,?)",
                    ops.opened,
                ),
                (
                    "UPDATE battery_stays SET to_ms = ? WHERE serial = ? AND device_id = ?"
                    " AND slot = ? AND from_ms = ? AND to_ms IS NULL",
                    ops.closed,
                ),
                (
                    "INSERT INTO battery_events (serial, kind, alert_id, at_ms, device_id,"
                    " slot, detail) VALUES (?,?,?,?,?,?,?)",
                    ops.events,
                ),
                (
                    "UPDATE battery SET flagged = 1, flagged_at_ms = ?, flag_reason = ?"
                    " WHERE serial = ?",
                    ops.flags,
                ),
            ]
        )

    def restore(self) -> Restored:
        flagged = {
            str(r[0]): (r[1], r[2])
            for r in self._db.query(
                "SELECT serial, flagged_at_ms, flag_reason FROM battery WHERE flagged = 1"
            )
        }
        placed = [
            (str(r[0]), str(r[1]), int(r[2]), int(r[3]), r[4], r[5])
            for r in self._db.query(
                "SELECT serial, device_id, slot, since_ms, max_temp_c, max_rise_c_per_min"
                " FROM battery WHERE device_id IS NOT NULL"
            )
        ]
        return Restored(flagged, placed)

    def alerts_recorded(self, alert_ids: list[int]) -> set[tuple[str, int]]:
        """(serial, alert id) of the recorded safety events among ``alert_ids``."""
        if not alert_ids:
            return set()
        marks = ",".join("?" * len(alert_ids))
        rows = self._db.query(
            f"SELECT serial, alert_id FROM battery_events WHERE alert_id IN ({marks})",
            alert_ids,
        )
        return {(str(r[0]), int(r[1])) for r in rows}

    def clear(self, serial: str, at_ms: int, actor_id: str, actor_name: str, note: str) -> bool:
        """Clear ``serial``'s flag with ``note``; False when it is not flagged."""
        rows = self._db.query(
            "SELECT flagged, flagged_at_ms, flag_reason FROM battery WHERE serial = ?", (serial,)
        )
        if not rows or not rows[0][0]:
            return False
        self._db.transaction(
            [
                (
                    "INSERT INTO battery_clearances (serial, at_ms, actor_id, actor_name, note,"
                    " flagged_at_ms, flag_reason) VALUES (?,?,?,?,?,?,?)",
                    [(serial, at_ms, actor_id, actor_name, note, rows[0][1], rows[0][2])],
                ),
                (
                    "UPDATE battery SET flagged = 0, flagged_at_ms = NULL, flag_reason = NULL"
                    " WHERE serial = ?",
                    [(serial,)],
                ),
            ]
        )
        return True

    def passport(self, serial: str) -> dict[str, Any] | None:
        """One pack's passport (``None``: never seen), stays and events newest first."""
        rows = self._db.query(f"SELECT {_BATTERY_COLUMNS} FROM battery WHERE serial = ?", (serial,))
        if not rows:
            return None
        out = _battery(rows[0])
        out["stays"] = [
            {"device_id": r[0], "slot": r[1], "from_ms": r[2], "to_ms": r[3]}
            for r in self._db.query(
                "SELECT device_id, slot, from_ms, to_ms FROM battery_stays WHERE serial = ?"
                " ORDER BY from_ms DESC, id DESC LIMIT ?",
                (serial, STAYS_SHOWN),
            )
        ]
        out["events"] = [
            {
                "kind": r[0],
                "alert_id": r[1],
                "at_ms": r[2],
                "device_id": r[3],
                "slot": r[4],
                "detail": r[5],
            }
            for r in self._db.query(
                "SELECT kind, alert_id, at_ms, device_id, slot, detail FROM battery_events"
                " WHERE serial = ? ORDER BY id DESC LIMIT ?",
                (serial, STAYS_SHOWN),
            )
        ]
        out["clearances"] = [
            {
                "at_ms": r[0],
                "actor_id": r[1],
                "actor_name": r[2],
                "note": r[3],
                "flagged_at_ms": r[4],
                "flag_reason": r[5],
            }
            for r in self._db.query(
                "SELECT at_ms, actor_id, actor_name, note, flagged_at_ms, flag_reason"
                " FROM battery_clearances WHERE serial = ? ORDER BY id DESC LIMIT ?",
                (serial, STAYS_SHOWN),
            )
        ]
        return out

    def batteries(
        self, *, flagged: bool | None, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Battery rows ordered by serial, after ``after`` (the previous page's last)."""
        where: list[str] = []
        args: list[Any] = []
        if flagged is not None:
            where.append("flagged = ?")
            args.append(int(flagged))
        if after is not None:
            where.append("serial > ?")
            args.append(after)
        sql = f"SELECT {_BATTERY_COLUMNS} FROM battery"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.query(sql + " ORDER BY serial LIMIT ?", (*args, limit))
        return [_battery(r) for r in rows]


_BATTERY_COLUMNS = (
    "serial, flagged, flagged_at_ms, flag_reason, max_temp_c, max_rise_c_per_min,"
    " first_seen_ms, device_id, slot, since_ms"
)


def _battery(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "serial": row[0],
        "flagged": bool(row[1]),
        "flagged_at_ms": row[2],
        "flag_reason": row[3],
        "max_temp_c": row[4],
        "max_rise_c_per_min": row[5],
        "first_seen_ms": row[6],
        "device_id": row[7],
        "slot": row[8],
        "since_ms": row[9],
    }
