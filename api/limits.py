"""Request body limits, checked before a body is read: a pure ASGI middleware around
``receive``.

The limit of a request is its route's own (``body_max`` in ``openapi_extra``, shown in the
API docs as ``x-body-max-bytes``), never more than the service-wide ``body_max_bytes``.
A ``Content-Length`` over it is refused at the first read, before a byte of the body is
taken; a chunked body is counted as it arrives and refused as soon as it passes the limit.
uvicorn holds at most its read buffer (64 KiB) of a body nobody reads, so nothing big is
ever in memory. The answer is 413 with the usual JSON error. Any answer given before the
body was read whole (413, 401, 404...) says ``Connection: close``: the rest of the upload
is not read either.

A route that needs a key checks it before the body is read (``api.auth.KeyFirstRoute``).

``NoNul`` refuses a NUL character (U+0000) in the path or the query string with a 422:
PostgreSQL cannot hold or compare one, so on an API replica (or serve on PostgreSQL) a
filter such as ``?assignee=%00`` failed in the store and was answered 503 as an outage;
nothing stored holds one, so every engine answers the same refusal.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KiB = 1024
ID_MAX = 2**63 - 1
"""The largest id (alerts, events, webhooks, dead letters) a store holds: SQLite's INTEGER."""
LIMIT_FIELD = "x-body-max-bytes"


def body_max(limit: int) -> dict[str, Any]:
    """``openapi_extra`` of a route whose bodies are smaller than the service-wide limit."""
    return {LIMIT_FIELD: limit}


class TooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is limited to {limit} bytes here")


def route_limit(scope: Scope, default: int) -> int:
    """The body limit of the route that ``scope`` was routed to (the default before)."""
    extra = getattr(scope.get("route"), "openapi_extra", None) or {}
    own = extra.get(LIMIT_FIELD)
    return min(own, default) if isinstance(own, int) else default


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        read = 0
        unread = bool(length) or "chunked" in headers.get("transfer-encoding", "").lower()

        async def limited() -> Message:
            # the route is known by the time its handler reads: its limit applies
            nonlocal read, unread
            limit = route_limit(scope, self.max_bytes)
            if length is not None and length > limit:
                raise TooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > limit:
                    raise TooLarge(limit)
                unread = bool(message.get("more_body", False))
            return message

        async def closing(message: Message) -> None:
            # answered before the body was read (refused, 401, 404...): close the
            # connection, or the server would go on reading the upload to discard it
            if message["type"] == "http.response.start" and unread:
                closed = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": closed}
            await send(message)

        await self.app(scope, limited, closing)


class NoNul:
    """422 for a NUL character in the path or the query string (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = "path" if "\x00" in scope["path"] else None
            if b"%00" in scope["query_string"] or b"\x00" in scope["query_string"]:
                where = "query"
            if where is not None:
                problem = {"field": where, "problem": "a NUL character (U+0000) is not allowed"}
                answer = JSONResponse(
                    {"error": "invalid_request", "detail": [problem]}, status_code=422
                )
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)
