"""Sentinels: riders registered at a station, their reports' outcomes, and their points.

A rider registers with a nickname (no phone number, no name) and gets a token,
``cwr_<id>_<secret>``, shown once; only its SHA-256 is kept (random, like API keys). A report
sent with ``Authorization: Rider <token>`` is the rider's; one without stays anonymous.

A report's outcome: ``pending`` until decided, then ``confirmed`` (by telemetry: the alert it
joined was raised by the rules, or one of the rules opens at its place within
``confirm_window_s`` of it; or by a maintainer), ``rejected`` (a maintainer) or ``expired``
(nothing confirmed it within the window). Decided once; telemetry outcomes are settled
when someone looks (the rider, a maintainer): a function of the stored alerts, so nothing
is missed while the service is down.

Points are a ledger, never a counter: an entry per award (``confirmed_by_telemetry``,
``confirmed_by_maintainer``) and per reversal (``reversed``, a negative entry naming the one
it reverses). A rider earns once per incident: no award when one of theirs already names
the report's alert or its confirming alert. Blocking; the API calls it from a worker thread.

Exceptions::

    SentinelError (ValueError)
    ├── RiderRefused    a token that admits no rider (why, in words a client can act on)
    ├── NotFound        no report, ledger entry or rider with that id
    └── Conflict        the report or entry does not allow the change
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import bindparam, cast, func, insert, literal_column, or_, select, update
from sqlalchemy.sql.expression import BindParameter, ColumnElement, Executable

from api.text import plain_text
from devices.rollup import RiderReport
from ingest import StoreError, StoreUnavailable
from ingest.alerts.model import REPORT_CATEGORIES, SERVICE_STATION, Alert
from ingest.db.database import CoreStatement, Database
from ingest.db.schema import Int, rider_points, rider_reports, riders
from ingest.statedb import StateDB

PREFIX = "cwr_"
NICKNAME_MAX = 24
SYSTEM = "chargewatch"

Outcome = Literal["pending", "confirmed", "rejected", "expired"]
OUTCOMES: tuple[str, ...] = ("pending", "confirmed", "rejected", "expired")
Reason = Literal["confirmed_by_telemetry", "confirmed_by_maintainer", "reversed"]


class SentinelError(ValueError):
    pass


class RiderRefused(SentinelError):
    pass


class NotFound(SentinelError):
    pass


class Conflict(SentinelError):
    pass


# -- nicknames ---------------------------------------------------------------------------

_CHINESE_DIGITS = str.maketrans("〇零一二三四五六七八九", "00123456789")
_SEPARATORS = re.compile(r"(?<=\d)[\s\-.()\[\]/_·+]+(?=\d)")
_PHONE = re.compile(r"\d{7,}")
NICKNAME_RULE = (
    f"1 to {NICKNAME_MAX} visible characters on one line, no control, bidi or invisible ones"
)
PHONE_RULE = (
    "looks like a phone number (7 or more digits in a row): we store no phone numbers;"
    " choose a nickname without one"
)


def nickname_problem(nickname: str) -> str | None:
    """Why ``nickname`` cannot be kept, or None. Digits are read the way people write a
    number to get past a filter: full-width, other scripts' digits, Chinese numerals, and
    runs broken by spaces, dashes, dots or brackets."""
    if not nickname or plain_text(nickname) != nickname or "\n" in nickname:
        return NICKNAME_RULE
    if len(nickname) > NICKNAME_MAX:
        return NICKNAME_RULE
    folded = unicodedata.normalize("NFKC", nickname).translate(_CHINESE_DIGITS)
    folded = "".join(str(unicodedata.digit(c)) if c.isdigit() else c for c in folded)
    if _PHONE.search(_SEPARATORS.sub("", folded)):
        return PHONE_RULE
    return None


# -- what is stored ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rider:
    id: str
    nickname: str
    station_id: str
    created_at_ms: int


@dataclass(frozen=True, slots=True)
class Report:
    id: int
    rider_id: str | None
    station_id: str
    device_id: str | None
    unit: int | None
    unit_kind: str | None
    category: str
    text: str
    alert_id: int
    at_ms: int
    outcome: str
    decided_at_ms: int | None
    decided_by: str | None
    decided_role: str | None
    decision_note: str | None
    confirmed_by_alert: int | None
    duplicate_of: int | None
    no_points: str | None  # why a confirmed report earned nothing: duplicate, known
    points: int = 0  # the ledger's sum for this report


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    rider_id: str
    delta: int
    reason: str
    note: str | None
    report_id: int | None
    alert_id: int | None
    incident_id: int | None
    reverses: int | None
    at_ms: int
    actor: str
    actor_role: str
    reversed_by: int | None = None


# 0 written in the SQL: a literal would be a parameter SQLite's statement cannot name (also
# its OFFSET, which SQLite's LIMIT always has)
_ZERO: ColumnElement[int] = literal_column("0")
_r = rider_reports.alias("r")
_p = rider_points.alias("p")
_REPORT_SELECT = select(
    _r.c.id, _r.c.rider_id, _r.c.station_id, _r.c.device_id, _r.c.unit, _r.c.unit_kind,
    _r.c.category, _r.c.text, _r.c.alert_id, _r.c.at_ms, _r.c.outcome, _r.c.decided_at_ms,
    _r.c.decided_by, _r.c.decided_role, _r.c.decision_note, _r.c.confirmed_by_alert,
    _r.c.duplicate_of, _r.c.no_points,
    # cast: PostgreSQL's sum of a bigint is a numeric (a Decimal, which json.dumps refuses)
    cast(
        select(func.coalesce(func.sum(_p.c.delta), _ZERO))
        .where(_p.c.report_id == _r.c.id)
        .scalar_subquery(),
        Int,
    ),
)  # fmt: skip
_e = rider_points.alias("e")
_x = rider_points.alias("x")
_ENTRY_SELECT = select(
    _e.c.id, _e.c.rider_id, _e.c.delta, _e.c.reason, _e.c.note, _e.c.report_id, _e.c.alert_id,
    _e.c.incident_id, _e.c.reverses, _e.c.at_ms, _e.c.actor, _e.c.actor_role,
    select(_x.c.id).where(_x.c.reverses == _e.c.id).scalar_subquery(),
)  # fmt: skip

_REGISTER = insert(riders)
_RIDER = select(riders.c.id, riders.c.nickname, riders.c.station_id, riders.c.created_at_ms)
_RIDER_BY_ID = _RIDER.where(riders.c.id == bindparam("b_id"))
_CHECK = select(riders.c.hash, *_RIDER.selected_columns).where(riders.c.id == bindparam("b_id"))
_ADD_REPORT = (
    insert(rider_reports).values(outcome=literal_column("'pending'")).returning(rider_reports.c.id)
)
_REPORT = _REPORT_SELECT.where(_r.c.id == bindparam("b_id"))
_REPORT_FILTERS = (
    ("rider_id", _r.c.rider_id == bindparam("b_rider_id")),
    ("outcome", _r.c.outcome == bindparam("b_outcome")),
    ("station_id", _r.c.station_id == bindparam("b_station_id")),
    ("before_id", _r.c.id < bindparam("b_before_id")),
)


def _reports(filters: tuple[bool, ...]) -> Executable:
    """Reports newest first, with the ``_REPORT_FILTERS`` that ``filters`` turns on."""
    q = _REPORT_SELECT
    for on, (_, clause) in zip(filters, _REPORT_FILTERS, strict=True):
        if on:
            q = q.where(clause)
    return q.order_by(_r.c.id.desc()).limit(bindparam("b_limit")).offset(_ZERO)


_REPORTS = {on: _reports(on) for on in itertools.product((False, True), repeat=4)}
_MADE_BETWEEN = (
    _REPORT_SELECT.where(_r.c.at_ms >= bindparam("b_since"), _r.c.at_ms < bindparam("b_until"))
    .order_by(_r.c.at_ms, _r.c.id)
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
)
_R = rider_reports.c
_REPORTS_MADE = (
    select(_R.station_id, _R.device_id, _R.category, _R.at_ms)
    .where(_R.at_ms >= bindparam("b_since"), _R.at_ms < bindparam("b_until"))
    .order_by(_R.at_ms, _R.id)
)
_P = rider_points.c
_RELATED: list[BindParameter[Any]] = [bindparam("b_alert"), bindparam("b_incident")]
_EARNED = (
    select(_P.report_id)
    .where(
        _P.rider_id == bindparam("b_rider_id"),
        _P.reverses.is_(None),
        or_(_P.incident_id.in_(_RELATED), _P.alert_id.in_(_RELATED)),
    )
    .limit(literal_column("1"))
    .offset(_ZERO)
)
_AWARD = insert(rider_points)
_DECIDE = (
    update(rider_reports)
    .where(_R.id == bindparam("b_id"))
    .values(
        outcome=bindparam("b_outcome"),
        decided_at_ms=bindparam("b_at"),
        decided_by=bindparam("b_by"),
        decided_role=bindparam("b_role"),
        decision_note=bindparam("b_note"),
        confirmed_by_alert=bindparam("b_confirmed_by_alert"),
        duplicate_of=bindparam("b_duplicate_of"),
        no_points=bindparam("b_no_points"),
    )
)
_BALANCE = select(func.coalesce(func.sum(_P.delta), _ZERO)).where(
    _P.rider_id == bindparam("b_rider_id")
)
_ENTRY = _ENTRY_SELECT.where(_e.c.id == bindparam("b_id"))
_LEDGER = _ENTRY_SELECT.where(_e.c.rider_id == bindparam("b_rider_id"))
_LEDGER_PAGES = {
    before: (_LEDGER.where(_e.c.id < bindparam("b_before_id")) if before else _LEDGER)
    .order_by(_e.c.id.desc())
    .limit(bindparam("b_limit"))
    .offset(_ZERO)
    for before in (False, True)
}
_REVERSE = insert(rider_points).returning(_P.id)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- telemetry confirmation --------------------------------------------------------------


def confirms(report: Report, alert: Alert, window_ms: int) -> bool:
    """Whether ``alert`` is telemetry confirming ``report``: raised by the rules (not a
    rider report, not about the service), at its station and, when the report names a
    device, that device; critical when the report's category is (smoke is not confirmed
    by an offline pile); opened within the window of the report, before or after."""
    if alert.rule == "rider_report" or alert.station_id == SERVICE_STATION:
        return False
    if alert.station_id != report.station_id:
        return False
    if report.device_id is not None and alert.device_id != report.device_id:
        return False
    if REPORT_CATEGORIES.get(report.category) == "critical" and alert.severity != "critical":
        return False
    return abs(alert.opened_at_ms - report.at_ms) <= window_ms


def confirming_alert(report: Report, alerts: Sequence[Alert], window_ms: int) -> Alert | None:
    """The first-opened alert among ``alerts`` that confirms ``report``, or None."""
    found = [a for a in alerts if confirms(report, a, window_ms)]
    return min(found, key=lambda a: (a.opened_at_ms, a.id)) if found else None


# -- the store ---------------------------------------------------------------------------


class SentinelStore:
    """Riders, their reports and the points ledger, on a ``Database`` of the state store
    (``ingest.statedb``): serve's, a replica's, or the data dir's file (``in_dir``)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # a decision reads, then writes: one at a time in this process (the only writer)
        self._deciding = threading.Lock()

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> SentinelStore:
        return cls(StateDB.of(None, data_dir).database())

    def close(self) -> None:
        self._db.close()

    # -- riders ----------------------------------------------------------------------

    def register(self, station_id: str, nickname: str, now_ms: int) -> tuple[Rider, str]:
        """A new rider; returns it and its token (shown once, never stored)."""
        problem = nickname_problem(nickname)
        if problem is not None:
            raise ValueError(problem)
        secret = secrets.token_urlsafe(32)
        for _ in range(5):
            rider = Rider(secrets.token_hex(4), nickname, station_id, now_ms)
            row = {
                "id": rider.id,
                "hash": _hash(secret),
                "nickname": nickname,
                "station_id": station_id,
                "created_at_ms": now_ms,
            }
            try:
                self._db.execute(_REGISTER, row)
            except StoreUnavailable:
                raise
            except StoreError:
                if self.rider(rider.id) is not None:
                    continue  # that id is taken: draw another
                raise
            return rider, f"{PREFIX}{rider.id}_{secret}"
        raise StoreError("could not draw a free rider id")

    def rider(self, rider_id: str) -> Rider | None:
        rows = self._db.query(_RIDER_BY_ID, {"b_id": rider_id})
        return Rider(*rows[0]) if rows else None

    def check(self, token: str) -> Rider:
        """The rider ``token`` names; else ``RiderRefused``."""
        if not token.startswith(PREFIX):
            raise RiderRefused(f"not a rider token (they start with {PREFIX})")
        rider_id, _, secret = token[len(PREFIX) :].partition("_")
        if not rider_id or not secret or len(token) > 200:
            raise RiderRefused("malformed rider token")
        rows = self._db.query(_CHECK, {"b_id": rider_id})
        if not rows or not hmac.compare_digest(rows[0][0], _hash(secret)):
            raise RiderRefused("unknown rider token: register again at POST /v1/riders")
        return Rider(*rows[0][1:])

    # -- reports ---------------------------------------------------------------------

    def add_report(
        self,
        rider_id: str | None,
        station_id: str,
        device_id: str | None,
        unit: int | None,
        unit_kind: str | None,
        category: str,
        text: str,
        alert_id: int,
        at_ms: int,
    ) -> Report:
        done = self._db.execute(
            _ADD_REPORT,
            {
                "rider_id": rider_id,
                "station_id": station_id,
                "device_id": device_id,
                "unit": unit,
                "unit_kind": unit_kind,
                "category": category,
                "text": text,
                "alert_id": alert_id,
                "at_ms": at_ms,
            },
        )
        report = self.report(int(done.rows[0][0]))
        assert report is not None
        return report

    def report(self, report_id: int) -> Report | None:
        rows = self._db.query(_REPORT, {"b_id": report_id})
        return Report(*rows[0]) if rows else None

    def reports(
        self,
        *,
        rider_id: str | None = None,
        outcome: str | None = None,
        station_id: str | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[Report]:
        """Reports, newest first."""
        values = {
            "rider_id": rider_id,
            "outcome": outcome,
            "station_id": station_id,
            "before_id": before_id,
        }
        on = tuple(values[name] is not None for name, _ in _REPORT_FILTERS)
        params: dict[str, Any] = {f"b_{k}": v for k, v in values.items() if v is not None}
        rows = self._db.query(_REPORTS[on], {**params, "b_limit": limit})
        return [Report(*row) for row in rows]

    def made_between(self, since_ms: int, until_ms: int, limit: int = 1_000_000) -> list[Report]:
        """Reports made in [since_ms, until_ms), oldest first."""
        rows = self._db.query(
            _MADE_BETWEEN, {"b_since": since_ms, "b_until": until_ms, "b_limit": limit}
        )
        return [Report(*row) for row in rows]

    def reports_made(self, since_ms: int, until_ms: int) -> list[RiderReport]:
        """What the hourly rollups count (``ingest.rollups.ReportSource``)."""
        rows = self._db.query(_REPORTS_MADE, {"b_since": since_ms, "b_until": until_ms})
        return [RiderReport(str(s), d, str(c), int(t)) for s, d, c, t in rows]

    def decide(
        self,
        report_id: int,
        outcome: Outcome,
        now_ms: int,
        *,
        actor: str = SYSTEM,
        role: str = "system",
        note: str | None = None,
        confirmed_by_alert: int | None = None,
        points: int = 0,
        known: bool = False,
        allowed: Sequence[str] = ("pending",),
    ) -> Report:
        """Decide a report's outcome (from one of ``allowed``) and, for a confirmed report of
        a rider, award ``points`` unless the rider already earned for this incident, or
        the incident was ``known`` long before the report (it told nobody anything new)."""
        with self._deciding:
            report = self.report(report_id)
            if report is None:
                raise NotFound(f"no report with id {report_id}")
            if report.outcome not in allowed:
                raise Conflict(f"report {report_id} is {report.outcome} already")
            statements: list[CoreStatement] = []
            duplicate_of = no_points = None
            if outcome == "confirmed" and report.rider_id is not None and known:
                no_points = "known"
            elif outcome == "confirmed" and report.rider_id is not None and points > 0:
                incident = confirmed_by_alert or report.alert_id
                earlier = self._db.query(
                    _EARNED,
                    {"b_rider_id": report.rider_id, "b_alert": report.alert_id,
                     "b_incident": incident},
                )  # fmt: skip
                if earlier:
                    duplicate_of, no_points = earlier[0][0], "duplicate"
                else:
                    reason = (
                        "confirmed_by_maintainer" if role != "system" else "confirmed_by_telemetry"
                    )
                    award = {
                        "rider_id": report.rider_id, "delta": points, "reason": reason,
                        "note": None, "report_id": report.id, "alert_id": report.alert_id,
                        "incident_id": incident, "at_ms": now_ms, "actor": actor,
                        "actor_role": role,
                    }  # fmt: skip
                    statements.append((_AWARD, [award]))
            decision = {
                "b_id": report_id, "b_outcome": outcome, "b_at": now_ms, "b_by": actor,
                "b_role": role, "b_note": note, "b_confirmed_by_alert": confirmed_by_alert,
                "b_duplicate_of": duplicate_of, "b_no_points": no_points,
            }  # fmt: skip
            statements.insert(0, (_DECIDE, [decision]))
            self._db.transaction(statements)
        decided = self.report(report_id)
        assert decided is not None
        return decided

    # -- points ----------------------------------------------------------------------

    def balance(self, rider_id: str) -> int:
        rows = self._db.query(_BALANCE, {"b_rider_id": rider_id})
        return int(rows[0][0])

    def entry(self, entry_id: int) -> Entry | None:
        rows = self._db.query(_ENTRY, {"b_id": entry_id})
        return Entry(*rows[0]) if rows else None

    def ledger(self, rider_id: str, before_id: int | None = None, limit: int = 100) -> list[Entry]:
        """A rider's entries, newest first."""
        params: dict[str, Any] = {"b_rider_id": rider_id, "b_limit": limit}
        if before_id is not None:
            params["b_before_id"] = before_id
        rows = self._db.query(_LEDGER_PAGES[before_id is not None], params)
        return [Entry(*row) for row in rows]

    def reverse(self, entry_id: int, reason: str, now_ms: int, actor: str, role: str) -> Entry:
        """A negative entry taking back award ``entry_id`` (once)."""
        with self._deciding:
            entry = self.entry(entry_id)
            if entry is None:
                raise NotFound(f"no ledger entry with id {entry_id}")
            if entry.reverses is not None:
                raise Conflict(f"entry {entry_id} is itself a reversal")
            if entry.reversed_by is not None:
                raise Conflict(f"entry {entry_id} was reversed already (entry {entry.reversed_by})")
            done = self._db.execute(
                _REVERSE,
                {
                    "rider_id": entry.rider_id, "delta": -entry.delta, "reason": "reversed",
                    "note": reason, "report_id": entry.report_id, "alert_id": entry.alert_id,
                    "incident_id": None, "reverses": entry.id, "at_ms": now_ms,
                    "actor": actor, "actor_role": role,
                },
            )  # fmt: skip
        reversal = self.entry(int(done.rows[0][0]))
        assert reversal is not None
        return reversal
