"""Battery passports: each pack's summary, its stays in slots, its safety events and the
clearances of its flag, in the data dir's SQLite file through a connection of their own
(WAL lets it share the file), or in PostgreSQL: the same Core statements on either
(``ingest.db.database``). Blocking: the passports' writer task calls it from a
worker thread, the API too.

Tables:

- ``battery``: one row per serial: flag (since, why), the highest temperature and fastest
  rise seen, where it is now (device, slot, since; null when in no slot).
- ``battery_stays``: (serial, device, slot, from, to): ``to`` null while it is there.
- ``battery_events``: safety events while it sat in a slot (the alert that said so).
- ``battery_clearances``: a maintainer cleared the flag, with a note.

In the cluster every partition's worker writes the passports of the packs in its cabinets
(``ingest.worker_passports``), so the writes of two partitions about one serial (it left a
cabinet of partition 1 and came to one of partition 2) arrive in either order, and ``apply``
merges them the same in any order:

- first seen: the earliest; the maxima: the highest (a NULL never lowers either);
- a stay that began ends at the latest when a later stay of the pack began (a cabinet that
  reports the slot empty late, or never, does not leave the pack in two places), or when
  its own cabinet saw it go, whichever is earlier;
- where it is (device, slot, since) is not written by either partition: it is the latest
  stay, while that stay is open (recomputed for each serial whose stays a batch changes);
- the flag: the earliest safety event's (time and reason) stands until a clearance.

``flagged_where`` reads the flagged packs with each one's latest stay (ended or not: the
workers tell a stale view of their own from a pack in their slot), and ``restore`` says which
placed flagged packs a safety event flagged where they sit (``battery_events`` of this stay,
``appeared`` apart): those were announced by that alert.

On PostgreSQL a write that flags packs, and a clearance, NOTIFY ``FLAGS_CHANNEL`` (the serial)
at commit: the workers and the API replicas LISTEN there, so a flag raised in one partition
is known in every other (and a clearance everywhere) without waiting for a reload.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    bindparam,
    case,
    exists,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.sql.expression import ColumnElement, Executable

from ingest.db.database import Database, PgDatabase
from ingest.db.dialect import dialect_of, per_dialect
from ingest.db.schema import battery, battery_clearances, battery_events, battery_stays
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"  # the same file as ingest.sqlite_store

APPEARED = "appeared"
"""The event kind of a flagged pack appearing in a slot (its ``flagged_battery`` alert):
every other kind is a safety event, which flags the pack where it sits."""

FLAGS_CHANNEL = "cw_battery_flags"
"""NOTIFY of a pack flagged or cleared (PostgreSQL): the payload is its serial."""


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
    # the placed flagged packs that a safety event flagged where they sit, in this stay
    flagged_here: frozenset[str] = frozenset()


_B = battery.c
# SQLite's LIMIT always comes with an OFFSET, a parameter of its own unless given
_NONE: ColumnElement[int] = literal_column("0")
_BATTERY_COLUMNS = (
    _B.serial, _B.flagged, _B.flagged_at_ms, _B.flag_reason, _B.max_temp_c,
    _B.max_rise_c_per_min, _B.first_seen_ms, _B.device_id, _B.slot, _B.since_ms,
)  # fmt: skip


def _raised(column: str, new: Any) -> Any:
    """The stored maximum, or the new one when it is higher (a NULL never lowers it)."""
    old = battery.c[column]
    return case((or_(old.is_(None), new > old), func.coalesce(new, old)), else_=old)


def _upsert_battery(insert: Any) -> Executable:
    """The battery row: first seen the earliest, the maxima raised; where it is comes from
    its stays (``_PLACE``), so a partition's late write does not move it back."""
    ins = insert(battery)
    first = ins.excluded.first_seen_ms
    upsert: Executable = ins.on_conflict_do_update(
        index_elements=[_B.serial],
        set_={
            "first_seen_ms": case((first < _B.first_seen_ms, first), else_=_B.first_seen_ms),
            "max_temp_c": _raised("max_temp_c", ins.excluded.max_temp_c),
            "max_rise_c_per_min": _raised("max_rise_c_per_min", ins.excluded.max_rise_c_per_min),
        },
    )
    return upsert


_UPSERT_BATTERY = per_dialect(_upsert_battery)
_BATTERY_KEYS = (
    "serial", "first_seen_ms", "device_id", "slot", "since_ms", "max_temp_c",
    "max_rise_c_per_min",
)  # fmt: skip
_OPEN_STAY = insert(battery_stays)
_S = battery_stays.c
# a stay ends at the earlier of its cabinet's word and the next stay's beginning
_CLOSE_STAY = (
    update(battery_stays)
    .where(
        _S.serial == bindparam("b_serial"),
        _S.device_id == bindparam("b_device_id"),
        _S.slot == bindparam("b_slot"),
        _S.from_ms == bindparam("b_from_ms"),
        or_(_S.to_ms.is_(None), _S.to_ms > bindparam("b_to_ms")),
    )
    .values(to_ms=bindparam("b_to_ms"))
)
_LATER = battery_stays.alias("later")
_NEXT_FROM = (
    select(func.min(_LATER.c.from_ms))
    .where(_LATER.c.serial == _S.serial, _LATER.c.from_ms > _S.from_ms)
    .scalar_subquery()
)
_CLOSE_BEFORE_NEXT = (
    update(battery_stays)
    .where(
        _S.serial == bindparam("b_serial"),
        _NEXT_FROM.is_not(None),
        or_(_S.to_ms.is_(None), _S.to_ms > _NEXT_FROM),
    )
    .values(to_ms=_NEXT_FROM)
)
_OPEN = battery_stays.alias("open_stay")


def _open_stay(column: str) -> Any:
    """``column`` of the pack's open stay (after ``_CLOSE_BEFORE_NEXT``: its latest), or NULL."""
    return (
        select(_OPEN.c[column])
        .where(_OPEN.c.serial == _B.serial, _OPEN.c.to_ms.is_(None))
        .order_by(_OPEN.c.from_ms.desc(), _OPEN.c.id.desc())
        .limit(literal_column("1"))
        .offset(_NONE)
        .scalar_subquery()
    )


_PLACE = (
    update(battery)
    .where(_B.serial == bindparam("b_serial"))
    .values(
        device_id=_open_stay("device_id"), slot=_open_stay("slot"), since_ms=_open_stay("from_ms")
    )
)
_EVENT = insert(battery_events)
_EVENT_KEYS = ("serial", "kind", "alert_id", "at_ms", "device_id", "slot", "detail")
_FLAG = (  # the earliest flag stands (two partitions' flags of one pack, in either order)
    update(battery)
    .where(
        _B.serial == bindparam("b_serial"),
        or_(
            _B.flagged == literal_column("0"),
            _B.flagged_at_ms.is_(None),
            _B.flagged_at_ms > bindparam("b_at"),
        ),
    )
    .values(flagged=literal_column("1"), flagged_at_ms=bindparam("b_at"),
            flag_reason=bindparam("b_reason"))
)  # fmt: skip
_UNFLAG = (
    update(battery)
    .where(_B.serial == bindparam("b_serial"))
    .values(flagged=literal_column("0"), flagged_at_ms=null(), flag_reason=null())
)
_CLEARANCE = insert(battery_clearances)
_NOTIFY_FLAG = select(func.pg_notify(literal_column(f"'{FLAGS_CHANNEL}'"), bindparam("b_serial")))
_FLAGGED = select(_B.serial, _B.flagged_at_ms, _B.flag_reason).where(
    _B.flagged == literal_column("1")
)
_LATEST = battery_stays.alias("latest")
# the pack's latest stay, ended or not (``stays_by_serial``): one lookup per flagged pack
_LATEST_ID = (
    select(_LATEST.c.id)
    .where(_LATEST.c.serial == _B.serial)
    .order_by(_LATEST.c.from_ms.desc(), _LATEST.c.id.desc())
    .limit(literal_column("1"))
    .offset(_NONE)
    .scalar_subquery()
)
_FLAGGED_WHERE = (
    select(_B.serial, _B.flagged_at_ms, _B.flag_reason, _S.device_id, _S.slot, _S.from_ms)
    .select_from(battery.outerjoin(battery_stays, _S.id == _LATEST_ID))
    .where(_B.flagged == literal_column("1"))
)
_HERE = battery_events.alias("here")
# flagged packs in a slot that a safety event flagged there, since their stay there began
_FLAGGED_HERE = select(_B.serial, _B.device_id).where(
    _B.flagged == literal_column("1"),
    _B.device_id.is_not(None),
    exists().where(
        _HERE.c.serial == _B.serial,
        _HERE.c.device_id == _B.device_id,
        _HERE.c.slot == _B.slot,
        _HERE.c.at_ms >= _B.since_ms,
        _HERE.c.kind != literal_column(f"'{APPEARED}'"),
    ),
)
_PLACED = select(
    _B.serial, _B.device_id, _B.slot, _B.since_ms, _B.max_temp_c, _B.max_rise_c_per_min
).where(_B.device_id.is_not(None))
# a partition's cabinets only (PostgreSQL: the cluster's workers restore per partition)
_PLACED_IN = _PLACED.where(_B.device_id.in_(bindparam("b_devices", expanding=True)))
_IDS_AT_ONCE = 100
"""Alert ids one ``alerts_recorded`` statement asks about (unused places are NULL)."""
_RECORDED = select(battery_events.c.serial, battery_events.c.alert_id).where(
    battery_events.c.alert_id.in_([bindparam(f"b_id{i}") for i in range(_IDS_AT_ONCE)])
)
_FLAG_OF = select(_B.flagged, _B.flagged_at_ms, _B.flag_reason).where(
    _B.serial == bindparam("b_serial")
)
_BATTERY = select(*_BATTERY_COLUMNS).where(_B.serial == bindparam("b_serial"))
_STAYS = (
    select(_S.device_id, _S.slot, _S.from_ms, _S.to_ms)
    .where(_S.serial == bindparam("b_serial"))
    .order_by(_S.from_ms.desc(), _S.id.desc())
    .limit(literal_column(str(STAYS_SHOWN)))
    .offset(_NONE)
)
_E = battery_events.c
_EVENTS = (
    select(_E.kind, _E.alert_id, _E.at_ms, _E.device_id, _E.slot, _E.detail)
    .where(_E.serial == bindparam("b_serial"))
    .order_by(_E.id.desc())
    .limit(literal_column(str(STAYS_SHOWN)))
    .offset(_NONE)
)
_C = battery_clearances.c
_CLEARANCES = (
    select(_C.at_ms, _C.actor_id, _C.actor_name, _C.note, _C.flagged_at_ms, _C.flag_reason)
    .where(_C.serial == bindparam("b_serial"))
    .order_by(_C.id.desc())
    .limit(literal_column(str(STAYS_SHOWN)))
    .offset(_NONE)
)


def _named(keys: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Positional rows as the named parameters of a Core statement."""
    return [dict(zip(keys, row, strict=True)) for row in rows]


def _page(flagged: bool | None, after: bool) -> Executable:
    """Battery rows by serial: the statement for one combination of filters."""
    q = select(*_BATTERY_COLUMNS)
    if flagged is not None:
        q = q.where(_B.flagged == literal_column(str(int(flagged))))
    if after:
        q = q.where(_B.serial > bindparam("b_after"))
    return q.order_by(_B.serial).limit(bindparam("b_limit")).offset(_NONE)


_PAGES = {(f, a): _page(f, a) for f in (None, False, True) for a in (False, True)}


class PassportStore:
    """On a ``Database``: the embedded file (a path, ``in_dir``) or PostgreSQL
    (``on_postgresql``)."""

    def __init__(self, db: Database | str | Path, *, synchronous: str = "FULL") -> None:
        if isinstance(db, str | Path):
            db = SQLiteDB(db, synchronous=synchronous)
        self._db: Database = db
        self._dialect = dialect_of(db)
        self._upsert_battery = _UPSERT_BATTERY[self._dialect]

    @classmethod
    def in_dir(cls, data_dir: str | Path, **options: Any) -> PassportStore:
        return cls(Path(data_dir) / DB_FILE, **options)

    @classmethod
    def on_postgresql(cls, url: str) -> PassportStore:
        return cls(PgDatabase(url))

    def close(self) -> None:
        self._db.close()

    def apply(self, ops: PassportOps) -> None:
        """Everything in one transaction: the battery rows (maxima never go down), stays
        begun (and the stays before them ended), stays ended (a stay may begin and end
        within one batch), where each pack is now, its events and flags. Merges the same in
        any order with another writer's (module docstring)."""
        began = [{"b_serial": s} for s in dict.fromkeys(o[0] for o in ops.opened)]
        moved = dict.fromkeys([*(o[0] for o in ops.opened), *(c[1] for c in ops.closed)])
        flagged = [{"b_serial": s} for s in dict.fromkeys(f[2] for f in ops.flags)]
        self._db.transaction(
            [
                # by serial: two partitions' writers lock the rows they share in one order
                (self._upsert_battery, _named(_BATTERY_KEYS, [(s, *r) for s, r in sorted(ops.batteries.items())])),
                (_OPEN_STAY, _named(("serial", "device_id", "slot", "from_ms"), ops.opened)),
                (_CLOSE_BEFORE_NEXT, began),
                (_CLOSE_STAY, _named(("b_to_ms", "b_serial", "b_device_id", "b_slot", "b_from_ms"), ops.closed)),
                (_PLACE, [{"b_serial": s} for s in moved]),
                (_EVENT, _named(_EVENT_KEYS, ops.events)),
                (_FLAG, _named(("b_at", "b_reason", "b_serial"), ops.flags)),
                (_NOTIFY_FLAG, flagged if self._dialect == "postgresql" else []),
            ]
        )  # fmt: skip

    def flagged(self) -> dict[str, tuple[int | None, str | None]]:
        """The flagged packs: serial -> (flagged at, reason)."""
        return {str(r[0]): (r[1], r[2]) for r in self._db.query(_FLAGGED)}

    def flagged_where(
        self,
    ) -> dict[str, tuple[int | None, str | None, tuple[str, int, int] | None]]:
        """The flagged packs in one read, each with its latest stay whether ended or not
        (the cabinet that saw it last, in any partition): serial -> (flagged at, reason,
        (device, slot, from) or None when it was never in a slot)."""
        return {
            str(r[0]): (r[1], r[2], None if r[3] is None else (str(r[3]), int(r[4]), int(r[5])))
            for r in self._db.query(_FLAGGED_WHERE)
        }

    def restore(self, devices: Collection[str] | None = None) -> Restored:
        """Every flagged pack, and the packs in a slot: of ``devices`` only when given; and
        which of those that are flagged were flagged by a safety event where they sit (in
        their stay there: announced by that alert, and locked)."""
        flagged = self.flagged()
        here = frozenset(
            str(r[0]) for r in self._db.query(_FLAGGED_HERE) if devices is None or r[1] in devices
        )
        if devices is not None and self._dialect == "postgresql":
            rows = self._db.query(_PLACED_IN, {"b_devices": sorted(devices)})
        else:
            rows = self._db.query(_PLACED)
        placed = [
            (str(r[0]), str(r[1]), int(r[2]), int(r[3]), r[4], r[5])
            for r in rows
            if devices is None or r[1] in devices
        ]
        return Restored(flagged, placed, here)

    def alerts_recorded(self, alert_ids: list[int]) -> set[tuple[str, int]]:
        """(serial, alert id) of the recorded safety events among ``alert_ids``."""
        found: set[tuple[str, int]] = set()
        for i in range(0, len(alert_ids), _IDS_AT_ONCE):
            chunk: list[int | None] = list(alert_ids[i : i + _IDS_AT_ONCE])
            chunk += [None] * (_IDS_AT_ONCE - len(chunk))
            rows = self._db.query(_RECORDED, {f"b_id{n}": v for n, v in enumerate(chunk)})
            found.update((str(r[0]), int(r[1])) for r in rows)
        return found

    def clear(self, serial: str, at_ms: int, actor_id: str, actor_name: str, note: str) -> bool:
        """Clear ``serial``'s flag with ``note``; False when it is not flagged."""
        rows = self._db.query(_FLAG_OF, {"b_serial": serial})
        if not rows or not rows[0][0]:
            return False
        clearance = {
            "serial": serial,
            "at_ms": at_ms,
            "actor_id": actor_id,
            "actor_name": actor_name,
            "note": note,
            "flagged_at_ms": rows[0][1],
            "flag_reason": rows[0][2],
        }
        key = [{"b_serial": serial}]
        notify = key if self._dialect == "postgresql" else []  # the workers drop the flag
        self._db.transaction([(_CLEARANCE, [clearance]), (_UNFLAG, key), (_NOTIFY_FLAG, notify)])
        return True

    def passport(self, serial: str) -> dict[str, Any] | None:
        """One pack's passport (``None``: never seen), stays and events newest first."""
        key = {"b_serial": serial}
        rows = self._db.query(_BATTERY, key)
        if not rows:
            return None
        out = _battery(rows[0])
        out["stays"] = [
            {"device_id": r[0], "slot": r[1], "from_ms": r[2], "to_ms": r[3]}
            for r in self._db.query(_STAYS, key)
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
            for r in self._db.query(_EVENTS, key)
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
            for r in self._db.query(_CLEARANCES, key)
        ]
        return out

    def batteries(
        self, *, flagged: bool | None, after: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Battery rows ordered by serial, after ``after`` (the previous page's last)."""
        params: dict[str, Any] = {"b_limit": limit}
        if after is not None:
            params["b_after"] = after
        rows = self._db.query(_PAGES[flagged, after is not None], params)
        return [_battery(r) for r in rows]


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
