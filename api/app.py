"""The FastAPI application: one router per audience, JSON errors, the running ingest in
``app.state.ingest``."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.auth import KeyStore
from api.routes import alerts, health, maintenance, reports, riders
from ingest.service import Ingest


def create_app(ingest: Ingest) -> FastAPI:
    app = FastAPI(
        title="chargewatch",
        version="0.1.0",
        summary="Live availability of e-bike charging piles and battery-swap cabinets",
    )
    app.state.ingest = ingest
    app.state.keys = KeyStore.in_dir(ingest.config.data_dir)  # maintenance API keys
    errors.install(app)
    app.include_router(health.router)
    app.include_router(riders.router)
    app.include_router(maintenance.router)
    app.include_router(alerts.router)
    app.include_router(reports.router)
    return app
