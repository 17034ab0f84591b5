"""The FastAPI application: one router per audience, JSON errors, body limits
(``api.limits``); ingest's read side and actions (``ingest.readside``) in ``app.state.read``
and ``app.state.actions``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors, schemas
from api.audit import AuditLog
from api.auth import KeyStore
from api.forecast import StatsCache
from api.headers import SecurityHeaders
from api.limits import BodyLimit, NoNul
from api.live import Live
from api.routes import (
    alerts,
    batteries,
    commands,
    health,
    history,
    keys,
    maintenance,
    notifications,
    pages,
    reports,
    riders,
    sentinels,
    stream,
    summaries,
    work_orders,
)
from api.sentinels import SentinelStore
from api.settings import ServeSettings
from api.snapshots import StationViews
from ingest.db.database import Database
from ingest.readside import Actions, ReadSide


class ApiStores(NamedTuple):
    """The API's own stores: maintenance keys, the audit log, riders and their points."""

    keys: KeyStore
    audit: AuditLog
    sentinels: SentinelStore

    @classmethod
    def on(cls, database: Callable[[], Database]) -> ApiStores:
        """Each on its own connection from ``database`` (blocking: call it in a thread)."""
        return cls(KeyStore(database()), AuditLog(database()), SentinelStore(database()))

    def close(self) -> None:
        for store in self:
            store.close()


def create_app(
    read: ReadSide,
    actions: Actions,
    settings: ServeSettings | None = None,
    stores: ApiStores | None = None,
) -> FastAPI:
    """The app on ``read`` and ``actions``; its own ``stores`` are the composition root's
    choice (None: the embedded file of ``read.data_dir``; the caller closes what it gave)."""
    settings = settings or ServeSettings()
    app = FastAPI(
        title="chargewatch",
        version="0.1.0",
        summary="Live availability of e-bike charging piles and battery-swap cabinets",
        docs_url="/docs" if settings.docs else None,  # from a CDN: api.headers
        redoc_url="/redoc" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.read = read
    app.state.actions = actions
    if stores is None:
        stores = ApiStores(
            KeyStore.in_dir(read.data_dir),
            AuditLog.in_dir(read.data_dir),
            SentinelStore.in_dir(read.data_dir),
        )
    app.state.keys = stores.keys  # maintenance API keys
    app.state.audit = stores.audit  # who did what (api.audit)
    app.state.sentinels = stores.sentinels  # riders, points
    app.state.live = live = Live()  # charge rates and SSE wake-ups, fed by the pipeline
    app.state.stats = StatsCache()  # forecasts and demand rates per station
    # station views shared by requests, recomputed when their devices change
    app.state.views = views = StationViews(
        read.catalog, read.twins, live.trends, flagged=read.flagged_batteries
    )
    read.on_flag_change(views.on_flag_change)
    read.on_twins_changed(live.on_change)
    read.on_twins_changed(views.on_change)
    errors.install(app)
    schemas.install(app)  # our 422 body in the OpenAPI document
    app.add_middleware(GZipIfAccepted, minimum_size=GZIP_MIN_BYTES)  # skips text/event-stream
    app.add_middleware(BodyLimit, max_bytes=settings.body_max_bytes)  # before a body is read
    app.add_middleware(NoNul)  # PostgreSQL holds none (api.limits)
    app.add_middleware(SecurityHeaders)  # CSP, nosniff, no framing (api.headers)
    app.include_router(health.router)
    app.include_router(stream.router)  # before riders: /stations/stream is not a station id
    app.include_router(riders.router)
    app.include_router(history.router)
    app.include_router(maintenance.router)
    app.include_router(alerts.router)
    app.include_router(batteries.router)
    app.include_router(work_orders.router)
    app.include_router(commands.router)
    app.include_router(notifications.router)
    app.include_router(keys.router)
    app.include_router(reports.router)
    app.include_router(sentinels.router)  # after reports: POST /v1/reports is there
    app.include_router(summaries.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    return app


GZIP_MIN_BYTES = 1000


class GZipIfAccepted:
    """Starlette's GZip for clients that accept gzip; the others skip it (its identity path
    wraps and inspects every response: ~40 us of a ~80 us trivial request in-process) and
    only get the ``Vary: Accept-Encoding`` it would have added, so shared caches keep the
    two encodings apart."""

    def __init__(self, app: ASGIApp, minimum_size: int = GZIP_MIN_BYTES) -> None:
        self.app = app
        self.minimum_size = minimum_size
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"accept-encoding" and b"gzip" in value:
                await self.gzip(scope, receive, send)
                return

        async def vary(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = self._with_vary(message["headers"])
                if headers is not None:
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, vary)

    def _with_vary(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
        """The headers with ``Vary: Accept-Encoding`` when gzip would have compressed this
        answer for a client that accepts it (as Starlette's identity path adds it), else
        None."""
        length = None
        vary = None
        for i, (name, value) in enumerate(headers):
            if name == b"content-encoding" or (
                name == b"content-type" and value.startswith(b"text/event-stream")
            ):
                return None
            if name == b"content-length":
                length = int(value)
            elif name == b"vary":
                vary = i
        if length is not None and length < self.minimum_size:
            return None
        if vary is None:
            return [*headers, (b"vary", b"Accept-Encoding")]
        value = headers[vary][1]
        if b"accept-encoding" in value.lower():
            return None
        out = list(headers)
        out[vary] = (b"vary", value + b", Accept-Encoding")
        return out
