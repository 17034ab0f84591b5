"""API keys (api.auth.KeyStore) give the same answers on both engines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.auth import KeyRefused, KeyStore
from tests.db.engines import ENGINES, open_database


@pytest.fixture(params=ENGINES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    s = KeyStore(open_database(request, tmp_path))
    try:
        yield s
    finally:
        s.close()


def test_create_check_list_revoke(store: KeyStore) -> None:
    ops, ops_token = store.create("ops", "maintainer")
    boss, boss_token = store.create("boss", "admin", expires_at_ms=ops.created_at_ms + 60_000)
    assert store.check(ops_token) == ops
    assert store.check(boss_token) == boss
    assert [k.id for k in store.list()] in ([ops.id, boss.id], [boss.id, ops.id])
    with pytest.raises(KeyRefused, match="unknown"):
        store.check(ops_token[:-2] + "xx")
    with pytest.raises(KeyRefused, match="expired"):
        store.check(boss_token, now_ms=boss.created_at_ms + 60_000)
    assert store.revoke(ops.id) is True
    assert store.revoke(ops.id) is False
    assert store.revoke("nope") is False
    with pytest.raises(KeyRefused, match="revoked"):
        store.check(ops_token)
    (listed,) = [k for k in store.list() if k.id == ops.id]
    assert listed.revoked_at_ms is not None
    assert listed.revoked_at_ms >= ops.created_at_ms
    assert store.verify(ops_token) is None
