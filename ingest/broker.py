"""The embedded MQTT broker (amqtt, in-process) for a machine with nothing else installed.

amqtt speaks MQTT 3.1.1 only and tops out at a few thousand messages/s (see
shared/architecture.md): plenty for one district, not for scale. Production uses mosquitto
or EMQX via ``--broker``.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from ingest import BrokerConfigError
from ingest.mqtt import BrokerURL

log = logging.getLogger(__name__)


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def url(self) -> BrokerURL:
        return BrokerURL(self.host, self.port)

    async def __aenter__(self) -> EmbeddedBroker:
        from amqtt.broker import Broker  # imported late: amqtt is slow to import

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as exc:
            raise BrokerConfigError(
                f"cannot start the embedded broker on {self.host}:{self.port}: {exc}"
            ) from exc
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
