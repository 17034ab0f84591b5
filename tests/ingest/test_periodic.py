"""The periodic background pass shared by the housekeeping and the PostgreSQL retention
(``ingest.periodic``): the first pass after its delay, then one every period, sooner when
woken; a store error is logged and the next round tries again; anything else escapes to the
supervisor."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ingest import StoreError
from ingest.periodic import Periodic


async def test_first_after_its_delay_then_every_period_sooner_when_woken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    times: list[float] = []
    passes: asyncio.Queue[None] = asyncio.Queue()

    async def once() -> None:
        times.append(time.monotonic())
        passes.put_nowait(None)
        if len(times) == 2:
            raise StoreError("database is locked")

    periodic = Periodic("test pass", once, every_s=0.2, first_after_s=0.1)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ingest.periodic"):
        task = asyncio.create_task(periodic.run())
        async with asyncio.timeout(5):
            for _ in range(3):
                await passes.get()
            periodic.wake()  # the fourth at once, not a period later
            await passes.get()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert 0.1 <= times[0] - start < 0.19
    assert 0.2 <= times[1] - times[0] < 0.39
    assert 0.2 <= times[2] - times[1] < 0.39  # the error cost nothing but its pass
    assert times[3] - times[2] < 0.15
    assert [r.getMessage() for r in caplog.records] == [
        "test pass: database is locked (retried in 0 s)"
    ]


async def test_anything_but_a_store_error_escapes_to_the_supervisor() -> None:
    async def once() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        await Periodic("test pass", once, every_s=10, first_after_s=0).run()
