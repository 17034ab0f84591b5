"""The cluster's tests run on a database at this chargewatch's schema (``db upgrade``)."""

from __future__ import annotations

import pytest

from ingest.db import migrate


@pytest.fixture
def pg_url(pg_url: str) -> str:
    """The session PostgreSQL's new database for one test, migrated."""
    migrate.upgrade(pg_url)
    return pg_url
