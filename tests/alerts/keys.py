"""Maintenance API keys for tests that read protected endpoints of a served process."""

from __future__ import annotations

from pathlib import Path

import httpx

from api.auth import KeyStore
from ingest.db.database import PgDatabase
from tests.servers import Service

_tokens: dict[Path | str, str] = {}


def maintainer_key(data_dir: Path, db: str | None = None) -> str:
    """A maintainer key in the service's data dir, or in the PostgreSQL ``db`` of API
    replicas (created once per data dir or database)."""
    where: Path | str = db or data_dir
    if where not in _tokens:
        store = KeyStore(PgDatabase(db, pool_size=1)) if db else KeyStore.in_dir(data_dir)
        try:
            _tokens[where] = store.create("tests", "maintainer")[1]
        finally:
            store.close()
    return _tokens[where]


def maintainer_get(service: Service, path: str, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {maintainer_key(service.data_dir, service.db)}"}
    return httpx.get(service.base_url + path, params=params or None, headers=headers, timeout=10)  # type: ignore[arg-type]
