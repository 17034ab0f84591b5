"""The wire form of contract v1 as firmware writes it: header, timestamps, compact JSON.

Piles stamp ``ts`` as RFC 3339 with the local +08:00 offset and milliseconds
(``2026-11-28T12:00:00.000+08:00``); cabinets stamp integer epoch milliseconds, so both
forms the contract allows are on the wire. The death (the Will) carries no ``ts``.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any

from devices.contract import PROTOCOL_VERSION, DeviceKind
from simulators.daycycle import LOCAL_TZ

Body = dict[str, Any]


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""One encoder for every payload: ``json.dumps`` with options builds a new one per call."""


@functools.lru_cache(maxsize=4)
def _local_second(second: int) -> tuple[str, str]:
    """``2026-11-28T12:00:00`` and ``+08:00`` of an epoch second: thousands of devices stamp
    within the same second, so the datetime work is done once per second."""
    text = datetime.fromtimestamp(second, tz=UTC).astimezone(LOCAL_TZ).isoformat()
    return text[:19], text[19:]


def device_ts(kind: DeviceKind, t: float) -> str | int:
    """Sim epoch seconds ``t`` as the device of ``kind`` writes it."""
    ms = round(t * 1000)
    if kind == "cabinet":
        return ms
    second, milli = divmod(ms, 1000)
    date_time, offset = _local_second(second)
    return f"{date_time}.{milli:03d}{offset}"


def encode(obj: Body) -> str:
    """Compact JSON; NaN and Infinity are refused (the contract rejects them)."""
    return _ENCODER.encode(obj)


def message(kind: DeviceKind, t: float, boot: str, seq: int, body: Body) -> str:
    """A birth, status or event: the common header followed by ``body`` (not empty)."""
    ts = device_ts(kind, t)
    stamp = f'"{ts}"' if isinstance(ts, str) else str(ts)
    head = f'{{"v":{PROTOCOL_VERSION},"ts":{stamp},"boot":{_ENCODER.encode(boot)},"seq":{seq},'
    return head + _ENCODER.encode(body)[1:]


def birth_body(fields: Body, heartbeat_s: int) -> Body:
    """``online: true`` and the device description, after the header."""
    return {"online": True, **fields, "heartbeat_s": heartbeat_s}


def death(boot: str, seq: int) -> str:
    """The Will, and the goodbye a graceful stop publishes: the same text."""
    return encode({"v": PROTOCOL_VERSION, "online": False, "boot": boot, "seq": seq})
