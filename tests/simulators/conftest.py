"""Fixtures for the simulator tests: the catalog, a plain paho subscriber, async polling."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import Catalog
from simulators.config import BrokerAddress, FleetConfig

T = TypeVar("T")

#: A fixed start: Saturday 2026-11-28 11:00 in Hefei, the lunch peak.
START = datetime.fromisoformat("2026-11-28T11:00:00+08:00")


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load()


def pick(catalog: Catalog, piles: int, cabinets: int) -> list[str]:
    """The first ``piles`` piles and ``cabinets`` cabinets of the catalog."""
    devices = list(catalog.devices.values())
    chosen = [d.id for d in devices if d.kind == "pile"][:piles]
    return chosen + [d.id for d in devices if d.kind == "cabinet"][:cabinets]


def fleet_config(port: int, **overrides: Any) -> FleetConfig:
    settings: dict[str, Any] = {
        "broker": BrokerAddress("127.0.0.1", port),
        "seed": 7,
        "speed": 600.0,
        "start": START,
        "fault_rate": 0.0,
    }
    settings.update(overrides)
    return FleetConfig(**settings)


async def eventually(check: Callable[[], T], seconds: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``check`` without blocking the event loop until it stops raising AssertionError."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


async def within(awaitable: Awaitable[T], seconds: float = 15.0) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool

    @property
    def device_id(self) -> str:
        return self.topic.split("/")[-2]

    @property
    def channel(self) -> str:
        return self.topic.split("/")[-1]

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.payload)
        return data


class Subscriber:
    """A plain paho client (its own thread) that records everything under ``topic``."""

    def __init__(self, port: int, topic: str = "cw/v1/#") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = lambda client, *args: client.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("subscriber did not get its SUBACK")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def of(self, device_id: str) -> list[Received]:
        return [m for m in self.snapshot() if m.device_id == device_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribe() -> Iterator[Callable[[int], Subscriber]]:
    """Start subscribers on a broker port; all are closed after the test."""
    opened: list[Subscriber] = []

    def start(port: int) -> Subscriber:
        sub = Subscriber(port)
        opened.append(sub)
        return sub

    yield start
    for sub in opened:
        sub.close()


def read_truth(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
