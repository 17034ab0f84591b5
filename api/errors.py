"""JSON errors: every failure a client sees is ``{"error": code, "detail": ...}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ingest import StoreError
from ingest.readside import Unavailable

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}


class NotFound(HTTPException):
    def __init__(self, what: str, ident: str) -> None:
        super().__init__(404, f"no {what} with id {ident!r}")


def invalid_query(field: str, problem: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("query", field), "msg": problem, "type": "value_error"}]
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _CODES.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": code, "detail": exc.detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]), "problem": err["msg"]}
            for err in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        """A store that cannot answer now (an outage, a dead writer): 503, never a hang."""
        return JSONResponse(
            {"error": "unavailable", "detail": str(exc)},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        """A part of the service that does not run here (alerts disabled, ...): 503."""
        return JSONResponse({"error": "unavailable", "detail": str(exc)}, status_code=503)
