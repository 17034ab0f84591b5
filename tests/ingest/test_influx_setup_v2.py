"""``chargewatch influx setup`` for InfluxDB 2.x/3.x: the raw bucket's retention, a rollups
bucket kept forever, and the two DBRP mappings the InfluxQL reads need.

No InfluxDB 2.x/3.x server runs here (Debian ships 1.6.7 only; shared/architecture.md), so
the management API is a FAKE: a small local HTTP server of this test's own that keeps
buckets and mappings the way 2.x's /api/v2 answers them, and records every request. What is
checked is what the command sends and that running it twice changes nothing more."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from ingest import StoreError
from ingest.influx import InfluxHistory
from ingest.influxsetup import setup_v2

TOKEN = "t0ken"


class FakeInflux2:
    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, Any]] = {}
        self.dbrps: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, str]] = []  # method, path, authorization


@pytest.fixture
def fake() -> Iterator[tuple[FakeInflux2, int]]:
    state = FakeInflux2()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            state.requests.append((self.command, url.path, self.headers.get("Authorization", "")))
            if self.headers.get("Authorization") != f"Token {TOKEN}":
                return self._answer(401, {"code": "unauthorized"})
            match (self.command, url.path):
                case ("GET", "/api/v2/orgs"):
                    return self._answer(200, {"orgs": [{"id": "o1", "name": "district"}]})
                case ("GET", "/api/v2/buckets"):
                    found = [b for b in state.buckets.values() if b["name"] == q.get("name")]
                    return self._answer(200, {"buckets": found})
                case ("POST", "/api/v2/buckets"):
                    made = {**body, "id": f"b{len(state.buckets) + 1}"}
                    state.buckets[made["id"]] = made
                    return self._answer(201, made)
                case ("GET", "/api/v2/dbrps"):
                    found = [m for m in state.dbrps if m["database"] == q["db"]
                             and m["retention_policy"] == q["rp"]]  # fmt: skip
                    return self._answer(200, {"content": found})
                case ("POST", "/api/v2/dbrps"):
                    state.dbrps.append({**body, "id": f"d{len(state.dbrps) + 1}"})
                    return self._answer(201, state.dbrps[-1])
            if self.command == "PATCH" and url.path.startswith("/api/v2/buckets/"):
                bucket = state.buckets[url.path.rsplit("/", 1)[1]]
                bucket.update(body)
                return self._answer(200, bucket)
            return self._answer(404, {"code": "not found"})

        do_GET = do_POST = do_PATCH = _handle

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def history(port: int, token: str = TOKEN) -> InfluxHistory:
    return InfluxHistory(f"influx2://127.0.0.1:{port}?org=district&bucket=cw&token={token}")


def test_buckets_retention_and_mappings_made_then_kept(fake: tuple[FakeInflux2, int]) -> None:
    state, port = fake
    h = history(port)
    try:
        first = setup_v2(h, 30)
        assert {b["name"]: b["retentionRules"] for b in state.buckets.values()} == {
            "cw": [{"type": "expire", "everySeconds": 30 * 86_400}],
            "cw_rollups": [],  # forever: what remains of older days
        }
        raw_id = next(i for i, b in state.buckets.items() if b["name"] == "cw")
        rollups_id = next(i for i, b in state.buckets.items() if b["name"] == "cw_rollups")
        mappings = {(m["database"], m["retention_policy"]): (m["bucketID"], m["default"])
                    for m in state.dbrps}  # fmt: skip
        assert mappings == {
            ("cw", "autogen"): (raw_id, True),
            ("cw", "rollups"): (rollups_id, False),
        }
        assert all(auth == f"Token {TOKEN}" for _, _, auth in state.requests)
        assert any("created" in line for line in first)
        again = setup_v2(h, 60)  # run again: the retention updated, nothing doubled
    finally:
        h.close()
    assert len(state.buckets) == 2
    assert len(state.dbrps) == 2
    assert state.buckets[raw_id]["retentionRules"] == [
        {"type": "expire", "everySeconds": 60 * 86_400}
    ]
    assert not any("created" in line for line in again)


def test_a_refused_token_or_unknown_org_is_a_clear_error(fake: tuple[FakeInflux2, int]) -> None:
    _, port = fake
    h = history(port, token="wrong")
    try:
        with pytest.raises(StoreError, match="401"):
            setup_v2(h, 30)
    finally:
        h.close()
    h = InfluxHistory(f"influx2://127.0.0.1:{port}?org=nobody&bucket=cw&token={TOKEN}")
    try:
        with pytest.raises(StoreError, match="no organisation 'nobody'"):
            setup_v2(h, 30)
    finally:
        h.close()
