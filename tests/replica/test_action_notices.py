"""One LISTEN connection per worker for the maintainers' actions (``ingest.actions.
ActionNotices``): the notice of a queued action wakes the applier of its station, and the
listener's one query a poll (and on every connect) wakes those with queued actions that no
notice announced. Before it, every partition's applier held a LISTEN connection of its own
and claimed every second: 16 connections and 16 claims a second per worker doing nothing.

Real PostgreSQL, a real ``AlertEngine`` on it (``worker_engine``), real appliers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import psycopg

from ingest.actions import ACTIONS_CHANNEL, ActionApplier, ActionNotices, ActionQueue, libpq_url
from ingest.alerts.engine import AlertEngine
from ingest.db.database import PgDatabase
from tests.alerts.helpers import eventually
from tests.replica.test_replica import STATION, seeded
from tests.replica.test_replica_alerts import OTHER_STATION, worker_engine

NOT_AN_ALERT = {"alert_id": 999_999, "by": "li-wei", "note": None}  # applied: "failed"


@asynccontextmanager
async def running(notices: ActionNotices) -> AsyncIterator[ActionNotices]:
    task = asyncio.create_task(notices.run(), name="notices")
    try:
        yield notices
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)


@asynccontextmanager
async def applier(
    url: str, station: str, engine: AlertEngine, notices: ActionNotices
) -> AsyncIterator[ActionApplier]:
    async with ActionApplier(url, [station], alerts=engine, notices=notices) as a:
        task = asyncio.create_task(a.run(), name=f"applier-{station}")
        try:
            yield a
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=5)


async def listeners(url: str) -> int:
    """Sessions whose last statement was a LISTEN on the actions' channel (an applier's
    own) or the listener's look for queued actions (the worker's ``ActionNotices``)."""
    async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s OR query LIKE %s",
            (f"LISTEN {ACTIONS_CHANNEL}", "SELECT DISTINCT station_id FROM action_queue %"),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


def is_listening(notices: ActionNotices) -> None:
    assert notices.listening


async def state_within(queue: ActionQueue, request_id: int, seconds: float) -> tuple[str, float]:
    """The action's state once it is finished (``done``, ``failed``, ``expired``; or after
    ``seconds``), and how long."""
    start = time.monotonic()
    while True:
        outcome = await asyncio.to_thread(queue.outcome, request_id)
        assert outcome is not None
        took = time.monotonic() - start
        if outcome.state not in ("queued", "applying") or took > seconds:
            return outcome.state, took
        await asyncio.sleep(0.02)


async def test_a_notice_wakes_the_applier_of_its_station_through_one_listen(pg_url: str) -> None:
    catalog = seeded(pg_url)
    queue = ActionQueue(PgDatabase(pg_url))
    notices = ActionNotices(pg_url, poll_s=60.0)  # the poll cannot be what applies it
    try:
        async with AsyncExitStack() as stack:
            engine = await stack.enter_async_context(worker_engine(pg_url, catalog))
            await stack.enter_async_context(running(notices))
            ours = await stack.enter_async_context(applier(pg_url, STATION, engine, notices))
            other = await stack.enter_async_context(applier(pg_url, OTHER_STATION, engine, notices))
            await eventually(lambda: is_listening(notices))
            await asyncio.sleep(0.2)  # the appliers' first claims are done
            assert await listeners(pg_url) == 1  # two appliers, one listening connection
            request = await asyncio.to_thread(
                queue.submit, STATION, "acknowledge", NOT_AN_ALERT, 5000
            )
            state, took = await state_within(queue, request, 5.0)
            assert state == "failed"  # applied: the alert does not exist
            assert took < 3.0  # the notice: the listener's poll is a minute
            assert (ours.applied, other.applied) == (1, 0)
    finally:
        queue.close()


async def test_actions_no_notice_announced_are_applied_at_connect_and_by_the_poll(
    pg_url: str,
) -> None:
    catalog = seeded(pg_url)
    queue = ActionQueue(PgDatabase(pg_url))
    notices = ActionNotices(pg_url, poll_s=0.3)
    try:
        async with (
            worker_engine(pg_url, catalog) as engine,
            applier(pg_url, STATION, engine, notices) as ours,
        ):
            await asyncio.sleep(0.2)  # its first look found nothing
            # queued while nobody listens: the notice goes to no one
            early = await asyncio.to_thread(
                queue.submit, STATION, "acknowledge", NOT_AN_ALERT, 30_000
            )
            await asyncio.sleep(0.3)
            assert ours.applied == 0
            async with running(notices):
                state, took = await state_within(queue, early, 5.0)
                assert state == "failed"
                assert took < 3.0  # the listener's look when it connected (no poll of its own)
                # queued without a notice at all (a row, no NOTIFY): the poll finds it
                async with await psycopg.AsyncConnection.connect(
                    libpq_url(pg_url), autocommit=True
                ) as conn:
                    cur = await conn.execute(
                        "INSERT INTO action_queue (station_id, kind, args, state,"
                        " requested_at_ms, expires_at_ms) VALUES (%s, 'acknowledge', %s,"
                        " 'queued', 0, 9000000000000000) RETURNING id",
                        (STATION, '{"alert_id": 999999, "by": "li-wei", "note": null}'),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                state, took = await state_within(queue, int(row[0]), 5.0)
                assert state == "failed"
                assert took < 3.0
                assert ours.applied == 2
    finally:
        queue.close()
