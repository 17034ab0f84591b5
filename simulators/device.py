"""One simulated device on the wire: its own MQTT connection, Will, birth, status and events.

Three tasks in one TaskGroup per device:

- ``connection``: build a client whose Will is the death for the birth it will send,
  connect (bounded by the fleet's limiter), publish the birth, then the outbox in order
  (it starts with a fresh full status snapshot); on loss reconnect with capped, jittered backoff. It is
  the only task that assigns ``seq``, at publish time, so wire order is seq order.
- ``behaviour``: advance the model along the sim clock, queue its events and a status on
  every change; at the end of ``--duration`` freeze, queue a final snapshot, wait until
  everything queued is acknowledged, and set ``held``: from then on only heartbeats with
  the same content (new ``ts`` and ``seq``) follow.
- ``heartbeat``: queue a status whenever none went out for ``heartbeat_s`` wall seconds.

A graceful ``stop`` publishes the queued messages, then the death itself, then disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from devices.catalog import DeviceSpec
from devices.contract import DEFAULT_HEARTBEAT_S
from devices.topics import Channel, TopicScheme
from simulators import payloads
from simulators.backoff import Backoff
from simulators.cabinet import CabinetModel
from simulators.clock import SimClock
from simulators.errors import UnsupportedUnit
from simulators.model import Body, DeviceModel
from simulators.pile import PileModel
from simulators.rng import device_rng

log = logging.getLogger(__name__)

MAX_BACKLOG = 1000
"""Messages a device keeps while offline; later ones are dropped (and counted)."""

Recorder = Callable[[str, bool, str], None]
"""Called with (topic, retain, payload) for every publish the broker acknowledged."""


@dataclass(frozen=True, slots=True)
class SimContext:
    """What every device of a fleet shares."""

    host: str
    port: int
    clock: SimClock
    scheme: TopicScheme
    seed: int = 1
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    fault_rate: float = 0.0
    end: float | None = None  # sim epoch seconds at which behaviour freezes
    keepalive_s: int = 60
    timeout_s: float = 10.0
    connect_limiter: asyncio.Semaphore | None = None
    record: Recorder | None = None


@dataclass(frozen=True, slots=True)
class Outgoing:
    channel: Channel
    at: float  # sim epoch seconds: the device clock when it happened
    body: Body


def build_model(spec: DeviceSpec, ctx: SimContext) -> DeviceModel:
    rng = device_rng(ctx.seed, spec.id)
    model_type = PileModel if spec.kind == "pile" else CabinetModel
    return model_type(spec, rng, ctx.clock.start, fault_rate=ctx.fault_rate)


def _consume_disconnect_error(client: aiomqtt.Client) -> None:
    """Mark aiomqtt's disconnect error as seen: we already handled the loss, and a session
    torn down by another failure would otherwise log "exception was never retrieved"."""
    disconnected = client._disconnected  # private in aiomqtt 2.x; no public accessor
    if disconnected.done() and not disconnected.cancelled():
        disconnected.exception()


class SimDevice:
    """A device: ``await run()`` until ``stop()``; injections apply at once and publish."""

    def __init__(self, spec: DeviceSpec, ctx: SimContext) -> None:
        self.spec = spec
        self.id = spec.id
        self.kind = spec.kind
        self.ctx = ctx
        self.model = build_model(spec, ctx)
        self.model.drain()  # the first snapshot follows the birth anyway
        # The boot stream also depends on the start, so a restart with the default start
        # ("now") gets a new boot and the service does not mistake it for old news.
        self._boot_rng = device_rng(ctx.seed, spec.id, f"boot@{round(ctx.clock.start * 1000)}")
        self.boot = self._new_boot()
        self.topics: dict[Channel, str] = {
            ch: ctx.scheme.build(spec.id, ch) for ch in ("state", "status", "event")
        }
        self.born = asyncio.Event()  # the first birth was acknowledged
        self.held = asyncio.Event()  # behaviour froze and everything queued is acknowledged
        self.connected = False
        self.connects = 0
        self.published = 0
        self.dropped = 0
        self._seq = 0
        self._outbox: asyncio.Queue[Outgoing | None] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._offline_until = 0.0
        self._wake = asyncio.Event()
        self._last_status = time.monotonic()
        self._jitter = random.Random()  # wire timing only; not part of the seeded story

    def _new_boot(self) -> str:
        return f"{self._boot_rng.getrandbits(48):012x}"

    @property
    def seq(self) -> int:
        """The seq the next message of this boot will carry."""
        return self._seq

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._connection(), name=f"{self.id}:connection")
            tg.create_task(self._behaviour(), name=f"{self.id}:behaviour")
            tg.create_task(self._heartbeat(), name=f"{self.id}:heartbeat")

    def stop(self) -> None:
        """Ask for a graceful stop: publish what is queued, then the death, then disconnect."""
        if not self._stop.is_set():
            self._stop.set()
            self._wake.set()
            self._outbox.put_nowait(None)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was requested meanwhile."""
        if self._stop.is_set():
            return True
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    # -- connection ---------------------------------------------------------------------------

    def _make_client(self, will_seq: int) -> aiomqtt.Client:
        will = aiomqtt.Will(
            self.topics["state"], payloads.death(self.boot, will_seq), qos=1, retain=True
        )
        return aiomqtt.Client(
            self.ctx.host,
            self.ctx.port,
            identifier=self.id,
            username=self.id,
            protocol=aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=True,
            keepalive=self.ctx.keepalive_s,
            timeout=self.ctx.timeout_s,
            logger=logging.getLogger("simulators.mqtt"),
        )

    async def _connection(self) -> None:
        backoff = Backoff(rng=self._jitter)
        limiter: contextlib.AbstractAsyncContextManager[Any] = (
            self.ctx.connect_limiter or contextlib.nullcontext()
        )
        while not self._stop.is_set():
            offline = self._offline_until - time.monotonic()
            if offline > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(offline):
                        await self._wake.wait()  # restore_connection() or stop()
                if self._stop.is_set():
                    break
            will_seq = self._seq
            client = self._make_client(will_seq)
            lost: str | None = None
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with limiter:
                        await stack.enter_async_context(client)
                    backoff.reset()
                    self._client, self.connected = client, True
                    self.connects += 1
                    await self._session(client, will_seq)
            except* aiomqtt.MqttError as group:
                lost = "; ".join(str(exc) or type(exc).__name__ for exc in group.exceptions)
            finally:
                self._client, self.connected = None, False
                _consume_disconnect_error(client)
            if lost is None or self._stop.is_set():
                if lost is not None:
                    log.debug("%s: connection ended while stopping (%s)", self.id, lost)
                break
            delay = backoff.next_delay()
            log.warning(
                "%s: connection failed or lost (%s); reconnect attempt %d in %.2fs",
                self.id,
                lost,
                backoff.attempt,
                delay,
            )
            if await self._sleep(delay):
                break

    async def _session(self, client: aiomqtt.Client, will_seq: int) -> None:
        self._requeue_for_session()
        assert self._seq == will_seq, "the birth must carry the seq its Will names"
        async with asyncio.TaskGroup() as tg:
            # The watcher ends the session the moment the connection drops, even while a
            # publish waits for its PUBACK.
            watcher = tg.create_task(self._watch(client), name=f"{self.id}:watch")
            birth = payloads.birth_body(self.model.birth_fields(), self.ctx.heartbeat_s)
            await self._send(client, "state", self.ctx.clock.now(), birth)
            self.born.set()
            await self._publish_outbox(client, will_seq)
            watcher.cancel()

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Raise MqttError as soon as the connection drops, even when nothing is publishing."""
        async for message in client.messages:  # we subscribe to nothing; this only waits
            log.debug("%s: unexpected message on %s", self.id, message.topic)

    async def _publish_outbox(self, client: aiomqtt.Client, will_seq: int) -> None:
        while True:
            item = await self._outbox.get()
            try:
                if item is None:  # graceful stop: the same death the Will carries
                    text = payloads.death(self.boot, will_seq)
                    await self._publish_text(client, "state", text)
                    return
                await self._send(client, item.channel, item.at, item.body)
            finally:
                self._outbox.task_done()

    async def _send(self, client: aiomqtt.Client, channel: Channel, at: float, body: Body) -> None:
        seq = self._seq
        self._seq += 1  # taken even if the publish fails: the broker may have it
        text = payloads.message(self.kind, at, self.boot, seq, body)
        await self._publish_text(client, channel, text)
        if channel == "status":
            self._last_status = time.monotonic()

    async def _publish_text(self, client: aiomqtt.Client, channel: Channel, text: str) -> None:
        topic, retain = self.topics[channel], channel != "event"
        await client.publish(topic, text, qos=1, retain=retain)
        self.published += 1
        if self.ctx.record is not None:
            self.ctx.record(topic, retain, text)

    def _requeue_for_session(self) -> None:
        """Before a birth: a fresh snapshot first, then the events still waiting (statuses
        from before the connection are stale and dropped), then a pending stop."""
        waiting: list[Outgoing | None] = []
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            self._outbox.task_done()
            if item is None or item.channel == "event":
                waiting.append(item)
        self._outbox.put_nowait(Outgoing("status", self.ctx.clock.now(), self.model.snapshot()))
        for item in waiting:
            self._outbox.put_nowait(item)

    def drop_connection(self, offline_s: float = 0.0) -> bool:
        """Cut the connection without a goodbye (the broker sends the Will); stay offline
        ``offline_s`` wall seconds, then reconnect within the same boot. False if offline."""
        client = self._client
        if client is None:
            return False
        self._offline_until = time.monotonic() + offline_s
        self._wake.clear()
        sock = client._client.socket()  # aiomqtt keeps the paho client private
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        return True

    def restore_connection(self) -> None:
        """End an offline period from ``drop_connection`` now: reconnect (same boot)."""
        self._offline_until = 0.0
        self._wake.set()

    # -- behaviour ----------------------------------------------------------------------------

    def _enqueue(self, channel: Channel, at: float, body: Body) -> None:
        if self._stop.is_set():
            return
        if self._outbox.qsize() >= MAX_BACKLOG:  # offline for long: like firmware, forget
            self.dropped += 1
            return
        self._outbox.put_nowait(Outgoing(channel, at, body))

    def _advance(self) -> float:
        """Bring the model up to now (or to the frozen end); returns sim now."""
        now = self.ctx.clock.now()
        end = self.ctx.end
        self.model.advance_to(now if end is None else min(now, end))
        return now

    def _sync(self, now: float) -> None:
        drained = self.model.drain()
        for event in drained.events:
            self._enqueue("event", event.at, event.body)
        if drained.changed:
            self._enqueue("status", now, self.model.snapshot())

    async def _behaviour(self) -> None:
        clock, end = self.ctx.clock, self.ctx.end
        tick = min(1.0, max(0.2, clock.wall_seconds(30.0)))
        while True:
            now = self._advance()
            self._sync(now)
            if end is not None and now >= end:
                break
            if await self._sleep(tick):
                return
        # Power, energy and soc move every step without being a "change"; publish the frozen
        # state now, so that nothing a later heartbeat says differs from the log at HOLD.
        self._enqueue("status", now, self.model.snapshot())
        async with asyncio.TaskGroup() as tg:  # wait until all of it is acknowledged
            flushed = tg.create_task(self._outbox.join(), name=f"{self.id}:flush")
            stopped = tg.create_task(self._stop.wait(), name=f"{self.id}:stopped")
            await asyncio.wait((flushed, stopped), return_when=asyncio.FIRST_COMPLETED)
            flushed.cancel()
            stopped.cancel()
        if not self._stop.is_set():
            self.held.set()

    async def _heartbeat(self) -> None:
        # Each device beats a little faster than required, at its own pace, so that devices
        # which connected together drift apart instead of beating in bursts.
        heartbeat = self.ctx.heartbeat_s * self._jitter.uniform(0.8, 0.95)
        while True:
            wait = self._last_status + heartbeat - time.monotonic()
            if wait > 0:
                if await self._sleep(wait):
                    return
                continue
            if self.connected:
                self._enqueue("status", self.ctx.clock.now(), self.model.snapshot())
            self._last_status = time.monotonic()

    # -- injections (for tests and demos; they apply even after behaviour froze) ---------------

    def _apply(self, change: Callable[[float], Any]) -> Any:
        now = self._advance()
        result = change(now)
        self._sync(now)
        return result

    def _pile(self) -> PileModel:
        if not isinstance(self.model, PileModel):
            raise UnsupportedUnit(f"{self.id} is a {self.kind}; only piles have that")
        return self.model

    def _cabinet(self) -> CabinetModel:
        if not isinstance(self.model, CabinetModel):
            raise UnsupportedUnit(f"{self.id} is a {self.kind}; only cabinets have that")
        return self.model

    def inject_fault(self, code: str, unit: int | None = None) -> None:
        """Raise fault ``code`` on the device or on port/slot ``unit`` until cleared."""
        self._apply(lambda now: self.model.inject_fault(code, unit, now))

    def clear_fault(self, code: str, unit: int | None = None) -> None:
        self._apply(lambda now: self.model.clear_fault(code, unit, now))

    def set_temperature(self, unit: int | None, temp_c: float | None) -> None:
        """Pin the reported temperature of the device (unit None) or a slot; None unpins."""
        self._apply(lambda now: self.model.set_temperature(unit, temp_c))

    def set_smoke(self, on: bool) -> None:
        cabinet = self._cabinet()
        self._apply(lambda now: cabinet.set_smoke(on, now))

    def set_door(self, open_: bool) -> None:
        cabinet = self._cabinet()
        self._apply(lambda now: cabinet.set_door(open_, now))

    def set_port_power(self, unit: int, watts: float | None) -> None:
        """Pin the power a charging port reports; None unpins (0 W: stuck charging)."""
        pile = self._pile()
        self._apply(lambda now: pile.set_port_power(unit, watts))

    def rewind_energy(self, unit: int, wh: float) -> None:
        """Make a charging port's energy counter go back by ``wh`` in the next snapshot."""
        pile = self._pile()
        self._apply(lambda now: pile.rewind_energy(unit, wh))

    def set_slot_soc(self, unit: int, soc: float | None) -> None:
        """Force the soc a slot reports; None unpins (its state keeps the pack's own soc)."""
        cabinet = self._cabinet()
        self._apply(lambda now: cabinet.set_slot_soc(unit, soc))

    def take_battery(self, unit: int) -> str:
        cabinet = self._cabinet()
        battery: str = self._apply(lambda now: cabinet.take_battery(unit))
        return battery

    def insert_battery(self, unit: int, soc: float, battery: str | None = None) -> str:
        cabinet = self._cabinet()
        inserted: str = self._apply(lambda now: cabinet.insert_battery(unit, soc, battery))
        return inserted

    async def settle(self) -> None:
        """Wait until everything queued so far is published and acknowledged."""
        await self._outbox.join()
