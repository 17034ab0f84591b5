"""``chargewatch api --db URL [--host H] [--port P]`` as a real process."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ingest.db import migrate
from tests.db.older import contents, migrated_behind
from tests.pg_server import PgServer
from tests.replica.test_replica import STATION, seeded
from tests.servers import Process, chargewatch_argv, eventually, free_port

ROOT = Path(__file__).resolve().parent.parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        chargewatch_argv(*args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_api_refuses_a_database_behind_its_schema(pg_url: str, pg_session: PgServer) -> None:
    """Never migrated and one migration behind (as the release before left it), the two at
    once: each refused with what to run, and nothing written."""
    older = pg_session.create_database(f"{pg_url.rsplit('/', 1)[1]}_older")
    revision = migrated_behind(older)
    before = {url: contents(url) for url in (pg_url, older)}
    with ThreadPoolExecutor(2) as pool:
        runs = pool.map(
            lambda url: run("api", "--db", url, "--port", str(free_port())), (pg_url, older)
        )
        for url, rev, done in zip(
            (pg_url, older), ("none (never migrated)", revision), runs, strict=True
        ):
            assert done.returncode == 1, done.stderr
            assert (
                f"chargewatch api: database {url} is at revision {rev}, this chargewatch"
                f" needs {migrate.head()}: run `chargewatch db upgrade --db {url}`"
            ) in done.stderr
            assert contents(url) == before[url]


def test_api_needs_a_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CHARGEWATCH_DB"}
    done = subprocess.run(
        chargewatch_argv("api"), cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "CHARGEWATCH_DB" in done.stderr
    done = run("api", "--db", f"sqlite:///{tmp_path}/state.db")
    assert done.returncode == 1
    assert "PostgreSQL" in done.stderr


def test_api_serves_the_district_from_the_database_named_in_the_environment(
    pg_url: str, tmp_path: Path
) -> None:
    seeded(pg_url)
    port = free_port()
    proc = Process(
        chargewatch_argv("api", "--host", "127.0.0.1", "--port", str(port)),
        port,
        ROOT,
        tmp_path / "api.log",
        env={"CHARGEWATCH_DB": pg_url, "CHARGEWATCH_INGEST__DATA_DIR": str(tmp_path / "data")},
    )
    proc.start()
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"

        def ready() -> None:
            r = httpx.get(f"{base}/readyz", timeout=5)
            assert r.status_code == 200, r.text

        eventually(ready, timeout=20)
        stations = httpx.get(f"{base}/v1/stations", timeout=5).json()["stations"]
        assert STATION in {s["id"] for s in stations}
        assert httpx.get(f"{base}/", timeout=5).status_code == 200
        assert b"cw_replica_listening 1.0" in httpx.get(f"{base}/metrics", timeout=5).content
    finally:
        proc.stop()
    assert proc.proc is not None
    assert proc.proc.returncode == 0, (tmp_path / "api.log").read_text()
