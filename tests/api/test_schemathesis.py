"""schemathesis against a real ``chargewatch serve`` (SQLite) and a real cluster (a
``chargewatch api`` replica over PostgreSQL, fed by ``chargewatch ingest`` workers), each
running the small district of tests.api.district: requests generated from the OpenAPI
document, valid and invalid (schemathesis' positive and negative modes), to every
operation, with a maintainer key (and, on serve, without a key). No answer may be a 5xx,
and every answer must be one the document declares for that operation, with that media
type and a body matching its schema. Valid requests also name the things the fixture made
(``Target.known``), so the routes are tried past their 404 too.

What a replica answers differently by design (docs/operations.md, "API replicas"), and
how this test expects it:

- actions (acknowledge, resolve, notes, reports, work orders, commands) are applied by
  the worker owning the station; a replica answers 503 when no worker takes one within
  5 s. Both workers hold every partition here, so such a 503 fails the test
  (``not_a_server_error``): it would be a defect, not an outage.
- the history is PostgreSQL's, which keeps no hourly rollups: ``/v1/summaries/*`` answer
  404 ``hourly rollups`` (declared) where serve answers 200; the fixture says so.
- API keys are in PostgreSQL (``maintainer_key(data_dir, db)``), shared by the replicas.

Bounded for CI: ``EXAMPLES`` requests per operation and mode, half as many on the
cluster (its answers take a worker's round trip for actions); serve ~30 s, the cluster
~20 s more on 2 cores (its start ~8 s, one run). The run without a key is serve's only:
without a key the maintenance routes answer 401 before any store is read
(``api.auth.KeyFirstRoute``) and the rider routes run the code the maintainer run runs,
so on the cluster it would try nothing new. The two SSE streams are left out (a valid
request is an open stream for 30 s); their errors are declared like any other and
checked in ``test_openapi``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.alerts.keys import maintainer_key
from tests.api.district import BACKENDS, district
from tests.servers import Service

pytestmark = pytest.mark.e2e

EXAMPLES = int(os.environ.get("CHARGEWATCH_SCHEMATHESIS_EXAMPLES", "10"))  # more: a deeper run
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
STREAMS = {"/v1/stations/stream", "/v1/alerts/stream"}


@dataclass
class Target:
    """A running service and the ids of things it holds: positive cases use them as path
    parameters too (``KNOWN``), so the routes' paths past the 404 are generated for."""

    service: Service
    known: dict[str, str]
    examples: int  # per operation and mode


@pytest.fixture(scope="module", params=BACKENDS)
def target(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Target]:
    """The small district on ``serve`` (SQLite) or on the cluster (PostgreSQL, ingest
    workers, a ``chargewatch api`` replica): tests.api.district."""
    with district(request.param, tmp_path_factory.mktemp("schemathesis"), request) as d:
        svc = d.service
        station = "yungu-road"
        # something to read: a rider's report opens an alert (notes, deliveries), with a
        # work order; on the cluster each goes through the worker owning the station
        r = httpx.post(svc.base_url + "/v1/reports", json={"station": station, "category": "smoke"})
        assert r.status_code == 201, r.text
        alert, report = r.json()["alert_id"], r.json()["report_id"]
        headers = {"Authorization": f"Bearer {maintainer_key(svc.data_dir, svc.db)}"}
        r = httpx.post(
            f"{svc.base_url}/v1/alerts/{alert}/notes", json={"text": "seen"}, headers=headers
        )
        assert r.status_code == 201, r.text
        r = httpx.post(f"{svc.base_url}/v1/alerts/{alert}/work-order", headers=headers)
        assert r.status_code == 201, r.text
        order = r.json()["id"]
        # by design (module docstring): no hourly rollups in the cluster's history
        r = httpx.get(f"{svc.base_url}/v1/summaries/stations", headers=headers)
        if request.param == "cluster":
            assert r.status_code == 404, r.text
            assert "hourly rollups" in r.json()["detail"]
        else:
            assert r.status_code == 200, r.text
        # a NUL in a filter or an id: refused on both engines (PostgreSQL holds none; the
        # replica answered 503 as if the database were down)
        for path in ("/v1/work-orders?assignee=a%00b", "/v1/commands/abcdefgh%00"):
            r = httpx.get(svc.base_url + path, headers=headers)
            assert r.status_code == 422, (path, r.status_code, r.text)
        device = d.catalog.stations[station].devices[0].id
        known = {"station_id": station, "device_id": device, "alert_id": str(alert),
                 "order_id": str(order), "report_id": str(report)}  # fmt: skip
        # the cluster's run at half the examples: CI time (module docstring)
        yield Target(svc, known, EXAMPLES if request.param == "serve" else EXAMPLES // 2 or 1)


def _with_known(known: dict[str, str]) -> Callable[[schemathesis.Case], schemathesis.Case]:
    def put(case: schemathesis.Case) -> schemathesis.Case:
        for name in case.path_parameters or {}:
            if name in known:
                case.path_parameters[name] = known[name]
        return case

    return put


def _run(target: Target, headers: dict[str, str]) -> list[str]:
    base_url = target.service.base_url
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 25
    cases = [
        (operation, mode)
        for operation in operations
        if operation.path not in STREAMS
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ]
    for operation, mode in cases:
        strategy = operation.as_strategy(generation_mode=mode)
        if mode is GenerationMode.POSITIVE:  # random ids, and the ones that exist
            strategy = strategy | strategy.map(_with_known(target.known))

        @settings(
            max_examples=target.examples,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=10)

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no parameters
        except (Exception, BaseExceptionGroup) as exc:  # every operation's failures, then fail
            failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    return failures


@pytest.mark.parametrize("target", ["serve"], indirect=True)  # serve's only: the docstring
def test_public_answers_match_the_document(target: Target) -> None:
    failures = _run(target, {})
    assert not failures, "\n\n".join(failures)


def test_maintainer_answers_match_the_document(target: Target) -> None:
    key = maintainer_key(target.service.data_dir, target.service.db)
    failures = _run(target, {"Authorization": f"Bearer {key}"})
    assert not failures, "\n\n".join(failures)
