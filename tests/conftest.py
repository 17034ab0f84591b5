from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_server import PgServer, postgresql
from tests.servers import Process, mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Process]:
    """A real mosquitto on a free loopback port, persistence on, stopped by PID afterwards."""
    with mosquitto(tmp_path / "mosquitto") as proc:
        yield proc


@pytest.fixture(scope="session")
def pg_session() -> Iterator[PgServer]:
    """One real PostgreSQL for the whole run (tests that must stop or break their server start
    their own with ``tests.pg_server.postgresql()``)."""
    with postgresql() as server:
        yield server


@pytest.fixture
def pg_url(pg_session: PgServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty database on the session's PostgreSQL, for one test; dropped after it (its
    connections closed by force), so the session's cluster holds only the running test's."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    database = f"t_{name}_{uuid.uuid4().hex[:8]}"
    yield pg_session.create_database(database)
    pg_session.psql(f'DROP DATABASE "{database}" WITH (FORCE)')
