"""The FastAPI application: one router per audience, JSON errors, the running ingest in
``app.state.ingest``."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.routes import health, maintenance, riders
from ingest.service import Ingest


def create_app(ingest: Ingest) -> FastAPI:
    app = FastAPI(
        title="chargewatch",
        version="0.1.0",
        summary="Live availability of e-bike charging piles and battery-swap cabinets",
    )
    app.state.ingest = ingest
    errors.install(app)
    app.include_router(health.router)
    app.include_router(riders.router)
    app.include_router(maintenance.router)
    return app
