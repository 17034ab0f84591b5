"""One timer for the whole fleet: callbacks due within the same slot run together.

Each of 10,000 devices wants a wake-up for its heartbeat, its next behaviour step and its
connection's keepalive. As asyncio timers that is tens of thousands of ``TimerHandle``s in
the loop's heap, ordered by a ``__lt__`` written in Python; at ``--speed 60`` the heap
alone took about a fifth of the simulator's CPU. A ``TimerWheel`` keeps the callbacks in
lists per ``resolution_s`` slot and the slot numbers (plain ints) in a heap, and asks the
loop for one timer: the earliest slot. A callback runs up to ``resolution_s`` late, never
early. There is no cancel: a callback checks whether it is still wanted.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable

log = logging.getLogger(__name__)

RESOLUTION_S = 0.05


class TimerWheel:
    def __init__(self, resolution_s: float = RESOLUTION_S) -> None:
        self.resolution_s = resolution_s
        self._slots: dict[int, list[Callable[[], None]]] = {}
        self._heap: list[int] = []
        self._armed: asyncio.TimerHandle | None = None
        self._armed_slot: int | None = None

    def __len__(self) -> int:
        return sum(len(callbacks) for callbacks in self._slots.values())

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, ``delay_s`` (or up to ``resolution_s`` more) from now."""
        loop = asyncio.get_running_loop()
        slot = math.floor((loop.time() + max(0.0, delay_s)) / self.resolution_s) + 1
        callbacks = self._slots.get(slot)
        if callbacks is not None:
            callbacks.append(callback)
            return
        self._slots[slot] = [callback]
        heapq.heappush(self._heap, slot)
        if self._armed_slot is None or slot < self._armed_slot:
            self._arm(loop, slot)

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed = loop.call_at(slot * self.resolution_s, self._fire)
        self._armed_slot = slot

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._armed = self._armed_slot = None
        now_slot = math.floor(loop.time() / self.resolution_s + 1e-9)
        heap = self._heap
        while heap and heap[0] <= now_slot:
            for callback in self._slots.pop(heapq.heappop(heap)):
                try:
                    callback()
                except Exception:  # one device's bug must not stop every other device's timer
                    log.exception("timer callback %r failed", callback)
        if heap:
            self._arm(loop, heap[0])

    def close(self) -> None:
        """Forget every pending callback."""
        if self._armed is not None:
            self._armed.cancel()
        self._armed = self._armed_slot = None
        self._slots.clear()
        self._heap.clear()
