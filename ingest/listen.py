"""Following PostgreSQL LISTEN/NOTIFY: the one loop every follower in ingest/ shares (the
registry, the actions, the battery flags, the webhook subscriptions, the replica).

``follow`` connects (autocommit, ``connect_timeout``), LISTENs on its channels and then:

- ``on_connect`` on each (re)connect: the catch-up read of what no notice announced (sent
  before we listened, or while the connection was lost: NOTIFY keeps nothing);
- ``on_notices`` with each batch: one notice, and with ``gather_s`` what else arrives
  within it (up to ``gather_max``), so that a burst (a cabinet's smoke flags all its packs)
  is one read;
- every ``period_s`` (counted from the connect, or from the last period; notices do not
  postpone it, so a steady stream of notices cannot starve the safety net): a ping
  (``SELECT 1`` within ``ping_timeout_s``, when given: a server that died without closing
  the socket shows here) and ``on_period``, the safety-net read.

A lost connection (``psycopg.Error``, ``OSError``, a ping's ``TimeoutError``, and the
callbacks' own ``errors``) is logged and retried after ``backoff_s`` (capped, jittered;
the count of failures in a row starts again once LISTEN succeeds). ``on_state(True,
None)`` says we listen, ``on_state(False, exc)`` that we stopped (``exc`` None when
cancelled). Runs until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeAlias

import psycopg

from ingest.backoff import backoff_s

log = logging.getLogger(__name__)

Conn: TypeAlias = "psycopg.AsyncConnection[Any]"
Notices: TypeAlias = "list[psycopg.Notify]"


async def follow(
    url: str,
    channels: Sequence[str],
    *,
    name: str,
    on_notices: Callable[[Notices], Awaitable[None]],
    on_connect: Callable[[Conn], Awaitable[None]] | None = None,
    period_s: float | None = None,
    on_period: Callable[[Conn], Awaitable[None]] | None = None,
    ping_timeout_s: float | None = None,
    gather_s: float | None = None,
    gather_max: int | None = None,
    on_state: Callable[[bool, BaseException | None], None] | None = None,
    errors: tuple[type[Exception], ...] = (),
    first_s: float = 0.5,
    cap_s: float = 10.0,
    connect_timeout_s: int = 5,
) -> NoReturn:
    """Follow ``channels`` at the libpq ``url`` (module docstring); ``name`` starts the
    log lines."""
    caught: tuple[type[Exception], ...] = (psycopg.Error, OSError, TimeoutError, *errors)
    failures = 0
    while True:
        error: BaseException | None = None
        try:
            conn = await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=connect_timeout_s
            )
            async with conn:
                for channel in channels:
                    await conn.execute(f"LISTEN {channel}".encode())
                failures = 0
                if on_state is not None:
                    on_state(True, None)
                if on_connect is not None:
                    await on_connect(conn)
                await _listen(conn, on_notices, period_s, on_period, ping_timeout_s,
                              gather_s, gather_max)  # fmt: skip
        except caught as exc:
            error = exc
            failures += 1
            delay = backoff_s(failures, first_s=first_s, cap_s=cap_s)
            log.warning("%s: %s; LISTEN again in %.1f s (attempt %d)",
                        name, exc or type(exc).__name__, delay, failures)  # fmt: skip
        finally:
            if on_state is not None:
                on_state(False, error)
        await asyncio.sleep(delay)


async def _listen(
    conn: Conn,
    on_notices: Callable[[Notices], Awaitable[None]],
    period_s: float | None,
    on_period: Callable[[Conn], Awaitable[None]] | None,
    ping_timeout_s: float | None,
    gather_s: float | None,
    gather_max: int | None,
) -> NoReturn:
    loop = asyncio.get_running_loop()
    due = None if period_s is None else loop.time() + period_s
    while True:
        wait_s = None if due is None else max(0.0, due - loop.time())
        batch = [n async for n in conn.notifies(timeout=wait_s, stop_after=1)]
        if batch and gather_s is not None:
            batch += [n async for n in conn.notifies(timeout=gather_s, stop_after=gather_max)]
        if batch:
            await on_notices(batch)
        if due is not None and period_s is not None and loop.time() >= due:
            if ping_timeout_s is not None:
                async with asyncio.timeout(ping_timeout_s):
                    await conn.execute("SELECT 1")
            if on_period is not None:
                await on_period(conn)
            due = loop.time() + period_s
