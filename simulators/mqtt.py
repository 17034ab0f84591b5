"""A device's MQTT 3.1.1 connection, as small as firmware's: CONNECT (with the Will), QoS 1
PUBLISH, PUBACK, PINGREQ, DISCONNECT, and one SUBSCRIBE (the device's own ``cmd`` topic,
contract v1.1): a PUBLISH that arrives is acknowledged at once and handed to ``on_message``
(commands are idempotent by id, so at-least-once is enough).

One ``Link`` is an ``asyncio.Protocol`` on the fleet's event loop: no thread, no task and no
timer per connection but a keepalive check, so ten thousand of them cost little more than
their sockets. Publishing is a synchronous write; the PUBACKs come back through
``on_ack(packet_id)``. aiomqtt (on paho) keeps a background task that wakes every second per
client and awaits every PUBACK through futures, which at 10,000 devices was the simulator's
bottleneck (see docs/benchmarks.md).

Errors::

    MqttError            the connection failed or was lost
     +-- ConnectRefused  the broker answered CONNECT with a non-zero return code
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import struct
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Scheduler = Callable[[float, Callable[[], None]], object]
"""``call_later(delay_s, callback)``: the loop's own, or a ``TimerWheel``'s."""

CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP = 0x20, 0x30, 0x40, 0x90, 0xD0
MAX_INCOMING = 64 * 1024
"""Largest packet a device takes from the broker (a command is at most 16 KiB); a longer
one closes the connection, as firmware with a fixed receive buffer would."""
PINGREQ = b"\xc0\x00"
DISCONNECT = b"\xe0\x00"
_MAX_PACKET_ID = 0xFFFF


class MqttError(Exception):
    """The connection failed or was lost."""


class ConnectRefused(MqttError):
    """CONNACK with a non-zero return code (3.1.1 section 3.2.2.3)."""


def remaining_length(n: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_string(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def publish_topic(topic: str) -> bytes:
    """The topic as it appears in a PUBLISH (length-prefixed UTF-8), built once per topic."""
    return mqtt_string(topic.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def connect_packet(
    client_id: str,
    *,
    keepalive_s: int,
    will: Will | None,
    username: str | None,
    password: str | None = None,
) -> bytes:
    """CONNECT, protocol level 4 (3.1.1), clean session."""
    flags = 0x02
    payload = mqtt_string(client_id.encode("utf-8"))
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        payload += mqtt_string(will.topic.encode("utf-8")) + mqtt_string(will.payload)
    if username is not None:
        flags |= 0x80
        payload += mqtt_string(username.encode("utf-8"))
        if password is not None:  # 3.1.1: a password only with a username
            flags |= 0x40
            payload += mqtt_string(password.encode("utf-8"))
    variable = b"\x00\x04MQTT\x04" + bytes([flags]) + struct.pack("!H", keepalive_s)
    body = variable + payload
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, packet_id: int, *, retain: bool) -> bytes:
    """PUBLISH at QoS 1; ``topic`` from ``publish_topic``."""
    size = len(topic) + 2 + len(payload)
    return b"".join(
        (
            b"\x33" if retain else b"\x32",
            remaining_length(size),
            topic,
            packet_id.to_bytes(2, "big"),
            payload,
        )
    )


class Link(asyncio.Protocol):
    """One client connection. ``await connect(...)`` returns it once the broker accepted."""

    def __init__(
        self,
        on_ack: Callable[[int], None],
        keepalive_s: int,
        call_later: Scheduler | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.on_ack = on_ack
        self.on_message = on_message
        self.keepalive_s = keepalive_s
        self._call_later: Scheduler = call_later or asyncio.get_running_loop().call_later
        self.closed: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        """Resolves when the connection ends: None after ``disconnect``, else the reason."""
        self._connack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._next_id = 0
        self._graceful = False
        self._last_write = 0.0
        self._last_read = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        client_id: str,
        *,
        on_ack: Callable[[int], None],
        on_message: Callable[[str, bytes], None] | None = None,
        keepalive_s: int = 60,
        will: Will | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        timeout_s: float = 10.0,
        call_later: Scheduler | None = None,
    ) -> Link:
        """``ssl``: TLS, the broker's certificate verified for ``host``."""
        loop = asyncio.get_running_loop()
        link: Link | None = None
        try:
            async with asyncio.timeout(timeout_s):
                _, link = await loop.create_connection(
                    lambda: cls(on_ack, keepalive_s, call_later, on_message),
                    host,
                    port,
                    ssl=ssl,
                    server_hostname=host if ssl is not None else None,
                )
                link._write(
                    connect_packet(
                        client_id,
                        keepalive_s=keepalive_s,
                        will=will,
                        username=username,
                        password=password,
                    )
                )
                await link._connack
        except TimeoutError:
            if link is not None:
                link.abort()
            raise MqttError(f"no CONNACK from {host}:{port} within {timeout_s:.0f}s") from None
        except OSError as exc:
            raise MqttError(f"cannot connect to {host}:{port}: {exc}") from exc
        except MqttError:
            if link is not None:
                link.abort()
            raise
        link._arm_ping()
        return link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._last_read = asyncio.get_running_loop().time()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = None if self._graceful else (str(exc) if exc else "closed by the broker")
        if not self._connack.done():
            self._connack.set_exception(MqttError(reason or "closed before CONNACK"))
        if not self.closed.done():
            self.closed.set_result(reason)

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._connack.done() and not self._graceful

    def disconnect(self) -> None:
        """DISCONNECT and close: the broker discards the Will."""
        if self._transport is not None:
            self._graceful = True
            self._transport.write(DISCONNECT)
            self._transport.close()

    def abort(self) -> None:
        """Close the socket without DISCONNECT: the broker publishes the Will."""
        if self._transport is not None:
            self._transport.abort()

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, topic: bytes, payload: bytes, *, retain: bool) -> int:
        """Write a QoS 1 PUBLISH; returns its packet id, which ``on_ack`` will get."""
        if self._transport is None:
            raise MqttError("not connected")
        self._next_id = self._next_id % _MAX_PACKET_ID + 1
        self._write(publish_packet(topic, payload, self._next_id, retain=retain))
        return self._next_id

    def subscribe(self, topic: str) -> int:
        """SUBSCRIBE to ``topic`` at QoS 1; returns its packet id (the SUBACK is not awaited:
        the broker handles the packets of a connection in order)."""
        if self._transport is None:
            raise MqttError("not connected")
        self._next_id = self._next_id % _MAX_PACKET_ID + 1
        body = self._next_id.to_bytes(2, "big") + mqtt_string(topic.encode("utf-8")) + b"\x01"
        self._write(b"\x82" + remaining_length(len(body)) + body)
        return self._next_id

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)
        self._last_write = asyncio.get_running_loop().time()

    # -- receiving ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._last_read = asyncio.get_running_loop().time()
        at, end = 0, len(buffer)
        while end - at >= 2:
            kind, size = buffer[at] & 0xF0, buffer[at + 1]
            head = 2
            if size & 0x80:  # a long packet: nothing we expect, but skip it correctly
                size, shift, head = size & 0x7F, 7, 2
                while True:
                    if at + head >= end:
                        self._buffer = buffer[at:]
                        return
                    digit = buffer[at + head]
                    size, shift, head = size | (digit & 0x7F) << shift, shift + 7, head + 1
                    if not digit & 0x80:
                        break
            if size > MAX_INCOMING:
                self.abort()
                return
            if end - at < head + size:
                break
            flags = buffer[at] & 0x0F
            body = buffer[at + head : at + head + size]
            at += head + size
            if kind == PUBACK:
                self.on_ack(int.from_bytes(body[:2], "big"))
            elif kind == PUBLISH:
                self._on_publish(flags, body)
            elif kind == SUBACK and body[2:3] == b"\x80":
                log.warning("the broker refused a subscription (ACL?)")
            elif kind == CONNACK:
                self._on_connack(body)
        self._buffer = buffer[at:]

    def _on_publish(self, flags: int, body: bytes) -> None:
        """An incoming PUBLISH: acknowledged (QoS 1) before it is handled, like firmware
        that queues a command and answers it later."""
        qos = (flags >> 1) & 0x03
        if len(body) < 2:
            return
        length = int.from_bytes(body[:2], "big")
        topic, rest = body[2 : 2 + length], body[2 + length :]
        if qos:
            if len(rest) < 2:
                return
            packet_id, rest = rest[:2], rest[2:]
            if self._transport is not None:
                self._write(b"\x40\x02" + packet_id)
        if self.on_message is not None:
            self.on_message(topic.decode("utf-8", "replace"), rest)

    def _on_connack(self, body: bytes) -> None:
        if self._connack.done():
            return
        code = body[1] if len(body) > 1 else 255
        if code == 0:
            self._connack.set_result(None)
        else:
            self._connack.set_exception(ConnectRefused(f"CONNACK return code {code}"))

    # -- keepalive ----------------------------------------------------------------------------

    def _arm_ping(self) -> None:
        self._call_later(self.keepalive_s / 2, self._keepalive)

    def _keepalive(self) -> None:
        if self._transport is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_read > 1.5 * self.keepalive_s:  # no PUBACK or PINGRESP for long
            self.abort()
            return
        if now - self._last_write >= self.keepalive_s / 2:
            self._write(PINGREQ)
        self._arm_ping()
