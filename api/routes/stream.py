"""``GET /v1/stations/stream``: Server-Sent Events of availability changes.

On connect the stream sends every asked-for station once (``event: station``), then a
station again whenever what a rider sees of it changed: counts, stale/online, estimates.
Changes come from the ingest pipeline (``api.live.Changes``); a timer catches devices that
go stale without a message. A comment line every ``KEEPALIVE_S`` keeps proxies from closing
an idle stream.

Each stream ends after ``STREAM_MAX_S`` with a ``retry`` hint: browsers' EventSource
reconnects within a second and gets a fresh snapshot, and a server that is shutting down
never waits longer than that for its open streams.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from api.deps import ReadDep
from api.errors import invalid_query
from api.live import LiveDep
from api.schemas import answers
from api.snapshots import StationViews
from ingest.readside import now_ms

router = APIRouter(prefix="/v1", tags=["riders"])

KEEPALIVE_S = 15.0
STALENESS_CHECK_S = 2.0
STREAM_MAX_S = 30.0
RETRY_MS = 1000


def _event(event_id: int, data: bytes) -> bytes:
    """``data``: the station's JSON, on one line (JSON escapes its newlines)."""
    return b"event: station\nid: %d\ndata: %s\n\n" % (event_id, data)


@router.get(
    "/stations/stream", response_class=StreamingResponse,
    **answers(None, 422, media_type="text/event-stream"),
)  # fmt: skip
async def stream(
    request: Request,
    read: ReadDep,
    live: LiveDep,
    stations: Annotated[
        str | None, Query(description="comma-separated station ids; default: all")
    ] = None,
) -> StreamingResponse:
    """Availability changes of the asked-for stations as Server-Sent Events."""
    catalog = read.catalog
    wanted = list(catalog.stations) if not stations else [s for s in stations.split(",") if s]
    unknown = [s for s in wanted if s not in catalog.stations]
    if unknown:
        raise invalid_query("stations", f"unknown station(s): {', '.join(unknown)}")
    queue = live.changes.subscribe()

    shared: StationViews = request.app.state.views

    def views(ids: list[str]) -> list[tuple[str, bytes, str]]:
        """(id, JSON, ETag) of each station: the shared view's bytes, its age spliced in."""
        now = now_ms()
        out = []
        for s in ids:
            entry = shared.station(s, now, fresh=True)
            out.append((s, entry.summary_json.fill(entry.data_age_s(now)), entry.summary_etag))
        return out

    async def events() -> AsyncIterator[str | bytes]:
        sent: dict[str, str] = {}
        counter = 0
        started = last_write = time.monotonic()
        try:
            yield f"retry: {RETRY_MS}\n\n"
            pending: set[str] = set(wanted)
            while True:
                for station_id, data, tag in views(sorted(pending)):
                    if sent.get(station_id) != tag:
                        sent[station_id] = tag
                        counter += 1
                        last_write = time.monotonic()
                        yield _event(counter, data)
                now = time.monotonic()
                if now - started > STREAM_MAX_S or await request.is_disconnected():
                    return
                if now - last_write > KEEPALIVE_S:
                    last_write = now
                    yield ": keepalive\n\n"
                try:
                    async with asyncio.timeout(STALENESS_CHECK_S):
                        changed = await queue.get()
                    pending = {s for s in changed if s in sent}
                except TimeoutError:
                    pending = set(wanted)  # staleness comes without a message
        finally:
            live.changes.unsubscribe(queue)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
