"""A command as the service keeps it: what was asked, by whom, and what became of it.

States: ``pending`` (stored, not yet accepted by the broker), ``sent`` (the broker
acknowledged it, PUBACK), then one of ``done`` / ``rejected`` / ``failed`` (the device's
answer) or ``expired`` (no answer by ``expires``). Only ``pending`` and ``sent`` are open:
resent, and the only ones a result changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from devices.contract import COMMAND_UNIT
from ingest.alerts.model import rfc3339

CommandState = Literal["pending", "sent", "done", "rejected", "failed", "expired"]
STATES: tuple[str, ...] = get_args(CommandState)
OPEN: frozenset[str] = frozenset({"pending", "sent"})


@dataclass(slots=True)
class CommandRecord:
    id: str
    device_id: str
    station_id: str
    type: str
    unit: int | None  # the port (pile commands) or slot (cabinet commands)
    state: str
    requested_by: str  # the API key's name
    requested_key: str | None  # the API key's id
    requested_at_ms: int
    expires_at_ms: int
    payload: str  # the command as published, the same bytes every time
    sends: int = 0
    sent_at_ms: int | None = None  # the first PUBACK
    last_sent_at_ms: int | None = None  # the latest publish
    result: str | None = None
    info: str | None = None
    result_at_ms: int | None = None
    # an answer that came after the command expired (kept, does not change the state)
    late_result: str | None = None
    late_info: str | None = None
    late_result_at_ms: int | None = None
    repeats: int = 0  # answers after the first (a device answers a resent id again)
    updated_at_ms: int = 0

    @property
    def open(self) -> bool:
        return self.state in OPEN

    def row(self) -> tuple[Any, ...]:
        return tuple(asdict(self).values())

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> CommandRecord:
        return cls(*row)

    def view(self) -> dict[str, Any]:
        """The API's shape: RFC 3339 times, ``port`` or ``slot``."""
        unit_field = COMMAND_UNIT.get(self.type)
        return {
            "id": self.id,
            "device": self.device_id,
            "station": self.station_id,
            "type": self.type,
            "port": self.unit if unit_field == "port" else None,
            "slot": self.unit if unit_field == "slot" else None,
            "state": self.state,
            "requested_by": self.requested_by,
            "requested_at": rfc3339(self.requested_at_ms),
            "expires_at": rfc3339(self.expires_at_ms),
            "sends": self.sends,
            "sent_at": rfc3339(self.sent_at_ms),
            "last_sent_at": rfc3339(self.last_sent_at_ms),
            "result": self.result,
            "info": self.info,
            "result_at": rfc3339(self.result_at_ms),
            "late_result": self.late_result,
            "late_info": self.late_info,
            "late_result_at": rfc3339(self.late_result_at_ms),
            "repeats": self.repeats,
            "updated_at": rfc3339(self.updated_at_ms),
        }


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(CommandRecord))
