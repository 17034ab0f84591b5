"""The fleet's timer wheel: order by slot, never early, one failure does not stop the rest."""

from __future__ import annotations

import asyncio
import logging

import pytest

from simulators.timers import TimerWheel
from tests.simulators.conftest import within


async def test_callbacks_run_in_time_order_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(resolution_s=0.01)
    ran: list[tuple[str, float, float]] = []  # name, due, ran at
    done = asyncio.Event()

    def at(name: str, delay: float) -> None:
        due = loop.time() + delay
        wheel.call_later(delay, lambda: ran.append((name, due, loop.time())))

    at("c", 0.05)
    at("a", 0.0)
    at("b", 0.02)
    at("b2", 0.02)
    wheel.call_later(0.06, done.set)
    await within(done.wait(), 5)
    assert [name for name, *_ in ran] == ["a", "b", "b2", "c"]
    assert all(ran_at >= due for _, due, ran_at in ran)
    assert len(wheel) == 0


async def test_a_callback_may_schedule_again_and_a_failure_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    wheel = TimerWheel(resolution_s=0.01)
    ticks: list[int] = []
    done = asyncio.Event()

    def tick() -> None:
        ticks.append(len(ticks))
        if len(ticks) < 3:
            wheel.call_later(0.0, tick)
        else:
            done.set()

    def broken() -> None:
        raise RuntimeError("a device bug")

    wheel.call_later(0.0, broken)
    wheel.call_later(0.0, tick)
    with caplog.at_level(logging.ERROR, logger="simulators.timers"):
        await within(done.wait(), 5)
    assert ticks == [0, 1, 2]
    assert "a device bug" in caplog.text


async def test_close_forgets_pending_callbacks() -> None:
    wheel = TimerWheel(resolution_s=0.01)
    ran: list[str] = []
    wheel.call_later(0.02, lambda: ran.append("late"))
    assert len(wheel) == 1
    wheel.close()
    assert len(wheel) == 0
    done = asyncio.Event()
    wheel.call_later(0.04, done.set)  # still usable; the forgotten one never runs
    await within(done.wait(), 5)
    assert ran == []
