"""What the API learns from the stream of applied changes (``Pipeline.listeners``).

``Trends`` keeps, per cabinet slot, the recent (device time, soc) readings of the battery in
it, so that the time until it reaches the release level comes from its own recent charge
rate; and, per pile port, since when it has been ``finished`` (charged, still plugged in)
and how long finished ports stayed plugged in before riders unplugged them.

``Changes`` wakes the SSE streams: each subscriber gets the ids of stations whose devices
changed, coalesced while it is busy.

Both run on the event loop, called by the pipeline after each durable batch.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from devices.contract import CabinetStatus, PileStatus
from ingest.twins import Twin

CHARGE_WINDOW_MS = 30 * 60 * 1000
"""Readings older than this (device time) no longer count towards a slot's charge rate."""
MIN_RATE_SPAN_MS = 60 * 1000
"""A rate needs readings at least this far apart: one soc step in seconds is noise."""
NOMINAL_PACK_WH = 1440.0
"""Fallback when a slot has no rate yet: 48 V x 30 Ah, the middle of the district's packs."""
DEFAULT_FINISHED_DWELL_S = 30 * 60
"""Fallback for how long a finished port stays plugged in, until we observed enough."""
DWELLS_KEPT = 500
MIN_DWELLS = 5
NOMINAL_SESSION_WH = 1000.0
"""Fallback energy of one charging session: a 48 V x 24 Ah pack from ~15 % to full."""
NEAR_END_S = 30 * 60
"""A charging session counts as near its end when it should finish within this."""


@dataclass
class _Charge:
    battery: str | None
    readings: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=64))


class Trends:
    def __init__(self) -> None:
        self._charges: dict[tuple[str, int], _Charge] = {}
        self._finished_since: dict[tuple[str, int], int] = {}
        self._dwells: deque[float] = deque(maxlen=DWELLS_KEPT)
        self._session_wh: deque[float] = deque(maxlen=DWELLS_KEPT)
        self._charging: dict[tuple[str, int], float] = {}  # last energy_wh while charging
        self._seen_ts: dict[str, int] = {}

    def observe(self, twins: Iterable[Twin]) -> None:
        for twin in twins:
            status = twin.status
            if status is None or self._seen_ts.get(twin.device_id) == status.ts:
                continue
            self._seen_ts[twin.device_id] = status.ts
            if isinstance(status, CabinetStatus):
                self._observe_cabinet(twin.device_id, status)
            else:
                self._observe_pile(twin.device_id, status)

    def _observe_cabinet(self, device_id: str, status: CabinetStatus) -> None:
        for slot in status.slots:
            key = (device_id, slot.n)
            charge = self._charges.get(key)
            if slot.battery is None or slot.soc is None:
                self._charges.pop(key, None)
                continue
            if charge is None or charge.battery != slot.battery:
                charge = self._charges[key] = _Charge(slot.battery)
            if charge.readings and status.ts <= charge.readings[-1][0]:
                continue
            charge.readings.append((status.ts, float(slot.soc)))
            while charge.readings and charge.readings[0][0] < status.ts - CHARGE_WINDOW_MS:
                charge.readings.popleft()

    def _observe_pile(self, device_id: str, status: PileStatus) -> None:
        for port in status.ports:
            key = (device_id, port.n)
            since = self._finished_since.get(key)
            if port.state == "charging":
                self._charging[key] = port.energy_wh
            elif key in self._charging:
                energy = self._charging.pop(key)
                if port.state == "finished" and energy > 0:  # a session charged to its end
                    self._session_wh.append(max(energy, port.energy_wh))
            if port.state == "finished":
                if since is None:
                    self._finished_since[key] = status.ts
            elif since is not None:
                del self._finished_since[key]
                if port.state == "available" and status.ts > since:
                    self._dwells.append((status.ts - since) / 1000)

    # -- estimates ------------------------------------------------------------------------

    def charge_rate(self, device_id: str, n: int) -> float | None:
        """Soc points per second of the battery in slot ``n``, from its recent readings."""
        charge = self._charges.get((device_id, n))
        if charge is None or len(charge.readings) < 2:
            return None
        (t0, s0), (t1, s1) = charge.readings[0], charge.readings[-1]
        if t1 - t0 < MIN_RATE_SPAN_MS or s1 <= s0:
            return None
        return (s1 - s0) / ((t1 - t0) / 1000)

    def finished_since(self, device_id: str, n: int) -> int | None:
        return self._finished_since.get((device_id, n))

    def session_energy(self) -> tuple[float, str]:
        """Typical energy of a whole charging session, and how we know it."""
        if len(self._session_wh) >= MIN_DWELLS:
            median = statistics.median(self._session_wh)
            return median, f"median energy of {len(self._session_wh)} observed sessions"
        return NOMINAL_SESSION_WH, "assumed 1,000 Wh sessions (too few seen)"

    def finished_dwell(self) -> tuple[float, str]:
        """Typical time a finished port stays plugged in, and how we know it."""
        if len(self._dwells) >= MIN_DWELLS:
            median = statistics.median(self._dwells)
            return median, f"median of {len(self._dwells)} observed unplugs"
        return float(DEFAULT_FINISHED_DWELL_S), "assumed 30 min until unplugged (too few seen)"


class Changes:
    """Fan-out of "these stations changed" to the SSE streams."""

    def __init__(self) -> None:
        self._subscribers: set[asyncio.Queue[set[str]]] = set()

    def subscribe(self) -> asyncio.Queue[set[str]]:
        queue: asyncio.Queue[set[str]] = asyncio.Queue(maxsize=1)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[set[str]]) -> None:
        self._subscribers.discard(queue)

    def notify(self, stations: set[str]) -> None:
        for queue in self._subscribers:
            pending = queue.get_nowait() if queue.full() else set()
            pending.update(stations)  # coalesced with what the stream has not picked up yet
            queue.put_nowait(pending)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)


class Live:
    """Trends and change notifications, fed by the pipeline."""

    def __init__(self) -> None:
        self.trends = Trends()
        self.changes = Changes()

    def on_change(self, twins: list[Twin]) -> None:
        self.trends.observe(twins)
        self.changes.notify({t.station_id for t in twins})


def get_live(request: Request) -> Live:
    live: Live = request.app.state.live
    return live


LiveDep = Annotated[Live, Depends(get_live)]
