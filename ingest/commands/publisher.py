"""Publishes commands to ``<prefix>/<device>/cmd`` (QoS 1, not retained) on an MQTT
connection of its own, and reports each PUBACK.

Why not the ingest source's connection: that one stops reading under back-pressure (every
in-flight slot taken, its broker queue holding the rest), so a command's PUBACK would wait
behind a full window exactly when the service is busiest; it writes its own PUBACKs by
packet id (``ingest.gmqtt_source``), which our PUBLISHes would share; and it is a
persistent session, which commands do not want (the service resends them itself). This
client has its own id (``<ingest client id>-cmd``), a clean session, the same broker URL
and credentials (the broker ACL lets the ingest user write ``<prefix>/+/cmd``).

paho runs the network in its own thread, as in ``ingest.mqtt``: a capped, jittered,
logged reconnect backoff; ``on_sent(command id)`` and ``on_connected()`` are called on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ingest.mqtt import BrokerURL, reconnect_backoff

log = logging.getLogger(__name__)


class CommandPublisher:
    def __init__(
        self,
        url: BrokerURL,
        *,
        client_id: str,
        on_sent: Callable[[str], None],
        on_connected: Callable[[], None],
        keepalive_s: int = 30,
        reconnect_max_s: int = 30,
    ) -> None:
        self.url = url
        self.keepalive_s = keepalive_s
        self.reconnect_max_s = reconnect_max_s
        self._on_sent = on_sent
        self._on_connected = on_connected
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        # packet id -> command id, on the loop only: publish() runs there, and a PUBACK is
        # handled there after it (no lock: paho calls on_publish holding its own mutex,
        # which publish() takes too)
        self._by_mid: dict[int, str] = {}
        self._thread: threading.Thread | None = None
        self._connected_since_attempt = False
        self.connected = False
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,  # nothing kept for us: the service resends open commands
            protocol=paho.MQTTv311,
            reconnect_on_failure=False,  # our thread reconnects, with jitter
        )
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        context = url.ssl_context()
        if context is not None:
            self._client.tls_set_context(context)
        self._client.on_connect = self._connect_cb
        self._client.on_disconnect = self._disconnect_cb
        self._client.on_publish = self._publish_cb

    async def __aenter__(self) -> CommandPublisher:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._network, name="mqtt-commands", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self._client.disconnect()
        if self._thread is not None:
            self._thread.join(10)

    def publish(self, command_id: str, topic: str, payload: bytes) -> bool:
        """Publish once (QoS 1, not retained); False when not connected (the service
        publishes it again when the connection is back)."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=1, retain=False)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        self._by_mid[info.mid] = command_id
        return True

    def _acked(self, mid: int) -> None:
        command_id = self._by_mid.pop(mid, None)
        if command_id is not None:
            self._on_sent(command_id)

    def _connected(self) -> None:
        self._by_mid.clear()  # a clean session: nothing in flight survives a reconnect
        self._on_connected()

    # -- paho thread --------------------------------------------------------------------

    def _network(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._connected_since_attempt = False
            try:
                self._client.connect(self.url.host, self.url.port, keepalive=self.keepalive_s)
                self._client.loop_forever()
            except OSError as exc:
                log.warning("commands: cannot reach the broker %s: %s", self.url, exc)
            if self._stopping.is_set():
                return
            failures, delay = reconnect_backoff(
                self.url, failures, self._connected_since_attempt, self.reconnect_max_s
            )
            self._stopping.wait(delay)

    def _connect_cb(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("commands: broker %s refused the connection: %s", self.url, reason)
            return
        self.connected = self._connected_since_attempt = True
        log.info("commands: connected to %s", self.url)
        self._call(self._connected)

    def _disconnect_cb(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected = False
        if not self._stopping.is_set():
            log.warning("commands: lost broker %s (%s)", self.url, reason)

    def _publish_cb(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        self._call(self._acked, mid)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(callback, *args)
