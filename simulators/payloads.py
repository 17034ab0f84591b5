"""The wire form of contract v1 as firmware writes it: header, timestamps, compact JSON.

Piles stamp ``ts`` as RFC 3339 with the local +08:00 offset and milliseconds
(``2026-11-28T12:00:00.000+08:00``); cabinets stamp integer epoch milliseconds, so both
forms the contract allows are on the wire. The death (the Will) carries no ``ts``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from devices.contract import PROTOCOL_VERSION, DeviceKind
from simulators.daycycle import LOCAL_TZ

Body = dict[str, Any]


def device_ts(kind: DeviceKind, t: float) -> str | int:
    """Sim epoch seconds ``t`` as the device of ``kind`` writes it."""
    if kind == "cabinet":
        return round(t * 1000)
    dt = datetime.fromtimestamp(round(t * 1000) / 1000, tz=UTC).astimezone(LOCAL_TZ)
    return dt.isoformat(timespec="milliseconds")


def encode(obj: Body) -> str:
    """Compact JSON; NaN and Infinity are refused (the contract rejects them)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def message(kind: DeviceKind, t: float, boot: str, seq: int, body: Body) -> str:
    """A birth, status or event: the common header followed by ``body``."""
    header: Body = {"v": PROTOCOL_VERSION, "ts": device_ts(kind, t), "boot": boot, "seq": seq}
    return encode({**header, **body})


def birth_body(fields: Body, heartbeat_s: int) -> Body:
    """``online: true`` and the device description, after the header."""
    return {"online": True, **fields, "heartbeat_s": heartbeat_s}


def death(boot: str, seq: int) -> str:
    """The Will, and the goodbye a graceful stop publishes: the same text."""
    return encode({"v": PROTOCOL_VERSION, "online": False, "boot": boot, "seq": seq})
