"""The fleet: every catalog device (or one shard of them) from one process.

``async with Fleet(catalog, config, truth=...) as fleet`` starts all devices in one
TaskGroup (connecting at most ``connect_concurrency`` at a time); leaving the block stops
them gracefully (each publishes its death). ``await fleet.ready()`` returns once every
device's birth was acknowledged, ``await fleet.hold()`` once behaviour froze at the end of
``duration_s`` and everything is acknowledged (the ``{"hold": true}`` line is then in the
truth log). Injections (``inject_fault``, ``set_smoke``, ...) take a device id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from types import TracebackType
from typing import Self

from devices.catalog import Catalog
from devices.topics import TopicScheme
from simulators.clock import SimClock
from simulators.config import FleetConfig
from simulators.device import FleetStats, SimContext, SimDevice
from simulators.errors import SimulatorError, UnknownDevice
from simulators.truth import TruthLog

log = logging.getLogger(__name__)


def _tls_context(config: FleetConfig) -> ssl.SSLContext | None:
    """One context for every device's connection: verifies the broker's certificate."""
    if not config.broker.tls:
        return None
    try:
        return ssl.create_default_context(cafile=config.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise SimulatorError(f"--cafile {config.cafile}: {exc}") from None


class Fleet:
    def __init__(
        self,
        catalog: Catalog,
        config: FleetConfig,
        *,
        truth: TruthLog | None = None,
        only: list[str] | None = None,
    ) -> None:
        self.config = config
        self.truth = truth
        self.clock = SimClock(config.start, config.speed)
        end = None if config.duration_s is None else self.clock.start + config.duration_s
        self.context = SimContext(
            host=config.broker.host,
            port=config.broker.port,
            clock=self.clock,
            scheme=TopicScheme(config.prefix),
            seed=config.seed,
            heartbeat_s=config.heartbeat_s,
            fault_rate=config.fault_rate,
            end=end,
            keepalive_s=config.keepalive_s,
            connect_limiter=asyncio.Semaphore(config.connect_concurrency),
            passwords=config.passwords,
            ssl=_tls_context(config),
            record=truth.record if truth is not None else None,
        )
        chosen = [
            device
            for position, device in enumerate(catalog.devices.values())
            if config.shard.takes(position) and (only is None or device.id in only)
        ]
        if only is not None:
            missing = sorted(set(only) - {d.id for d in chosen})
            if missing:
                raise UnknownDevice(f"not in this catalog/shard: {', '.join(missing)}")
        if config.passwords is not None:
            without = sorted(d.id for d in chosen if d.id not in config.passwords)
            if without:
                shown = ", ".join(without[:5]) + (" …" if len(without) > 5 else "")
                raise SimulatorError(
                    f"{len(without)} devices have no password in the credentials: {shown}"
                    " (run chargewatch broker-config again for this catalog)"
                )
        self.devices: dict[str, SimDevice] = {d.id: SimDevice(d.spec, self.context) for d in chosen}
        self._held = asyncio.Event()
        self._hold_task: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()

    def __len__(self) -> int:
        return len(self.devices)

    def device(self, device_id: str) -> SimDevice:
        try:
            return self.devices[device_id]
        except KeyError:
            raise UnknownDevice(f"{device_id!r} is not run by this fleet") from None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._stack.callback(self.stop)  # runs before the TaskGroup waits for the devices
        for device in self.devices.values():
            tg.create_task(device.run(), name=f"device:{device.id}")
        if self.context.end is not None:
            self._hold_task = tg.create_task(self._hold(), name="fleet:hold")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self.context.timers.close()  # the stopped devices' last wake-ups

    def stop(self) -> None:
        """Graceful stop of every device (deaths published); ``__aexit__`` waits for it."""
        for device in self.devices.values():
            device.stop()
        if self._hold_task is not None and not self._held.is_set():
            self._hold_task.cancel()  # a stopped device never reaches the hold

    async def ready(self) -> None:
        """Return once every device's first birth was acknowledged."""
        await asyncio.gather(*(d.born.wait() for d in self.devices.values()))

    async def hold(self) -> None:
        """Return once behaviour froze after ``duration_s`` and the log has the hold line."""
        await self._held.wait()

    async def _hold(self) -> None:
        await self.ready()
        await asyncio.gather(*(d.held.wait() for d in self.devices.values()))
        if self.truth is not None:
            assert self.context.end is not None
            self.truth.record_hold(
                sim_time=self.context.end,
                devices=len(self.devices),
                seed=self.config.seed,
            )
            await self.truth.flush()
        log.info("behaviour frozen at sim %s for %d devices", self.context.end, len(self))
        self._held.set()

    async def settle(self) -> None:
        """Wait until every device published (and the broker acknowledged) what it queued."""
        await asyncio.gather(*(d.settle() for d in self.devices.values()))

    # -- stats --------------------------------------------------------------------------------

    @property
    def stats(self) -> FleetStats:
        """Born, connected and published counts, and the heartbeat lag, kept as they change."""
        return self.context.stats

    @property
    def published(self) -> int:
        return self.context.stats.published

    @property
    def born(self) -> int:
        """Devices whose first birth was acknowledged."""
        return self.context.stats.born

    @property
    def connected(self) -> int:
        return self.context.stats.connected

    # -- injections ---------------------------------------------------------------------------

    def inject_fault(self, device_id: str, code: str, unit: int | None = None) -> None:
        """Raise fault ``code`` on a device (unit None) or one port/slot, until cleared."""
        self.device(device_id).inject_fault(code, unit)

    def clear_fault(self, device_id: str, code: str, unit: int | None = None) -> None:
        self.device(device_id).clear_fault(code, unit)

    def set_smoke(self, device_id: str, on: bool) -> None:
        """Cabinet smoke detector: ``smoke: true`` in status and a ``smoke`` fault event."""
        self.device(device_id).set_smoke(on)

    def set_door(self, device_id: str, open_: bool) -> None:
        """Cabinet maintenance door: ``door_open`` and door_opened/door_closed events."""
        self.device(device_id).set_door(open_)

    def set_temperature(self, device_id: str, unit: int | None, temp_c: float | None) -> None:
        """Pin ``temp_c`` of a device (unit None) or a cabinet slot; None unpins it."""
        self.device(device_id).set_temperature(unit, temp_c)

    def set_port_power(self, device_id: str, port: int, watts: float | None) -> None:
        """Pin the power a charging pile port reports; None unpins (0 W: stuck charging)."""
        self.device(device_id).set_port_power(port, watts)

    def rewind_energy(self, device_id: str, port: int, wh: float) -> None:
        """A charging port's energy counter goes back by ``wh`` in the next snapshot."""
        self.device(device_id).rewind_energy(port, wh)

    def set_slot_soc(self, device_id: str, slot: int, soc: float | None) -> None:
        """Force the soc a cabinet slot reports, e.g. a ``ready`` slot below the release
        level; None unpins."""
        self.device(device_id).set_slot_soc(slot, soc)

    def take_battery(self, device_id: str, unit: int) -> str:
        """Pull the pack out of a cabinet slot; returns its id."""
        return self.device(device_id).take_battery(unit)

    def insert_battery(
        self, device_id: str, unit: int, soc: float, battery: str | None = None
    ) -> str:
        """Put a pack into an empty cabinet slot; returns its id."""
        return self.device(device_id).insert_battery(unit, soc, battery)

    def drop_connection(self, device_id: str, offline_s: float = 0.0) -> bool:
        """Cut a device's connection without a goodbye; the broker delivers its Will."""
        return self.device(device_id).drop_connection(offline_s)

    def restore_connection(self, device_id: str) -> None:
        """Bring a dropped device back before its offline time is over (same boot)."""
        self.device(device_id).restore_connection()
