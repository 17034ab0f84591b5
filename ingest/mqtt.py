"""The MQTT side of ingest: a paho-mqtt 2 client with manual acknowledgement.

paho runs its network loop in its own thread. Each QoS 1 message takes an in-flight slot
before it is handed to the asyncio side; the slot is freed when the message is acknowledged
(after the store has it) or dropped. With every slot taken, the paho thread waits: TCP
back-pressure, and the broker keeps the rest in our persistent session. Memory stays bounded
by ``max_inflight``.

Commands (contract v1.1) go out on this connection (``publish``; see
``ingest.gmqtt_source`` for why not on another). paho writes them from its network thread,
which waits while every in-flight slot is taken: a command then waits for the store too.

Reconnects: our network thread waits a jittered exponential backoff (1 s doubling, capped at
``reconnect_max_s``, times 0.5-1 so many ingest workers don't reconnect in step), logs each
attempt, and subscribes again on every connect.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ingest import BrokerConfigError

log = logging.getLogger(__name__)


def _redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True, slots=True)
class BrokerURL:
    """``mqtt://[user:password@]host[:1883]`` or ``mqtts://…[:8883]`` (TLS, verified
    against the system's CAs or ``cafile``). User and password are percent-decoded; the
    password never appears in ``str``/``repr`` (logs)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    cafile: str | None = None

    @classmethod
    def parse(cls, url: str, cafile: str | Path | None = None) -> BrokerURL:
        shown = _redacted(url)
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise BrokerConfigError(
                f"broker URL {shown!r}: use mqtt://host:port or mqtts://host:port"
            )
        if not parts.hostname:
            raise BrokerConfigError(f"broker URL {shown!r} has no host")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise BrokerConfigError(f"broker URL {shown!r} has an invalid port") from None
        if cafile is not None and not tls:
            raise BrokerConfigError(f"a CA file was given for {shown!r}: use mqtts:// for TLS")
        if cafile is not None and not Path(cafile).is_file():
            raise BrokerConfigError(f"the broker CA file {cafile} does not exist")
        return cls(
            parts.hostname,
            port,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            tls,
            str(cafile) if cafile is not None else None,
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """For mqtts: verifies the broker's certificate and name (``cafile`` or the
        system's CAs); None for plain mqtt."""
        if not self.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise BrokerConfigError(f"cannot use the broker CA file {self.cafile}: {exc}") from None

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def reconnect_backoff(
    url: BrokerURL, failures: int, was_up: bool, cap_s: float
) -> tuple[int, float]:
    """The next attempt's number and the wait before it, logged: 1 s doubling per failure in
    a row (a connection that was up starts over), capped at ``cap_s``, times 0.5-1 so that
    many ingest workers don't reconnect in step. Shared by both sources."""
    failures = 1 if was_up else failures + 1
    delay = min(cap_s, 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
    log.warning("reconnect attempt %d to %s in %.1fs", failures, url, delay)
    return failures, delay


@dataclass(slots=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retained: bool
    mid: int
    received_ms: int
    generation: int  # which connection delivered it (acks go only to that one)


class MqttSource:
    """Subscribes with a persistent session and hands messages to ``deliver`` (on the loop)."""

    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str,
        subscription: str,
        deliver: Callable[[Received], None],
        max_inflight: int = 1000,
        keepalive_s: int = 30,
        reconnect_max_s: int = 30,
        on_connection_change: Callable[[bool], None] | None = None,
        on_session: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = url
        self._on_session = on_session  # CONNACK's session present flag, every connect
        self.subscription = subscription
        self._deliver = deliver
        self._on_connection_change = on_connection_change
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._stopping = threading.Event()
        self._pending: collections.deque[Received] = collections.deque()
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = False
        self.generation = 0
        # called on the loop with publish()'s ticket when the broker acknowledged it
        self.on_published: Callable[[tuple[int, int]], None] | None = None
        self.keepalive_s = keepalive_s
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,  # persistent session: the broker keeps what we have not acked
            protocol=paho.MQTTv311,
            manual_ack=True,
            reconnect_on_failure=False,  # our network thread reconnects, with jitter
        )
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        context = url.ssl_context()
        if context is not None:
            self._client.tls_set_context(context)
        self.reconnect_max_s = reconnect_max_s
        self._thread: threading.Thread | None = None
        self._connected_since_attempt = False
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    async def __aenter__(self) -> MqttSource:
        self._loop = asyncio.get_running_loop()
        self._ended = asyncio.Event()
        self._thread = threading.Thread(
            target=self._network_then_end, name="mqtt-ingest", daemon=True
        )
        self._thread.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._stop)

    async def finished(self) -> None:
        """Return when the network thread has ended: at a stop, or by a bug."""
        await self._ended.wait()

    def _network_then_end(self) -> None:
        try:
            self._network()
        finally:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._ended.set)

    def _stop(self) -> None:
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(10)

    def _network(self) -> None:
        """The network thread: connect, run paho's loop until the connection drops, then
        wait a capped, jittered, exponential backoff (each attempt logged), and again."""
        failures = 0
        log.info("connecting to %s", self.url)
        while not self._stopping.is_set():
            self._connected_since_attempt = False
            try:
                self._client.connect(self.url.host, self.url.port, keepalive=self.keepalive_s)
                self._client.loop_forever()
            except OSError as exc:
                log.warning("cannot reach the broker %s: %s", self.url, exc)
            if self._stopping.is_set():
                return
            failures, delay = reconnect_backoff(
                self.url, failures, self._connected_since_attempt, self.reconnect_max_s
            )
            self._stopping.wait(delay)

    # -- called from the asyncio side ---------------------------------------------------

    def ack(self, msg: Received) -> bool:
        """Acknowledge and free the slot; False when the connection that sent it is gone
        (the broker will deliver it again, and the duplicate is dropped by seq)."""
        acked = False
        if msg.qos > 0 and msg.generation == self.generation and self.connected:
            acked = self._client.ack(msg.mid, msg.qos) == paho.MQTT_ERR_SUCCESS
        self._slots.release()
        return acked

    def publish(self, topic: str, payload: bytes) -> tuple[int, int] | None:
        """Publish at QoS 1, not retained: a ticket (generation, packet id) that
        ``on_published`` gets at the PUBACK; None when not connected."""
        if not self.connected:
            return None
        generation = self.generation
        info = self._client.publish(topic, payload, qos=1, retain=False)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        return generation, info.mid

    # -- paho thread --------------------------------------------------------------------

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        # on the loop: publish() returned (and its caller kept the ticket) before this runs
        if self._loop is not None and self.on_published is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self.on_published, (self.generation, mid))

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s refused the connection: %s", self.url, reason)
            return
        self.generation += 1
        self.connected = True
        self._connected_since_attempt = True
        log.info(
            "connected to %s (session present: %s), subscribing to %s",
            self.url,
            flags.session_present,
            self.subscription,
        )
        client.subscribe(self.subscription, qos=1)
        self._notify(True)
        if self._on_session is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self._on_session, bool(flags.session_present))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        if any(r.is_failure for r in reasons):
            log.error("subscription to %s refused: %s", self.subscription, reasons)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        was = self.connected
        self.connected = False
        if was:
            self._notify(False)
        if not self._stopping.is_set():
            log.warning("lost broker %s (%s)", self.url, reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        while not self._slots.acquire(timeout=0.5):
            if self._stopping.is_set():
                return  # never acked: the broker delivers it again next time
        received = Received(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retained=bool(message.retain),
            mid=message.mid,
            received_ms=time.time_ns() // 1_000_000,
            generation=self.generation,
        )
        assert self._loop is not None
        # Hand over in bursts: one loop wake-up (a self-pipe write) per burst, not per message.
        self._pending.append(received)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # loop closed during shutdown
                self._flush_scheduled = False
                while self._pending:
                    self._pending.popleft()
                    self._slots.release()

    def _flush(self) -> None:
        """On the loop: deliver everything the paho thread handed over, in arrival order."""
        self._flush_scheduled = False  # before draining: a later append schedules anew
        pending, deliver = self._pending, self._deliver
        while pending:
            deliver(pending.popleft())

    def _notify(self, connected: bool) -> None:
        if self._on_connection_change is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self._on_connection_change, connected)
