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
import re
import secrets
import sqlite3
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from api.text import plain_text
from devices.rollup import RiderReport
from ingest import StoreError
from ingest.alerts.model import REPORT_CATEGORIES, SERVICE_STATION, Alert
from ingest.sqlite_db import SQLiteDB

DB_FILE = "chargewatch.db"
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


_REPORT_COLUMNS = (
    "id, rider_id, station_id, device_id, unit, unit_kind, category, text, alert_id, at_ms,"
    " outcome, decided_at_ms, decided_by, decided_role, decision_note, confirmed_by_alert,"
    " duplicate_of, no_points"
)
_REPORT_SELECT = (
    f"SELECT {', '.join('r.' + c.strip() for c in _REPORT_COLUMNS.split(','))},"
    " (SELECT coalesce(sum(p.delta), 0) FROM rider_points p WHERE p.report_id = r.id)"
    " FROM rider_reports r"
)
_ENTRY_COLUMNS = (
    "id, rider_id, delta, reason, note, report_id, alert_id, incident_id, reverses, at_ms,"
    " actor, actor_role"
)
_ENTRY_SELECT = (
    f"SELECT {', '.join('e.' + c.strip() for c in _ENTRY_COLUMNS.split(','))},"
    " (SELECT x.id FROM rider_points x WHERE x.reverses = e.id) FROM rider_points e"
)


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
    """Riders, their reports and the points ledger, in the data dir's SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = SQLiteDB(self.path)
        # a decision reads, then writes: one at a time in this process (the only writer)
        self._deciding = threading.Lock()

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> SentinelStore:
        return cls(Path(data_dir) / DB_FILE)

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
            try:
                self._db.execute(
                    "INSERT INTO riders (id, hash, nickname, station_id, created_at_ms)"
                    " VALUES (?,?,?,?,?)",
                    (rider.id, _hash(secret), nickname, station_id, now_ms),
                )
            except StoreError as exc:
                if isinstance(exc.__cause__, sqlite3.IntegrityError):
                    continue  # that id is taken: draw another
                raise
            return rider, f"{PREFIX}{rider.id}_{secret}"
        raise StoreError("could not draw a free rider id")

    def rider(self, rider_id: str) -> Rider | None:
        rows = self._db.query(
            "SELECT id, nickname, station_id, created_at_ms FROM riders WHERE id = ?", (rider_id,)
        )
        return Rider(*rows[0]) if rows else None

    def check(self, token: str) -> Rider:
        """The rider ``token`` names; else ``RiderRefused``."""
        if not token.startswith(PREFIX):
            raise RiderRefused(f"not a rider token (they start with {PREFIX})")
        rider_id, _, secret = token[len(PREFIX) :].partition("_")
        if not rider_id or not secret or len(token) > 200:
            raise RiderRefused("malformed rider token")
        rows = self._db.query(
            "SELECT hash, id, nickname, station_id, created_at_ms FROM riders WHERE id = ?",
            (rider_id,),
        )
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
        cur = self._db.execute(
            "INSERT INTO rider_reports (rider_id, station_id, device_id, unit, unit_kind,"
            " category, text, alert_id, at_ms, outcome) VALUES (?,?,?,?,?,?,?,?,?,'pending')",
            (rider_id, station_id, device_id, unit, unit_kind, category, text, alert_id, at_ms),
        )
        report = self.report(int(cur.lastrowid or 0))
        assert report is not None
        return report

    def report(self, report_id: int) -> Report | None:
        rows = self._db.query(f"{_REPORT_SELECT} WHERE r.id = ?", (report_id,))
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
        where: list[str] = []
        args: list[Any] = []
        for column, value in (
            ("rider_id", rider_id),
            ("outcome", outcome),
            ("station_id", station_id),
        ):
            if value is not None:
                where.append(f"r.{column} = ?")
                args.append(value)
        if before_id is not None:
            where.append("r.id < ?")
            args.append(before_id)
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        rows = self._db.query(
            f"{_REPORT_SELECT}{clause} ORDER BY r.id DESC LIMIT ?", (*args, limit)
        )
        return [Report(*row) for row in rows]

    def made_between(self, since_ms: int, until_ms: int, limit: int = 1_000_000) -> list[Report]:
        """Reports made in [since_ms, until_ms), oldest first."""
        rows = self._db.query(
            f"{_REPORT_SELECT} WHERE r.at_ms >= ? AND r.at_ms < ? ORDER BY r.at_ms, r.id LIMIT ?",
            (since_ms, until_ms, limit),
        )
        return [Report(*row) for row in rows]

    def reports_made(self, since_ms: int, until_ms: int) -> list[RiderReport]:
        """What the hourly rollups count (``ingest.rollups.ReportSource``)."""
        rows = self._db.query(
            "SELECT station_id, device_id, category, at_ms FROM rider_reports"
            " WHERE at_ms >= ? AND at_ms < ? ORDER BY at_ms, id",
            (since_ms, until_ms),
        )
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
            statements: list[tuple[str, Sequence[Sequence[Any]]]] = []
            duplicate_of = no_points = None
            if outcome == "confirmed" and report.rider_id is not None and known:
                no_points = "known"
            elif outcome == "confirmed" and report.rider_id is not None and points > 0:
                related = {report.alert_id, confirmed_by_alert or report.alert_id}
                marks = ",".join("?" * len(related))
                earlier = self._db.query(
                    "SELECT report_id FROM rider_points WHERE rider_id = ? AND reverses IS NULL"
                    f" AND (incident_id IN ({marks}) OR alert_id IN ({marks})) LIMIT 1",
                    (report.rider_id, *related, *related),
                )
                if earlier:
                    duplicate_of, no_points = earlier[0][0], "duplicate"
                else:
                    reason = (
                        "confirmed_by_maintainer" if role != "system" else "confirmed_by_telemetry"
                    )
                    statements.append(
                        (
                            "INSERT INTO rider_points (rider_id, delta, reason, note, report_id,"
                            " alert_id, incident_id, at_ms, actor, actor_role)"
                            " VALUES (?,?,?,?,?,?,?,?,?,?)",
                            [
                                (
                                    report.rider_id, points, reason, None, report.id,
                                    report.alert_id, confirmed_by_alert or report.alert_id,
                                    now_ms, actor, role,
                                )
                            ],
                        )
                    )  # fmt: skip
            statements.insert(
                0,
                (
                    "UPDATE rider_reports SET outcome = ?, decided_at_ms = ?, decided_by = ?,"
                    " decided_role = ?, decision_note = ?, confirmed_by_alert = ?,"
                    " duplicate_of = ?, no_points = ? WHERE id = ?",
                    [(outcome, now_ms, actor, role, note, confirmed_by_alert, duplicate_of,
                      no_points, report_id)],
                ),
            )  # fmt: skip
            self._db.transaction(statements)
        decided = self.report(report_id)
        assert decided is not None
        return decided

    # -- points ----------------------------------------------------------------------

    def balance(self, rider_id: str) -> int:
        rows = self._db.query(
            "SELECT coalesce(sum(delta), 0) FROM rider_points WHERE rider_id = ?", (rider_id,)
        )
        return int(rows[0][0])

    def entry(self, entry_id: int) -> Entry | None:
        rows = self._db.query(f"{_ENTRY_SELECT} WHERE e.id = ?", (entry_id,))
        return Entry(*rows[0]) if rows else None

    def ledger(self, rider_id: str, before_id: int | None = None, limit: int = 100) -> list[Entry]:
        """A rider's entries, newest first."""
        where, args = "WHERE e.rider_id = ?", [rider_id]
        if before_id is not None:
            where += " AND e.id < ?"
            args.append(str(before_id))
        rows = self._db.query(f"{_ENTRY_SELECT} {where} ORDER BY e.id DESC LIMIT ?", (*args, limit))
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
            cur = self._db.execute(
                "INSERT INTO rider_points (rider_id, delta, reason, note, report_id, alert_id,"
                " incident_id, reverses, at_ms, actor, actor_role)"
                " VALUES (?,?,'reversed',?,?,?,NULL,?,?,?,?)",
                (entry.rider_id, -entry.delta, reason, entry.report_id, entry.alert_id,
                 entry.id, now_ms, actor, role),
            )  # fmt: skip
        reversal = self.entry(int(cur.lastrowid or 0))
        assert reversal is not None
        return reversal
