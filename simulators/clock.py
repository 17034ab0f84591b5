"""The simulated clock: ``sim_time = start + wall_elapsed * speed``.

Behaviour runs on this clock (``--speed 60`` makes an hour pass in a minute); heartbeats
do not, because the service judges freshness by its own wall clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime


class SimClock:
    def __init__(
        self,
        start: datetime | None = None,
        speed: float = 1.0,
        *,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        if start is None:
            start = datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("the simulation start needs a timezone (e.g. +08:00 or Z)")
        if not speed > 0:
            raise ValueError(f"speed must be > 0, not {speed}")
        self.start = start.timestamp()
        self.speed = speed
        self._wall = wall
        self._t0 = wall()

    def now(self) -> float:
        """Sim time as epoch seconds."""
        return self.start + (self._wall() - self._t0) * self.speed

    def wall_seconds(self, sim_seconds: float) -> float:
        """How long ``sim_seconds`` of simulated time take on the wall clock."""
        return sim_seconds / self.speed
