"""The one LISTEN follower (``ingest.listen.follow``) against a real PostgreSQL: notices
delivered (a burst gathered into one batch), the catch-up on every connect and every
period (the safety net), a reconnect after the server ends the backend (``pg_terminate_backend``), and the
wait between attempts capped while the server cannot be reached."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import psycopg
import pytest

from ingest.actions import libpq_url
from ingest.listen import Notices, follow
from tests.alerts.helpers import eventually
from tests.servers import free_port

CHANNEL = "listen_test"


class Seen:
    def __init__(self) -> None:
        self.catch_ups = 0
        self.batches: list[list[str]] = []
        self.states: list[tuple[bool, BaseException | None]] = []

    async def caught_up(self, conn: object) -> None:
        self.catch_ups += 1

    async def notices(self, batch: Notices) -> None:
        self.batches.append([n.payload for n in batch])

    def state(self, listening: bool, exc: BaseException | None) -> None:
        self.states.append((listening, exc))


@asynccontextmanager
async def running(run: Callable[[], Any]) -> AsyncIterator[None]:
    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)


async def notify(url: str, *payloads: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for p in payloads:
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, p))


def following(url: str, seen: Seen, **kw: Any) -> Callable[[], Any]:
    def run() -> Any:
        return follow(url, [CHANNEL], name="test", on_notices=seen.notices,
                      catch_up=seen.caught_up, on_state=seen.state, **kw)  # fmt: skip

    return run


async def test_notices_are_delivered_a_burst_in_one_batch_after_the_catch_up(pg_url: str) -> None:
    url, seen = libpq_url(pg_url), Seen()
    async with running(following(url, seen, gather_s=0.3)):
        await eventually(lambda: assert_(seen.states == [(True, None)] and seen.catch_ups == 1))
        await notify(url, "a", "b", "c")  # three transactions, within the gathering
        await eventually(lambda: assert_(seen.batches == [["a", "b", "c"]]))
        await notify(url, "d")
        await eventually(lambda: assert_(seen.batches[1:] == [["d"]]))
    assert seen.catch_ups == 1
    assert seen.states[-1] == (False, None)  # cancelled: not listening, no error


async def test_the_safety_net_runs_every_period_even_under_a_stream_of_notices(
    pg_url: str,
) -> None:
    url, seen = libpq_url(pg_url), Seen()
    async with running(following(url, seen, period_s=0.3, ping_timeout_s=2.0)):
        await eventually(lambda: assert_(seen.catch_ups == 1))
        for i in range(12):  # a notice every 0.1 s: never 0.3 s of quiet
            await notify(url, str(i))
            await asyncio.sleep(0.1)
        assert seen.catch_ups >= 3  # on connect, then every 0.3 s
        assert len(seen.batches) >= 6


async def test_reconnects_and_catches_up_after_the_server_ends_the_backend(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, seen = libpq_url(pg_url), Seen()
    async with running(following(url, seen, first_s=0.05, cap_s=0.1)):
        await eventually(lambda: assert_(seen.catch_ups == 1))
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert [r[0] for r in await cur.fetchall()] == [True]
        await eventually(lambda: assert_(seen.catch_ups == 2))
        lost = [s for s in seen.states if not s[0]]
        assert len(lost) == 1
        assert isinstance(lost[0][1], psycopg.OperationalError)
        assert seen.states[-1] == (True, None)
        await notify(url, "after")  # the new connection listens
        await eventually(lambda: assert_(seen.batches == [["after"]]))
    assert "test: " in caplog.text
    assert "LISTEN again in" in caplog.text


async def test_the_wait_between_attempts_is_capped(caplog: pytest.LogCaptureFixture) -> None:
    url, seen = f"postgresql://127.0.0.1:{free_port()}/nothing", Seen()
    caplog.set_level(logging.WARNING, logger="ingest.listen")
    async with running(following(url, seen, first_s=0.1, cap_s=0.3)):
        await eventually(lambda: assert_(len(seen.states) >= 7))
    found = re.findall(r"again in ([\d.]+) s \(attempt (\d+)\)", caplog.text)
    waits = [float(w) for w, _ in found]
    assert [int(a) for _, a in found] == list(range(1, len(found) + 1))
    # doubled from 0.1 (times 0.5-1) to the cap, not past it: 0.15-0.3 from the third on
    assert max(waits) <= 0.3
    assert min(waits[2:]) >= 0.1
    assert len(waits) >= 6
    assert seen.catch_ups == 0
    assert all(not listening for listening, _ in seen.states)


async def test_a_failing_catch_up_reconnects_and_the_backoff_keeps_growing(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A catch-up that fails (its own ``errors``) after a successful LISTEN: reconnect, and
    the failures are still counted (no retry at the first wait forever)."""
    url, seen = libpq_url(pg_url), Seen()
    caplog.set_level(logging.WARNING, logger="ingest.listen")

    async def flaky(conn: object) -> None:
        await seen.caught_up(conn)
        if seen.catch_ups <= 3:
            raise LookupError("not yet")

    def run() -> NoReturn:  # type: ignore[misc]
        return follow(url, [CHANNEL], name="test", on_notices=seen.notices, catch_up=flaky,
                      errors=(LookupError,), first_s=0.05, cap_s=0.1)  # fmt: skip

    async with running(run):
        await eventually(lambda: assert_(seen.catch_ups == 4))
    attempts = re.findall(r"not yet; LISTEN again in [\d.]+ s \(attempt (\d+)\)", caplog.text)
    assert attempts == ["1", "2", "3"]


def assert_(condition: bool) -> None:
    assert condition


async def test_without_on_notices_a_burst_runs_the_catch_up_once(pg_url: str) -> None:
    url, seen = libpq_url(pg_url), Seen()

    def run() -> Any:
        return follow(url, [CHANNEL], name="test", catch_up=seen.caught_up, gather_s=0.3)

    async with running(run):
        await eventually(lambda: assert_(seen.catch_ups == 1))
        await notify(url, "a", "b", "c")
        await eventually(lambda: assert_(seen.catch_ups == 2))
        await asyncio.sleep(0.5)
        assert seen.catch_ups == 2  # one read for the three
