"""The middle test layer: the whole app over the in-process read side of a real ``Ingest``
started with no broker (``connect=False``). Device messages are injected in-process as the
MQTT source would hand them (Home Assistant's ``async_fire_mqtt_message``) and go through
the real pipeline (decode, order, twins, store, alert rules); the test asserts the HTTP
answer through httpx's ASGI transport. No broker, no socket, no mocks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from api.app import create_app
from api.auth import KeyStore
from api.settings import ServeSettings
from devices.catalog import Catalog
from devices.topics import Channel
from ingest.config import IngestConfig
from ingest.inprocess import read_and_act
from ingest.service import Ingest, now_ms


@dataclass
class Service:
    ingest: Ingest
    http: httpx.AsyncClient
    data_dir: Path

    def key(self, role: str = "maintainer", name: str = "li-wei") -> str:
        store = KeyStore.in_dir(self.data_dir)
        try:
            return store.create(name, role)[1]
        finally:
            store.close()

    async def fire(self, device_id: str, channel: Channel, message: dict[str, Any]) -> None:
        """Inject one message from ``device_id`` and wait until the pipeline has written
        it, acknowledged it and told its observers (twins, alerts, the API's views)."""
        topic = self.ingest.scheme.build(device_id, channel)
        self.ingest.inject(topic, json.dumps(message).encode())
        await self.ingest.drain(quiet_s=0, max_s=5)
        assert self.ingest.pipeline is not None
        assert self.ingest.pipeline.unacked == 0, "the injected message was not handled in 5 s"

    async def get_until(
        self, path: str, holds: Callable[[Any], bool], within_s: float = 3.0
    ) -> Any:
        """GET ``path`` until ``holds(json)`` (bounded): shared station views refresh a
        changed station within ``api.snapshots.REFRESH_MS``."""
        deadline = time.monotonic() + within_s
        while True:
            r = await self.http.get(path)
            assert r.status_code == 200, r.text
            body = r.json()
            if holds(body):
                return body
            assert time.monotonic() < deadline, f"{path} never held within {within_s}s: {body}"
            await asyncio.sleep(0.05)


@asynccontextmanager
async def service(tmp_path: Path, config: IngestConfig | None = None) -> AsyncIterator[Service]:
    data_dir = tmp_path / "data"
    config = (config or IngestConfig()).model_copy(update={"data_dir": data_dir})
    async with Ingest(config, Catalog.load(), connect=False) as ingest:
        app = create_app(*read_and_act(ingest), ServeSettings())
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield Service(ingest, http, data_dir)


def header(seq: int, boot: str = "boot-1") -> dict[str, Any]:
    return {"v": 1, "ts": now_ms(), "boot": boot, "seq": seq}
