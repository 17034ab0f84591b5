"""The service's long-lived tasks under one supervisor: a task that dies is never silent.

A monitoring service whose alert writer died silently kept answering ``/readyz`` with
"ready" while no alert was saved and every alert route hung (issue 11). Every long-lived task
therefore runs here, with one of two policies:

- ``restart``: the task's own state survives its death (the alert writer's queue, the
  timer, a webhook worker). Its death is logged at once with the traceback, reported to
  ``on_failure`` (which raises an alert where alerting still works), shown by
  ``problems()`` until it has run again for ``healthy_after_s``, and it is restarted after a
  capped backoff.
- ``fatal``: the task holds what a restart in place cannot rebuild (the pipeline's batch in
  hand, the MQTT connection's unacknowledged messages). Its death is logged and reported the
  same way, then ``on_fatal`` is called: the process stops with a non-zero status so that
  its own supervisor (systemd, Kubernetes) starts it again, and the broker redelivers
  everything that was not acknowledged.

A task that returns when it should run forever, or is cancelled by anyone but the
supervisor, has died too.

Every task runs in the supervisor's one ``asyncio.TaskGroup``, entered with the supervisor
(``async with Supervisor() as sup``, or the service's ``AsyncExitStack``) and left when it
stops: the task itself (named as started) and its keeper (``supervise:NAME``), which waits
for it, says why it ended and starts it again. A task never hands the group an exception (its
death is caught and reported here), so one crash never cancels its siblings; the group sees
tasks end only when they are stopped. One-shot jobs (``spawn``) run in the same group, their
failure logged; leaving the supervisor waits for them.

    Supervisor.start / spawn before entering, or after leaving  -> RuntimeError
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

log = logging.getLogger(__name__)

Policy = Literal["restart", "fatal"]
TaskFactory = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class Death:
    """What is known of a supervised task's last death."""

    task: str
    reason: str
    at: float  # time.monotonic()
    deaths: int
    running: bool  # restarted since
    policy: Policy


class Supervisor:
    def __init__(
        self,
        *,
        on_failure: Callable[[str, str], None] | None = None,
        on_fatal: Callable[[str, str], None] | None = None,
        restart_min_s: float = 0.5,
        restart_max_s: float = 30.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        # called on the loop as (task name, reason): set after construction by whoever can
        # raise an alert or stop the process
        self.on_failure = on_failure
        self.on_fatal = on_fatal
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self.healthy_after_s = healthy_after_s
        self.deaths: dict[str, Death] = {}
        self._running: dict[str, asyncio.Task[Exception | None]] = {}  # the task itself, by name
        self._keepers: dict[str, asyncio.Task[None]] = {}  # its supervising loop
        self._jobs: set[asyncio.Task[None]] = set()  # one-shot jobs (spawn)
        self._group = asyncio.TaskGroup()
        self._entered = False
        self._closing = False

    async def __aenter__(self) -> Self:
        await self._group.__aenter__()
        self._entered = True
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop every task (``close``), wait for the one-shot jobs, leave the group. The
        group is left as if its body had ended well: an error of the caller's is the caller's
        to raise, not the group's to wrap."""
        try:
            await self.close()
        except BaseException:  # interrupted while stopping: stop the rest at once
            for task in (*self._keepers.values(), *self._jobs):
                task.cancel()
            raise
        finally:
            self._entered = False
            await self._group.__aexit__(None, None, None)

    def start(self, name: str, factory: TaskFactory, *, policy: Policy = "restart") -> None:
        """Run ``factory()`` as the task ``name`` until ``stop`` or ``close``."""
        if name in self._keepers:
            raise ValueError(f"a task named {name!r} is already supervised")
        keeper = self._keep(name, factory, policy)
        self._keepers[name] = self._create(keeper, f"supervise:{name}", asked=name)

    def spawn(self, name: str, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run the one-shot ``job`` as the task ``name``; its failure is logged (it is no
        long-lived task: nothing to restart). Leaving the supervisor waits for it."""
        task = self._create(self._once(name, job), name, asked=name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    def _create(
        self, coro: Coroutine[Any, Any, None], name: str, *, asked: str
    ) -> asyncio.Task[None]:
        if not self._entered or self._closing:
            coro.close()  # never awaited: no "coroutine was never awaited" warning
            state = "closing" if self._closing else "not entered"
            raise RuntimeError(
                f"supervisor is {state}: start task {asked!r} inside `async with supervisor`"
            )
        return self._group.create_task(coro, name=name)

    def task(self, name: str) -> asyncio.Task[Exception | None] | None:
        """The running task ``name`` (tests kill it to see the service say so)."""
        return self._running.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._keepers)

    async def stop(self, name: str) -> None:
        """Stop one task on purpose (not a death)."""
        keeper = self._keepers.pop(name, None)
        if keeper is None:
            return
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        self.deaths.pop(name, None)

    async def close(self) -> None:
        """Stop every task, newest first (a later task may use an earlier one), then wait
        for the one-shot jobs."""
        self._closing = True
        for name in reversed(list(self._keepers)):
            await self.stop(name)
        if self._jobs:
            await asyncio.wait(set(self._jobs))

    def problems(self) -> list[str]:
        """Each task that is down, or died recently, as a sentence for ``/readyz``."""
        now = time.monotonic()
        out = []
        for death in self.deaths.values():
            ago = now - death.at
            times = f"{death.deaths} time{'s' if death.deaths != 1 else ''}"
            if death.policy == "fatal":
                out.append(f"task {death.task} died: {death.reason}; the service is stopping")
            elif not death.running:
                out.append(f"task {death.task} died {ago:.0f}s ago ({times}): {death.reason}")
            elif ago < self.healthy_after_s:
                out.append(
                    f"task {death.task} died {ago:.0f}s ago ({times}): {death.reason}; restarted"
                )
        return out

    async def _keep(self, name: str, factory: TaskFactory, policy: Policy) -> None:
        delay = self.restart_min_s
        while True:
            # a task of the group, named as started; it returns its death rather than
            # raising it (a raise would cancel the whole group)
            task = self._group.create_task(_caught(factory), name=name)
            self._running[name] = task
            started = time.monotonic()
            if (death := self.deaths.get(name)) is not None:
                death.running = True
            try:
                # our own cancellation must not look like a death
                error = await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():  # we are being stopped: stop the task with us
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise
                if self._closing:
                    raise
                reason = "cancelled"
            else:
                if error is None:
                    reason = "returned, but should run until the service stops"
                    log.critical("task %s %s", name, reason)
                else:
                    reason = f"{type(error).__name__}: {error}"
                    log.critical("task %s died: %s", name, reason, exc_info=error)
            finally:
                self._running.pop(name, None)
            if reason == "cancelled":
                log.critical("task %s was cancelled by someone else", name)
            previous = self.deaths.get(name)
            self.deaths[name] = Death(
                name, reason, time.monotonic(), (previous.deaths if previous else 0) + 1,
                running=False, policy=policy,
            )  # fmt: skip
            self._report(self.on_failure, name, reason)
            if policy == "fatal":
                self._report(self.on_fatal, name, reason)
                return
            if time.monotonic() - started > self.healthy_after_s:
                delay = self.restart_min_s  # it ran well for a while: not a crash loop
            log.warning("restarting task %s in %.1fs", name, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.restart_max_s)

    @staticmethod
    async def _once(name: str, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except Exception:
            log.exception("task %s failed", name)

    @staticmethod
    def _report(callback: Callable[[str, str], None] | None, name: str, reason: str) -> None:
        if callback is None:
            return
        try:
            callback(name, reason)
        except Exception:
            log.exception("reporting the death of task %s failed", name)


async def _caught(factory: TaskFactory) -> Exception | None:
    """Run ``factory()``; its exception is the result (None: it returned)."""
    try:
        await factory()
    except Exception as exc:
        return exc
    return None
