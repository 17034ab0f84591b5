"""The SSE alert stream, idle: a keepalive comment every ``sse_keepalive_s``, and a client
that goes away (the stream's task cancelled while it waits) ends it at once and unsubscribes
it: the wait is an ``asyncio.timeout``, which never swallows that cancel. Driven through the
ASGI app itself (httpx's ASGITransport buffers a whole answer, and this one never ends)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ingest.alerts.config import AlertsConfig
from ingest.config import IngestConfig
from tests.alerts.helpers import eventually
from tests.security.inprocess import in_process

KEEPALIVE_S = 0.05


async def test_an_idle_stream_keeps_alive_and_a_gone_client_is_unsubscribed(
    tmp_path: Path,
) -> None:
    config = IngestConfig(alerts=AlertsConfig(sse_keepalive_s=KEEPALIVE_S))
    async with in_process(tmp_path, alerts=True, config=config) as served:
        engine = served.ingest.alerts
        assert engine is not None
        token = served.key()
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": "/v1/alerts/stream", "raw_path": b"",
            "query_string": b"", "root_path": "", "server": ("testserver", 80),
            "client": ("127.0.0.1", 50000),
            "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
        }  # fmt: skip
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        stream = asyncio.create_task(served.app(scope, receive, send), name="sse-client")
        try:

            def kept_alive() -> None:
                bodies = [m.get("body", b"") for m in sent if m["type"] == "http.response.body"]
                assert bodies.count(b": keepalive\n\n") >= 3, sent

            await eventually(kept_alive, within_s=5)
            assert sent[0]["status"] == 200
            assert len(engine._subscribers) == 1
        finally:
            stream.cancel()  # the client's connection is gone: its task is cancelled
            done, _ = await asyncio.wait({stream}, timeout=5)
        assert done == {stream}  # ended at once, not at the next keepalive or never
        assert engine._subscribers == set()
