"""What a work order is: an alert handed to a person, with a due time, through its states.

States::

    open ──► assigned ──► on_site ──► fixed ──► closed
      │          │  ▲ (re-assign)       ▲
      └──────────┴──────────────────────┘  (the alert resolved: fixed from any earlier state)

``on_site`` is set by the device's own ``door_opened`` during the order, or by hand;
``fixed`` only while the alert is resolved (the device reports healthy again, or a
maintainer resolved the alert), and at once when it resolves; ``closed`` by hand after fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from typing import Any, Literal

from ingest.alerts.model import rfc3339

OrderState = Literal["open", "assigned", "on_site", "fixed", "closed"]
ORDER_STATES: tuple[OrderState, ...] = ("open", "assigned", "on_site", "fixed", "closed")
UNFINISHED: tuple[OrderState, ...] = ("open", "assigned", "on_site")

#: The states a maintainer may move an order to, from each state (``fixed`` also needs the
#: alert resolved). ``assigned`` -> ``assigned`` hands the order to someone else.
MANUAL: dict[str, tuple[OrderState, ...]] = {
    "open": ("assigned", "on_site", "fixed"),
    "assigned": ("assigned", "on_site", "fixed"),
    "on_site": ("fixed",),
    "fixed": ("closed",),
    "closed": (),
}


class WorkOrderError(ValueError):
    pass


class OrderNotFound(WorkOrderError):
    pass


class OrderConflict(WorkOrderError):
    pass


class OrderInvalid(WorkOrderError):
    pass


@dataclass(frozen=True, slots=True)
class OrderQuery:
    states: Sequence[str] = ()
    assignee: str | None = None
    station: str | None = None
    before_id: int | None = None
    limit: int = 100


@dataclass(slots=True)
class WorkOrder:
    id: int
    alert_id: int
    station_id: str
    device_id: str | None
    rule: str
    code: str
    severity: str
    state: str
    assignee: str | None
    created_by: str
    created_at_ms: int
    due_at_ms: int
    assigned_at_ms: int | None = None
    on_site_at_ms: int | None = None
    on_site_how: str | None = None  # "door" (the device's door_opened) or "manual"
    fixed_at_ms: int | None = None
    closed_at_ms: int | None = None
    closed_by: str | None = None
    overdue_notices: int = 0
    overdue_at_ms: int | None = None
    updated_at_ms: int = 0

    def row(self) -> tuple[Any, ...]:
        return astuple(self)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> WorkOrder:
        return cls(*row)

    def overdue(self, now_ms: int) -> bool:
        return self.state in UNFINISHED and now_ms >= self.due_at_ms


ORDER_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(WorkOrder))


def order_view(order: WorkOrder, now_ms: int) -> dict[str, Any]:
    """The API's JSON of a work order (the log is added by the detail view)."""
    return {
        "id": order.id,
        "alert_id": order.alert_id,
        "station": order.station_id,
        "device": order.device_id,
        "rule": order.rule,
        "code": order.code,
        "severity": order.severity,
        "state": order.state,
        "assignee": order.assignee,
        "created_by": order.created_by,
        "created_at": rfc3339(order.created_at_ms),
        "due_at": rfc3339(order.due_at_ms),
        "overdue": order.overdue(now_ms),
        "assigned_at": rfc3339(order.assigned_at_ms),
        "on_site_at": rfc3339(order.on_site_at_ms),
        "on_site_how": order.on_site_how,
        "fixed_at": rfc3339(order.fixed_at_ms),
        "closed_at": rfc3339(order.closed_at_ms),
        "closed_by": order.closed_by,
        "overdue_notices": order.overdue_notices,
        "updated_at": rfc3339(order.updated_at_ms),
    }
