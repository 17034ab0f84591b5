"""Fleet settings, validated up front with messages that say what to fix."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
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
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """``mqtt://host:port`` (port 1883 when omitted) or ``mqtts://host:port`` (TLS, 8883).
        Each device brings its own username (its id) and password (``--credentials``)."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
            raise SimulatorError(f"--broker {url!r}: use mqtt://host:port or mqtts://host:port")
        if parts.username or parts.password:
            raise SimulatorError(
                "--broker: no user in the URL; each device logs in as itself (--credentials)"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise SimulatorError(f"--broker {url!r}: the port must be a number") from None
        if not parts.hostname:
            raise SimulatorError(f"--broker {url!r}: no host; use mqtt://host:port")
        return cls(parts.hostname, port, tls)


def load_passwords(path: Path) -> dict[str, str]:
    """The devices' passwords from ``credentials.json`` (``chargewatch broker-config``):
    ``{"devices": {"<id>": "<password>", …}, …}``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SimulatorError(f"--credentials {path}: {exc.strerror}") from None
    except ValueError:
        raise SimulatorError(f"--credentials {path}: not JSON") from None
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in devices.items()
    ):
        raise SimulatorError(
            f'--credentials {path}: expected {{"devices": {{"<id>": "<password>", …}}}}'
        )
    return devices


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
    # device id -> password (None: connect with the username only)
    passwords: Mapping[str, str] | None = field(default=None, repr=False)
    cafile: Path | None = None  # verifies an mqtts:// broker (None: the system's CAs)

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
        if self.cafile is not None and not self.broker.tls:
            raise SimulatorError("--cafile is for TLS: use an mqtts:// broker")
        if self.connect_concurrency < 1:
            raise SimulatorError("connect_concurrency must be >= 1")
