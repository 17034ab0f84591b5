"""The ground-truth log: one JSON line per publish the broker acknowledged.

``{"t": <wall RFC 3339 UTC>, "topic": ..., "retain": bool, "qos": 1, "payload": "<text>"}``
in publish order per device, and ``{"hold": true, ...}`` once behaviour froze. Devices call
``record`` (no I/O, never blocks); a writer task appends batches to the file in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

FLUSH_INTERVAL_S = 0.2


def wall_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TruthLog:
    """Async context manager owning the writer task; ``record`` from any device task."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lines_written = 0
        self._pending: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closing = asyncio.Event()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.path.write_text, "", encoding="utf-8")
        self._closing.clear()
        self._task = asyncio.create_task(self._writer(), name="truth-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Let the writer finish on its own: cancelling it could cancel a queued write of
        # lines already taken from the buffer (the last deaths, typically).
        self._closing.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush()

    def record(self, topic: str, retain: bool, payload: str) -> None:
        line = {"t": wall_rfc3339(), "topic": topic, "retain": retain, "qos": 1, "payload": payload}
        self._pending.append(json.dumps(line, ensure_ascii=False, separators=(",", ":")))

    def record_hold(self, **info: Any) -> None:
        self._pending.append(json.dumps({"hold": True, "t": wall_rfc3339(), **info}))

    async def flush(self) -> None:
        """Write everything recorded so far (in order) and return once it is on disk."""
        async with self._write_lock:
            lines, self._pending = self._pending, []
            if lines:
                # shielded: once taken from the buffer, lines reach the file even if the
                # caller is cancelled meanwhile
                await asyncio.shield(asyncio.to_thread(self._append, lines))
                self.lines_written += len(lines)

    def _append(self, lines: list[str]) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")

    async def _writer(self) -> None:
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_INTERVAL_S):
                    await self._closing.wait()
            await self.flush()
