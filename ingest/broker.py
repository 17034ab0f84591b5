"""The embedded MQTT broker (amqtt) for a machine with nothing else installed.

amqtt speaks MQTT 3.1.1 only and tops out at a few thousand messages/s (see
shared/architecture.md): plenty for one district, not for scale. It runs in a thread with
its own event loop, so a busy service (ingest, API, hundreds of device connections) never
starves it: amqtt gives a subscriber only 5 s to acknowledge a QoS 1 message before it drops
the delivery (amqtt/mqtt/protocol/handler.py), which a shared loop under a connection storm
did exceed. Production uses mosquitto or EMQX via ``--broker``.

It binds loopback by default. Given a credentials file (``chargewatch broker-config
mosquitto`` writes one) it enforces what the generated mosquitto configuration does
(``ingest.brokerauth``): every client authenticates, a device's client id is its username,
a device publishes (its Will too) only under its own id and reads only its own ``cmd``, the
ingest user reads everything and writes commands. Our amqtt plugins do it
(``ingest.brokerplugins``): amqtt's
own ``TopicAccessControlListPlugin`` knows only fixed topic lists per user (no ``%u``
patterns) and does not check Will topics at all, and its ``FileAuthPlugin`` does not read
mosquitto's ``$7$`` hashes. Binding anything but loopback without credentials is refused.

Two defects of amqtt 0.12.1 (amqtt/broker.py) are mended by ``_broker``, found by
tests/ingest/test_embedded_broker_auth.py:
- at every connect it replays to the new client the retained messages of EVERY filter any
  client holds (ingest's ``cw/v1/+/+`` too), without asking the topic rules: each device
  received every other device's retained status, battery serials included. A client now gets
  the retained messages of its own subscriptions only.
- it walks its table of subscriptions across awaits (that replay, and each broadcast asking
  the topic rules), so a client subscribing meanwhile raised "dictionary changed size during
  iteration" in another client's connect: the table now iterates over a snapshot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from devices.topics import DEFAULT_PREFIX
from ingest import BrokerConfigError
from ingest.brokerauth import Credentials
from ingest.mqtt import BrokerURL

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmbeddedBroker:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        credentials: Path | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        if credentials is None and not is_loopback(host):
            raise BrokerConfigError(
                f"the embedded broker would let anyone on the network publish as any device on"
                f" {host}:{port}: give it a credentials file (--broker-credentials, made by"
                " `chargewatch broker-config mosquitto`) or bind it to 127.0.0.1"
            )
        self.host = host
        self.port = port
        self.prefix = prefix
        self.credentials = Credentials.load(credentials) if credentials is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> BrokerURL:
        """Where ingest connects: loopback when bound to every interface; as the ingest user
        when there are credentials."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        if self.credentials is None:
            return BrokerURL(host, self.port)
        c = self.credentials
        return BrokerURL(host, self.port, c.ingest_username, c.ingest_password)

    async def __aenter__(self) -> EmbeddedBroker:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="embedded-broker", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except Exception as exc:
            raise BrokerConfigError(
                f"cannot start the embedded broker on {self.host}:{self.port}: {exc}"
            ) from exc
        log.info(
            "embedded MQTT broker (amqtt) listening on %s:%d, %s",
            self.host,
            self.port,
            "devices authenticated" if self.credentials else "anonymous clients (loopback only)",
        )
        return self

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except Exception as exc:
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _start(self) -> None:
        from amqtt.broker import Broker  # imported late: amqtt is slow to import

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        plugins: dict[str, Any] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        }
        if self.credentials is not None:
            plugins = {
                "ingest.brokerplugins.CredentialsAuthPlugin": {
                    "credentials": self.credentials,
                    "prefix": self.prefix,
                },
                "ingest.brokerplugins.TopicRulesPlugin": {
                    "prefix": self.prefix,
                    "ingest_username": self.credentials.ingest_username,
                },
            }
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": plugins,
        }
        self._broker = _broker(Broker, config)
        await self._broker.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        if self._broker is not None:
            done = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                async with asyncio.timeout(10):
                    await asyncio.wrap_future(done)
            except (TimeoutError, Exception) as exc:  # shutting down anyway
                log.warning("embedded broker shutdown: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 10)


class _SnapshotDict(dict[str, Any]):
    """A dict whose iteration walks a copy: amqtt awaits inside loops over its subscriptions."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().keys()))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return list(super().items())


def _broker(base: type[Any], config: dict[str, Any]) -> Any:
    """amqtt's ``Broker`` with the two defects above mended (see the module docstring)."""

    class Broker(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._subscriptions: dict[str, Any] = _SnapshotDict(vars(self)["_subscriptions"])

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if any(held.client_id == session.client_id for held, _ in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return Broker(config)
