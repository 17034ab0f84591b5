"""The dependency audit step (``.ci/audit.py``) fails on a known vulnerability and says so,
without failing, when its advisory source cannot be reached: never a silent pass.

The advisory source is a loopback HTTP server speaking OSV's query API (OSV itself is
not reachable from here); the audited environment is a directory holding one installed
package's metadata (``--path``), so each run takes a second."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "audit.py"
ADVISORY = {
    "id": "GHSA-test-0001",
    "summary": "demo-pkg 1.0 runs what it reads",
    "affected": [
        {
            "package": {"name": "demo-pkg", "ecosystem": "PyPI"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.1"}]}],
        }
    ],
}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    meta = tmp_path / "site" / "demo_pkg-1.0.dist-info"
    meta.mkdir(parents=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
    return meta.parent


@contextmanager
def osv(vulnerable: bool) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            query: dict[str, Any] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            hit = vulnerable and query["package"]["name"] == "demo-pkg"
            body = json.dumps({"vulns": [ADVISORY]} if hit else {}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/query"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run(site: Path, url: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SCRIPT), "--", "--path", str(site), "-s", "osv", "--osv-url", url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_a_known_vulnerability_fails_the_step(site: Path) -> None:
    with osv(vulnerable=True) as url:
        done = run(site, url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "VULNERABLE demo-pkg 1.0: GHSA-test-0001 (fixed in 1.1)" in done.stdout


def test_no_known_vulnerability_passes_and_says_what_was_checked(site: Path) -> None:
    with osv(vulnerable=False) as url:
        done = run(site, url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dependency audit: 1 packages checked, no known vulnerabilities" in done.stdout


def test_an_unreachable_advisory_source_is_said_not_passed_silently(site: Path) -> None:
    done = run(site, f"http://127.0.0.1:{free_port()}/v1/query")  # nothing listens there
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("dependency audit skipped: advisory source unreachable (")
    assert "No known vulnerabilities" not in done.stdout
