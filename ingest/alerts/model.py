"""What an alert is: its key (one open alert per key), its fields, and its JSON view.

Lifecycle: ``open`` -> ``acknowledged`` -> ``resolved``. A cleared condition starts a
verification window (``clearing_since``); the alert resolves itself once the window passes
with the condition still clear, and a condition that returns within it reopens the same
alert (``count`` + 1) instead of opening a new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from devices.faults import Severity

AlertStatus = Literal["open", "acknowledged", "resolved"]
SEVERITIES: tuple[Severity, ...] = ("critical", "major", "minor", "warning")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

#: Event types of the change stream (SSE); webhooks get opened, escalated and resolved.
EventType = Literal[
    "opened", "repeated", "clearing", "acknowledged", "escalated", "resolved", "note", "report"
]
NOTIFIED_EVENTS: tuple[str, ...] = ("opened", "escalated", "resolved")


class AlertError(ValueError):
    pass


class AlertNotFound(AlertError):
    """No alert with that id."""


class AlertConflict(AlertError):
    """The alert's state does not allow the change (e.g. already resolved)."""


REPORT_CATEGORIES: dict[str, Severity] = {
    "smoke": "critical",
    "fire": "critical",
    "water": "critical",
    "heat": "major",
    "damage": "major",
    "not_working": "minor",
    "blocked": "minor",
    "other": "warning",
}


SERVICE_STATION = "service"
"""The ``station`` of alerts about the service itself (not a catalog station)."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One change of the alert stream (SSE): its id, type and JSON."""

    id: int
    type: str
    data: str  # JSON


@dataclass(frozen=True, slots=True)
class AlertQuery:
    status: Sequence[str] = ()
    severity: Sequence[str] = ()
    station: str | None = None
    device: str | None = None
    rule: str | None = None
    since_ms: int | None = None
    before_id: int | None = None
    limit: int = 100


def rfc3339(ms: int | None) -> str | None:
    if ms is None:
        return None
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Key:
    """One condition on one target: at most one unresolved alert per key."""

    station_id: str
    device_id: str | None
    unit: int | None
    rule: str
    code: str


@dataclass(frozen=True, slots=True)
class Observation:
    """A rule found ``key`` active now."""

    key: Key
    severity: Severity
    value: float | None = None
    info: str | None = None
    auto_resolve: bool = True


@dataclass(slots=True)
class Alert:
    id: int
    rule: str
    code: str
    severity: str
    status: str
    station_id: str
    device_id: str | None
    unit: int | None
    unit_kind: str | None  # "port" (pile) or "slot" (cabinet) when unit is set
    opened_at_ms: int
    last_seen_at_ms: int
    count: int = 1
    last_value: float | None = None
    info: str | None = None
    acknowledged_at_ms: int | None = None
    acknowledged_by: str | None = None
    resolved_at_ms: int | None = None
    resolved_by: str | None = None
    resolved_how: str | None = None  # "auto" (condition clear for the window) or "manual"
    clearing_since_ms: int | None = None
    escalation_level: int = 0
    escalated_at_ms: int | None = None
    parent_id: int | None = None  # the station incident that groups this alert
    suppressed: bool = False  # grouped under a parent: no notifications of its own
    notified: bool = False  # its opening was sent to webhooks
    reports: int = 0  # rider reports attached
    auto_resolve: bool = True

    @property
    def key(self) -> Key:
        return Key(self.station_id, self.device_id, self.unit, self.rule, self.code)

    @property
    def active(self) -> bool:
        return self.status != "resolved"

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Alert:
        names = {f.name for f in fields(cls)}
        data = {k: v for k, v in record.items() if k in names}
        for flag in ("suppressed", "notified", "auto_resolve"):
            data[flag] = bool(data.get(flag))
        return cls(**data)

    def title(self) -> str:
        where = self.device_id or self.station_id
        if self.unit is not None:
            where += f" {self.unit_kind or 'unit'} {self.unit}"
        what = self.code if self.rule == "fault" else self.rule
        return f"[{self.severity}] {what} at {where}"


ALERT_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Alert))


def alert_view(alert: Alert) -> dict[str, Any]:
    """The API's JSON of an alert (notes and deliveries are added by the detail view)."""
    view: dict[str, Any] = {
        "id": alert.id,
        "rule": alert.rule,
        "code": alert.code,
        "severity": alert.severity,
        "status": alert.status,
        "title": alert.title(),
        "station": alert.station_id,
        "device": alert.device_id,
        "port": alert.unit if alert.unit_kind == "port" else None,
        "slot": alert.unit if alert.unit_kind == "slot" else None,
        "opened_at": rfc3339(alert.opened_at_ms),
        "last_seen_at": rfc3339(alert.last_seen_at_ms),
        "acknowledged_at": rfc3339(alert.acknowledged_at_ms),
        "acknowledged_by": alert.acknowledged_by,
        "resolved_at": rfc3339(alert.resolved_at_ms),
        "resolved_by": alert.resolved_by,
        "resolved_how": alert.resolved_how,
        "count": alert.count,
        "last_value": alert.last_value,
        "info": alert.info,
        "clearing_since": rfc3339(alert.clearing_since_ms),
        "escalation_level": alert.escalation_level,
        "escalated_at": rfc3339(alert.escalated_at_ms),
        "parent_id": alert.parent_id,
        "suppressed": alert.suppressed,
        "reports": alert.reports,
    }
    return view


class Timing(NamedTuple):
    """An alert's times in epoch ms (``AlertStore.timings``)."""

    station_id: str
    code: str
    opened_ms: int
    acked_ms: int | None
    resolved_ms: int | None
    device_id: str | None = None  # None: the station's own alert (or the service's)
