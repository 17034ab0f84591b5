"""Fleet settings, validated up front with messages that say what to fix."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from devices.contract import DEFAULT_HEARTBEAT_S, HEARTBEAT_MAX_S
from devices.topics import DEFAULT_PREFIX
from simulators.errors import SimulatorError
from simulators.model import DEFAULT_FAULT_RATE

CONNECT_CONCURRENCY = 50
"""Connections in flight at once: all 412 devices are up within seconds, no SYN storm."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://host:port`` (port 1883 when omitted)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp"):
            raise SimulatorError(f"--broker {url!r}: use mqtt://host:port (TLS is not supported)")
        try:
            port = parts.port or 1883
        except ValueError:
            raise SimulatorError(f"--broker {url!r}: the port must be a number") from None
        if not parts.hostname:
            raise SimulatorError(f"--broker {url!r}: no host; use mqtt://host:port")
        return cls(parts.hostname, port)


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``: every count-th catalog device."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index_text, count_text = text.split("/")
            shard = cls(int(index_text), int(count_text))
        except ValueError:
            raise SimulatorError(f"--shard {text!r}: use i/n, e.g. 1/4") from None
        if not 1 <= shard.index <= shard.count:
            raise SimulatorError(f"--shard {text!r}: i must be between 1 and n")
        return shard

    def takes(self, position: int) -> bool:
        """Whether the device at 0-based catalog ``position`` belongs to this shard."""
        return position % self.count == self.index - 1


@dataclass(frozen=True, slots=True)
class FleetConfig:
    broker: BrokerAddress
    prefix: str = DEFAULT_PREFIX
    seed: int = 1
    speed: float = 1.0
    start: datetime | None = None  # sim start; None = now
    duration_s: float | None = None  # sim seconds of behaviour before HOLD
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    fault_rate: float = DEFAULT_FAULT_RATE
    shard: Shard = Shard()
    connect_concurrency: int = CONNECT_CONCURRENCY
    keepalive_s: int = 60

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise SimulatorError(f"--speed {self.speed}: must be > 0")
        if self.duration_s is not None and self.duration_s < 0:
            raise SimulatorError(f"--duration {self.duration_s}: must be >= 0 sim seconds")
        if not 1 <= self.heartbeat_s <= HEARTBEAT_MAX_S:
            raise SimulatorError(f"--heartbeat-s {self.heartbeat_s}: must be 1..{HEARTBEAT_MAX_S}")
        if self.fault_rate < 0:
            raise SimulatorError(f"--fault-rate {self.fault_rate}: must be >= 0 faults/day")
        if self.start is not None and self.start.tzinfo is None:
            raise SimulatorError("--start needs an offset, e.g. 2026-11-28T08:00:00+08:00")
        if self.connect_concurrency < 1:
            raise SimulatorError("connect_concurrency must be >= 1")
