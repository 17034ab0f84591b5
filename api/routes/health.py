"""Liveness, readiness and Prometheus metrics.

``/metrics`` answers clients from ``metrics_allow`` (loopback by default) and any request
with a maintainer or admin key (Prometheus: ``authorization: {credentials: <key>}``);
others get 403. A request relayed by a proxy that is not in ``trusted_proxies`` (it
carries ``X-Forwarded-For`` or ``Forwarded`` we did not read) is not from loopback, even
when its proxy runs there.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from api.auth import optional_maintainer
from api.deps import ReadDep
from api.schemas import Health, Readiness, answers
from api.settings import ServeSettings

router = APIRouter(tags=["health"])


@router.get("/healthz", **answers(Health))
async def healthz() -> dict[str, Any]:
    """The process is up (says nothing about the broker or the store)."""
    return {"status": "ok"}


@router.get("/readyz", **answers(Readiness, also={503: Readiness}))
async def readyz(read: ReadDep) -> JSONResponse:
    """Ready only while connected to the broker, the pipeline alive and the store writing."""
    problems = read.problems()
    return JSONResponse(
        {"ready": not problems, "problems": problems}, status_code=503 if problems else 200
    )


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.cache
def _networks(allowed: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in allowed)


def metrics_allowed(request: Request, settings: ServeSettings) -> bool:
    """The client's address is in ``metrics_allow`` and was not hidden behind a proxy we
    do not trust."""
    if request.client is None:
        return False
    relayed = "x-forwarded-for" in request.headers or "forwarded" in request.headers
    if relayed and not settings.trusted_proxies:
        return False  # a proxy we do not know relayed it: where it came from is unknown
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(address in net for net in _networks(tuple(settings.metrics_allow)))


@router.get(
    "/metrics", response_class=Response, **answers(None, 401, 403, media_type=CONTENT_TYPE_LATEST)
)
async def metrics(request: Request, read: ReadDep) -> Response:
    """Prometheus text: from ``metrics_allow`` (loopback by default), or with a key."""
    settings: ServeSettings = request.app.state.settings
    if not metrics_allowed(request, settings) and await optional_maintainer(request) is None:
        raise HTTPException(
            403,
            "/metrics is for the configured networks (CHARGEWATCH_METRICS_ALLOW) or a"
            " maintainer key (Authorization: Bearer)",
        )
    return Response(read.metrics(), media_type=CONTENT_TYPE_LATEST)
