"""Contract v1 as typed models, and ``decode``: raw MQTT payload -> model or a reason.

Errors::

    ContractError          the message breaks contract v1; ``reason`` is a short code
                           (see REASONS) and ``detail`` says what exactly was wrong

``decode`` never raises anything else for any payload: bad input is data, not a crash.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self, get_args

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from devices.topics import Channel

PROTOCOL_VERSION = 1
MAX_PAYLOAD_BYTES = 16 * 1024
DEFAULT_HEARTBEAT_S = 30

PortState = Literal["available", "charging", "finished", "reserved", "faulted", "disabled"]
SlotState = Literal["empty", "charging", "ready", "reserved", "faulted", "disabled"]
EventType = Literal[
    "fault_raised",
    "fault_cleared",
    "session_started",
    "session_ended",
    "swap",
    "door_opened",
    "door_closed",
]
DeviceKind = Literal["pile", "cabinet"]

PORT_STATES: tuple[str, ...] = get_args(PortState)
SLOT_STATES: tuple[str, ...] = get_args(SlotState)
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

#: Every reason a message can be rejected for; the ingestor adds the ones that need context.
REASONS = (
    "oversized",  # payload over 16 KiB
    "not_json",  # not UTF-8 JSON (NaN/Infinity and nesting past the parser's limit included)
    "not_object",  # JSON, but not an object
    "version",  # "v" missing or not 1
    "schema",  # a field missing, of the wrong type, or out of range
    "topic",  # topic outside the scheme (set by the ingestor)
    "unknown_device",  # device id not in the catalog (set by the ingestor)
    "kind_mismatch",  # payload kind differs from the catalog (set by the ingestor)
    "count_mismatch",  # ports/slots count differs from the birth (set by the ingestor)
)


class ContractError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_TS_MAX_MS = 253402300800000  # year 10000: every ts accepted can be shown as a UTC date-time


def parse_ts(value: str | int) -> int:
    """Device time as epoch milliseconds: RFC 3339 with an offset, or integer epoch ms."""
    if isinstance(value, int):
        if not 0 <= value < _TS_MAX_MS:
            raise ValueError("epoch milliseconds out of range")
        return value
    if "T" not in value and "t" not in value and " " not in value:
        raise ValueError("RFC 3339 date-time expected")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"not an RFC 3339 date-time: {value!r}") from exc
    if dt.tzinfo is None:
        raise ValueError("RFC 3339 time needs an offset (Z or +hh:mm)")
    ms = int(dt.timestamp() * 1000)
    if not 0 <= ms < _TS_MAX_MS:
        raise ValueError("time out of range (1970 to 9999 UTC)")
    return ms


def _ts_field(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("ts must be an RFC 3339 string or integer epoch milliseconds")
    return parse_ts(value)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class _Model(BaseModel):
    # strict: "42" is not an int and 0 is not a bool; unknown fields are ignored (vendors add their own)
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


Boot = Annotated[str, Field(min_length=4, max_length=32)]
# the stores keep seq as a signed 64-bit integer; a bigger one is bad input, not a store crash
SEQ_MAX = 2**63 - 1
Seq = Annotated[int, Field(ge=0, le=SEQ_MAX)]
Number = int | float


class _Header(_Model):
    v: Literal[1]
    ts: int
    boot: Boot
    seq: Seq

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: Any) -> int:
        return _ts_field(value)


class Port(_Model):
    n: Annotated[int, Field(ge=1)]
    state: PortState
    fault: str | None = None
    power_w: float = 0.0
    energy_wh: float = 0.0
    session: str | None = None


class Slot(_Model):
    n: Annotated[int, Field(ge=1)]
    state: SlotState
    fault: str | None = None
    battery: str | None = None
    soc: Annotated[float, Field(ge=0, le=100)] | None = None
    temp_c: float | None = None
    power_w: float = 0.0
    energy_wh: float = 0.0


def _check_units(items: list[Port] | list[Slot], what: str) -> None:
    """Every port/slot once, numbered 1..n; a faulted one names its fault. One validator
    per snapshot rather than one per port: validation is most of ingest's CPU per message."""
    numbers = sorted(item.n for item in items)
    if numbers != list(range(1, len(items) + 1)):
        raise ValueError(f"{what} must list every {what[:-1]} once, numbered 1..{len(items)}")
    for item in items:
        if item.state == "faulted" and not item.fault:
            raise ValueError(f"{what[:-1]} {item.n} is faulted but has no fault code")


class PileStatus(_Header):
    kind: Literal["pile"]
    ports: Annotated[list[Port], Field(min_length=1, max_length=256)]
    faults: list[str] = Field(default_factory=list)
    voltage_v: float | None = None
    temp_c: float | None = None
    rssi_dbm: float | None = None

    @model_validator(mode="after")
    def _numbering(self) -> Self:
        _check_units(self.ports, "ports")
        return self

    @property
    def units(self) -> list[Port]:
        return self.ports

    @property
    def device_faults(self) -> list[str]:
        return list(self.faults)


class CabinetStatus(_Header):
    kind: Literal["cabinet"]
    slots: Annotated[list[Slot], Field(min_length=1, max_length=256)]
    faults: list[str] = Field(default_factory=list)
    temp_c: float | None = None
    smoke: bool = False
    door_open: bool = False
    voltage_v: float | None = None
    rssi_dbm: float | None = None

    @model_validator(mode="after")
    def _numbering(self) -> Self:
        _check_units(self.slots, "slots")
        return self

    @property
    def units(self) -> list[Slot]:
        return self.slots

    @property
    def device_faults(self) -> list[str]:
        """Device-level faults; ``smoke: true`` counts as ``smoke`` even when not listed."""
        if self.smoke and "smoke" not in self.faults:
            return [*self.faults, "smoke"]
        return list(self.faults)


Status = PileStatus | CabinetStatus


class Birth(_Header):
    online: Literal[True]
    kind: DeviceKind
    model: str | None = None
    firmware: str | None = None
    ports: Annotated[int, Field(ge=1, le=256)] | None = None
    slots: Annotated[int, Field(ge=1, le=256)] | None = None
    heartbeat_s: Annotated[int, Field(ge=1, le=86400)] = DEFAULT_HEARTBEAT_S

    @model_validator(mode="after")
    def _count(self) -> Self:
        if self.kind == "pile" and self.ports is None:
            raise ValueError("a pile's birth needs 'ports'")
        if self.kind == "cabinet" and self.slots is None:
            raise ValueError("a cabinet's birth needs 'slots'")
        return self

    @property
    def units(self) -> int:
        count = self.ports if self.kind == "pile" else self.slots
        assert count is not None  # checked by _count
        return count


class Death(_Model):
    """The MQTT Will (or a graceful goodbye). Sent by the broker, so it may carry no ``ts``."""

    v: Literal[1]
    online: Literal[False]
    boot: Boot
    seq: Seq
    ts: int | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value: Any) -> int | None:
        return None if value is None else _ts_field(value)


class Event(_Header):
    type: EventType
    code: str | None = None
    port: Annotated[int, Field(ge=1)] | None = None
    slot: Annotated[int, Field(ge=1)] | None = None
    value: float | None = None
    info: str | None = None
    session: str | None = None
    energy_wh: float | None = None
    slot_out: Annotated[int, Field(ge=1)] | None = None
    battery_out: str | None = None
    soc_out: Annotated[float, Field(ge=0, le=100)] | None = None
    slot_in: Annotated[int, Field(ge=1)] | None = None
    battery_in: str | None = None
    soc_in: Annotated[float, Field(ge=0, le=100)] | None = None

    @model_validator(mode="after")
    def _fields_per_type(self) -> Self:
        required: tuple[str, ...] = ()
        if self.type in ("fault_raised", "fault_cleared"):
            required = ("code",)
        elif self.type == "session_started":
            required = ("port", "session")
        elif self.type == "session_ended":
            required = ("port", "session", "energy_wh")
        elif self.type == "swap":
            required = ("slot_out", "battery_out", "soc_out", "slot_in", "battery_in", "soc_in")
        missing = [name for name in required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"event {self.type} needs {', '.join(missing)}")
        return self


Message = Birth | Death | PileStatus | CabinetStatus | Event


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"


def decode(channel: Channel, payload: bytes) -> Message:
    """Decode one payload published on ``channel``; raises ContractError with a reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        data = pydantic_core.from_json(payload, allow_inf_nan=False)
    except ValueError as exc:
        raise ContractError("not_json", str(exc)) from None
    if not isinstance(data, dict):
        raise ContractError("not_object", f"JSON {type(data).__name__}, object expected")
    version = data.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ContractError("version", f"v={version!r}, this service speaks v1")
    model: type[Message]
    if channel == "status":
        kind = data.get("kind")
        if kind == "pile":
            model = PileStatus
        elif kind == "cabinet":
            model = CabinetStatus
        else:
            raise ContractError("schema", f"kind: {kind!r} is not 'pile' or 'cabinet'")
    elif channel == "state":
        online = data.get("online")
        if online is True:
            model = Birth
        elif online is False:
            model = Death
        else:
            raise ContractError("schema", "online: must be true or false")
    elif channel == "event":
        model = Event
    else:
        raise ContractError("topic", f"channel {channel!r} carries no device data")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ContractError("schema", _first_error(exc)) from None
