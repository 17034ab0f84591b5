"""HTTP caching and paging for rider endpoints: ``ETag``/``If-None-Match``, a short
``Cache-Control``, and ``limit``/``offset`` paging with ``X-Total-Count`` and ``Link``.

The ETag covers the whole answer except what only the clock changes: ages (``data_age_s``,
``age_s``, ``generated_at``, the "… ago" texts) and countdowns (``*_in_s``, whose ``*_at``
twins are covered). A client that revalidates gets 304 as long as nothing but the clock
moved, and counts down from ``updated_at`` and ``*_at`` itself. Staleness is not an age: a device going stale changes ``stale`` and
so the ETag.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pydantic_core
from fastapi import Request, Response

RIDER_MAX_AGE_S = 5
"""Counts change within seconds; a proxy or browser may reuse an answer this long."""
# ages, and estimates counted down from now (their ``*_at`` twins are in the tag)
_VOLATILE = frozenset(
    {
        "data_age_s",
        "age_s",
        "generated_at",
        "text",
        "next_ready_in_s",
        "next_free_in_s",
        "ready_in_s",
        "expected_free_in_s",
    }
)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def etag_of(body: Any) -> str:
    """The ETag of everything in ``body`` but ages and countdowns. Views are built in a
    fixed key order, so the serialisation needs no sorting."""
    return etag_of_bytes(pydantic_core.to_json(_strip(body)))


_STRING = rb'"(?:[^"\\]|\\.)*"'  # a JSON string, escapes included
_VOLATILE_JSON = re.compile(
    rb'"(?:' + b"|".join(k.encode() for k in sorted(_VOLATILE)) + rb')":'
    rb"(?:null|-?[0-9][0-9.eE+-]*|"
    + _STRING
    + rb"|\{(?:"
    + _STRING
    + rb":"
    + _STRING
    + rb",?)*\}),?"
)


def etag_of_json(data: bytes) -> str:
    """``etag_of`` for a body already serialised (compact, as ``pydantic_core.to_json``
    writes it): the same fields are left out, by pattern instead of by walking the objects
    (about 5x cheaper)."""
    return etag_of_bytes(_VOLATILE_JSON.sub(b"", data))


def etag_of_bytes(data: bytes) -> str:
    """A weak ETag (``W/"..."``): two answers that share it are equivalent, not byte for
    byte the same. They differ in their ages, and the gzipped and the plain encoding share
    it; a strong ETag promises identical bytes (RFC 9110, 8.8.1)."""
    return 'W/"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'


def _matches(header: str | None, etag: str) -> bool:
    """``If-None-Match`` uses the weak comparison: ``W/"x"`` and ``"x"`` match."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag.removeprefix("W/") in tags


def cached_json(
    request: Request,
    body: Any,
    *,
    max_age_s: int = RIDER_MAX_AGE_S,
    headers: dict[str, str] | None = None,
    etag: str | None = None,
) -> Response:
    """``body`` as JSON with an ETag (``etag``, or computed), or 304 when the client already
    has it."""
    etag = etag or etag_of(body)
    out = {
        "ETag": etag,
        "Cache-Control": f"public, max-age={max_age_s}",
        **(headers or {}),
    }
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=out)
    return Response(pydantic_core.to_json(body), media_type="application/json", headers=out)


def page_headers(request: Request, total: int, limit: int | None, offset: int) -> dict[str, str]:
    """``X-Total-Count`` and an RFC 8288 ``Link`` with first/prev/next/last pages."""
    headers = {"X-Total-Count": str(total)}
    if limit is None:
        return headers
    links = []

    def link(rel: str, at: int) -> None:
        url = request.url.include_query_params(limit=limit, offset=at)
        links.append(f'<{url}>; rel="{rel}"')

    link("first", 0)
    if offset > 0:
        link("prev", max(0, offset - limit))
    if offset + limit < total:
        link("next", offset + limit)
    link("last", max(0, (total - 1) // limit * limit) if total else 0)
    headers["Link"] = ", ".join(links)
    return headers


def cached_bytes(
    request: Request,
    data: bytes,
    etag: str,
    *,
    max_age_s: int = RIDER_MAX_AGE_S,
    headers: dict[str, str] | None = None,
) -> Response:
    """JSON already serialised (``data``) with its ``etag``, or 304 when the client
    already has it."""
    out = {"ETag": etag, "Cache-Control": f"public, max-age={max_age_s}", **(headers or {})}
    unchanged = not_modified(request, etag, out, max_age_s=max_age_s)
    if unchanged is not None:
        return unchanged
    return Response(data, media_type="application/json", headers=out)


VARY = {"Vary": "Accept-Encoding"}


def not_modified(
    request: Request,
    etag: str,
    headers: dict[str, str] | None = None,
    *,
    max_age_s: int = RIDER_MAX_AGE_S,
) -> Response | None:
    """304 when the client already has ``etag`` (before anything is serialised or
    compressed), else None. ``Content-Encoding`` is for a body: a 304 has none."""
    if not _matches(request.headers.get("if-none-match"), etag):
        return None
    out = {"ETag": etag, "Cache-Control": f"public, max-age={max_age_s}", **(headers or {})}
    out.pop("Content-Encoding", None)
    return Response(status_code=304, headers=out)
