"""Security headers on every answer (a pure ASGI middleware):

- the pages (``/``, ``/console``): a Content-Security-Policy that allows only this
  service's own scripts, styles and connections (no inline script or style, no ``eval``,
  no plugins) and ``frame-ancestors 'none'``: the console keeps its API key in
  localStorage, and a page that frames it could trick a maintainer into clicks
  (clickjacking). ``Permissions-Policy`` leaves geolocation to the rider page itself.
- every other answer (the API, static files): ``default-src 'none'; frame-ancestors
  'none'``: JSON is never a document, and nothing here is meant to be framed.
- everywhere: ``X-Content-Type-Options: nosniff`` (a browser takes each answer for its
  declared type), ``X-Frame-Options: DENY`` (for browsers without CSP level 2) and
  ``Referrer-Policy: no-referrer``.
- ``/docs`` and ``/redoc`` (only when ``docs`` is on: ``api.settings``) load Swagger UI
  and ReDoc from their CDN with an inline script; their policy allows exactly that, and
  still no framing.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_CSP = (
    f"default-src 'none'; script-src 'unsafe-inline' {DOCS_CDN}; style-src 'unsafe-inline'"
    f" {DOCS_CDN}; img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self';"
    f" worker-src blob:; font-src {DOCS_CDN} https://fonts.gstatic.com; frame-ancestors 'none'"
)
PAGES = frozenset({"/", "/console", "/console/summaries"})
DOCS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})

_COMMON = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_PAGE = [
    *_COMMON,
    (b"content-security-policy", PAGE_CSP.encode()),
    (b"permissions-policy", b"geolocation=(self), camera=(), microphone=(), payment=()"),
]
_API = [*_COMMON, (b"content-security-policy", API_CSP.encode())]
_DOCS = [*_COMMON, (b"content-security-policy", DOCS_CSP.encode())]


def headers_for(path: str) -> list[tuple[bytes, bytes]]:
    if path in PAGES:
        return _PAGE
    if path in DOCS:
        return _DOCS
    return _API


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = headers_for(scope["path"])

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
