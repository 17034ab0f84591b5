"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import IngestDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, Any]:
    """The process is up (says nothing about the broker or the store)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ingest: IngestDep) -> JSONResponse:
    """Ready only while connected to the broker, the pipeline alive and the store writing."""
    problems = ingest.problems()
    return JSONResponse(
        {"ready": not problems, "problems": problems}, status_code=503 if problems else 200
    )


@router.get("/metrics", response_class=Response)
async def metrics(ingest: IngestDep) -> Response:
    return Response(generate_latest(ingest.metrics.registry), media_type=CONTENT_TYPE_LATEST)
