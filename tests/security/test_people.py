"""People: the actor of every maintenance action is the key's owner, admins manage keys over
the API (with an expiry), and every maintainer and admin action is in the audit log, CLI
key actions too. In-process through the whole ASGI app, a real AlertEngine and SQLite."""

from __future__ import annotations

import asyncio
import getpass
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from api.auth import KeyStore
from tests.security.inprocess import STATION, bearer, in_process
from tests.servers import chargewatch_argv


async def _report(http: object, station: str = STATION) -> int:
    r = await http.post("/v1/reports", json={"station": station, "category": "smoke"})  # type: ignore[attr-defined]
    assert r.status_code == 201, r.text
    return int(r.json()["alert_id"])


async def test_by_cannot_name_someone_else_and_every_act_is_audited(tmp_path: Path) -> None:
    async with in_process(tmp_path, alerts=True) as app:
        maint = bearer(app.key("maintainer", "li-wei"))
        admin = bearer(app.key("admin", "ops-lead"))
        alert_id = await _report(app.http)
        for path, body in (
            (f"/v1/alerts/{alert_id}/ack", {"by": "wang-fang", "note": "on my way"}),
            (f"/v1/alerts/{alert_id}/notes", {"text": "door jammed", "by": "wang-fang"}),
            (f"/v1/alerts/{alert_id}/resolve", {"by": "wang-fang"}),
        ):
            r = await app.http.post(path, json=body, headers=maint)
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["field"] == "body.by"
            assert "li-wei" in r.json()["detail"][0]["problem"]
        # refused acts changed nothing
        r = await app.http.get(f"/v1/alerts/{alert_id}", headers=maint)
        assert r.json()["status"] == "open"
        assert r.json()["notes"] == [] or all(n["author"] != "wang-fang" for n in r.json()["notes"])

        r = await app.http.post(f"/v1/alerts/{alert_id}/ack", json={"note": "x"}, headers=maint)
        assert r.status_code == 200, r.text
        assert r.json()["acknowledged_by"] == "li-wei"
        r = await app.http.post(
            f"/v1/alerts/{alert_id}/notes", json={"text": "door jammed", "by": "li-wei"},
            headers=maint,
        )  # fmt: skip
        assert r.status_code == 201, r.text
        r = await app.http.post(f"/v1/alerts/{alert_id}/resolve", headers=maint)
        assert r.status_code == 200, r.text
        assert r.json()["resolved_by"] == "li-wei"
        r = await app.http.post(
            "/v1/webhooks",
            json={"url": "https://hooks.example.com/robot/send?access_token=SECRET-TOKEN"},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        hook = r.json()["id"]
        r = await app.http.delete(f"/v1/webhooks/{hook}", headers=admin)
        assert r.status_code == 204

        # the audit log is for admins
        r = await app.http.get("/v1/audit", headers=maint)
        assert r.status_code == 403
        r = await app.http.get("/v1/audit", headers=admin)
        assert r.status_code == 200, r.text
        entries = r.json()["entries"]
        got = [(e["action"], e["target"], e["actor"]["name"], e["actor"]["role"]) for e in entries]
        assert got == [
            ("webhook.delete", str(hook), "ops-lead", "admin"),
            ("webhook.create", str(hook), "ops-lead", "admin"),
            ("alert.resolve", str(alert_id), "li-wei", "maintainer"),
            ("alert.note", str(alert_id), "li-wei", "maintainer"),
            ("alert.acknowledge", str(alert_id), "li-wei", "maintainer"),
        ]
        create = entries[1]
        assert create["detail"]["host"] == "hooks.example.com"
        assert "SECRET-TOKEN" not in r.text  # a chat webhook's token is in its URL
        assert "door jammed" not in r.text  # note texts stay in the alert
        assert entries[3]["detail"] == {"chars": len("door jammed")}
        ids = {e["actor"]["id"] for e in entries}
        assert len(ids) == 2
        assert all(len(i) == 8 for i in ids)
        # filters and paging
        r = await app.http.get("/v1/audit", params={"action": "alert.note"}, headers=admin)
        assert [e["action"] for e in r.json()["entries"]] == ["alert.note"]
        r = await app.http.get("/v1/audit", params={"limit": 2}, headers=admin)
        page = r.json()
        assert len(page["entries"]) == 2
        r = await app.http.get(
            "/v1/audit", params={"limit": 10, "cursor": page["next_cursor"]}, headers=admin
        )
        assert [e["action"] for e in r.json()["entries"]] == [
            "alert.resolve", "alert.note", "alert.acknowledge",
        ]  # fmt: skip
        for bad in ({"limit": 1001}, {"action": "drop.tables"}, {"since": "2026-01-01T00:00:00"}):
            r = await app.http.get("/v1/audit", params=bad, headers=admin)
            assert r.status_code == 422, (bad, r.text)


async def test_admins_manage_keys_over_the_api(tmp_path: Path) -> None:
    async with in_process(tmp_path) as app:
        admin = bearer(app.key("admin", "ops-lead"))
        maint = bearer(app.key("maintainer", "li-wei"))
        r = await app.http.post("/v1/keys", json={"name": "night-shift"}, headers=maint)
        assert r.status_code == 403
        r = await app.http.post("/v1/keys", json={"name": "night-shift", "ttl_s": 3600},
                                headers=admin)  # fmt: skip
        assert r.status_code == 201, r.text
        new = r.json()
        assert new["role"] == "maintainer"
        expires = datetime.fromisoformat(new["expires_at"])
        assert abs((expires - datetime.now(UTC)).total_seconds() - 3600) < 60
        token = new["token"]
        assert token.startswith(f"cwk_{new['id']}_")
        # the new key works at once; its token is never shown again
        r = await app.http.get(f"/v1/stations/{STATION}", headers=bearer(token))
        assert r.status_code == 200, r.text
        r = await app.http.get("/v1/keys", headers=admin)
        assert r.status_code == 200
        listed = {k["id"]: k for k in r.json()["keys"]}
        assert listed[new["id"]]["active"] is True
        assert token.split("_")[-1] not in r.text
        assert "token" not in listed[new["id"]]
        assert "hash" not in listed[new["id"]]
        # revoke: its next request is 401 and says why
        r = await app.http.delete(f"/v1/keys/{new['id']}", headers=admin)
        assert r.status_code == 204
        r = await app.http.get("/v1/alerts", headers=bearer(token))
        assert r.status_code == 401
        assert "revoked" in r.json()["detail"]
        r = await app.http.delete(f"/v1/keys/{new['id']}", headers=admin)
        assert r.status_code == 404
        for bad in (
            {"name": ""},
            {"name": "dae\u202enilrog"},  # shown reversed, as someone else's name
            {"name": "li-wei\u200b"},  # looks like li-wei
            {"name": " li-wei"},
            {"name": "two\nlines"},
            {"name": "x", "role": "root"},
            {"name": "x", "ttl_s": 0},
            {"name": "x", "expires_at": "2020-01-01T00:00:00Z"},
            {"name": "x", "expires_at": "2099-01-01T00:00:00"},
            {"name": "x", "ttl_s": 60, "expires_at": "2099-01-01T00:00:00Z"},
        ):
            r = await app.http.post("/v1/keys", json=bad, headers=admin)
            assert r.status_code == 422, (bad, r.text)
        r = await app.http.get("/v1/audit", headers=admin)
        actions = [(e["action"], e["target"]) for e in r.json()["entries"]]
        assert actions == [("key.revoke", new["id"]), ("key.create", new["id"])]


async def test_an_expired_key_gets_401_saying_so(tmp_path: Path) -> None:
    async with in_process(tmp_path) as app:
        store = KeyStore.in_dir(app.data_dir)
        try:
            _, token = store.create("short", "maintainer", time.time_ns() // 1_000_000 + 300)
        finally:
            store.close()
        r = await app.http.get(f"/v1/stations/{STATION}", headers=bearer(token))
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r = await app.http.get(f"/v1/stations/{STATION}", headers=bearer(token))
            if r.status_code == 401:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 401
        assert "expired at" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_the_keys_command_expires_and_is_audited(tmp_path: Path) -> None:
    data = tmp_path / "data"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = chargewatch_argv("keys", "--data-dir", str(data), *args)
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    out = run("create", "--name", "contractor", "--expires", "7d")
    assert out.returncode == 0, out.stderr
    key_id = out.stdout.split()[2]
    assert "expires" in out.stdout
    assert run("create", "--name", "x", "--expires", "yesterday").returncode == 2
    assert run("create", "--name", "li\u202eiew").returncode == 2
    assert run("create", "--name", "x", "--expires", "2001-01-01T00:00:00Z").returncode == 2
    assert run("revoke", key_id).returncode == 0
    listing = run("list").stdout
    assert "expires" in listing
    in_a_week = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y-%m-%d")
    assert in_a_week in listing

    from api.audit import AuditLog, AuditQuery

    log = AuditLog.in_dir(data)
    try:
        entries = log.query(AuditQuery())
    finally:
        log.close()
    assert [(e["action"], e["target"]) for e in entries] == [
        ("key.revoke", key_id), ("key.create", key_id),
    ]  # fmt: skip
    assert {e["actor"]["id"] for e in entries} == {"cli"}
    assert {e["actor"]["name"] for e in entries} == {getpass.getuser()}
    assert entries[1]["detail"]["name"] == "contractor"


@pytest.mark.parametrize("by", [None, "li-wei"])
async def test_by_may_repeat_the_keys_name(tmp_path: Path, by: str | None) -> None:
    async with in_process(tmp_path, alerts=True) as app:
        maint = bearer(app.key("maintainer", "li-wei"))
        alert_id = await _report(app.http)
        body = {} if by is None else {"by": by}
        r = await app.http.post(f"/v1/alerts/{alert_id}/ack", json=body, headers=maint)
        assert r.status_code == 200, r.text
        assert r.json()["acknowledged_by"] == "li-wei"


def test_keys_from_before_expiry_keep_working(tmp_path: Path) -> None:
    """A data dir whose api_keys table has no expires_at_ms column (as written before keys
    could expire): its keys still admit, and new keys can expire."""
    import hashlib
    import sqlite3

    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "chargewatch.db")
    db.execute(
        "CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,"
        " hash TEXT NOT NULL, created_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER)"
        " WITHOUT ROWID"
    )
    secret = "s" * 43
    db.execute(
        "INSERT INTO api_keys VALUES ('0badc0de', 'old', 'admin', ?, 1, NULL)",
        (hashlib.sha256(secret.encode()).hexdigest(),),
    )
    db.commit()
    db.close()
    store = KeyStore.in_dir(data)
    try:
        old = store.check(f"cwk_0badc0de_{secret}")
        assert (old.name, old.role, old.expires_at_ms) == ("old", "admin", None)
        soon = time.time_ns() // 1_000_000 + 60_000
        _, token = store.create("new", "maintainer", soon)
        assert store.check(token).expires_at_ms == soon
    finally:
        store.close()
