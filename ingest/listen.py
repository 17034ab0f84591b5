"""Following PostgreSQL LISTEN/NOTIFY: the one loop of the registry, actions, battery flags,
webhook subscriptions and replica followers.

``follow`` connects, LISTENs on its channels, says so (``on_state(True, None)``) and runs
``catch_up`` for what no notice announced (NOTIFY keeps nothing for the disconnected). Each
batch (a notice, and with ``gather_s`` what else comes within it, up to 1000: a
burst is one read) goes to ``on_notices``, or without it runs ``catch_up``. Every
``period_s`` (notices do not postpone it: they cannot starve this safety net) the connection
is pinged (unless ``ping_timeout_s`` is None: a dead server shows here) and ``catch_up``
runs again. A lost connection (``psycopg.Error``, ``OSError``, ``TimeoutError``, the
callbacks' ``errors``) says so (``on_state(False, exc)``; ``exc`` None when cancelled), is
logged and retried after ``backoff_s`` (counted again once LISTEN and the catch-up succeed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeAlias

import psycopg

from ingest.backoff import backoff_s

log = logging.getLogger(__name__)

Notices: TypeAlias = "list[psycopg.Notify]"


async def follow(
    url: str,
    channels: Sequence[str],
    *,
    name: str,
    catch_up: Callable[[psycopg.AsyncConnection[Any]], Awaitable[object]] | None = None,
    on_notices: Callable[[Notices], Awaitable[object]] | None = None,
    period_s: float | None = None,
    ping_timeout_s: float | None = 5.0,
    gather_s: float | None = None,
    on_state: Callable[[bool, BaseException | None], None] = lambda up, exc: None,
    errors: tuple[type[Exception], ...] = (),
    first_s: float = 0.5,
    cap_s: float = 10.0,
) -> NoReturn:
    """Follow ``channels`` at the libpq ``url`` (module docstring); ``name`` starts the
    log lines."""
    failures = 0
    while True:
        error: BaseException | None = None
        try:
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, connect_timeout=5
            ) as conn:
                for channel in channels:
                    await conn.execute(f"LISTEN {channel}".encode())
                on_state(True, None)
                loop = asyncio.get_running_loop()
                if catch_up is not None:
                    await catch_up(conn)
                failures = 0
                due = None if period_s is None else loop.time() + period_s
                while True:
                    wait_s = None if due is None else max(0.0, due - loop.time())
                    batch = [n async for n in conn.notifies(timeout=wait_s, stop_after=1)]
                    if batch and gather_s is not None:
                        more = conn.notifies(timeout=gather_s, stop_after=1000)
                        batch += [n async for n in more]
                    if batch and on_notices is not None:
                        await on_notices(batch)
                    elif batch and catch_up is not None:
                        await catch_up(conn)
                    if due is not None and period_s is not None and loop.time() >= due:
                        if ping_timeout_s is not None:
                            async with asyncio.timeout(ping_timeout_s):
                                await conn.execute("SELECT 1")
                        if catch_up is not None:
                            await catch_up(conn)
                        due = loop.time() + period_s
        except (psycopg.Error, OSError, TimeoutError) + errors as exc:  # noqa: RUF005 (mypy)
            error, failures = exc, failures + 1
            delay = backoff_s(failures, first_s=first_s, cap_s=cap_s)
            log.warning("%s: %s; LISTEN again in %.1f s (attempt %d)",
                        name, exc or type(exc).__name__, delay, failures)  # fmt: skip
        finally:
            on_state(False, error)
        await asyncio.sleep(delay)
