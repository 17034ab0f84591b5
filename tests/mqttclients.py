"""A plain paho client for broker tests: connect with a username/password (TLS optional),
see whether the broker accepted, publish, subscribe, collect what arrives."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import eventually


@dataclass(frozen=True)
class Got:
    topic: str
    payload: bytes


class Client:
    """One MQTT 3.1.1 connection driven by hand. ``connect()`` returns paho's reason code:
    ``rc.is_failure`` when the broker refused (or closed before a CONNACK)."""

    def __init__(
        self,
        port: int,
        username: str | None = None,
        password: str | None = None,
        *,
        client_id: str | None = None,
        will: tuple[str, bytes] | None = None,
        cafile: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host, self.port = host, port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else (username or ""),
            reconnect_on_failure=False,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=False)
        if cafile is not None:
            self.client.tls_set_context(ssl.create_default_context(cafile=str(cafile)))
        self.messages: list[Got] = []
        self.granted: list[int] = []
        self._answered = threading.Event()
        self._subscribed = threading.Event()
        self.reason: paho.ReasonCode | None = None
        self.connected = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def connect(self, timeout: float = 5.0) -> paho.ReasonCode:
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        assert self._answered.wait(timeout), "no CONNACK and no close"
        assert self.reason is not None
        return self.reason

    def _on_connect(
        self, client: paho.Client, ud: object, flags: object, rc: paho.ReasonCode, props: object
    ) -> None:
        self.reason, self.connected = rc, not rc.is_failure
        self._answered.set()

    def _on_disconnect(
        self, client: paho.Client, ud: object, flags: object, rc: paho.ReasonCode, props: object
    ) -> None:
        if not self._answered.is_set():
            self.reason = rc
            self._answered.set()
        self.connected = False

    def _on_message(self, client: paho.Client, ud: object, msg: paho.MQTTMessage) -> None:
        self.messages.append(Got(msg.topic, bytes(msg.payload)))

    def _on_subscribe(
        self, client: paho.Client, ud: object, mid: int, rcs: list[paho.ReasonCode], props: object
    ) -> None:
        self.granted = [rc.value for rc in rcs]
        self._subscribed.set()

    def subscribe(self, *filters: str) -> list[int]:
        """Subscribe at QoS 1; the granted QoS per filter (128: refused)."""
        self._subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self._subscribed.wait(5), "no SUBACK"
        return self.granted

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1, waits for the PUBACK (mosquitto acknowledges a denied publish too)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]

    def wait_for(self, topic: str, timeout: float = 10.0) -> None:
        def arrived() -> None:
            assert topic in self.topics(), self.topics()

        eventually(arrived, timeout=timeout)

    def vanish(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker handles the Will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        if self.connected:
            self.client.disconnect()
        self.client.loop_stop()
