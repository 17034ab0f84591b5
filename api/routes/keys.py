"""Admins' endpoints: API keys (create, list, revoke) and the audit log.

``POST /v1/keys`` answers the token once (only its hash is kept), like ``chargewatch keys
create``; a key may be given an end (``expires_at``, or ``ttl_s`` from now). Every change
is in the audit log (``api.audit``), read at ``GET /v1/audit``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, field_validator

from api.audit import ACTIONS, AuditQuery, audit_log
from api.audit import audit as record_action
from api.auth import NAME_RULE, TTL_MAX_S, Admin, KeyFirstRoute, KeyStore, key_store
from api.errors import NotFound, invalid_query
from api.limits import ID_MAX, KiB, body_max
from api.schemas import AuditPage, KeyCreated, Keys, answers
from api.text import plain_text
from api.views import rfc3339
from ingest.readside import now_ms

router = APIRouter(prefix="/v1", tags=["admin"], route_class=KeyFirstRoute)

KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{8}$", description="the key's id (8 hex digits)")]


class KeyIn(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=100, description="who or what uses it")]
    role: Literal["maintainer", "admin"] = "maintainer"
    expires_at: Annotated[datetime | None, Field(description="RFC 3339, with an offset")] = None
    ttl_s: Annotated[
        int | None, Field(ge=1, le=TTL_MAX_S, description="or: lifetime in seconds from now")
    ] = None

    @field_validator("name")
    @classmethod
    def _visible(cls, value: str) -> str:
        if plain_text(value) != value or "\n" in value:
            raise ValueError(NAME_RULE)
        return value


def _invalid(field: str, problem: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": problem, "type": "value_error"}])


@router.post(
    "/keys",
    openapi_extra=body_max(4 * KiB),
    **answers(KeyCreated, 400, 401, 403, 413, 422, status=201),
)
async def create_key(request: Request, key: Admin, body: KeyIn) -> dict[str, Any]:
    """A new key; the answer carries its ``token``, shown this once and never again."""
    now = now_ms()
    expires: int | None = None
    if body.expires_at is not None and body.ttl_s is not None:
        raise _invalid("ttl_s", "give expires_at or ttl_s, not both")
    if body.expires_at is not None:
        if body.expires_at.tzinfo is None:
            raise _invalid("expires_at", "give an offset (Z or +08:00)")
        expires = int(body.expires_at.timestamp() * 1000)
        if not now < expires <= now + TTL_MAX_S * 1000:
            raise _invalid("expires_at", "must be in the future, at most 10 years from now")
    elif body.ttl_s is not None:
        expires = now + body.ttl_s * 1000
    store: KeyStore = key_store(request)
    new, token = await asyncio.to_thread(store.create, body.name, body.role, expires)
    await record_action(
        request, key.actor, "key.create", new.id,
        name=new.name, role=new.role, expires_at=rfc3339(expires),
    )  # fmt: skip
    return {**new.view(), "token": token}


@router.get("/keys", **answers(Keys, 401, 403))
async def list_keys(request: Request, key: Admin) -> dict[str, Any]:
    """Every key, revoked and expired ones too (never a token or its hash)."""
    keys = await asyncio.to_thread(key_store(request).list)
    now = now_ms()
    return {
        "keys": [
            {
                **k.view(),
                "active": k.revoked_at_ms is None
                and (k.expires_at_ms is None or k.expires_at_ms > now),
            }
            for k in keys
        ]
    }


@router.delete("/keys/{key_id}", **answers(None, 401, 403, 404, 422, status=204))
async def revoke_key(request: Request, key: Admin, key_id: KeyId) -> None:
    """Revoke a key at once: its next request gets 401."""
    if not await asyncio.to_thread(key_store(request).revoke, key_id):
        raise NotFound("active key", key_id)
    await record_action(request, key.actor, "key.revoke", key_id)


@router.get("/audit", **answers(AuditPage, 401, 403, 422))
async def audit(
    request: Request,
    key: Admin,
    action: Annotated[str | None, Query(description=", ".join(ACTIONS))] = None,
    actor: Annotated[
        str | None, Query(max_length=64, description="a key id, or cli for the command")
    ] = None,
    target: Annotated[str | None, Query(max_length=200)] = None,
    since: datetime | None = None,
    cursor: Annotated[
        int | None, Query(ge=1, le=ID_MAX, description="next_cursor of a previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Maintainer and admin actions, newest first; ``next_cursor`` pages on."""
    if action is not None and action not in ACTIONS:
        raise invalid_query("action", f"one of {', '.join(ACTIONS)}")
    if since is not None and since.tzinfo is None:
        raise invalid_query("since", "give an offset (Z or +08:00)")
    q = AuditQuery(
        action=action,
        actor=actor,
        target=target,
        since_ms=int(since.timestamp() * 1000) if since is not None else None,
        before_id=cursor,
        limit=limit,
    )
    rows = await asyncio.to_thread(audit_log(request).query, q)
    entries = [{"at": rfc3339(r.pop("at_ms")), **r} for r in rows]
    return {
        "entries": entries,
        "next_cursor": entries[-1]["id"] if len(entries) == limit else None,
    }
