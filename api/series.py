"""Time series from stored history, the same for every history store.

The store downsamples (``HistoryStore.status_samples``: the last status per device and
bucket) and hands over births, deaths and events (``happenings``); this module turns them
into counts per status, and holds each device's last status over later instants
("sample and hold") until its next status, its death, or ``HOLD_MAX_MS`` without news.

Pure functions on plain data: no I/O.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from devices.contract import parse_ts

HOLD_MAX_MS = 24 * 3600 * 1000
"""A status stands for at most this long without a newer one: a device that vanished (and
whose Will was lost too) stops counting. Devices send a status at least every heartbeat, so
this only matters for those that went silent."""


@dataclass(frozen=True, slots=True)
class Counts:
    """What one status says, in numbers."""

    kind: str
    ts_ms: int
    units: int = 0
    free: int = 0  # pile: ports a rider can plug into; cabinet: ready batteries
    busy: int = 0  # pile: ports charging or finished (plugged in); cabinet: slots charging
    power_w: float = 0.0
    energy_wh: float = 0.0
    temp_c: float | None = None
    voltage_v: float | None = None
    soc_mean: float | None = None
    faults: tuple[str, ...] = ()
    states: dict[str, int] = field(default_factory=dict)


def load(payload: str) -> dict[str, Any]:
    data = pydantic_core.from_json(payload)
    return data if isinstance(data, dict) else {}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def counts(data: dict[str, Any], release_soc: float, fallback_ts_ms: int = 0) -> Counts:
    """Counts of one stored status payload (already validated when it was ingested)."""
    try:
        ts = parse_ts(data["ts"])
    except (KeyError, TypeError, ValueError):
        ts = fallback_ts_ms
    faults = [str(f) for f in data.get("faults") or []]
    if data.get("smoke") is True and "smoke" not in faults:
        faults.append("smoke")
    kind = str(data.get("kind"))
    units: list[dict[str, Any]] = [
        u for u in (data.get("ports") if kind == "pile" else data.get("slots")) or [] if u
    ]
    states: dict[str, int] = defaultdict(int)
    for unit in units:
        states[str(unit.get("state"))] += 1
    if kind == "pile":
        free = sum(1 for u in units if u.get("state") == "available" and not u.get("fault"))
        busy = states["charging"] + states["finished"]
        socs: list[float] = []
    else:
        free = sum(
            1
            for u in units
            if u.get("state") == "ready"
            and not u.get("fault")
            and u.get("soc") is not None
            and _num(u.get("soc")) >= release_soc
        )
        busy = states["charging"]
        socs = [_num(u["soc"]) for u in units if u.get("soc") is not None]
    temp = data.get("temp_c")
    volt = data.get("voltage_v")
    return Counts(
        kind=kind,
        ts_ms=ts,
        units=len(units),
        free=0 if faults else free,
        busy=busy,
        power_w=round(sum(_num(u.get("power_w")) for u in units), 1),
        energy_wh=round(sum(_num(u.get("energy_wh")) for u in units), 1),
        temp_c=None if temp is None else _num(temp),
        voltage_v=None if volt is None else _num(volt),
        soc_mean=round(sum(socs) / len(socs), 1) if socs else None,
        faults=tuple(faults),
        states=dict(states),
    )


class Held:
    """Each device's statuses and online changes, asked "what was true at instant t"."""

    def __init__(
        self,
        samples: Iterable[dict[str, Any]],
        happenings: Iterable[dict[str, Any]],
        release_soc: dict[str, float],
        every_ms: int,
        hold_max_ms: int = HOLD_MAX_MS,
    ) -> None:
        self.hold_max_ms = hold_max_ms
        self._times: dict[str, list[int]] = defaultdict(list)
        self._counts: dict[str, list[Counts]] = defaultdict(list)
        for row in samples:
            device = row["device_id"]
            c = counts(load(row["payload"]), release_soc.get(device, 90.0), row["bucket_ms"])
            times = self._times[device]
            # the store orders by bucket; device clocks may still step back within a boot
            if times and c.ts_ms < times[-1]:
                continue
            times.append(c.ts_ms)
            self._counts[device].append(c)
        self._state_times: dict[str, list[int]] = defaultdict(list)
        self._state_online: dict[str, list[bool]] = defaultdict(list)
        for row in happenings:
            if row["type"] in ("birth", "death"):
                self._state_times[row["device_id"]].append(int(row["ts_ms"]))
                self._state_online[row["device_id"]].append(row["type"] == "birth")
        self.samples = sum(len(v) for v in self._times.values())

    def at(self, device_id: str, t_ms: int) -> Counts | None:
        """The device's last status before ``t_ms`` if it still stood then."""
        times = self._times.get(device_id)
        if not times:
            return None
        i = bisect.bisect_left(times, t_ms) - 1
        if i < 0:
            return None
        held = self._counts[device_id][i]
        if t_ms - held.ts_ms > self.hold_max_ms:
            return None
        states = self._state_times.get(device_id)
        if states:
            j = bisect.bisect_left(states, t_ms) - 1
            # a death after this status (and no birth since) takes the device away
            if j >= 0 and not self._state_online[device_id][j] and states[j] >= held.ts_ms:
                return None
        return held


def grid(since_ms: int, until_ms: int, every_ms: int) -> list[int]:
    """Ends of the epoch-aligned buckets after ``since``, and ``until`` itself (the end of
    the bucket still running)."""
    first = since_ms - since_ms % every_ms + every_ms
    out = list(range(first, until_ms + 1, every_ms))
    if not out or out[-1] < until_ms:
        out.append(until_ms)
    return out


def sum_at(held: Held, device_ids: Sequence[str], t_ms: int) -> list[Counts]:
    return [c for d in device_ids if (c := held.at(d, t_ms)) is not None]
