"""HTTP abuse against a real ``chargewatch serve`` process (uvicorn): bodies refused by size
before they are read, keys checked before bodies, every integer from a URL bounded (422,
never a 500), and the history window's ``to``.

Bodies are streamed over a raw socket, so the test sees when the answer comes: a refused
body is answered while the client is still sending, and the server's peak memory (VmHWM of
the serve process) does not grow by the body's size.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import KeyStore
from tests.servers import Service, chargewatch_serve

pytestmark = pytest.mark.e2e

BIG = 100 * 1024 * 1024  # 100 MiB announced or streamed
MiB = 1024 * 1024


@dataclass
class Served:
    service: Service
    maintainer: str
    admin: str

    def headers(self, role: str | None) -> dict[str, str]:
        token = {"maintainer": self.maintainer, "admin": self.admin}.get(role or "")
        return {} if token is None else {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("http-limits")
    data_dir = tmp / "data"
    data_dir.mkdir()
    store = KeyStore.in_dir(data_dir)
    try:
        maintainer = store.create("tests", "maintainer")[1]
        admin = store.create("tests-admin", "admin")[1]
    finally:
        store.close()
    with chargewatch_serve(tmp, None, data_dir=data_dir) as svc:
        yield Served(svc, maintainer, admin)


def peak_rss(service: Service) -> int:
    """The serve process's peak resident memory so far (bytes)."""
    assert service.process.proc is not None
    status = Path(f"/proc/{service.process.proc.pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any
    sent: int  # body bytes the client had written when the answer was complete


def stream_body(
    service: Service,
    path: str,
    size: int,
    headers: dict[str, str],
    *,
    chunked: bool = False,
    timeout: float = 30.0,
) -> Answer:
    """POST ``size`` bytes to ``path`` while reading: stops at the first complete answer (or
    when the server closes). Sends a Content-Length, or chunked transfer encoding."""
    port = int(service.base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.setblocking(False)
    piece = b'{"text":"' + b"x" * (64 * 1024 - 9)
    sent = 0
    pending = b""
    closed = False  # the server stopped reading: sending is over
    answer = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not pending and sent < size and not closed:
                body = piece[: size - sent]
                pending = b"%x\r\n%s\r\n" % (len(body), body) if chunked else body
                sent += len(body)
                if chunked and sent >= size:
                    pending += b"0\r\n\r\n"
            want_write = [sock] if pending else []
            readable, writable, _ = select.select([sock], want_write, [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    break
                answer += data
                if _complete(answer):
                    break
            if writable:
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    sent -= len(pending)  # never arrived
                    pending = b""
                    continue
                pending = pending[n:]
        else:
            raise AssertionError(f"no answer within {timeout}s ({sent} bytes sent)")
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return Answer(int(status_line.split()[1]), fields, json.loads(body), sent - len(pending))


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


REPORT = "/v1/reports"
NOTES = "/v1/alerts/1/notes"
WEBHOOKS = "/v1/webhooks"


@pytest.mark.parametrize(
    ("path", "role", "chunked", "status"),
    [
        (REPORT, None, False, 413),
        (REPORT, None, True, 413),
        (NOTES, None, False, 401),  # no key: refused before the body is looked at
        (NOTES, None, True, 401),
        (WEBHOOKS, None, False, 401),
        (WEBHOOKS, "maintainer", False, 403),  # a key without the role: the same
        (NOTES, "maintainer", False, 413),  # a good key: then the size counts
        (NOTES, "maintainer", True, 413),
        (WEBHOOKS, "admin", True, 413),
        ("/v1/no-such-thing", None, False, 404),  # any answer before the body: closed
    ],
)
def test_a_big_body_is_refused_before_it_is_read(
    served: Served, path: str, role: str | None, chunked: bool, status: int
) -> None:
    before = peak_rss(served.service)
    answer = stream_body(served.service, path, BIG, served.headers(role), chunked=chunked)
    assert answer.status == status, answer.body
    expected = {401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large"}[status]
    assert answer.body["error"] == expected, answer.body
    if status == 413:
        assert "bytes" in answer.body["detail"], answer.body  # says what the limit is
    # answered long before the client could finish, and the connection is not kept for
    # the rest of the upload
    assert answer.sent < BIG // 4, answer.sent
    assert answer.headers.get("connection") == "close", answer.headers
    grown = peak_rss(served.service) - before
    assert grown < 32 * MiB, f"serve's peak memory grew by {grown / MiB:.0f} MiB"


def test_bodies_within_the_limit_still_work(served: Served) -> None:
    base = served.service.base_url
    report = {"station": "wanguo-south", "category": "other", "text": "x" * 400}
    r = httpx.post(base + REPORT, json=report, timeout=10)
    assert r.status_code == 201, r.text
    alert_id = r.json()["alert_id"]
    r = httpx.post(
        f"{base}/v1/alerts/{alert_id}/notes",
        json={"text": "y" * 2000},
        headers=served.headers("maintainer"),
        timeout=10,
    )
    assert r.status_code == 201, r.text
    assert r.json()["notes"][-1]["text"] == "y" * 2000


HUGE = str(2**63)  # one above what SQLite's INTEGER holds
HUGER = "99999999999999999999"


@pytest.mark.parametrize(
    ("method", "path", "params", "role", "field"),
    [
        ("GET", "/v1/devices/WGS-P01/history", {"every": HUGER + "d"}, None, "query.every"),
        ("GET", "/v1/devices/WGS-P01/history", {"every": HUGER}, None, "query.every"),
        ("GET", "/v1/devices/WGS-P01/history", {"from": HUGER}, None, "query.from"),
        ("GET", "/v1/devices/WGS-P01/history", {"to": HUGER}, None, "query.to"),
        ("GET", "/v1/devices/WGS-P01/history", {"end": HUGER}, None, "query.end"),
        ("GET", "/v1/stations/wanguo-south/utilization", {"every": HUGER + "d"}, None, "query.every"),
        ("GET", "/v1/stations/wanguo-south/utilization", {"from": HUGER}, None, "query.from"),
        ("GET", "/v1/stations", {"offset": HUGE}, None, "query.offset"),
        ("GET", "/v1/stations", {"updated_since": HUGER}, None, "query.updated_since"),
        ("GET", f"/v1/alerts/{HUGE}", {}, "maintainer", "path.alert_id"),
        ("POST", f"/v1/alerts/{HUGE}/ack", {}, "maintainer", "path.alert_id"),
        ("POST", f"/v1/alerts/{HUGE}/resolve", {}, "maintainer", "path.alert_id"),
        ("POST", f"/v1/alerts/{HUGE}/notes", {}, "maintainer", "path.alert_id"),
        ("GET", "/v1/alerts", {"cursor": HUGE}, "maintainer", "query.cursor"),
        ("GET", "/v1/alerts/stream", {"after": HUGE}, "maintainer", "query.after"),
        ("DELETE", f"/v1/webhooks/{HUGE}", {}, "admin", "path.webhook_id"),
        ("GET", "/v1/stations/wanguo-south/forecast", {"weeks": HUGE}, None, "query.weeks"),
        ("GET", "/v1/deadletters", {"limit": HUGE}, "maintainer", "query.limit"),
    ],
)  # fmt: skip
def test_every_integer_in_a_url_has_a_range(
    served: Served, method: str, path: str, params: dict[str, str], role: str | None, field: str
) -> None:
    body = {"text": "n"} if path.endswith("/notes") else None
    r = httpx.request(
        method,
        served.service.base_url + path,
        params=params,
        json=body,
        headers=served.headers(role),
        timeout=10,
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request", r.text
    assert field in [p["field"] for p in r.json()["detail"]], r.text


def test_last_event_id_has_a_range(served: Served) -> None:
    headers = {**served.headers("maintainer"), "Last-Event-ID": HUGE}
    r = httpx.get(served.service.base_url + "/v1/alerts/stream", headers=headers, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == "query.Last-Event-ID", r.text


def test_the_history_window_ends_at_to(served: Served) -> None:
    url = served.service.base_url + "/v1/devices/WGS-P01/history"
    start, end = "2026-11-30T00:00:00Z", "2026-11-30T06:00:00Z"
    start_ms, end_ms = "2026-11-30T00:00:00.000Z", "2026-11-30T06:00:00.000Z"  # as answered
    for name in ("to", "end"):  # `to` as documented and sent by the console; `end` kept
        r = httpx.get(url, params={"from": start, name: end}, timeout=10)
        assert r.status_code == 200, r.text
        assert (r.json()["from"], r.json()["to"]) == (start_ms, end_ms), (name, r.json())
        assert r.json()["every_s"] == 120  # about 200 buckets of six hours
    util = served.service.base_url + "/v1/stations/wanguo-south/utilization"
    r = httpx.get(util, params={"from": start, "to": end}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["to"] == end_ms
    assert r.json()["points"][-1]["at"] == end_ms
    both = httpx.get(url, params={"from": start, "to": end, "end": start}, timeout=10)
    assert both.status_code == 422, both.text
    assert "query.end" in [p["field"] for p in both.json()["detail"]]


def test_each_route_has_its_limit(served: Served) -> None:
    base = served.service.base_url
    note = {"text": "n" * 17_000}  # a valid size for nobody: notes are limited to 16 KiB
    r = httpx.post(f"{base}/v1/alerts/1/notes", json=note, headers=served.headers("maintainer"))
    assert r.status_code == 413, r.text
    assert r.json() == {
        "error": "too_large",
        "detail": "the request body is limited to 16384 bytes here",
    }
    # the same size to reports passes the size check (64 KiB) and meets the text limit
    report = {"station": "wanguo-south", "category": "other", "text": "r" * 17_000}
    r = httpx.post(f"{base}{REPORT}", json=report, timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == "body.text"


def test_the_service_wide_limit_is_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEWATCH_BODY_MAX_BYTES", "2048")
    with chargewatch_serve(tmp_path, None) as svc:
        report = {"station": "wanguo-south", "category": "other", "text": "r" * 3000}
        r = httpx.post(svc.base_url + REPORT, json=report, timeout=10)
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == "the request body is limited to 2048 bytes here"
        report["text"] = "r" * 300
        assert httpx.post(svc.base_url + REPORT, json=report, timeout=10).status_code == 201
