"""Remote commands (contract v1.1): a maintainer asks a device to disable or enable a
port/slot, hold or release a battery, open its door, reboot or resend its state; the
answer is 202 with the command, whose state follows (``pending``, ``sent``, ``done``,
``rejected``, ``failed``, ``expired``). Every route needs a maintainer key; who asked is
the key's name. See docs/commands.md."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from api.audit import audit
from api.auth import KeyFirstRoute, Maintainer
from api.deps import ActionsDep, ReadDep
from api.errors import NotFound
from api.limits import KiB, body_max
from api.schemas import answers
from devices.contract import COMMAND_ID_MAX, COMMAND_ID_MIN, MAX_UNITS, CommandType
from devices.topics import DEVICE_ID_PATTERN
from ingest.commands import CommandInvalid, CommandNotFound, TooManyCommands
from ingest.readside import COMMANDS_LIST_MAX as LIST_MAX

router = APIRouter(prefix="/v1", tags=["commands"], route_class=KeyFirstRoute)

DeviceId = Annotated[str, Path(max_length=64, pattern=rf"^{DEVICE_ID_PATTERN}$")]
CommandId = Annotated[str, Path(min_length=COMMAND_ID_MIN, max_length=COMMAND_ID_MAX)]
Unit = Annotated[int | None, Field(ge=1, le=MAX_UNITS)]
State = Literal["pending", "sent", "done", "rejected", "failed", "expired"]


class CommandIn(BaseModel):
    type: CommandType
    port: Unit = None
    slot: Unit = None
    ttl_s: Annotated[
        float | None,
        Field(ge=1, le=7 * 86_400, description="seconds until it expires (default 300)"),
    ] = None


class CommandOut(BaseModel):
    id: str
    device: str
    station: str
    type: str
    port: int | None
    slot: int | None
    state: State
    requested_by: str
    requested_at: str
    expires_at: str
    sends: int = Field(description="times published (resent until answered or expired)")
    sent_at: str | None = Field(description="when the broker first acknowledged it")
    last_sent_at: str | None
    result: str | None
    info: str | None
    result_at: str | None
    late_result: str | None = Field(description="an answer that came after it expired")
    late_info: str | None
    late_result_at: str | None
    repeats: int = Field(description="answers after the first (resends answered again)")
    updated_at: str | None


class CommandList(BaseModel):
    commands: list[CommandOut]


def _invalid(field: str, problem: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", field), "msg": problem, "type": "value_error"}])


@router.post(
    "/devices/{device_id}/commands",
    openapi_extra=body_max(1 * KiB),
    **answers(CommandOut, 400, 401, 404, 413, 422, 429, 503, status=202),
)
async def create_command(
    request: Request, actions: ActionsDep, key: Maintainer, device_id: DeviceId, body: CommandIn
) -> CommandOut:
    """Send a command; 202: stored and on its way, its state follows."""
    unit = body.port if body.port is not None else body.slot
    if body.port is not None and body.slot is not None:
        raise _invalid("slot", "give port or slot, not both")
    try:
        record = await actions.send_command(
            device_id,
            body.type,
            unit,
            ttl_s=body.ttl_s,
            requested_by=key.name,
            requested_key=key.id,
        )
    except CommandNotFound:
        raise NotFound("device", device_id) from None
    except CommandInvalid as exc:
        field, _, problem = str(exc).partition(": ")
        raise _invalid(field if problem else "type", problem or str(exc)) from None
    except TooManyCommands as exc:
        raise HTTPException(429, str(exc)) from None
    answer = CommandOut(**record.view())  # as created: the audit write lets it move on
    await audit(
        request, key.actor, "command.create", record.id, device=device_id, type=body.type,
        unit=unit,
    )  # fmt: skip
    return answer


@router.get("/commands/{command_id}", **answers(CommandOut, 401, 404, 422, 503))
async def get_command(read: ReadDep, key: Maintainer, command_id: CommandId) -> CommandOut:
    record = await read.command(command_id)
    if record is None:
        raise NotFound("command", command_id)
    return CommandOut(**record.view())


@router.get("/devices/{device_id}/commands", **answers(CommandList, 401, 404, 422, 503))
async def device_commands(
    read: ReadDep,
    key: Maintainer,
    device_id: DeviceId,
    limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 100,
) -> CommandList:
    """A device's commands, newest first."""
    if device_id not in read.catalog.devices:
        raise NotFound("device", device_id)
    records = await read.commands(device_id, limit)
    return CommandList(commands=[CommandOut(**r.view()) for r in records])


@router.get("/commands", **answers(CommandList, 401, 422, 503))
async def recent_commands(
    read: ReadDep, key: Maintainer, limit: Annotated[int, Query(ge=1, le=LIST_MAX)] = 100
) -> CommandList:
    """Every device's commands, newest first."""
    records = await read.commands(None, limit)
    return CommandList(commands=[CommandOut(**r.view()) for r in records])
