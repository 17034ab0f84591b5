"""Maintenance API keys for tests that read protected endpoints of a served process."""

from __future__ import annotations

from pathlib import Path

import httpx

from api.auth import KeyStore
from tests.servers import Service

_tokens: dict[Path, str] = {}


def maintainer_key(data_dir: Path) -> str:
    """A maintainer key in the service's data dir (created once per data dir)."""
    if data_dir not in _tokens:
        store = KeyStore.in_dir(data_dir)
        try:
            _tokens[data_dir] = store.create("tests", "maintainer")[1]
        finally:
            store.close()
    return _tokens[data_dir]


def maintainer_get(service: Service, path: str, **params: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {maintainer_key(service.data_dir)}"}
    return httpx.get(service.base_url + path, params=params or None, headers=headers, timeout=10)  # type: ignore[arg-type]
