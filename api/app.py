"""The FastAPI application: one router per audience, JSON errors, the running ingest in
``app.state.ingest``."""

from __future__ import annotations

import gc

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.staticfiles import StaticFiles

from api import errors
from api.auth import KeyStore
from api.forecast import StatsCache
from api.live import Live
from api.routes import alerts, health, history, maintenance, pages, reports, riders, stream
from api.snapshots import StationViews
from ingest.service import Ingest


def create_app(ingest: Ingest) -> FastAPI:
    app = FastAPI(
        title="chargewatch",
        version="0.1.0",
        summary="Live availability of e-bike charging piles and battery-swap cabinets",
    )
    app.state.ingest = ingest
    app.state.keys = KeyStore.in_dir(ingest.config.data_dir)  # maintenance API keys
    app.state.live = live = Live()  # charge rates and SSE wake-ups, fed by the pipeline
    app.state.stats = StatsCache()  # forecasts and demand rates per station
    # station views shared by requests, recomputed when their devices change
    app.state.views = views = StationViews(ingest.catalog, ingest.twins, live.trends)
    if ingest.pipeline is not None:
        ingest.pipeline.listeners.append(live.on_change)
        ingest.pipeline.listeners.append(views.on_change)
    errors.install(app)
    app.add_middleware(GZipMiddleware, minimum_size=1000)  # skips text/event-stream
    app.include_router(health.router)
    app.include_router(stream.router)  # before riders: /stations/stream is not a station id
    app.include_router(riders.router)
    app.include_router(history.router)
    app.include_router(maintenance.router)
    app.include_router(alerts.router)
    app.include_router(reports.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.STATIC_DIR), name="static")
    settle_heap()
    return app


def settle_heap() -> None:
    """Move everything alive after start-up (modules, catalog, twins, the app) out of the
    collector's reach (``gc.freeze``): a full collection walked all of it, 60-100 ms on this
    machine, stalling every request on the loop (the rider API's worst tail)."""
    gc.collect()
    gc.freeze()
