"""The FastAPI application: availability for riders, device state, health and metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.views import device_view, rfc3339, station_has, station_view
from ingest.service import Ingest, now_ms


class NotFound(StarletteHTTPException):
    def __init__(self, what: str, ident: str) -> None:
        super().__init__(404, f"no {what} with id {ident!r}")


def create_app(ingest: Ingest) -> FastAPI:
    app = FastAPI(
        title="chargewatch",
        version="0.1.0",
        summary="Live availability of e-bike charging piles and battery-swap cabinets",
    )
    catalog = ingest.catalog
    twins = ingest.twins

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]}
            for err in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        problems = []
        if ingest.source is None or not ingest.source.connected:
            problems.append(f"not connected to the broker {ingest.broker_url}")
        if ingest.failed is not None:
            problems.append(f"ingest pipeline stopped: {ingest.failed!r}")
        if ingest.pipeline is not None and not ingest.pipeline.store_healthy:
            problems.append("store writes are failing (retrying)")
        body = {"ready": not problems and ingest.ready, "problems": problems}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(ingest.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/stations", tags=["riders"])
    async def stations(
        lat: Annotated[float | None, Query(ge=-90, le=90)] = None,
        lon: Annotated[float | None, Query(ge=-180, le=180)] = None,
        radius_m: Annotated[float, Query(gt=0, le=100_000)] = 2000,
        kind: Literal["pile", "cabinet"] | None = None,
        available: bool = False,
    ) -> dict[str, Any]:
        """Stations near (lat, lon) by distance, or all stations when no point is given."""
        if (lat is None) != (lon is None):
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", "lat" if lat is None else "lon"),
                        "msg": "give lat and lon together",
                        "type": "value_error",
                    }
                ]
            )
        now = now_ms()
        origin = (lat, lon) if lat is not None and lon is not None else None
        views = [station_view(s, twins, now, origin=origin) for s in catalog.stations.values()]
        if origin is not None:
            views = [v for v in views if v["distance_m"] <= radius_m]
            views.sort(key=lambda v: v["distance_m"])
        views = [v for v in views if station_has(v, kind, available)]
        return {"stations": views, "generated_at": rfc3339(now)}

    @app.get("/v1/stations/{station_id}", tags=["riders"])
    async def station(station_id: str) -> dict[str, Any]:
        spec = catalog.stations.get(station_id)
        if spec is None:
            raise NotFound("station", station_id)
        now = now_ms()
        view = station_view(spec, twins, now)
        view["devices"] = [device_view(twins[d.id], now) for d in spec.devices]
        return view

    @app.get("/v1/devices/{device_id}", tags=["riders"])
    async def device(device_id: str) -> dict[str, Any]:
        if device_id not in catalog.devices:
            raise NotFound("device", device_id)
        return device_view(twins[device_id], now_ms())

    @app.get("/v1/deadletters", tags=["maintenance"])
    async def dead_letters(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        """Recent rejected messages with their reason, and a count per reason."""
        assert ingest.state is not None
        state = ingest.state
        rows, counts = await asyncio.gather(
            asyncio.to_thread(state.dead_letters, limit),
            asyncio.to_thread(state.dead_letter_counts),
        )
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

    return app
