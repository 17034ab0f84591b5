"""Contract v1 as typed models, and ``decode``: raw MQTT payload -> model or a reason.

Errors::

    ContractError          the message breaks contract v1; ``reason`` is a short code
                           (see REASONS) and ``detail`` says what exactly was wrong

``decode`` never raises anything else for any payload: bad input is data, not a crash.

The models are msgspec structs: decoding and validating a ten-port status straight from
the JSON bytes takes ~2 us, against ~19 us for the same checks in pydantic (measured in
docs/benchmarks.md), and validation was most of ingest's CPU per message. A payload that
fails the fast typed decode is decoded again step by step, only to name the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self, get_args

import msgspec
from msgspec import Meta
from msgspec.structs import force_setattr

from devices.topics import Channel

PROTOCOL_VERSION = 1
MAX_PAYLOAD_BYTES = 16 * 1024
DEFAULT_HEARTBEAT_S = 30
#: a birth's ``heartbeat_s`` decides how long its state counts as live (3 heartbeats): real
#: chargers beat every 10 s to 5 min; 10 min bounds what one forged birth can show as live
HEARTBEAT_MAX_S = 600
#: no device has more ports or slots (the catalog's limit too)
MAX_UNITS = 256

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
    "command_result",  # v1.1: a device's answer to a command
]
DeviceKind = Literal["pile", "cabinet"]

PORT_STATES: tuple[str, ...] = get_args(PortState)
SLOT_STATES: tuple[str, ...] = get_args(SlotState)
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

# -- v1.1: commands, service -> device on ``cmd``, answered by a ``command_result`` event --

CommandType = Literal[
    "disable_port",
    "enable_port",
    "disable_slot",
    "enable_slot",
    "lock_battery",
    "unlock_battery",
    "open_door",
    "reboot",
    "resend",
]
CommandResult = Literal["done", "rejected", "failed"]
COMMAND_TYPES: tuple[str, ...] = get_args(CommandType)
COMMAND_RESULTS: tuple[str, ...] = get_args(CommandResult)
#: the unit field a command type needs ("port"/"slot"), or None for the whole device
COMMAND_UNIT: dict[str, str | None] = {
    "disable_port": "port",
    "enable_port": "port",
    "disable_slot": "slot",
    "enable_slot": "slot",
    "lock_battery": "slot",
    "unlock_battery": "slot",
    "open_door": None,
    "reboot": None,
    "resend": None,
}
#: the device kind a command type is for; None: every kind
COMMAND_KIND: dict[str, DeviceKind | None] = {
    "disable_port": "pile",
    "enable_port": "pile",
    "disable_slot": "cabinet",
    "enable_slot": "cabinet",
    "lock_battery": "cabinet",
    "unlock_battery": "cabinet",
    "open_door": "cabinet",
    "reboot": None,
    "resend": None,
}
COMMAND_ID_MIN, COMMAND_ID_MAX = 8, 64

#: Every reason a message can be rejected for; the ingestor adds the ones that need context.
REASONS = (
    "oversized",  # payload over 16 KiB
    "not_json",  # not UTF-8 JSON (NaN/Infinity and nesting past the parser's limit included)
    "not_object",  # JSON, but not an object
    "version",  # "v" missing or not 1
    "schema",  # a field missing, of the wrong type, or out of range
    "duplicate_key",  # an object names a key twice: readers disagree on which value counts
    "topic",  # topic outside the scheme (set by the ingestor)
    "unknown_device",  # device id not in the catalog (set by the ingestor)
    "kind_mismatch",  # payload kind differs from the catalog (set by the ingestor)
    "count_mismatch",  # ports/slots count differs from the catalog (set by the ingestor)
    "unknown_unit",  # an event names a port/slot the device does not have (set by the ingestor)
    "internal",  # decoding raised something else: a bug, logged (set by the ingestor)
    "store_rejected",  # the store refused the row (set by the ingestor)
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


#: device time further than this from our arrival time is counted as clock skew
CLOCK_SKEW_MAX_MS = 5 * 60_000


def clock_skewed(ts_ms: int, arrival_ms: int, *, retained: bool = False) -> bool:
    """Whether device time ``ts_ms`` is off our clock by more than ``CLOCK_SKEW_MAX_MS``. A
    retained message may be old (the broker kept it), never from our future."""
    if ts_ms > arrival_ms + CLOCK_SKEW_MAX_MS:
        return True
    return not retained and ts_ms < arrival_ms - CLOCK_SKEW_MAX_MS


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


class _Model(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Strict: "42" is not an int and 0 is not a bool; unknown fields are ignored (vendors
    add their own). Constructing one runs the cross-field checks (``__post_init__``) but
    not the per-field constraints; ``of`` runs both, as ``decode`` does.

    ``gc=False``: a model holds strings, numbers and lists of models, never a cycle, so the
    garbage collector need not track it. A status makes a dozen of them (its ports or
    slots); untracked, they neither bring young collections nearer nor add to the old
    generation the collector scans while the twins keep them."""

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Self:
        """Validate already-parsed data (a stored record, a test's dict)."""
        return msgspec.convert(data, cls, strict=True)


Boot = Annotated[str, Meta(min_length=4, max_length=32)]
# seq < 2^53: fits every store's signed 64-bit integer and a JavaScript number exactly; a
# device sending a message a microsecond would need 285 years to get there
SEQ_MAX = 2**53 - 1
Seq = Annotated[int, Meta(ge=0, le=SEQ_MAX)]
# whether the device has that port/slot is checked against the catalog by the ingestor
UnitNumber = Annotated[int, Meta(ge=1, le=MAX_UNITS)]
Percent = Annotated[float, Meta(ge=0, le=100)]
CommandId = Annotated[str, Meta(min_length=COMMAND_ID_MIN, max_length=COMMAND_ID_MAX)]


def _ts_ms(model: msgspec.Struct, value: str | int | None) -> None:
    """``ts`` arrives as RFC 3339 or epoch ms; the model keeps epoch ms."""
    if isinstance(value, str) or (value is not None and not 0 <= value < _TS_MAX_MS):
        try:
            force_setattr(model, "ts", parse_ts(value))
        except ValueError as exc:
            raise ValueError(f"ts: {exc}") from None


class _Header(_Model, frozen=True, kw_only=True):
    v: Literal[1]
    if TYPE_CHECKING:
        ts: int  # epoch ms, always, once the model exists
    else:
        ts: int | str  # on the wire also RFC 3339; __post_init__ makes it epoch ms
    boot: Boot
    seq: Seq

    def __post_init__(self) -> None:
        _ts_ms(self, self.ts)


class Port(_Model, frozen=True, kw_only=True):
    n: UnitNumber
    state: PortState
    fault: str | None = None
    power_w: float = 0.0
    energy_wh: float = 0.0
    session: str | None = None


class Slot(_Model, frozen=True, kw_only=True):
    n: UnitNumber
    state: SlotState
    fault: str | None = None
    battery: str | None = None
    soc: Percent | None = None
    temp_c: float | None = None
    power_w: float = 0.0
    energy_wh: float = 0.0


def _check_units(items: list[Port] | list[Slot], what: str) -> None:
    """Every port/slot once, numbered 1..n; a faulted one names its fault."""
    numbers = [item.n for item in items]
    expected = list(range(1, len(items) + 1))
    if numbers != expected:  # devices list them in order: sort only when they do not
        numbers.sort()
        if numbers != expected:
            raise ValueError(f"{what} must list every {what[:-1]} once, numbered 1..{len(items)}")
    for item in items:
        if item.state == "faulted" and not item.fault:
            raise ValueError(f"{what[:-1]} {item.n} is faulted but has no fault code")


Units = Meta(min_length=1, max_length=MAX_UNITS)


class PileStatus(_Header, frozen=True, kw_only=True, tag_field="kind", tag="pile"):
    ports: Annotated[list[Port], Units]
    faults: list[str] = []
    voltage_v: float | None = None
    temp_c: float | None = None
    rssi_dbm: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_units(self.ports, "ports")

    @property
    def kind(self) -> Literal["pile"]:
        return "pile"

    @property
    def units(self) -> list[Port]:
        return self.ports

    @property
    def device_faults(self) -> list[str]:
        return list(self.faults)


class CabinetStatus(_Header, frozen=True, kw_only=True, tag_field="kind", tag="cabinet"):
    slots: Annotated[list[Slot], Units]
    faults: list[str] = []
    temp_c: float | None = None
    smoke: bool = False
    door_open: bool = False
    voltage_v: float | None = None
    rssi_dbm: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_units(self.slots, "slots")

    @property
    def kind(self) -> Literal["cabinet"]:
        return "cabinet"

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
UnitCount = Annotated[int, Meta(ge=1, le=MAX_UNITS)]


class Birth(_Header, frozen=True, kw_only=True):
    online: Literal[True]
    kind: DeviceKind
    model: str | None = None
    firmware: str | None = None
    ports: UnitCount | None = None
    slots: UnitCount | None = None
    heartbeat_s: Annotated[int, Meta(ge=1, le=HEARTBEAT_MAX_S)] = DEFAULT_HEARTBEAT_S

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind == "pile" and self.ports is None:
            raise ValueError("a pile's birth needs 'ports'")
        if self.kind == "cabinet" and self.slots is None:
            raise ValueError("a cabinet's birth needs 'slots'")

    @property
    def units(self) -> int:
        count = self.ports if self.kind == "pile" else self.slots
        assert count is not None  # checked in __post_init__
        return count


class Death(_Model, frozen=True, kw_only=True):
    """The MQTT Will (or a graceful goodbye). Sent by the broker, so it may carry no ``ts``."""

    v: Literal[1]
    online: Literal[False]
    boot: Boot
    seq: Seq
    if TYPE_CHECKING:
        ts: int | None = None
    else:
        ts: int | str | None = None

    def __post_init__(self) -> None:
        _ts_ms(self, self.ts)


_EVENT_NEEDS: dict[str, tuple[str, ...]] = {
    "fault_raised": ("code",),
    "fault_cleared": ("code",),
    "session_started": ("port", "session"),
    "session_ended": ("port", "session", "energy_wh"),
    "swap": ("slot_out", "battery_out", "soc_out", "slot_in", "battery_in", "soc_in"),
    "command_result": ("cmd", "result"),
}


class Event(_Header, frozen=True, kw_only=True):
    type: EventType
    code: str | None = None
    port: UnitNumber | None = None
    slot: UnitNumber | None = None
    value: float | None = None
    info: str | None = None
    session: str | None = None
    energy_wh: float | None = None
    slot_out: UnitNumber | None = None
    battery_out: str | None = None
    soc_out: Percent | None = None
    slot_in: UnitNumber | None = None
    battery_in: str | None = None
    soc_in: Percent | None = None
    cmd: CommandId | None = None  # command_result: the id of the command it answers
    result: CommandResult | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        missing = [name for name in _EVENT_NEEDS.get(self.type, ()) if getattr(self, name) is None]
        if missing:
            raise ValueError(f"event {self.type} needs {', '.join(missing)}")


Message = Birth | Death | PileStatus | CabinetStatus | Event


class Command(_Model, frozen=True, kw_only=True, omit_defaults=True):
    """A command, service -> device (v1.1). ``ts`` and ``expires`` are epoch ms; a port or
    slot command names its unit (whether the device has it, the device decides)."""

    v: Literal[1]
    id: CommandId
    if TYPE_CHECKING:
        ts: int
    else:
        ts: int | str
    type: CommandType
    expires: Annotated[int, Meta(ge=0, lt=_TS_MAX_MS)]
    port: UnitNumber | None = None
    slot: UnitNumber | None = None

    def __post_init__(self) -> None:
        _ts_ms(self, self.ts)
        unit = COMMAND_UNIT[self.type]
        if unit is not None and getattr(self, unit) is None:
            raise ValueError(f"command {self.type} needs {unit}")

    @property
    def unit(self) -> int | None:
        """The port or slot the command is about (None: the whole device)."""
        field = COMMAND_UNIT[self.type]
        return None if field is None else getattr(self, field)

    def encode(self) -> bytes:
        return _COMMAND_JSON.encode(self)


_COMMAND_JSON = msgspec.json.Encoder()

_UNIT_FIELDS = {"pile": ("port",), "cabinet": ("slot", "slot_out", "slot_in")}


def unknown_unit(event: Event, kind: DeviceKind, units: int) -> str | None:
    """What is wrong when ``event`` names a port/slot that a ``kind`` with ``units`` ports
    or slots does not have (a cabinet has no ports, a pile no slots); None when nothing."""
    word = "port" if kind == "pile" else "slot"
    for name in ("port", "slot", "slot_out", "slot_in"):
        n = getattr(event, name)
        if n is None:
            continue
        if name not in _UNIT_FIELDS[kind]:
            return f"{name} {n}: a {kind} has no {name.removesuffix('_out').removesuffix('_in')}s"
        if n > units:
            return f"{name} {n}: the device has {word}s 1..{units}"
    return None


_STATUS = msgspec.json.Decoder(PileStatus | CabinetStatus)
_EVENT = msgspec.json.Decoder(Event)
_COMMAND = msgspec.json.Decoder(Command)
_BIRTH = msgspec.json.Decoder(Birth)  # births outnumber deaths; a death takes the steps below
_ANY = msgspec.json.Decoder()


# -- duplicate keys -----------------------------------------------------------------------
# msgspec keeps the last of two equal keys in an object, JavaScript too, other readers the
# first: {"state":"available","state":"faulted"} could say one thing to us and another to
# the next reader of the stored payload. An exact check (Python's parser with a hook) costs
# 3x the typed decode, so it runs only when a C-speed copy says a key may be repeated: a
# "keys" mirror of the models (each known field a verbatim ``Raw``, absent ones UNSET and
# left out when encoded) is decoded and encoded again. The copy drops repeated keys,
# unknown keys and whitespace and never adds a byte, so it is as long as the payload only
# when there was none of them (compact JSON, as devices send). Any other payload takes
# the exact check, which names the repeated key or lets the payload through.


def _keys_mirror(
    name: str, models: tuple[type[msgspec.Struct], ...], nested: dict[str, type[Any]]
) -> type[msgspec.Struct]:
    """A struct with every field (and tag) of ``models`` as a verbatim optional ``Raw``;
    ``nested`` fields as lists of their own mirrors."""
    names: dict[str, Any] = {}
    for model in models:
        tag = model.__struct_config__.tag_field
        for field in (*([tag] if tag else []), *model.__struct_fields__):
            item: Any = nested.get(field)
            names[field] = (msgspec.Raw if item is None else list[item]) | msgspec.UnsetType
    return msgspec.defstruct(
        name,
        [(field, kind, msgspec.UNSET) for field, kind in names.items()],
        kw_only=True,
        omit_defaults=True,
        gc=False,  # verbatim pieces of the payload: no cycle, nothing for the collector
    )


_UNIT_KEYS = {
    "ports": _keys_mirror("PortKeys", (Port,), {}),
    "slots": _keys_mirror("SlotKeys", (Slot,), {}),
}
_KEYS: dict[str, msgspec.json.Decoder[Any]] = {
    "status": msgspec.json.Decoder(
        _keys_mirror("StatusKeys", (PileStatus, CabinetStatus), _UNIT_KEYS)
    ),
    "event": msgspec.json.Decoder(_keys_mirror("EventKeys", (Event,), {})),
    "state": msgspec.json.Decoder(_keys_mirror("StateKeys", (Birth, Death), {})),
}
_KEYS_ENCODER = msgspec.json.Encoder()


class _Repeated(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Repeated(key)
            seen.add(key)
    return out


def _check_unique_keys(channel: Channel, payload: bytes) -> None:
    """Raise ``duplicate_key`` when an object of ``payload`` (valid JSON) repeats a key."""
    try:
        keys = _KEYS_ENCODER.encode(_KEYS[channel].decode(payload))
    except msgspec.ValidationError:
        pass  # a vendor field named like the other kind's units ("slots" in a pile's status)
    else:
        if len(keys) == len(payload):
            return  # the common case: compact JSON, only known keys, each once
    try:
        json.loads(payload, object_pairs_hook=_unique)
    except _Repeated as exc:
        raise ContractError(
            "duplicate_key", f"the key {exc.args[0]!r} appears twice in one object"
        ) from None
    except (ValueError, RecursionError):
        pass  # msgspec read it: what Python's parser refuses is no repeated key


def _where(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.ports[1].n`" as "ports.1.n: Expected ..."."""
    text = str(exc)
    message, sep, path = text.rpartition(" - at `")
    if not sep:
        return f"payload: {text}"
    dotted = path.rstrip("`").removeprefix("$").replace("[", ".").replace("]", "").lstrip(".")
    return f"{dotted or 'payload'}: {message}"


def decode(channel: Channel, payload: bytes) -> Message:
    """Decode one payload published on ``channel``; raises ContractError with a reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        message: Message
        if channel == "status":
            message = _STATUS.decode(payload)
        elif channel == "event":
            message = _EVENT.decode(payload)
        elif channel == "state":
            message = _BIRTH.decode(payload)
        else:
            return _decode_steps(channel, payload)
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        return _decode_steps(channel, payload)  # find out why
    _check_unique_keys(channel, payload)
    return message


def _decode_steps(channel: Channel, payload: bytes) -> Message:
    """Parse, then check version, kind and schema in turn: the reason a payload is bad."""
    try:
        data = _ANY.decode(payload)
    except msgspec.ValidationError as exc:  # valid JSON syntax, e.g. 1e400 (infinity)
        raise ContractError("schema", _where(exc)) from None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        # msgspec checks UTF-8 inside strings with Python's codec: a UnicodeDecodeError
        raise ContractError("not_json", str(exc)) from None
    if not isinstance(data, dict):
        raise ContractError("not_object", f"JSON {type(data).__name__}, object expected")
    version = data.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ContractError("version", f"v={version!r}, this service speaks v1")
    model: Any
    if channel == "status":
        kind = data.get("kind")
        if kind not in ("pile", "cabinet"):
            raise ContractError("schema", f"kind: {kind!r} is not 'pile' or 'cabinet'")
        model = PileStatus | CabinetStatus
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
        message: Message = msgspec.convert(data, model, strict=True)
    except msgspec.ValidationError as exc:
        raise ContractError("schema", _where(exc)) from None
    _check_unique_keys(channel, payload)
    return message


def decode_command(payload: bytes) -> Command:
    """A command as a device reads it; raises ContractError with a reason."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ContractError("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        return _COMMAND.decode(payload)
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        pass
    try:
        data = _ANY.decode(payload)
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError) as exc:
        raise ContractError("not_json", str(exc)) from None
    if not isinstance(data, dict):
        raise ContractError("not_object", f"JSON {type(data).__name__}, object expected")
    version = data.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ContractError("version", f"v={version!r}, this device speaks v1")
    try:
        return msgspec.convert(data, Command, strict=True)
    except msgspec.ValidationError as exc:
        raise ContractError("schema", _where(exc)) from None


def command_id(payload: bytes) -> str | None:
    """The id of a command that may not decode (to answer it ``rejected``), when it has a
    valid one; None otherwise."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        data = _ANY.decode(payload)
    except (msgspec.MsgspecError, RecursionError, UnicodeDecodeError):
        return None
    ident = data.get("id") if isinstance(data, dict) else None
    if isinstance(ident, str) and COMMAND_ID_MIN <= len(ident) <= COMMAND_ID_MAX:
        return ident
    return None
