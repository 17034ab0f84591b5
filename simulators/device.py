"""One simulated device on the wire: its own MQTT connection, Will, birth, status and events.

One task per device, and two timers on the fleet's ``TimerWheel``:

- the task (``run``) owns the connection: build the Will (the death for the birth it will
  send), connect (bounded by the fleet's limiter), publish the birth, then the outbox in
  order (it starts with a fresh full status snapshot); on loss reconnect with capped,
  jittered backoff. Publishing is a synchronous write on the ``Link`` (``simulators.mqtt``)
  with at most ``INFLIGHT`` message(s) unacknowledged; ``seq`` is assigned at that write, so
  wire order is seq order. A message counts as published (and goes to the truth log) when
  the broker acknowledged it and everything before it.
- the behaviour timer fires at the model's next step (plus this device's phase, at least
  ``MIN_TICK_S`` apart): advance the model along the sim clock, queue its events and a
  status on every change; at the end of ``--duration`` freeze, queue a final snapshot and
  set ``held`` once everything queued is acknowledged: from then on only heartbeats with
  the same content (new ``ts`` and ``seq``) follow.
- the heartbeat timer queues a status whenever none went out for ``heartbeat_s`` wall
  seconds (times 0.8-0.95, this device's own pace).

A graceful ``stop`` publishes the queued messages, then the death itself, then disconnects.

Commands (contract v1.1): every connection subscribes to the device's own ``cmd`` topic. A
command is answered with a ``command_result`` event, then a fresh status that shows its
effect; one whose ``expires`` has passed (by the wall clock, as firmware set by NTP) is
ignored; an id seen before gets the answer it got then, without acting again (kept across
reboots, as firmware keeps it in flash). ``reboot`` publishes the death, disconnects and
comes back as a new boot (seq 0); ``resend`` disconnects gracefully (the broker drops the
Will) and reconnects within the boot: a fresh birth, whose seq the new Will names, and a
fresh status. A birth on the same connection would leave the Will naming an older birth,
which the service then ignores as stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from devices.catalog import DeviceSpec
from devices.contract import (
    COMMAND_KIND,
    COMMAND_UNIT,
    DEFAULT_HEARTBEAT_S,
    Command,
    ContractError,
    command_id,
    decode_command,
)
from devices.topics import Channel, TopicScheme
from simulators import payloads
from simulators.backoff import Backoff
from simulators.cabinet import CabinetModel
from simulators.clock import SimClock
from simulators.errors import LockFailed, SimulatorError, UnsupportedUnit
from simulators.model import STEP_S, Body, DeviceModel
from simulators.mqtt import Link, MqttError, Will, publish_topic
from simulators.pile import PileModel
from simulators.rng import device_rng
from simulators.timers import TimerWheel

log = logging.getLogger(__name__)

MAX_BACKLOG = 1000
"""Messages a device keeps while offline; later ones are dropped (and counted)."""

INFLIGHT = 1
"""Unacknowledged QoS 1 messages per connection; more wait in the outbox. One, like many
embedded MQTT clients (and aiomqtt's awaited publish before): a burst of injections reaches
the service a round trip apart. With 10, back-to-back statuses of one device in one ingest
batch made test_ready_low_soc count its alert twice in about half the runs (an ingest
issue, reported; the wire was right)."""

MIN_TICK_S = 0.2
"""Shortest wall time between two behaviour updates of a device (at high ``--speed`` one
update runs several model steps)."""

ANSWERS_KEPT = 1000
"""Command ids a device remembers with their answers (the service resends a command until
it expires, at most a day)."""

Recorder = Callable[[str, bool, str], None]
"""Called with (topic, retain, payload) for every publish the broker acknowledged."""


@dataclass(slots=True)
class FleetStats:
    """Counters of a whole fleet, kept by its devices (reading them costs nothing)."""

    born: int = 0  # devices whose first birth was acknowledged
    connected: int = 0
    published: int = 0  # messages the broker acknowledged
    lag_max_s: float = 0.0  # the latest a heartbeat was queued after it was due

    def take_lag(self) -> float:
        """The largest heartbeat lag since the last call."""
        lag, self.lag_max_s = self.lag_max_s, 0.0
        return lag


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
    passwords: Mapping[str, str] | None = None  # device id -> its broker password
    ssl: ssl.SSLContext | None = None  # TLS to the broker
    record: Recorder | None = None
    stats: FleetStats = field(default_factory=FleetStats)
    timers: TimerWheel = field(default_factory=TimerWheel)


@dataclass(frozen=True, slots=True)
class Outgoing:
    channel: Channel
    at: float  # sim epoch seconds: the device clock when it happened
    body: Body


@dataclass(frozen=True, slots=True)
class _Reconnect:
    """In the outbox after a command's result: end this connection gracefully once
    everything before it is acknowledged, and connect again (``new_boot``: as a new boot,
    publishing the death first)."""

    new_boot: bool


@dataclass(slots=True)
class _Sent:
    """A message on the wire, waiting for its PUBACK."""

    topic: str
    retain: bool
    text: str
    role: str = ""  # "birth" or "death": what its acknowledgement means
    acked: bool = False


def build_model(spec: DeviceSpec, ctx: SimContext) -> DeviceModel:
    rng = device_rng(ctx.seed, spec.id)
    model_type = PileModel if spec.kind == "pile" else CabinetModel
    return model_type(spec, rng, ctx.clock.start, fault_rate=ctx.fault_rate)


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
        self._cmd_topic = ctx.scheme.build(spec.id, "cmd")
        self._wire_topics = {ch: publish_topic(t) for ch, t in self.topics.items()}
        self.born = asyncio.Event()  # the first birth was acknowledged
        self.held = asyncio.Event()  # behaviour froze and everything queued is acknowledged
        self.connected = False
        self.connects = 0
        self.published = 0
        self.dropped = 0
        self._seq = 0
        self._birth_seq = 0  # of the current connection: what its Will names
        # None: the graceful stop
        self._outbox: deque[Outgoing | _Reconnect | None] = deque()
        self._reconnect: _Reconnect | None = None  # taken from the outbox, in progress
        # command id -> (result, info): a repeated id gets the same answer
        self._answers: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._after_done: dict[str, Callable[[], None]] = {}  # reboot/resend, after the answer
        self.commands_ignored = 0  # expired or unreadable: not answered
        self.reboots = 0
        self._inflight: dict[int, _Sent] = {}  # packet id -> message, in publish order
        self._settled = asyncio.Event()  # nothing queued, nothing unacknowledged
        self._settled.set()
        self._frozen = False
        self._stop = asyncio.Event()
        self._link: Link | None = None
        self._offline_until = 0.0
        self._wake = asyncio.Event()
        self._last_status = time.monotonic()
        self._jitter = random.Random()  # wire timing only; not part of the seeded story
        # Each device beats a little faster than required, at its own pace, so that devices
        # which connected together drift apart instead of beating in bursts; and it updates
        # its model a little after each step, at its own phase, for the same reason.
        self._beat_s = ctx.heartbeat_s * self._jitter.uniform(0.8, 0.95)
        self._phase_s = self._jitter.uniform(0.0, min(1.0, ctx.clock.wall_seconds(STEP_S)))

    def _new_boot(self) -> str:
        return f"{self._boot_rng.getrandbits(48):012x}"

    @property
    def seq(self) -> int:
        """The seq the next message of this boot will carry."""
        return self._seq

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._arm_behaviour()
        self._last_status = time.monotonic()
        self.ctx.timers.call_later(self._beat_s, self._heartbeat)
        await self._connection()

    def stop(self) -> None:
        """Ask for a graceful stop: publish what is queued, then the death, then disconnect."""
        if self._stop.is_set():
            return
        self._stop.set()  # the behaviour and heartbeat timers see it and end
        self._wake.set()
        self._outbox.append(None)
        self._settled.clear()
        link = self._link
        if link is not None:  # a broker that never acknowledges the death: cut it
            self.ctx.timers.call_later(self.ctx.timeout_s, link.abort)
        self._pump()

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

    async def _connect(self, will_seq: int) -> Link:
        will = Will(self.topics["state"], payloads.death(self.boot, will_seq).encode())
        limiter: contextlib.AbstractAsyncContextManager[Any] = (
            self.ctx.connect_limiter or contextlib.nullcontext()
        )
        async with limiter:
            return await Link.connect(
                self.ctx.host,
                self.ctx.port,
                self.id,
                on_ack=self._on_ack,
                on_message=self._on_message,
                keepalive_s=self.ctx.keepalive_s,
                will=will,
                username=self.id,
                password=self.ctx.passwords.get(self.id) if self.ctx.passwords else None,
                ssl=self.ctx.ssl,
                timeout_s=self.ctx.timeout_s,
                call_later=self.ctx.timers.call_later,
            )

    async def _connection(self) -> None:
        backoff = Backoff(rng=self._jitter)
        while not self._stop.is_set():
            offline = self._offline_until - time.monotonic()
            if offline > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(offline):
                        await self._wake.wait()  # restore_connection() or stop()
                if self._stop.is_set():
                    break
            will_seq = self._seq
            lost: str | None
            try:
                link = await self._connect(will_seq)
            except MqttError as exc:
                lost = str(exc) or type(exc).__name__
            else:
                backoff.reset()
                lost = await self._session(link, will_seq)
            if self._reconnect is not None and not self._stop.is_set():
                if self._reconnect.new_boot:  # reboot: a new boot, its seq starts at 0
                    self.boot, self._seq = self._new_boot(), 0
                    self.reboots += 1
                self._reconnect = None
                if lost is None:
                    continue  # ended on purpose: connect again at once
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

    async def _session(self, link: Link, will_seq: int) -> str | None:
        """Birth, then the outbox until the connection ends; None after a graceful stop."""
        self._link, self.connected = link, True
        self.connects += 1
        self.ctx.stats.connected += 1
        try:
            self._requeue_for_session()
            link.subscribe(self._cmd_topic)
            assert self._seq == will_seq, "the birth must carry the seq its Will names"
            birth = payloads.birth_body(self.model.birth_fields(), self.ctx.heartbeat_s)
            self._send("state", self.ctx.clock.now(), birth, role="birth")
            self._pump()
            return await link.closed
        except asyncio.CancelledError:
            link.abort()
            raise
        finally:
            self._link, self.connected = None, False
            self.ctx.stats.connected -= 1
            self._inflight.clear()  # never acknowledged: lost with the connection
            self._check_settled()

    def _pump(self) -> None:
        """Write queued messages while the in-flight window has room."""
        link = self._link
        if link is None or not link.is_open:
            return
        while self._outbox and len(self._inflight) < INFLIGHT:
            item = self._outbox.popleft()
            if item is None:  # graceful stop: the same death the Will carries
                self._outbox.clear()
                self._publish_text("state", payloads.death(self.boot, self._birth_seq), "death")
                return
            if isinstance(item, _Reconnect):
                self._reconnect = item
                if item.new_boot:  # reboot: the death first, then disconnect (_on_ack)
                    death = payloads.death(self.boot, self._birth_seq)
                    self._publish_text("state", death, "death")
                else:
                    link.disconnect()
                return
            self._send(item.channel, item.at, item.body)
        self._check_settled()

    def _send(self, channel: Channel, at: float, body: Body, role: str = "") -> None:
        seq = self._seq
        self._seq += 1  # taken even if the publish is lost: the broker may have it
        if role == "birth":
            self._birth_seq = seq
        self._publish_text(channel, payloads.message(self.kind, at, self.boot, seq, body), role)
        if channel == "status":
            self._last_status = time.monotonic()

    def _publish_text(self, channel: Channel, text: str, role: str = "") -> None:
        assert self._link is not None
        retain = channel != "event"
        packet_id = self._link.publish(self._wire_topics[channel], text.encode(), retain=retain)
        self._inflight[packet_id] = _Sent(self.topics[channel], retain, text, role)

    def _on_ack(self, packet_id: int) -> None:
        sent = self._inflight.get(packet_id)
        if sent is None:
            return
        sent.acked = True
        record, stats = self.ctx.record, self.ctx.stats
        while self._inflight:
            first_id, first = next(iter(self._inflight.items()))
            if not first.acked:
                break
            del self._inflight[first_id]
            self.published += 1
            stats.published += 1
            if record is not None:
                record(first.topic, first.retain, first.text)
            if first.role == "birth" and not self.born.is_set():
                self.born.set()
                stats.born += 1
            elif first.role == "death" and self._link is not None:
                self._link.disconnect()
                return
        self._pump()

    def _check_settled(self) -> None:
        if self._outbox or self._inflight:
            return
        self._settled.set()
        if self._frozen and not self._stop.is_set():
            self.held.set()

    def _requeue_for_session(self) -> None:
        """Before a birth: a fresh snapshot first, then the events still waiting (statuses
        from before the connection are stale and dropped), then a pending stop."""
        waiting = [
            item
            for item in self._outbox
            if item is None or isinstance(item, _Reconnect) or item.channel == "event"
        ]
        self._outbox.clear()
        self._outbox.append(Outgoing("status", self.ctx.clock.now(), self.model.snapshot()))
        self._outbox.extend(waiting)
        self._settled.clear()

    def drop_connection(self, offline_s: float = 0.0) -> bool:
        """Cut the connection without a goodbye (the broker sends the Will); stay offline
        ``offline_s`` wall seconds, then reconnect within the same boot. False if offline."""
        link = self._link
        if link is None or not link.is_open:
            return False
        self._offline_until = time.monotonic() + offline_s
        self._wake.clear()
        link.abort()
        return True

    def restore_connection(self) -> None:
        """End an offline period from ``drop_connection`` now: reconnect (same boot)."""
        self._offline_until = 0.0
        self._wake.set()

    # -- behaviour ----------------------------------------------------------------------------

    def _enqueue(self, channel: Channel, at: float, body: Body) -> None:
        if self._stop.is_set():
            return
        if len(self._outbox) >= MAX_BACKLOG:  # offline for long: like firmware, forget
            self.dropped += 1
            return
        self._outbox.append(Outgoing(channel, at, body))
        self._settled.clear()
        self._pump()

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

    def _arm_behaviour(self) -> None:
        clock, end = self.ctx.clock, self.ctx.end
        due = self.model.t + STEP_S
        if end is not None:
            due = min(due, end)
        delay = max(MIN_TICK_S, clock.wall_seconds(due - clock.now()) + self._phase_s)
        self.ctx.timers.call_later(delay, self._behave)

    def _behave(self) -> None:
        if self._stop.is_set():
            return
        now = self._advance()
        self._sync(now)
        end = self.ctx.end
        if end is None or now < end:
            self._arm_behaviour()
            return
        # Power, energy and soc move every step without being a "change"; publish the frozen
        # state now, so that nothing a later heartbeat says differs from the log at HOLD.
        self._enqueue("status", now, self.model.snapshot())
        self._frozen = True
        self._check_settled()

    def _heartbeat(self) -> None:
        if self._stop.is_set():
            return
        wait = self._last_status + self._beat_s - time.monotonic()
        if wait <= 0:
            if self.connected:
                stats = self.ctx.stats
                stats.lag_max_s = max(stats.lag_max_s, -wait)
                self._enqueue("status", self.ctx.clock.now(), self.model.snapshot())
            self._last_status = time.monotonic()
            wait = self._beat_s
        self.ctx.timers.call_later(wait, self._heartbeat)

    # -- commands (contract v1.1) ----------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes) -> None:
        """A PUBLISH from the broker: only our own ``cmd`` topic is subscribed."""
        if topic != self._cmd_topic or self._stop.is_set():
            return
        try:
            command = decode_command(payload)
        except ContractError as exc:
            ident = command_id(payload)
            if ident is None:  # nothing to answer to
                self.commands_ignored += 1
                log.warning("%s: unreadable command ignored: %s", self.id, exc)
                return
            self._answer(ident, "rejected", f"{exc.reason}: {exc.detail}")
            return
        if command.expires < time.time_ns() // 1_000_000:
            self.commands_ignored += 1
            log.info("%s: command %s expired; ignored", self.id, command.id)
            return
        self._answer(command.id, *self._obey(command))

    def _answer(self, ident: str, result: str, info: str) -> None:
        """Publish the ``command_result``; an id answered before gets that answer again."""
        now = self._advance()
        before = self._answers.get(ident)
        if before is not None:
            result, info = before
        else:
            self._answers[ident] = (result, info)
            while len(self._answers) > ANSWERS_KEPT:
                self._answers.popitem(last=False)
        body = {"type": "command_result", "cmd": ident, "result": result, "info": info}
        self._enqueue("event", now, body)
        self._sync(now)  # what the command changed: its events, then a status
        if before is None and result == "done":
            self._after_done.pop(ident, lambda: None)()

    def _obey(self, command: Command) -> tuple[str, str]:
        """Carry out a command once; (result, info)."""
        if command.id in self._answers:
            return self._answers[command.id]
        kind = COMMAND_KIND[command.type]
        if kind is not None and kind != self.kind:
            unit = COMMAND_UNIT[command.type]
            return "rejected", f"{command.type}: a {self.kind} has no {unit or 'door'}s"
        now = self._advance()
        try:
            info = self._carry_out(command, now)
        except LockFailed as exc:
            return "failed", str(exc)
        except SimulatorError as exc:  # out of range, in use, unsafe now
            return "rejected", str(exc)
        return "done", info

    def _carry_out(self, command: Command, now: float) -> str:
        unit = command.unit
        match command.type:
            case "disable_port" | "enable_port":
                assert unit is not None
                return self._pile().set_port_enabled(unit, command.type == "enable_port")
            case "disable_slot" | "enable_slot":
                assert unit is not None
                return self._cabinet().set_slot_enabled(unit, command.type == "enable_slot")
            case "lock_battery" | "unlock_battery":
                assert unit is not None
                return self._cabinet().set_battery_locked(unit, command.type == "lock_battery")
            case "open_door":
                return self._cabinet().open_door(now)
            case "reboot" | "resend":
                reconnect = _Reconnect(new_boot=command.type == "reboot")
                self._after_done[command.id] = lambda: self._queue_reconnect(reconnect)
                return "rebooting" if reconnect.new_boot else "birth and status follow"
        raise UnsupportedUnit(f"unknown command type {command.type}")  # pragma: no cover

    def _queue_reconnect(self, reconnect: _Reconnect) -> None:
        """After the result and its status: end the connection and connect again."""
        if self._stop.is_set():
            return
        self._outbox.append(reconnect)
        self._settled.clear()
        self._pump()

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
        while not self._settled.is_set():
            await self._settled.wait()
