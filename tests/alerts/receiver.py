"""A real HTTP webhook receiver on a free loopback port (a thread), for the alert tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what we answered (0: nothing, we hung)
    at: float = 0.0  # time.monotonic() on arrival

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def signature_ok(self, secret: str) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-chargewatch-signature", ""), expected)


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with 500 first
    fail_until: float = 0.0  # answer 500 until this time.monotonic() (an outage)
    answer: int = 200  # the status of a request that is not failed by the two above
    hang_until: float = 0.0  # until this time.monotonic(), take requests and never answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def delivered(self) -> list[Received]:
        """Requests we answered 2xx (what counts as delivered)."""
        with self.lock:
            return [r for r in self.requests if r.status == 200]

    def down_for(self, seconds: float) -> None:
        """An outage from now: every request is answered 500 for ``seconds``."""
        with self.lock:
            self.fail_until = time.monotonic() + seconds

    def events(self) -> list[tuple[str, int]]:
        """(event, alert id) of every delivered notification, in arrival order."""
        return [(r.json["event"], r.json["alert"]["id"]) for r in self.delivered()]


@contextmanager
def receiver() -> Iterator[Receiver]:
    state: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            now = time.monotonic()
            if now < state.hang_until:  # a black hole: the client's timeout must act
                with state.lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    state.requests.append(Received(self.path, headers, body, 0, now))
                while time.monotonic() < state.hang_until and not stopping.is_set():
                    time.sleep(0.05)
                self.close_connection = True
                return
            with state.lock:
                failed = state.fail_next > 0 or now < state.fail_until
                status = 500 if failed else state.answer
                if state.fail_next > 0:
                    state.fail_next -= 1
                headers = {k.lower(): v for k, v in self.headers.items()}
                state.requests.append(Received(self.path, headers, body, status, now))
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    stopping = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
