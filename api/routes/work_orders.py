"""Maintainers' work orders: an alert handed to a person with a due time, moved through
its states (ingest/alerts/order_model.py), and the repair statistics. Every route needs a
maintainer key; the actor of every action is the key's owner, and each action is in the
audit log (docs/alerts.md, "Work orders").

The assignee is a free-text name (one line of visible characters, at most 100): the
person who goes. ``mine=true`` lists the orders whose assignee is the key's name, so a
maintainer with a key of their own assigns to that name to see them in "my orders"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, Field
from starlette.exceptions import HTTPException

from api.audit import audit
from api.auth import ApiKey, KeyFirstRoute, Maintainer
from api.deps import ActionsDep, ReadDep
from api.errors import NotFound, invalid_query
from api.limits import ID_MAX, KiB, body_max
from api.schemas import answers
from api.text import plain_text
from ingest.alerts.model import AlertNotFound, rfc3339
from ingest.alerts.order_model import (
    ORDER_STATES,
    OrderConflict,
    OrderInvalid,
    OrderNotFound,
    OrderQuery,
    WorkOrder,
    order_view,
)
from ingest.readside import Actions, ReadSide

router = APIRouter(prefix="/v1", tags=["work orders"], route_class=KeyFirstRoute)

OrderId = Annotated[int, Path(ge=1, le=ID_MAX)]
SMALL_BODY = body_max(16 * KiB)
DUE_MAX = timedelta(days=366)
STATS_SPAN_MAX = timedelta(days=366)


def _one_line(value: str) -> str:
    if plain_text(value) != value or "\n" in value:
        raise ValueError("one line of visible characters, no leading or trailing space")
    return value


Assignee = Annotated[
    str, Field(min_length=1, max_length=100, description="who goes"), AfterValidator(_one_line)
]
Note = Annotated[str, Field(max_length=2000)]


class OrderIn(BaseModel):
    assignee: Assignee | None = None
    due_at: Annotated[
        datetime | None, Field(description="RFC 3339 with an offset; default: by severity")
    ] = None
    note: Note | None = None


class OrderCreate(OrderIn):
    alert_id: Annotated[int, Field(ge=1, le=ID_MAX)]


class StateIn(BaseModel):
    state: Literal["assigned", "on_site", "fixed", "closed"]
    assignee: Assignee | None = None
    note: Note | None = None


class OrderNoteIn(BaseModel):
    text: Annotated[str, Field(min_length=1, max_length=2000)]


class WorkOrderOut(BaseModel):
    id: int
    alert_id: int
    station: str
    device: str | None
    rule: str
    code: str
    severity: str
    state: str
    assignee: str | None
    created_by: str
    created_at: str
    due_at: str
    overdue: bool
    assigned_at: str | None
    on_site_at: str | None
    on_site_how: Literal["door", "manual"] | None
    fixed_at: str | None
    closed_at: str | None
    closed_by: str | None
    overdue_notices: int
    updated_at: str


class LogEntry(BaseModel):
    at: str
    actor: str
    what: str = Field(description="created, assigned, on_site, fixed, closed, note, overdue")
    note: str | None


class WorkOrderDetail(WorkOrderOut):
    log: list[LogEntry]


class WorkOrderList(BaseModel):
    work_orders: list[WorkOrderOut]
    next_cursor: int | None


class RepairGroupOut(BaseModel):
    key: str = Field(description="the station id, or the fault code (the rule's name)")
    alerts: int
    acknowledged: int
    resolved: int
    mtta_s: float | None = Field(description="mean time to acknowledge, seconds")
    mtta_median_s: float | None
    mttr_s: float | None = Field(description="mean time to repair (opened -> resolved)")
    mttr_median_s: float | None


class RepairStats(BaseModel):
    by: Literal["station", "code"]
    from_: str = Field(alias="from")
    to: str
    groups: list[RepairGroupOut]


def _ms(when: datetime, field: str) -> int:
    if when.tzinfo is None:
        raise RequestValidationError(
            [{"loc": ("body", field), "msg": "give an offset (Z or +08:00)", "type": "value_error"}]
        )
    return int(when.timestamp() * 1000)


async def _detail(read: ReadSide, order: WorkOrder) -> dict[str, Any]:
    view = order_view(order, read.clock_ms())
    view["log"] = [
        {
            "at": _time(r["at_ms"]),
            "actor": r["actor"],
            "what": r["what"],
            "note": r["note"],
        }
        for r in await read.work_order_log(order.id)
    ]
    return view


def _time(ms: int) -> str:
    return rfc3339(ms) or ""


async def _create(
    request: Request, read: ReadSide, actions: Actions, key: ApiKey, alert_id: int, body: OrderIn
) -> dict[str, Any]:
    due_ms = None
    if body.due_at is not None:
        due_ms = _ms(body.due_at, "due_at")
        if body.due_at - datetime.now(UTC) > DUE_MAX:
            raise RequestValidationError(
                [{"loc": ("body", "due_at"), "msg": "at most a year ahead", "type": "value_error"}]
            )
    try:
        order = await actions.create_work_order(
            alert_id, key.name, assignee=body.assignee, due_at_ms=due_ms, note=body.note
        )
    except AlertNotFound:
        raise NotFound("alert", str(alert_id)) from None
    except OrderConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except OrderInvalid as exc:
        raise RequestValidationError(
            [{"loc": ("body", "due_at"), "msg": str(exc), "type": "value_error"}]
        ) from None
    await audit(request, key.actor, "work_order.create", str(order.id), alert_id=alert_id,
                    assignee=order.assignee, due_at=_time(order.due_at_ms))  # fmt: skip
    return await _detail(read, order)


@router.post(
    "/alerts/{alert_id}/work-order",
    openapi_extra=SMALL_BODY,
    **answers(WorkOrderDetail, 400, 401, 404, 409, 413, 422, 503, status=201),
)
async def create_for_alert(
    request: Request,
    read: ReadDep,
    actions: ActionsDep,
    key: Maintainer,
    alert_id: Annotated[int, Path(ge=1, le=ID_MAX)],
    body: OrderIn | None = None,
) -> dict[str, Any]:
    """A work order for an unresolved alert (one per alert until it is closed: else 409).
    Due by the alert's severity unless ``due_at`` says; ``assigned`` when an assignee is
    given, else ``open``."""
    return await _create(request, read, actions, key, alert_id, body or OrderIn())


@router.post(
    "/work-orders",
    openapi_extra=SMALL_BODY,
    **answers(WorkOrderDetail, 400, 401, 404, 409, 413, 422, 503, status=201),
)
async def create_order(
    request: Request, read: ReadDep, actions: ActionsDep, key: Maintainer, body: OrderCreate
) -> dict[str, Any]:
    """The same as ``POST /v1/alerts/{alert_id}/work-order``, the alert in the body."""
    return await _create(request, read, actions, key, body.alert_id, body)


@router.get("/work-orders", **answers(WorkOrderList, 401, 422, 503))
async def list_orders(
    read: ReadDep,
    key: Maintainer,
    state: Annotated[str | None, Query(max_length=100, description="comma-separated")] = None,
    assignee: Annotated[str | None, Query(max_length=100)] = None,
    station: Annotated[str | None, Query(max_length=64)] = None,
    mine: Annotated[bool, Query(description="assigned to the key's name")] = False,
    cursor: Annotated[int | None, Query(ge=1, le=ID_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Work orders, newest first; ``next_cursor`` pages on."""
    states = [s.strip() for s in (state or "").split(",") if s.strip()]
    bad = [s for s in states if s not in ORDER_STATES]
    if bad:
        raise invalid_query("state", f"{', '.join(bad)} is not one of {', '.join(ORDER_STATES)}")
    if mine and assignee is not None and assignee != key.name:
        raise invalid_query("assignee", "mine=true lists the key's own orders")
    q = OrderQuery(
        states=states,
        assignee=key.name if mine else assignee,
        station=station,
        before_id=cursor,
        limit=limit,
    )
    found = await read.work_orders(q)
    now = read.clock_ms()
    return {
        "work_orders": [order_view(o, now) for o in found],
        "next_cursor": found[-1].id if len(found) == limit else None,
    }


@router.get(
    "/work-orders/{order_id}",
    **answers(WorkOrderDetail, 401, 404, 422, 503),
)
async def get_order(read: ReadDep, key: Maintainer, order_id: OrderId) -> dict[str, Any]:
    try:
        order = await read.work_order(order_id)
    except OrderNotFound:
        raise NotFound("work order", str(order_id)) from None
    return await _detail(read, order)


@router.post(
    "/work-orders/{order_id}/state",
    openapi_extra=SMALL_BODY,
    **answers(WorkOrderDetail, 400, 401, 404, 409, 413, 422, 503),
)
async def move_order(
    request: Request,
    read: ReadDep,
    actions: ActionsDep,
    key: Maintainer,
    order_id: OrderId,
    body: StateIn,
) -> dict[str, Any]:
    """Move an order: ``assigned`` (to ``assignee``, or again to someone else),
    ``on_site``, ``fixed`` (only once its alert is resolved: else 409), ``closed`` (only
    when fixed). A move its state does not allow is 409."""
    try:
        order = await actions.move_work_order(
            order_id, body.state, key.name, assignee=body.assignee, note=body.note
        )
    except OrderNotFound:
        raise NotFound("work order", str(order_id)) from None
    except OrderConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except OrderInvalid as exc:
        raise RequestValidationError(
            [{"loc": ("body", "assignee"), "msg": str(exc), "type": "value_error"}]
        ) from None
    await audit(request, key.actor, "work_order.state", str(order_id), state=body.state,
                 assignee=order.assignee, note_chars=len(body.note or ""))  # fmt: skip
    return await _detail(read, order)


@router.post(
    "/work-orders/{order_id}/notes",
    openapi_extra=SMALL_BODY,
    **answers(WorkOrderDetail, 400, 401, 404, 413, 422, 503, status=201),
)
async def add_note(
    request: Request,
    read: ReadDep,
    actions: ActionsDep,
    key: Maintainer,
    order_id: OrderId,
    body: OrderNoteIn,
) -> dict[str, Any]:
    try:
        order = await actions.add_work_order_note(order_id, key.name, body.text)
    except OrderNotFound:
        raise NotFound("work order", str(order_id)) from None
    await audit(request, key.actor, "work_order.note", str(order_id), chars=len(body.text))
    return await _detail(read, order)


@router.get(
    "/stats/repair",
    **answers(RepairStats, 401, 422, 503),
)
async def repair_stats(
    read: ReadDep,
    key: Maintainer,
    from_: Annotated[datetime | None, Query(alias="from", description="default: to - 30 d")] = None,
    to: Annotated[datetime | None, Query(description="default: now")] = None,
    by: Literal["station", "code"] = "station",
) -> dict[str, Any]:
    """Mean and median time to acknowledge (opened -> acknowledged) and to repair (opened
    -> resolved) of the alerts opened in [from, to), per station or per fault code."""
    for name, value in (("from", from_), ("to", to)):
        if value is not None and value.tzinfo is None:
            raise invalid_query(name, "give an offset (Z or +08:00)")
    end = to or datetime.now(UTC)
    start = from_ or end - timedelta(days=30)
    if start >= end:
        raise invalid_query("from", "must be before to")
    if end - start > STATS_SPAN_MAX:
        raise invalid_query("from", "a span of at most 366 days")
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    groups = await read.repair_times(start_ms, end_ms, by)
    return {
        "by": by,
        "from": _time(start_ms),
        "to": _time(end_ms),
        "groups": groups,
    }
