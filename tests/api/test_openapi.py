"""The OpenAPI document is a contract: every route declares its answer (a named schema,
or the media type of what is not JSON) and every error it can give, with the bodies
``api.errors`` really sends. New routes are checked too: a route added without
``api.schemas.answers`` (or its own equivalent) fails here, naming what it lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from api.app import create_app
from api.auth import _required_role
from devices.catalog import Catalog
from ingest.config import IngestConfig
from ingest.inprocess import read_and_act
from ingest.service import Ingest
from tests.security.inprocess import bearer, in_process

ERROR = "#/components/schemas/ErrorBody"
INVALID = "#/components/schemas/InvalidBody"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    data_dir = tmp_path_factory.mktemp("openapi")
    return create_app(*read_and_act(Ingest(IngestConfig(data_dir=data_dir), Catalog.load())))


def _routes(app: FastAPI) -> list[tuple[str, APIRoute]]:
    """(path, route) of every API route, those of included routers too (FastAPI >= 0.16x
    keeps included routers whole in ``app.routes``)."""
    found = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if isinstance(route, APIRoute):
            found.append((context.path_format or route.path_format, route))
    return found


def _needs(route: APIRoute) -> set[int]:
    """The errors a route can give, from what it takes: a key (401, and 403 below the
    admin role... for admin routes), path parameters (404), a body (400, 413, 422), any
    parameter (422)."""
    dep = route.dependant
    needs: set[int] = set()
    role = _required_role(dep)
    if role is not None:
        needs.add(401)
        if role.role == "admin":
            needs.add(403)
    if dep.path_params:
        needs.add(404)
    if route.body_field is not None:
        needs |= {400, 413, 422}
    if dep.query_params or dep.path_params or dep.header_params or route.body_field:
        needs.add(422)
    return needs


def test_every_route_declares_its_answer_and_its_errors(app: FastAPI) -> None:
    doc = app.openapi()
    missing: list[str] = []
    routes = _routes(app)
    assert len(routes) >= 27, [path for path, _ in routes]
    for path, route in routes:
        name = f"{','.join(sorted(route.methods))} {path}"
        if not route.include_in_schema:
            missing.append(f"{name}: not in the OpenAPI document")
            continue
        for method in route.methods:
            responses: dict[str, Any] = doc["paths"][path][method.lower()]["responses"]
            ok = [c for c in responses if c.startswith("2")]
            if not ok:
                missing.append(f"{name}: no success answer")
            for code in ok:
                content = responses[code].get("content", {})
                if code == "204":
                    continue
                json_schema = content.get("application/json", {}).get("schema", {})
                if not json_schema.get("$ref") and not any(
                    not m.startswith("application/json") for m in content
                ):
                    missing.append(f"{name}: {code} has no named schema ({json_schema})")
            for code in sorted(_needs(route)):
                if str(code) not in responses:
                    missing.append(f"{name}: {code} not declared")
            for code, response in responses.items():
                if code[0] in "45":
                    ref = response.get("content", {}).get("application/json", {}).get("schema")
                    want = INVALID if code == "422" else ERROR
                    if path != "/readyz" and ref != {"$ref": want}:
                        missing.append(f"{name}: {code} body is {ref}, not {want}")
    assert not missing, "\n".join(missing)


def test_fastapis_own_422_body_is_not_in_the_document(app: FastAPI) -> None:
    doc = app.openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "HTTPValidationError" not in str(doc)
    assert doc["components"]["schemas"]["InvalidBody"]["properties"]["detail"]["type"] == "array"


async def test_the_422_body_is_the_declared_one(tmp_path: Path) -> None:
    """What a client generated from the document expects is what it gets."""
    from api.schemas import ErrorBody, InvalidBody

    async with in_process(tmp_path, alerts=True) as ip:
        r = await ip.http.get("/v1/stations", params={"lat": "91", "lon": "x"})
        assert r.status_code == 422
        body = InvalidBody.model_validate(r.json())
        assert {p.field for p in body.detail} == {"query.lat", "query.lon"}
        r = await ip.http.post("/v1/alerts/1/ack", json={"by": 3}, headers=bearer(ip.key()))
        assert r.status_code == 422
        assert [p.field for p in InvalidBody.model_validate(r.json()).detail] == ["body.by"]
        r = await ip.http.get("/v1/alerts/1", headers=bearer(ip.key()))
        assert r.status_code == 404
        assert ErrorBody.model_validate(r.json()).error == "not_found"


def test_every_component_has_a_name_of_its_own(app: FastAPI) -> None:
    """Two models of one name in different modules become ``api__routes__x__Name``: a
    client generated from the document would get that module path as a class name."""
    names = app.openapi()["components"]["schemas"]
    assert [n for n in names if "__" in n] == []
