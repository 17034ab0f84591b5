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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

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
        self._running: dict[str, asyncio.Task[None]] = {}  # the task itself, by name
        self._keepers: dict[str, asyncio.Task[None]] = {}  # its supervising loop
        self._closing = False

    def start(self, name: str, factory: TaskFactory, *, policy: Policy = "restart") -> None:
        """Run ``factory()`` as the task ``name`` until ``stop`` or ``close``."""
        if name in self._keepers:
            raise ValueError(f"a task named {name!r} is already supervised")
        self._keepers[name] = asyncio.create_task(
            self._keep(name, factory, policy), name=f"supervise:{name}"
        )

    def task(self, name: str) -> asyncio.Task[None] | None:
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
        """Stop every task, newest first (a later task may use an earlier one)."""
        self._closing = True
        for name in reversed(list(self._keepers)):
            await self.stop(name)

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
            task = asyncio.create_task(factory(), name=name)
            self._running[name] = task
            started = time.monotonic()
            if (death := self.deaths.get(name)) is not None:
                death.running = True
            try:
                await asyncio.shield(task)  # our own cancellation must not look like a death
                reason = "returned, but should run until the service stops"
            except asyncio.CancelledError:
                if not task.done():  # we are being stopped: stop the task with us
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    raise
                if self._closing:
                    raise
                reason = "cancelled"
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.critical("task %s died: %s", name, reason, exc_info=exc)
            else:
                log.critical("task %s %s", name, reason)
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
    def _report(callback: Callable[[str, str], None] | None, name: str, reason: str) -> None:
        if callback is None:
            return
        try:
            callback(name, reason)
        except Exception:
            log.exception("reporting the death of task %s failed", name)
