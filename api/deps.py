"""What routes read: the running ingest (twins, stores, metrics), taken from app state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ingest.service import Ingest


def get_ingest(request: Request) -> Ingest:
    ingest: Ingest = request.app.state.ingest
    return ingest


IngestDep = Annotated[Ingest, Depends(get_ingest)]
