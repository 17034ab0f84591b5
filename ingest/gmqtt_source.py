"""The MQTT side of ingest on gmqtt (asyncio), with the interface of ``ingest.mqtt.MqttSource``.

gmqtt reads and parses on the event loop, about twice as fast as paho (docs/benchmarks.md,
section 1). Its own QoS 1 acknowledgement cannot be used as is: with
``optimistic_acknowledgement=False`` it sends the PUBACK when an async ``on_message`` returns,
one task per message, on whatever connection is current *then*: a message received on a
connection that has since dropped is acknowledged by packet id on the next one, where that id
may already name another message (mqtt/handler.py ``__handle_publish_callback`` ->
``client._send_command_with_mid`` -> ``self._connection``). So this source takes the QoS 1
PUBLISH from gmqtt's handler (``_handle_qos_1_publish_packet``, which has the packet id) and
writes the PUBACK itself, only when ``ack()`` is called after the store has the message, and
only on the connection that delivered it (``generation``). gmqtt never sends a PUBACK here.

In-flight: a message takes a slot before it is handed to ``deliver``; with every slot taken,
further messages wait here in arrival order and reading from the socket is paused (TCP
back-pressure: the broker keeps the rest in our persistent session, and never has more than
its own in-flight window unacknowledged). An ack frees a slot, which the oldest waiting
message takes; reading resumes once nothing waits.

Commands (contract v1.1) go out on this connection too (``publish``): the deployed broker
makes a client's id its username (``use_username_as_clientid``), so a second connection
with the ingest identity would take this session over. gmqtt numbers them and handles
their PUBACK; ``_handle_puback_packet`` is wrapped to tell ``on_published``. While reading
is paused (every slot taken) a command is still written, its PUBACK read later.

Reconnects are ours, as in ``MqttSource``: a fresh gmqtt client per connection (gmqtt's own
reconnect, a fixed 6 s delay without jitter, is switched off), capped and jittered
exponential backoff, each attempt logged, subscribing again on every connect. MQTT 3.1.1 with
a persistent session (clean session off), like the paho source: the embedded broker (amqtt)
speaks only 3.1.1, and 3.1.1 sessions need no expiry setting to outlive a disconnect.

Partition sessions (``ingest.worker``): one source per partition, with the partition's own
client id and exactly its devices' filters (``subscription`` takes a list; subscribed on
every connect, at most ``_SUBSCRIBE_BATCH`` filters per SUBSCRIBE), ``add_subscription`` for
a device added at run time, and leaving the context is a clean detach: the PUBACKs of what
the store has are written, then DISCONNECT, and the broker keeps the session (clean session
off) with everything not acknowledged, for the next owner of the partition to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import gmqtt
from gmqtt.mqtt.constants import MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError, MqttPackageHandler

from ingest import BrokerConfigError
from ingest.mqtt import BrokerURL, Received, reconnect_backoff

log = logging.getLogger(__name__)

_PUBACK = struct.Struct("!BBH")  # MQTT 3.1.1 PUBACK: type 0x40, remaining length 2, packet id
_DISCONNECT = b"\xe0\x00"
_QOS1_HOOK = "_handle_qos_1_publish_packet"
_SUBSCRIBE_BATCH = 100  # topic filters per SUBSCRIBE packet
CLOSE_WAIT_S = 3.0  # at most this long for the broker to close, or a cancelled connect to end


class _Client(gmqtt.Client):  # type: ignore[misc]  # gmqtt has no type information
    """gmqtt's client without its own reconnect: ``GmqttSource`` reconnects, with jitter."""

    async def reconnect(self, delay: bool = False) -> None:
        return None


class GmqttSource:
    """Subscribes with a persistent session and hands messages to ``deliver`` (on the loop)."""

    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str,
        subscription: str | Sequence[str],
        deliver: Callable[[Received], None],
        max_inflight: int = 1000,
        keepalive_s: int = 30,
        reconnect_max_s: int = 30,
        on_connection_change: Callable[[bool], None] | None = None,
        on_session: Callable[[bool], None] | None = None,
    ) -> None:
        if not callable(getattr(MqttPackageHandler, _QOS1_HOOK, None)):
            raise BrokerConfigError(
                f"gmqtt {getattr(gmqtt, '__version__', '?')} has no {_QOS1_HOOK}, which"
                " ack-after-write needs: install gmqtt 0.8.x or set mqtt_client=paho"
            )
        self.url = url
        self._ssl = url.ssl_context()  # once: loading a CA file is blocking work
        self.client_id = client_id
        self.subscriptions = [subscription] if isinstance(subscription, str) else [*subscription]
        self.subacks = 0  # SUBACKs received (all connections)
        self.keepalive_s = keepalive_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = max(10.0, float(keepalive_s))
        self._deliver = deliver
        self._on_connection_change = on_connection_change
        self._on_session = on_session  # CONNACK's session present flag, every connect
        self._max_inflight = max_inflight
        self._free = max_inflight  # slots not taken by a delivered, unacknowledged message
        self._waiting: deque[Received] = deque()  # arrived with every slot taken
        self._paused = False
        self._acks = bytearray()  # PUBACKs for the current connection, written once per burst
        self._flush_scheduled = False
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._client: Any = None  # the current generation's gmqtt client
        self._was_up = False  # the current generation's connection was accepted
        self._connection: Any = None  # gmqtt's MQTTConnection of the current generation
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.generation = 0
        # called on the loop with publish()'s ticket when the broker acknowledged it
        self.on_published: Callable[[tuple[int, int]], None] | None = None

    async def __aenter__(self) -> GmqttSource:
        self._task = asyncio.create_task(self._run(), name="mqtt-ingest")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def finished(self) -> None:
        """Return (or raise) when the connection loop has ended: at a stop, or by a bug."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        """Connect, run until the connection drops, wait a capped, jittered, exponential
        backoff (each attempt logged), and again."""
        failures = 0
        log.info("connecting to %s", self.url)
        while not self._stopping.is_set():
            was_up = False
            try:
                was_up = await self._connect_once()
            except (OSError, TimeoutError) as exc:
                log.warning("cannot reach the broker %s: %s", self.url, exc or type(exc).__name__)
            except MQTTConnectError as exc:
                log.warning("broker %s refused the connection: %s", self.url, exc)
            if self._stopping.is_set():
                return
            failures, delay = reconnect_backoff(self.url, failures, was_up, self.reconnect_max_s)
            with contextlib.suppress(TimeoutError):  # not wait_for: 3.11's can swallow a cancel
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _connect_once(self) -> bool:
        """One connection, a new generation: True once it was up, when it has dropped."""
        self.generation += 1
        generation = self.generation
        client = _Client(self.client_id, clean_session=False, optimistic_acknowledgement=False)
        if self.url.username:
            client.set_auth_credentials(self.url.username, self.url.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = functools.partial(self._on_qos0, generation)
        # QoS 1: ours, so the PUBACK waits for the store (module docstring)
        setattr(client._package_handler, _QOS1_HOOK, functools.partial(self._on_qos1, generation))
        puback = client._package_handler._handle_puback_packet
        client._package_handler._handle_puback_packet = functools.partial(
            self._on_puback, generation, puback
        )
        self._client = client
        self._lost.clear()
        self._was_up = False
        connect = asyncio.create_task(
            client.connect(
                self.url.host,
                self.url.port,
                ssl=self._ssl or False,
                keepalive=self.keepalive_s,
                version=MQTTv311,
            ),
            name=f"mqtt-connect:{generation}",
        )
        lost = asyncio.create_task(self._lost.wait(), name=f"mqtt-lost:{generation}")
        try:
            done, _ = await asyncio.wait(
                {connect, lost}, timeout=self.connect_timeout_s, return_when="FIRST_COMPLETED"
            )
            if connect in done:
                connect.result()  # OSError, MQTTConnectError
                await lost
            elif lost not in done:
                raise TimeoutError(f"no CONNACK within {self.connect_timeout_s:.0f}s")
            return self._was_up
        finally:
            for task in (connect, lost):
                task.cancel()
            # let them end here, not after us (bounded: a cancel cannot hang the stop)
            await asyncio.wait((connect, lost), timeout=CLOSE_WAIT_S)
            if not self._lost.is_set():  # shutdown, refusal or a CONNACK that never came
                await self._close(client)

    async def _close(self, client: Any) -> None:
        """Write the PUBACKs of what the store has, then DISCONNECT, and let the broker close
        first (at most a few seconds). Closing first lost PUBACKs written just before it: with
        mosquitto 2.0.11, all but the first two of a burst in about one run of ten (probably
        a reset overtaking what the broker had not read yet). Safe, they come again, but
        needless duplicates."""
        self._flush_acks()
        self._connection_gone()  # nothing more is acknowledged on this connection
        conn = client._connection
        if conn is None or conn.is_closing():
            self._lost.set()
            return
        conn.send_package(_DISCONNECT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await self._lost.wait()
        self._lost.set()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await conn.close()

    # -- called by the pipeline -----------------------------------------------------------

    def ack(self, msg: Received) -> bool:
        """Acknowledge and free the slot; False when the connection that sent it is gone
        (the broker will deliver it again, and the duplicate is dropped by seq)."""
        acked = False
        if msg.qos > 0 and msg.generation == self.generation and self.connected:
            self._acks += _PUBACK.pack(0x40, 2, msg.mid)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_acks)
            acked = True
        self._release()
        return acked

    def publish(self, topic: str, payload: bytes) -> tuple[int, int] | None:
        """Publish at QoS 1, not retained, on the current connection: a ticket
        (generation, packet id) that ``on_published`` gets at the PUBACK; None when not
        connected (nothing is kept to send later: the caller resends)."""
        conn = self._connection
        if not self.connected or conn is None or conn.is_closing():
            return None
        mid, _ = conn.publish(gmqtt.Message(topic, payload, qos=1, retain=False))
        return self.generation, mid

    def _on_puback(self, generation: int, handle: Any, cmd: int, packet: bytes) -> None:
        handle(cmd, packet)  # gmqtt frees the packet id
        if generation == self.generation and self.on_published is not None and len(packet) >= 2:
            self.on_published((generation, int.from_bytes(packet[:2], "big")))

    def _flush_acks(self) -> None:
        """One write of every PUBACK queued since the last, to the connection that is still
        the one that delivered those messages (a drop clears the queue first)."""
        self._flush_scheduled = False
        conn, acks = self._connection, self._acks
        if acks and self.connected and conn is not None and not conn.is_closing():
            conn.send_package(bytes(acks))
        acks.clear()

    def _release(self) -> None:
        if self._waiting:  # the slot goes straight to the oldest waiting message
            self._deliver(self._waiting.popleft())
            return
        if self._free >= self._max_inflight:
            raise RuntimeError("GmqttSource.ack: more acks than messages delivered")
        self._free += 1
        if self._paused:
            self._set_reading(True)

    # -- gmqtt callbacks, on the loop -------------------------------------------------------

    def _on_qos1(self, generation: int, mid: int, payload: bytes, topic: Any, props: Any) -> None:
        self._admit(generation, topic, payload, 1, props, mid)

    def _on_qos0(
        self, generation: int, client: Any, topic: Any, payload: bytes, qos: int, props: Any
    ) -> None:
        self._admit(generation, topic, payload, 0, props, 0)

    def _admit(
        self, generation: int, topic: Any, payload: bytes, qos: int, props: Any, mid: int
    ) -> None:
        if generation != self.generation:
            return  # a dropped connection's last bytes: never acked, delivered again
        received = Received(
            topic=topic if isinstance(topic, str) else topic.decode("utf-8", "replace"),
            payload=payload,
            qos=qos,
            retained=bool(props.get("retain")),
            mid=mid,
            received_ms=time.time_ns() // 1_000_000,
            generation=generation,
        )
        if self._free > 0 and not self._waiting:
            self._free -= 1
            self._deliver(received)
        else:
            self._waiting.append(received)
            self._set_reading(False)

    def _on_connect(self, client: Any, flags: int, rc: int, props: Any) -> None:
        if client is not self._client:
            return
        self._connection = client._package_handler.current_connection
        self.connected = self._was_up = True
        session_present = bool(flags & 0x01)  # CONNACK's acknowledge flags, bit 0
        log.info(
            "connected to %s as %s (session present: %s), subscribing to %d filter(s)",
            self.url,
            self.client_id,
            session_present,
            len(self.subscriptions),
        )
        for i in range(0, len(self.subscriptions), _SUBSCRIBE_BATCH):
            batch = self.subscriptions[i : i + _SUBSCRIBE_BATCH]
            client.subscribe([gmqtt.Subscription(f, qos=1) for f in batch])
        self._notify(True)
        if self._on_session is not None:
            self._on_session(session_present)

    def add_subscription(self, topic_filter: str) -> bool:
        """Subscribe to one more filter, now when connected and on every connect from now
        on (a device added at run time); False when it was already there."""
        if topic_filter in self.subscriptions:
            return False
        self.subscriptions.append(topic_filter)
        if self.connected and self._client is not None:
            self._client.subscribe(topic_filter, qos=1)
        return True

    def _on_subscribe(self, client: Any, mid: int, granted: Any, props: Any) -> None:
        if client is not self._client:
            return
        self.subacks += 1
        if any(q >= 0x80 for q in granted):
            log.error("%s: a subscription was refused: %s", self.client_id, granted)

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        if client is not self._client or self._lost.is_set():
            return
        was = self.connected
        self._connection_gone()
        self._lost.set()
        if was and not self._stopping.is_set():
            log.warning("lost broker %s", self.url)

    def _connection_gone(self) -> None:
        """Forget the connection: its queued PUBACKs and waiting messages are never acked
        (the broker delivers them again); their slots were never taken."""
        was = self.connected
        self.connected = False
        self._connection = None
        self._acks.clear()
        self._waiting.clear()
        self._paused = False
        if was:
            self._notify(False)

    def _set_reading(self, on: bool) -> None:
        conn = self._connection
        transport = getattr(conn, "_transport", None)
        if transport is None or transport.is_closing():
            return
        if on:
            self._paused = False
            transport.resume_reading()
        elif not self._paused or transport.is_reading():
            # asyncio's StreamReader (gmqtt's protocol) may resume a transport it paused
            # itself; pause again for every message that has to wait
            self._paused = True
            transport.pause_reading()

    def _notify(self, connected: bool) -> None:
        if self._on_connection_change is not None:
            self._on_connection_change(connected)
