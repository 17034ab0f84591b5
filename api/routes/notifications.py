"""Maintainers' view of webhook notifications that did not arrive: those waiting for their
next try, and those given up (refused, expired at the deadline, dropped). Maintainer key.
The subscription is named by id and name only: its URL can carry a robot's access token."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.auth import Maintainer
from api.deps import ReadDep
from api.schemas import answers

router = APIRouter(prefix="/v1", tags=["alerts"])


class SubscriptionRef(BaseModel):
    id: int
    name: str | None


class AlertRef(BaseModel):
    severity: str | None
    title: str | None
    station: str | None
    device: str | None
    rule: str | None = None
    code: str | None = None
    port: int | None = None
    slot: int | None = None


class Notification(BaseModel):
    id: int = Field(description="the delivery id, as sent in X-Chargewatch-Delivery")
    subscription: SubscriptionRef
    alert_id: int
    event: str = Field(description="opened, escalated or resolved")
    state: Literal["pending", "failed", "expired", "dropped"] = Field(
        description="pending: waiting for its next try; failed: refused by the receiver;"
        " expired: retried until the deadline; dropped: the subscription's queue was full"
        " or the subscription was removed"
    )
    attempts: int
    http_status: int | None
    last_error: str | None
    created_at: str
    last_attempt_at: str | None
    next_try_at: str | None
    deadline: str = Field(description="retried until then, then expired")
    finished_at: str | None
    alert: AlertRef


class Notifications(BaseModel):
    notifications: list[Notification]
    pending: int = Field(description="notifications waiting for their next try, in all")
    complete: bool = Field(
        description="false when the alert store could not be read: given-up notifications"
        " are then only those still in memory"
    )


@router.get("/notifications", **answers(Notifications, 401, 422, 503))
async def list_notifications(
    read: ReadDep,
    key: Maintainer,
    state: Annotated[
        Literal["undelivered", "pending", "failed"],
        Query(description="pending, failed (given up: failed, expired, dropped), or both"),
    ] = "undelivered",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Notifications:
    """Notifications not delivered: pending ones oldest first, then given-up ones newest
    first."""
    pending, waiting = await read.pending_notifications(limit)
    found = pending if state != "failed" else []
    complete = True
    if state != "pending":
        failed, complete = await read.undelivered_notifications(limit)
        found += failed[: limit - len(found)]
    return Notifications.model_validate(
        {"notifications": found, "pending": waiting, "complete": complete}
    )
