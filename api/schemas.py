"""The shapes of the API's answers, for the OpenAPI document (``/docs``) and the clients
generated from it: one model per answer, the error bodies, and ``answers``, which a route
passes to its decorator to declare both.

The models describe what the routes return; they do not build it. Routes keep building
their JSON themselves (the rider routes as cached bytes with ETags), so a model costs no
request anything; ``tests/api/test_openapi.py`` checks that every route declares one and
``tests/api/test_schemathesis.py`` that every answer matches its schema. Every model
allows fields it does not name: the API adds fields, never renames or drops one.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

# -- errors --------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error but 422: ``{"error": code, "detail": what happened}``."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(
        description="unauthorized, forbidden, not_found, conflict, too_large, rate_limited,"
        " unavailable, bad_request, method_not_allowed"
    )
    detail: str = Field(description="what happened, for a person")


class Problem(BaseModel):
    field: str = Field(description="where: query.lat, body.text, path.alert_id ...")
    problem: str


class InvalidBody(BaseModel):
    """422: the request's values, each problem with its field."""

    model_config = ConfigDict(extra="allow")
    error: Literal["invalid_request"]
    detail: list[Problem]


ERROR_TEXT = {
    304: "Not modified: the ETag in If-None-Match is still current",
    400: "The body could not be read (not UTF-8 JSON)",
    401: "No key where one is needed, or a key that admits no one",
    403: "The key's role may not do this (or, /metrics, not from an allowed network)",
    404: "No such thing",
    409: "Conflicts with the current state",
    413: "The body is over this route's limit",
    422: "A value of the request is invalid",
    429: "Too many requests: come back after Retry-After seconds",
    503: "Not available now (store outage, alerts disabled, not ready)",
}


def answers(
    model: type[BaseModel] | None,
    *errors: int,
    status: int = 200,
    media_type: str = "application/json",
    description: str | None = None,
    also: dict[int, type[BaseModel]] | None = None,
) -> dict[str, Any]:
    """Decorator arguments declaring a route's answer and each error it can give:
    ``@router.get(path, **answers(Station, 404, 422))``. ``model`` documents the answer
    (``response_model`` stays None: the route builds its own JSON); ``None`` for an answer
    that is not JSON (``media_type`` says what) or has no body; ``also``: other answers
    with a body of their own (``/readyz``'s 503)."""
    ok: dict[str, Any] = {"description": description or "OK"}
    if model is not None:
        ok["model"] = model
    elif status != 204:
        ok["content"] = {media_type: {"schema": {"type": "string"}}}
    responses: dict[int | str, dict[str, Any]] = {status: ok}
    for code in errors:
        if code == 304:
            responses[code] = {"description": ERROR_TEXT[code]}
        else:
            responses[code] = {
                "model": InvalidBody if code == 422 else ErrorBody,
                "description": ERROR_TEXT[code],
            }
    for code, other in (also or {}).items():
        responses[code] = {"model": other, "description": ERROR_TEXT.get(code, "")}
    return {"response_model": None, "responses": responses, "status_code": status}


class Open(BaseModel):
    """A JSON object with these fields at least."""

    model_config = ConfigDict(extra="allow")


# -- health --------------------------------------------------------------------------------


class Health(Open):
    status: Literal["ok"]


class Readiness(Open):
    ready: bool
    problems: list[str]


# -- riders: stations and devices ------------------------------------------------------------


class Names(Open):
    zh: str
    en: str


class PileCounts(Open):
    devices: int
    online: int
    ports_total: int
    ports_free: int
    last_known_free: int


class CabinetCounts(Open):
    devices: int
    online: int
    slots_total: int
    batteries_ready: int
    last_known_ready: int
    batteries_charging: int


class LastKnown(Open):
    """What an offline device (or station) said last, shown as stale."""

    ports_free: int | None = None
    batteries_ready: int | None = None
    at: str | None
    age_s: float
    text: dict[str, str] | str


class Arrival(Open):
    arrive_in_s: int
    p_port: float | None
    p_battery: float | None
    p_any: float | None
    method: str


class StationSummary(Open):
    id: str
    name: str
    name_en: str
    names: Names
    address: Names
    hours: str | None
    site_kind: str | None
    lat: float
    lon: float
    distance_m: float | None
    piles: PileCounts
    cabinets: CabinetCounts
    updated_at: str | None
    data_age_s: float | None
    stale: bool
    partly_stale: bool
    last_known: LastKnown | None
    last_updated: str | None
    next_free_in_s: int | None
    next_ready_in_s: int | None
    arrival: Arrival | None = Field(None, description="with arrive_in_s only")


class StationList(Open):
    stations: list[StationSummary]
    generated_at: str
    total: int
    ranked_by: str | None = Field(None, description="with arrive_in_s only")


class PortView(Open):
    n: int
    state: str
    power_w: float
    energy_wh: float
    fault: str | None
    session: str | None = Field(description="null in public answers")
    ocpi_status: str
    expected_free_in_s: int | None
    expected_free_basis: str | None


class SlotView(Open):
    n: int
    state: str
    battery: str | None = Field(description="null in public answers")
    soc: float | None
    temp_c: float | None
    power_w: float
    fault: str | None
    ready: bool
    ocpi_status: str
    ready_in_s: int | None


class DeviceView(Open):
    id: str
    kind: Literal["pile", "cabinet"]
    station_id: str
    online: bool
    stale: bool
    last_seen: str | None
    updated_at: str | None
    data_age_s: float | None
    state_online: bool | None
    heartbeat_s: int | None
    model: str | None
    firmware: str | None = Field(description="null in public answers")
    boot: str | None = Field(description="null in public answers")
    status_seq: int | None
    reported_at: str | None
    faults: list[str]
    lost_messages: int
    ports: list[PortView] | None = Field(None, description="piles")
    slots: list[SlotView] | None = Field(None, description="cabinets")
    last_updated: str | None
    last_known: LastKnown | None


class StationDetail(StationSummary):
    devices: list[DeviceView]


# -- history -------------------------------------------------------------------------------


class DeviceHistory(Open):
    device_id: str
    kind: Literal["pile", "cabinet"]
    station_id: str
    from_: str = Field(alias="from")
    to: str
    every_s: float
    aggregation: str
    points: list[dict[str, Any]] = Field(
        description="per bucket: t, reported_at, power_w, energy_wh, temp_c, states, faults;"
        " piles ports_free, ports_busy, voltage_v; cabinets batteries_ready,"
        " batteries_charging, soc_mean"
    )
    changes: list[dict[str, Any]] = Field(description="events and online changes, as they happened")


class UtilizationPoint(Open):
    t: str
    at: str
    devices_reporting: int
    ports_busy: int
    ports_free: int
    utilization: float | None
    batteries_ready: int
    batteries_charging: int
    energy_wh: float
    sessions_started: int
    sessions_ended: int
    swaps: int


class Utilization(Open):
    station_id: str
    from_: str = Field(alias="from")
    to: str
    every_s: float
    ports_total: int
    slots_total: int
    method: str
    points: list[UtilizationPoint]


class HourForecast(Open):
    hour: int
    ports_free: float | None
    batteries_ready: float | None
    samples: int
    days: int


class Forecast(Open):
    station_id: str
    timezone: str
    from_: str = Field(alias="from")
    to: str
    first_sample_at: str | None
    every_s: int
    samples: int
    days: int
    ports_total: int
    slots_total: int
    by_hour: list[HourForecast]
    by_weekday_hour: list[dict[str, Any]]
    best_hours: dict[str, list[Any]]
    method: str


# -- riders' reports -----------------------------------------------------------------------


class ReportAccepted(Open):
    alert_id: int
    attached: bool = Field(description="joined an alert that was already open")
    severity: str


# -- maintainers ---------------------------------------------------------------------------


class DeadLetter(Open):
    id: int
    received_at: str | None
    topic: str
    reason: str
    detail: str
    size: int
    payload_excerpt: str


class DeadLetters(Open):
    counts: dict[str, int] = Field(description="rejected messages per reason since the start")
    dead_letters: list[DeadLetter]


class Alert(Open):
    id: int
    rule: str
    code: str | None
    severity: str
    status: Literal["open", "acknowledged", "resolved"]
    title: str
    station: str | None
    device: str | None
    port: int | None
    slot: int | None
    opened_at: str | None
    last_seen_at: str | None
    acknowledged_at: str | None
    acknowledged_by: str | None
    resolved_at: str | None
    resolved_by: str | None
    resolved_how: str | None
    count: int
    last_value: float | None
    info: str | None
    clearing_since: str | None
    escalation_level: int
    escalated_at: str | None
    parent_id: int | None
    suppressed: bool
    reports: int


class AlertList(Open):
    alerts: list[Alert]
    next_cursor: int | None


class Note(Open):
    id: int
    at: str | None
    author: str
    source: str
    text: str


class Delivery(Open):
    id: int
    webhook_id: int
    event: str
    status: str
    attempts: int
    http_status: int | None
    error: str | None
    created_at: str | None
    finished_at: str | None
    last_attempt_at: str | None
    next_try_at: str | None
    deadline: str | None


class AlertDetail(Alert):
    notes: list[Note]
    deliveries: list[Delivery]


class Webhook(Open):
    id: int
    url: str
    format: str
    name: str | None
    severities: list[str]
    stations: list[str]
    rules: list[str]
    events: list[str]
    language: str | None
    failing: bool
    consecutive_failures: int
    delivered: int
    failed: int
    expired: int
    dropped: int
    last_error: str | None
    pending: int
    created_at: str | None
    last_success_at: str | None
    last_failure_at: str | None


class WebhookCreated(Webhook):
    secret: str = Field(description="the signing secret, shown this once")


class Webhooks(Open):
    webhooks: list[Webhook]
    failing: list[int] = Field(description="ids of the failing subscriptions")


# -- admins: keys and audit ------------------------------------------------------------------


class Key(Open):
    id: str
    name: str
    role: str
    created_at: str | None
    expires_at: str | None
    revoked_at: str | None


class KeyListed(Key):
    active: bool


class KeyCreated(Key):
    token: str = Field(description="the key, shown this once and never again")


class Keys(Open):
    keys: list[KeyListed]


class AuditActor(Open):
    id: str | None
    name: str | None
    role: str | None


class AuditEntry(Open):
    at: str | None
    id: int
    actor: AuditActor | dict[str, Any]
    action: str
    target: str | None
    detail: dict[str, Any] | None


class AuditPage(Open):
    entries: list[AuditEntry]
    next_cursor: int | None


def install(app: FastAPI) -> None:
    """The app's OpenAPI document with our 422 body wherever FastAPI put its own
    (``HTTPValidationError``, which ``api.errors`` never sends)."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default()
        ours = {"$ref": "#/components/schemas/InvalidBody"}
        theirs = "#/components/schemas/HTTPValidationError"
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                invalid = operation.get("responses", {}).get("422")
                if invalid is None:
                    continue
                content = invalid.setdefault("content", {}).setdefault("application/json", {})
                if content.get("schema", {}).get("$ref") == theirs:
                    content["schema"] = ours
                    invalid["description"] = ERROR_TEXT[422]
                    components.setdefault("InvalidBody", InvalidBody.model_json_schema(
                        ref_template="#/components/schemas/{model}"
                    ))  # fmt: skip
        if theirs.rsplit("/", 1)[1] in components:
            del components["HTTPValidationError"]
            components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
