"""Maintainers' endpoints: dead letters (alerts live in their own module)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.auth import KeyFirstRoute, Maintainer
from api.deps import ReadDep
from api.schemas import DeadLetters, answers
from api.views import rfc3339

router = APIRouter(prefix="/v1", tags=["maintenance"], route_class=KeyFirstRoute)


@router.get("/deadletters", **answers(DeadLetters, 401, 422, 503))
async def dead_letters(
    read: ReadDep, key: Maintainer, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """Recent rejected messages with their reason, and a count per reason since the start."""
    rows, counts = await read.dead_letters(limit)
    return {
        "counts": counts,
        "dead_letters": [
            {
                "id": d.id,
                "received_at": rfc3339(d.received_ms),
                "topic": d.topic,
                "reason": d.reason,
                "detail": d.detail,
                "size": d.size,
                "payload_excerpt": d.payload[:512].decode("utf-8", errors="replace"),
            }
            for d in rows
        ],
    }
