"""Maintainers' alerts: list, detail, acknowledge, resolve, notes, the SSE change stream,
and (admin) webhook subscriptions. Every route needs an API key (api/auth.py).

The actor of every action is the key's owner: ``by`` in a body may repeat the key's name
or be left out, never name someone else (422). Each action is in the audit log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, HttpUrl
from starlette.exceptions import HTTPException

from api.audit import audit
from api.auth import Admin, ApiKey, KeyFirstRoute, Maintainer
from api.deps import ActionsDep, ReadDep
from api.errors import NotFound, invalid_query
from api.limits import ID_MAX, KiB, body_max
from api.schemas import AlertDetail, AlertList, WebhookCreated, Webhooks, answers
from ingest.alerts.config import AlertsConfig
from ingest.alerts.model import (
    SEVERITIES,
    AlertConflict,
    AlertNotFound,
    AlertQuery,
    alert_view,
)
from ingest.readside import Actions, ReadSide, Unavailable

router = APIRouter(prefix="/v1", tags=["alerts"], route_class=KeyFirstRoute)

AlertId = Annotated[int, Path(ge=1, le=ID_MAX)]
SMALL_BODY = body_max(16 * KiB)  # a note of 2,000 characters is at most 12 KiB of JSON

STATUSES = ("open", "acknowledged", "resolved")


def alerts_config(read: ReadSide) -> AlertsConfig:
    """The alert options; 503 when alerts are disabled here."""
    config = read.alerts_config
    if config is None:
        raise Unavailable("alerts are disabled in this service (alerts.enabled=false)")
    return config


def _csv(value: str | None, field: str, allowed: tuple[str, ...]) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    if "active" in items and field == "status":
        items = [i for i in items if i != "active"] + ["open", "acknowledged"]
    bad = [i for i in items if i not in allowed]
    if bad:
        raise invalid_query(field, f"{', '.join(bad)} is not one of {', '.join(allowed)}")
    return items


@router.get("/alerts", **answers(AlertList, 401, 422, 503))
async def list_alerts(
    read: ReadDep,
    key: Maintainer,
    status: Annotated[str | None, Query(description="open, acknowledged, resolved, active")] = None,
    severity: str | None = None,
    station: str | None = None,
    device: str | None = None,
    rule: str | None = None,
    since: datetime | None = None,
    cursor: Annotated[
        int | None, Query(ge=1, le=ID_MAX, description="next_cursor of a previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Alerts, newest first; ``next_cursor`` pages on."""
    if since is not None and since.tzinfo is None:
        raise invalid_query("since", "give an offset (Z or +08:00)")
    q = AlertQuery(
        status=_csv(status, "status", (*STATUSES, "active")),
        severity=_csv(severity, "severity", SEVERITIES),
        station=station,
        device=device,
        rule=rule,
        since_ms=int(since.timestamp() * 1000) if since is not None else None,
        before_id=cursor,
        limit=limit,
    )
    alerts = await read.alerts(q)
    return {
        "alerts": [alert_view(a) for a in alerts],
        "next_cursor": alerts[-1].id if len(alerts) == limit else None,
    }


def _sse(event_id: int, event: str, data: str) -> str:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"


@router.get(
    "/alerts/stream",
    response_class=StreamingResponse,
    **answers(None, 401, 422, 503, media_type="text/event-stream"),
)
async def stream(
    request: Request,
    read: ReadDep,
    key: Maintainer,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[int | None, Query(ge=0, le=ID_MAX, description="like Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events of every alert change. Each event's ``id`` is one more than the
    previous one; reconnect with ``Last-Event-ID`` (or ``?after=``) to get what was missed."""
    keepalive = alerts_config(read).sse_keepalive_s
    resume: int | None = after
    if last_event_id is not None:
        try:
            resume = int(last_event_id)
        except ValueError:
            raise invalid_query("Last-Event-ID", "must be an event id (integer)") from None
        if not 0 <= resume <= ID_MAX:
            raise invalid_query("Last-Event-ID", f"must be an event id, 0 to {ID_MAX}")
    # subscribed before reading the backlog: nothing falls in between
    queue, live_from = read.subscribe_alerts()

    async def events() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n: chargewatch alert stream\n\n"
            last = live_from
            if resume is not None and resume < live_from:
                oldest = await read.oldest_alert_event()
                if oldest is not None and resume + 1 < oldest:
                    gone = {"from": resume + 1, "to": oldest - 1, "detail": "events pruned"}
                    yield f"event: reset\ndata: {json.dumps(gone)}\n\n"
                last = resume
                while True:
                    rows = await read.alert_events_after(last, 500)
                    for row in rows:
                        yield _sse(row.id, row.type, row.data)
                        last = row.id
                    if len(rows) < 500:
                        break
            elif resume is not None:
                last = resume
            while True:
                try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                    async with asyncio.timeout(keepalive):
                        item = await queue.get()
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if item is None:
                    return
                if item.id <= last:
                    continue
                yield _sse(item.id, item.type, item.data)
                last = item.id
        finally:
            read.unsubscribe_alerts(queue)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _detail(read: ReadSide, alert_id: int) -> dict[str, Any]:
    try:
        alert = await read.alert(alert_id)
    except AlertNotFound:
        raise NotFound("alert", str(alert_id)) from None
    view = alert_view(alert)
    view["notes"] = await read.alert_notes(alert_id)
    view["deliveries"] = await read.alert_deliveries(alert_id)
    return view


@router.get("/alerts/{alert_id}", **answers(AlertDetail, 401, 404, 422, 503))
async def get_alert(read: ReadDep, key: Maintainer, alert_id: AlertId) -> dict[str, Any]:
    return await _detail(read, alert_id)


BY = "the key's name, the default; any other name is refused: the actor is the key's owner"


class Action(BaseModel):
    by: Annotated[str | None, Field(max_length=100, description=BY)] = None
    note: Annotated[str | None, Field(max_length=2000)] = None


class NoteIn(BaseModel):
    text: Annotated[str, Field(min_length=1, max_length=2000)]
    by: Annotated[str | None, Field(max_length=100, description=BY)] = None


def _actor(key: ApiKey, by: str | None) -> str:
    """Who acts: the key's owner. ``by`` may say so again, not name someone else."""
    if by is not None and by != key.name:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "by"),
                    "msg": f"acts are recorded under the key's owner ({key.name!r});"
                    " leave 'by' out, or use a key of your own",
                    "type": "value_error",
                }
            ]
        )
    return key.name


async def _act(
    request: Request,
    read: ReadSide,
    actions: Actions,
    key: ApiKey,
    alert_id: int,
    what: str,
    body: Action,
) -> Any:
    by = _actor(key, body.by)
    try:
        if what == "ack":
            await actions.acknowledge(alert_id, by, body.note)
        else:
            await actions.resolve(alert_id, by, body.note)
    except AlertNotFound:
        raise NotFound("alert", str(alert_id)) from None
    except AlertConflict as exc:
        raise HTTPException(409, str(exc)) from None
    action = "alert.acknowledge" if what == "ack" else "alert.resolve"
    await audit(request, key.actor, action, str(alert_id), note_chars=len(body.note or ""))
    return await _detail(read, alert_id)


@router.post(
    "/alerts/{alert_id}/ack",
    openapi_extra=SMALL_BODY,
    **answers(AlertDetail, 400, 401, 404, 409, 413, 422, 503),
)
async def acknowledge(
    request: Request, read: ReadDep, actions: ActionsDep, key: Maintainer, alert_id: AlertId,
    body: Action | None = None,
) -> dict[str, Any]:  # fmt: skip
    return await _act(request, read, actions, key, alert_id, "ack", body or Action())  # type: ignore[no-any-return]


@router.post(
    "/alerts/{alert_id}/resolve",
    openapi_extra=SMALL_BODY,
    **answers(AlertDetail, 400, 401, 404, 409, 413, 422, 503),
)
async def resolve(
    request: Request, read: ReadDep, actions: ActionsDep, key: Maintainer, alert_id: AlertId,
    body: Action | None = None,
) -> dict[str, Any]:  # fmt: skip
    return await _act(request, read, actions, key, alert_id, "resolve", body or Action())  # type: ignore[no-any-return]


@router.post(
    "/alerts/{alert_id}/notes",
    openapi_extra=SMALL_BODY,
    **answers(AlertDetail, 400, 401, 404, 413, 422, 503, status=201),
)
async def add_note(
    request: Request,
    read: ReadDep,
    actions: ActionsDep,
    key: Maintainer,
    alert_id: AlertId,
    body: NoteIn,
) -> dict[str, Any]:
    by = _actor(key, body.by)
    try:
        await actions.add_alert_note(alert_id, by, body.text)
    except AlertNotFound:
        raise NotFound("alert", str(alert_id)) from None
    await audit(request, key.actor, "alert.note", str(alert_id), chars=len(body.text))
    return await _detail(read, alert_id)


# -- webhooks (admin) ---------------------------------------------------------------------


Event = Literal["opened", "escalated", "resolved", "overdue"]  # overdue: a work order's


class WebhookIn(BaseModel):
    url: HttpUrl
    name: Annotated[str | None, Field(max_length=100)] = None
    secret: Annotated[str | None, Field(min_length=8, max_length=200)] = None
    format: Literal["json", "wecom", "dingtalk", "feishu"] = "json"
    severities: Annotated[
        list[Literal["critical", "major", "minor", "warning"]], Field(max_length=4)
    ] = []
    stations: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=500)] = []
    rules: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=50)] = []
    events: Annotated[list[Event], Field(max_length=4)] = ["opened", "escalated", "resolved"]
    # chat messages and the JSON `title`/`summary` in this language; none: the setting
    language: Literal["zh", "en"] | None = None


@router.post("/webhooks", **answers(WebhookCreated, 400, 401, 403, 413, 422, 503, status=201))
async def create_webhook(
    request: Request, actions: ActionsDep, key: Admin, body: WebhookIn
) -> dict[str, Any]:
    """Subscribe a URL; the response carries the signing secret (shown this once)."""
    created = await actions.add_webhook(
        str(body.url),
        name=body.name,
        secret=body.secret,
        format=body.format,
        severities=list(body.severities),
        stations=body.stations,
        rules=body.rules,
        events=list(body.events),
        language=body.language,
    )
    # the host only: chat webhooks carry their token in the URL's path or query
    await audit(request, key.actor, "webhook.create", str(created["id"]), host=body.url.host,
                 format=body.format, name=body.name)  # fmt: skip
    return created


@router.get("/webhooks", **answers(Webhooks, 401, 403, 503))
async def list_webhooks(read: ReadDep, key: Admin) -> dict[str, Any]:
    """Subscriptions with their health: ``failing`` after repeated failed deliveries."""
    subs = await read.webhooks()
    return {"webhooks": subs, "failing": [s["id"] for s in subs if s["failing"]]}


@router.delete("/webhooks/{webhook_id}", **answers(None, 401, 403, 404, 422, 503, status=204))
async def delete_webhook(
    request: Request,
    actions: ActionsDep,
    key: Admin,
    webhook_id: Annotated[int, Path(ge=1, le=ID_MAX)],
) -> None:
    if not await actions.remove_webhook(webhook_id):
        raise NotFound("webhook", str(webhook_id))
    await audit(request, key.actor, "webhook.delete", str(webhook_id))
