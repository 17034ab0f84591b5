"""A pass in the background, every so often: the housekeeping of the embedded or InfluxDB
history (``ingest.housekeeping``) and the retention of a PostgreSQL history
(``ingest.pg_retention``).

``Periodic.run`` waits ``first_after_s``, then runs ``once`` every ``every_s`` until
cancelled; ``wake()`` (tests, an operator who just shortened the retention) starts the next
pass at once. A ``StoreError`` is logged and the pass tried again on the next round; anything
else escapes, to the supervisor that runs the task (``ingest.supervisor``), which logs it and
starts the task again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ingest import StoreError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Periodic:
    what: str  # for the log: "history housekeeping"
    once: Callable[[], Awaitable[object]]
    every_s: float
    first_after_s: float
    woken: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        await self._sleep(self.first_after_s)
        while True:
            try:
                await self.once()
            except StoreError as exc:
                log.warning("%s: %s (retried in %.0f s)", self.what, exc, self.every_s)
            await self._sleep(self.every_s)

    def wake(self) -> None:
        self.woken.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):  # not wait_for: 3.11's can swallow a cancel
            async with asyncio.timeout(seconds):
                await self.woken.wait()
        self.woken.clear()
