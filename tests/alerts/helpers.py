"""Drive an AlertEngine in-process: decoded contract messages applied to twins, a fake clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from devices.catalog import Catalog
from devices.contract import decode
from ingest.alerts.config import AlertsConfig, WebhookOptions
from ingest.alerts.engine import AlertEngine
from ingest.alerts.model import Alert
from ingest.alerts.store import AlertStore
from ingest.pipeline import Twins
from ingest.twins import Outcome

CATALOG = Catalog.load()
T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.ms = 1_796_284_800_000  # 2026-11-28T12:00:00+08:00: every station is open

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


def config(**overrides: Any) -> AlertsConfig:
    base: dict[str, Any] = {
        "tick_s": 3600,  # the tests call tick() themselves, on the fake clock
        "startup_grace_s": 0,
        "verify_s": 60,
        "webhooks": WebhookOptions(backoff_s=0.01, attempts=4, timeout_s=2),
    }
    base.update(overrides)
    return AlertsConfig(**base)


@asynccontextmanager
async def running(
    data_dir: Path, clock: Clock, cfg: AlertsConfig | None = None, twins: Twins | None = None
) -> AsyncIterator[AlertEngine]:
    store = AlertStore.in_dir(data_dir)
    engine = AlertEngine(cfg or config(), CATALOG, twins or Twins(CATALOG), store, clock=clock)
    try:
        async with engine:
            yield engine
            await engine.notifier.idle()
    finally:
        store.close()


class Device:
    """A hand-driven device feeding the engine like the pipeline does."""

    def __init__(
        self, engine: AlertEngine, clock: Clock, device_id: str, boot: str = "b00t"
    ) -> None:
        self.engine, self.clock, self.id, self.boot = engine, clock, device_id, boot
        self.kind = CATALOG.devices[device_id].kind
        self.units = CATALOG.devices[device_id].spec.units
        self.seq = 0
        self.birth_seq = 0

    def _send(self, channel: str, body: dict[str, Any], *, retained: bool = False) -> None:
        payload = {"v": 1, "boot": self.boot, "seq": self.seq, **body}
        if "online" not in body or body["online"]:
            payload.setdefault("ts", self.clock())  # device time: ours, unless a test says
        self.seq += 1
        msg = decode(channel, json.dumps(payload).encode())  # type: ignore[arg-type]
        twin = self.engine.twins[self.id]
        assert twin.apply(msg, self.clock(), retained=retained) is Outcome.APPLIED
        self.engine.observe(twin.snapshot(), msg, self.clock())  # as the pipeline does

    def birth(self, heartbeat_s: int = 30) -> None:
        self.birth_seq = self.seq
        units = {"ports": self.units} if self.kind == "pile" else {"slots": self.units}
        self._send(
            "state", {"online": True, "kind": self.kind, "heartbeat_s": heartbeat_s, **units}
        )

    def death(self) -> None:
        self._send("state", {"online": False, "seq": self.birth_seq})
        self.seq -= 1  # a death carries its birth's seq, not a new one

    def pile(
        self, faults: dict[int, str] | None = None, *, retained: bool = False, **extra: Any
    ) -> None:
        faults = faults or {}
        ports = [
            {"n": n, "state": "faulted", "fault": faults[n]}
            if n in faults
            else {"n": n, "state": "available"}
            for n in range(1, self.units + 1)
        ]
        self._send("status", {"kind": "pile", "ports": ports, **extra}, retained=retained)

    def pile_ports(self, ports: list[dict[str, Any]], **extra: Any) -> None:
        rest = [{"n": n, "state": "available"} for n in range(len(ports) + 1, self.units + 1)]
        self._send("status", {"kind": "pile", "ports": ports + rest, **extra})

    def cabinet(self, slots: dict[int, dict[str, Any]] | None = None, **extra: Any) -> None:
        slots = slots or {}
        body = [
            {
                "n": n,
                "state": "ready",
                "battery": f"B-{n}",
                "soc": 95,
                "temp_c": 30.0,
                **slots.get(n, {}),
            }
            for n in range(1, self.units + 1)
        ]
        self._send("status", {"kind": "cabinet", "slots": body, **extra})

    def event(self, type_: str, **fields: Any) -> None:
        self._send("event", {"type": type_, **fields})


def active(engine: AlertEngine, **match: Any) -> list[Alert]:
    return [a for a in engine.by_id.values() if all(getattr(a, k) == v for k, v in match.items())]


async def eventually(check: Callable[[], T | Awaitable[T]], within_s: float = 5.0) -> T:
    """Bounded polling on the loop (the engine and notifier keep running meanwhile)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            return result  # type: ignore[return-value]
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)
