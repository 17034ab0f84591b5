"""The PostgreSQL test server itself: it starts, answers, stops and starts again."""

from __future__ import annotations

import subprocess

import pytest

from tests.pg_server import PgServer, postgresql


def test_a_database_per_test(pg_session: PgServer, pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]
    assert pg_session.psql("SELECT current_database()", name) == name
    assert pg_session.psql("SHOW server_version_num", name) >= "150000"


def test_stopped_and_started_again_keeps_the_data() -> None:
    with postgresql() as pg:
        pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        pg.kill()
        with pytest.raises(subprocess.CalledProcessError):
            pg.psql("SELECT 1")
        pg.start()
        assert pg.psql("SELECT x FROM t") == "42"
