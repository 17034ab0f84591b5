"""Alerts end to end: simulated devices -> real mosquitto -> ``chargewatch serve`` (a
process) -> alerts over HTTP, signed webhooks to a real local receiver, the SSE stream
resumed with Last-Event-ID; API keys from ``chargewatch keys`` guard every maintenance
endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devices.catalog import Catalog
from simulators.config import BrokerAddress, FleetConfig
from simulators.fleet import Fleet
from tests.alerts.helpers import eventually
from tests.alerts.receiver import Receiver, receiver
from tests.servers import Process, Service, chargewatch_argv, chargewatch_serve

pytestmark = pytest.mark.e2e

PILE, CABINET = "WGS-P01", "WGS-C01"
SECRET = "e2e-webhook-secret"
FAST = {  # small windows so the lifecycle plays out in seconds
    "CHARGEWATCH_INGEST__ALERTS__VERIFY_S": "2",
    "CHARGEWATCH_INGEST__ALERTS__TICK_S": "0.2",
    "CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0",
    "CHARGEWATCH_INGEST__ALERTS__ESCALATE_CRITICAL_S": "1.5",
    "CHARGEWATCH_INGEST__ALERTS__ESCALATE_MAX": "1",
    "CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__BACKOFF_S": "0.05",
    "CHARGEWATCH_INGEST__ALERTS__REPORTS__BURST": "3",
}


def create_key(data_dir: Path, role: str, name: str) -> str:
    out = subprocess.run(
        chargewatch_argv("keys", "--data-dir", str(data_dir), "create", "--name", name, "--role", role),
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    token = out.stdout.splitlines()[0]
    assert token.startswith("cwk_")
    return token


@pytest.fixture
def served(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Service, dict[str, str], Receiver]]:
    for name, value in FAST.items():
        monkeypatch.setenv(name, value)
    data_dir = tmp_path / "serve" / "data"
    keys = {
        "admin": create_key(data_dir, "admin", "ops-lead"),
        "maintainer": create_key(data_dir, "maintainer", "li-wei"),
    }
    with (
        receiver() as hook,
        chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as svc,
    ):
        yield svc, keys, hook


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def read_stream(
    client: httpx.AsyncClient, token: str, into: list[tuple[int, dict[str, Any]]], last: int | None
) -> None:
    import json

    headers = bearer(token) | ({"Last-Event-ID": str(last)} if last is not None else {})
    async with client.stream("GET", "/v1/alerts/stream", headers=headers, timeout=None) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        event_id = None
        async for line in resp.aiter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: ") and event_id is not None:
                into.append((event_id, json.loads(line[6:])))


async def test_simulated_faults_to_alerts_webhooks_and_stream(
    broker: Process, served: tuple[Service, dict[str, str], Receiver]
) -> None:
    svc, keys, hook = served
    maint = bearer(keys["maintainer"])
    catalog = Catalog.load()
    fleet_cfg = FleetConfig(
        broker=BrokerAddress("127.0.0.1", broker.port), heartbeat_s=1, fault_rate=0.0
    )
    async with httpx.AsyncClient(base_url=svc.base_url, timeout=10) as http:
        created = await http.post(
            "/v1/webhooks", headers=bearer(keys["admin"]), json={"url": hook.url, "secret": SECRET}
        )
        assert created.status_code == 201, created.text
        seen: list[tuple[int, dict[str, Any]]] = []
        first = asyncio.create_task(read_stream(http, keys["maintainer"], seen, None))

        async def alerts(**params: Any) -> list[dict[str, Any]]:
            r = await http.get("/v1/alerts", headers=maint, params=params)
            assert r.status_code == 200, r.text
            body: list[dict[str, Any]] = r.json()["alerts"]
            return body

        async with Fleet(catalog, fleet_cfg, only=[PILE, CABINET]) as fleet:
            await fleet.ready()
            # smoke in a cabinet: critical, at once, to the right target, signed webhook
            hook.fail_next = 2  # the receiver answers 500 twice first
            started = time.monotonic()
            fleet.set_smoke(CABINET, True)

            async def smoke_alert() -> dict[str, Any]:
                found = await alerts(device=CABINET, rule="smoke")
                assert len(found) == 1
                return found[0]

            smoke = await eventually(smoke_alert)
            assert time.monotonic() - started < 2.0
            assert (smoke["severity"], smoke["station"], smoke["slot"]) == (
                "critical",
                "wanguo-south",
                None,
            )

            def webhook_opened() -> None:
                assert ("opened", smoke["id"]) in hook.events()

            await eventually(webhook_opened)
            assert time.monotonic() - started < 2.0
            assert all(r.signature_ok(SECRET) for r in hook.requests)

            # a port fault on the pile; heartbeats repeat it every second: still one alert
            fleet.inject_fault(PILE, "over_current", 3)

            async def port_alert() -> dict[str, Any]:
                found = await alerts(device=PILE, rule="over_current")
                assert len(found) == 1
                return found[0]

            port = await eventually(port_alert)
            assert (port["severity"], port["port"], port["status"]) == ("major", 3, "open")
            seq = (await http.get(f"/v1/devices/{PILE}")).json()["status_seq"]

            async def heartbeats() -> None:
                assert (await http.get(f"/v1/devices/{PILE}")).json()["status_seq"] >= seq + 2

            await eventually(heartbeats)
            [same] = await alerts(device=PILE, rule="over_current")
            assert (same["id"], same["count"]) == (port["id"], 1)

            # flap within the verification window: the same alert, count 2
            fleet.clear_fault(PILE, "over_current", 3)

            async def clearing() -> None:
                [a] = await alerts(device=PILE, rule="over_current")
                assert a["clearing_since"] is not None

            await eventually(clearing)
            fleet.inject_fault(PILE, "over_current", 3)

            async def reopened() -> None:
                [a] = await alerts(device=PILE, rule="over_current")
                assert (a["id"], a["count"], a["clearing_since"]) == (port["id"], 2, None)

            await eventually(reopened)

            # escalation of the unacknowledged smoke alert, then clear -> auto-resolve
            def escalated() -> None:
                assert ("escalated", smoke["id"]) in hook.events()

            await eventually(escalated)
            fleet.set_smoke(CABINET, False)

            async def resolved() -> None:
                a = (await http.get(f"/v1/alerts/{smoke['id']}", headers=maint)).json()
                assert (a["status"], a["resolved_how"]) == ("resolved", "auto")

            await eventually(resolved, within_s=8)
            await eventually(lambda: _assert(("resolved", smoke["id"]) in hook.events()))
            assert [e for e in hook.events() if e[1] == smoke["id"]] == [
                ("opened", smoke["id"]), ("escalated", smoke["id"]), ("resolved", smoke["id"]),
            ]  # fmt: skip

            async def logged() -> dict[str, Any]:  # once the receiver's answer is read
                detail: dict[str, Any] = (
                    await http.get(f"/v1/alerts/{smoke['id']}", headers=maint)
                ).json()
                assert [(d["event"], d["status"]) for d in detail["deliveries"]] == [
                    ("opened", "delivered"), ("escalated", "delivered"), ("resolved", "delivered"),
                ]  # fmt: skip
                return detail

            detail = await eventually(logged)
            assert detail["deliveries"][0]["attempts"] == 3

            # the stream so far; drop it, make changes, resume from the last id seen
            await eventually(lambda: _assert(any(d["type"] == "resolved" for _, d in seen)))
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            last = seen[-1][0]
            ack = await http.post(
                f"/v1/alerts/{port['id']}/ack", headers=maint, json={"note": "on my way"}
            )
            assert ack.status_code == 200
            assert (ack.json()["status"], ack.json()["acknowledged_by"]) == (
                "acknowledged",
                "li-wei",
            )
            fleet.set_smoke(CABINET, True)  # a new smoke alert while nobody listens
            await eventually(lambda: _smoke_count(alerts, 2))
            resumed: list[tuple[int, dict[str, Any]]] = []
            second = asyncio.create_task(read_stream(http, keys["maintainer"], resumed, last))
            await eventually(lambda: _assert(any(d["type"] == "opened" for _, d in resumed)))
            second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await second
        ids = [i for i, _ in seen] + [i for i, _ in resumed]
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap, no repeat
        types = [d["type"] for _, d in resumed]
        assert types[:2] == ["acknowledged", "note"]


async def _smoke_count(alerts: Any, n: int) -> None:
    assert len(await alerts(device=CABINET, rule="smoke")) == n


def _assert(condition: bool) -> None:
    assert condition


MAINTENANCE = [  # (method, path, json body, admin only)
    ("GET", "/v1/deadletters", None, False),
    ("GET", "/v1/alerts", None, False),
    ("GET", "/v1/alerts/stream", None, False),
    ("GET", "/v1/alerts/1", None, False),
    ("POST", "/v1/alerts/1/ack", {}, False),
    ("POST", "/v1/alerts/1/resolve", {}, False),
    ("POST", "/v1/alerts/1/notes", {"text": "x"}, False),
    ("GET", "/v1/webhooks", None, True),
    ("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/hook"}, True),
    ("DELETE", "/v1/webhooks/1", None, True),
]


def test_keys_guard_every_maintenance_endpoint_and_riders_report(
    served: tuple[Service, dict[str, str], Receiver],
) -> None:
    svc, keys, _ = served
    with httpx.Client(base_url=svc.base_url, timeout=10) as http:
        for method, path, body, admin_only in MAINTENANCE:
            for headers in ({}, bearer("cwk_nope_nope"), {"Authorization": "Basic eDp5"}):
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
            if admin_only:
                r = http.request(method, path, json=body, headers=bearer(keys["maintainer"]))
                assert r.status_code == 403, (method, path, r.text)
                assert r.json()["error"] == "forbidden"
        # the rider side stays public
        assert http.get("/v1/stations/wanguo-south").status_code == 200
        report = {"station": "wanguo-south", "device": CABINET, "slot": 2, "category": "smoke"}
        first = http.post("/v1/reports", json={**report, "text": "烟 <b>smoke</b>\x00 from slot 2"})
        assert first.status_code == 201, first.text
        assert (first.json()["attached"], first.json()["severity"]) == (False, "critical")
        again = http.post("/v1/reports", json={**report, "text": "still smoking"})
        # the same alert, attached; each report has its own id (sentinels)
        assert again.json() == {
            **first.json(),
            "attached": True,
            "report_id": first.json()["report_id"] + 1,
        }
        alert_id = first.json()["alert_id"]
        detail = http.get(f"/v1/alerts/{alert_id}", headers=bearer(keys["maintainer"])).json()
        assert (detail["rule"], detail["code"], detail["slot"], detail["reports"]) == (
            "rider_report", "smoke", 2, 2,
        )  # fmt: skip
        assert [n["text"] for n in detail["notes"]] == [
            "[smoke] 烟 <b>smoke</b> from slot 2",  # control characters dropped, kept as text
            "[smoke] still smoking",
        ]
        assert http.post("/v1/reports", json={**report, "text": "x" * 501}).status_code == 422
        assert http.post("/v1/reports", json={**report, "station": "nope"}).status_code == 404
        assert http.post("/v1/reports", json={**report, "slot": 13}).status_code == 422
        third = http.post("/v1/reports", json={**report, "category": "damage"})
        assert third.status_code == 201  # the burst of 3 is used up now
        limited = http.post("/v1/reports", json=report)
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) > 0
        # X-Forwarded-For counts only from a configured proxy (none by default): a client
        # cannot buy a new bucket with it (tests/e2e/test_report_flood.py: behind a proxy)
        forged = {"X-Forwarded-For": "203.0.113.7"}
        other = http.post("/v1/reports", json={**report, "category": "damage"}, headers=forged)
        assert other.status_code == 429, other.text
        # a revoked key stops working at once
        assert http.get("/v1/alerts", headers=bearer(keys["maintainer"])).status_code == 200
        key_id = keys["maintainer"].split("_")[1]
        subprocess.run(
            chargewatch_argv("keys", "--data-dir", str(svc.data_dir), "revoke", key_id),
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        listed = subprocess.run(
            chargewatch_argv("keys", "--data-dir", str(svc.data_dir), "list"),
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        assert "li-wei" in listed
        assert keys["maintainer"] not in listed
        assert http.get("/v1/alerts", headers=bearer(keys["maintainer"])).status_code == 401
