"""The web pages: riders at ``/``, maintainers at ``/console`` (and its operator reports at
``/console/summaries``); their files under
``/static``. Everything is served by the service itself: no CDN, no map tiles."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.schemas import answers

router = APIRouter(tags=["pages"])
HTML = answers(None, media_type="text/html", description="the page")

STATIC_DIR = Path(str(resources.files("api") / "static"))


def _page(name: str) -> FileResponse:
    return FileResponse(
        STATIC_DIR / name,
        media_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/", response_class=FileResponse, **HTML)
async def rider_page() -> FileResponse:
    return _page("index.html")


@router.get("/console", response_class=FileResponse, **HTML)
async def console_page() -> FileResponse:
    return _page("console.html")


@router.get("/console/summaries", response_class=FileResponse, **HTML)
async def summaries_page() -> FileResponse:
    return _page("summaries.html")
