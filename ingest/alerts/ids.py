"""Ids unique across the writers of one PostgreSQL database (issue 13): alert, change event
and webhook delivery ids, drawn from the database's sequences (``AlertStore.reserve_ids``)
in blocks.

The engine and the notifier number on the loop, synchronously (an alert opens inside a
rule's evaluation), so ids are reserved ahead: ``top_up`` (awaited before each batch of the
partition and each pass of the timer, in a worker thread) keeps at least ``low`` in hand. A
pool that runs dry between two top-ups (a burst larger than the block) reserves in place,
blocking the loop for one round trip, and counts it (``dry``): correct, only slower. Ids a
worker reserved and never used are gaps, never reused."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class IdPool:
    def __init__(self, reserve: Callable[[int], list[int]], *, block: int = 256) -> None:
        if not 2 <= block <= 10_000:
            raise ValueError(f"block of 2 to 10000 ids, not {block}")
        self._reserve = reserve
        self.block = block
        self.low = block // 2
        self._ids: deque[int] = deque()
        self.dry = 0  # takes that found the pool empty and reserved in place
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def take(self) -> int:
        if not self._ids:
            self.dry += 1
            log.info("id pool ran dry: reserving %d ids on the loop", self.block)
            self._ids.extend(self._reserve(self.block))
        return self._ids.popleft()

    async def top_up(self) -> None:
        """At least ``low`` ids in hand afterwards (a block is reserved when fewer are)."""
        async with self._lock:
            if len(self._ids) < self.low:
                self._ids.extend(await asyncio.to_thread(self._reserve, self.block))


class AlertIds:
    """The alert and change-event ids of an engine on PostgreSQL."""

    def __init__(self, reserve: Callable[[str, int], list[int]], *, block: int = 32) -> None:
        self.alerts = IdPool(lambda n: reserve("alert", n), block=block)
        self.events = IdPool(lambda n: reserve("event", n), block=block * 4)

    async def top_up(self) -> None:
        await self.alerts.top_up()
        await self.events.top_up()
