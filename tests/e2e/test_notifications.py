"""Undelivered notifications over HTTP: a ``chargewatch serve`` process (real mosquitto)
with two webhook subscriptions, one to a receiver that is down and one that refuses;
``GET /v1/notifications`` shows what waits for its retry and what was given up, with the
maintainer key, and the configured deadline turns a pending delivery into an expired one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.alerts.receiver import Receiver, receiver
from tests.e2e.test_alerts import bearer, create_key
from tests.servers import Process, Service, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

DEADLINE_S = 4.0
SETTINGS = {
    "CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0",
    "CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__BACKOFF_S": "0.1",
    "CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__BACKOFF_MAX_S": "0.5",
    "CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__DEADLINE_S": str(DEADLINE_S),
}


@pytest.fixture
def served(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Service, dict[str, str], Receiver, Receiver]]:
    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    data_dir = tmp_path / "serve" / "data"
    keys = {
        "admin": create_key(data_dir, "admin", "ops-lead"),
        "maintainer": create_key(data_dir, "maintainer", "li-wei"),
    }
    with (
        receiver() as down,
        receiver() as refusing,
        chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as svc,
    ):
        down.down_for(3600)
        refusing.answer = 410  # gone: not worth retrying
        yield svc, keys, down, refusing


def test_undelivered_notifications_are_listed_for_maintainers(
    served: tuple[Service, dict[str, str], Receiver, Receiver],
) -> None:
    svc, keys, down, refusing = served
    admin, maint = bearer(keys["admin"]), bearer(keys["maintainer"])
    with httpx.Client(base_url=svc.base_url, timeout=10) as http:
        subs = {}
        for name, hook in (("night shift", down), ("old room", refusing)):
            r = http.post("/v1/webhooks", headers=admin, json={"url": hook.url, "name": name})
            assert r.status_code == 201, r.text
            subs[name] = r.json()["id"]
        report = http.post(
            "/v1/reports",
            json={"station": "wanguo-south", "category": "smoke", "text": "smoke from slot 3"},
        )
        assert report.status_code == 201, report.text
        alert_id = report.json()["alert_id"]
        reported = time.monotonic()

        def listed(state: str) -> list[dict[str, Any]]:
            r = http.get("/v1/notifications", headers=maint, params={"state": state})
            assert r.status_code == 200, r.text
            found: list[dict[str, Any]] = r.json()["notifications"]
            return found

        def retrying() -> dict[str, Any]:
            [pending] = listed("pending")
            # failing_after (3) failures done: an attempt is counted as it starts, so the
            # third can still be in flight (not yet a failure) while 3 are listed
            assert pending["attempts"] >= 4
            return pending

        pending = eventually(retrying, timeout=DEADLINE_S - 1)
        assert time.monotonic() - reported < DEADLINE_S  # seen while it was still pending
        assert pending["state"] == "pending"
        assert pending["subscription"] == {"id": subs["night shift"], "name": "night shift"}
        assert (pending["alert_id"], pending["event"]) == (alert_id, "opened")
        assert pending["last_error"] == "HTTP 500"
        assert pending["next_try_at"] is not None
        assert pending["alert"]["severity"] == "critical"
        assert pending["alert"]["station"] == "wanguo-south"
        assert "url" not in pending["subscription"]  # a robot's URL carries its token
        metrics = http.get("/metrics").text.splitlines()
        assert "chargewatch_webhook_pending 1.0" in metrics
        assert "chargewatch_webhooks_failing 1.0" in metrics  # before anything gave up

        [refused] = eventually(lambda: _nonempty(listed("failed")))
        assert refused["subscription"]["id"] == subs["old room"]
        assert (refused["state"], refused["attempts"], refused["http_status"]) == (
            "failed",
            1,
            410,
        )
        assert len(refusing.requests) == 1

        def expired() -> list[dict[str, Any]]:
            gone = [n for n in listed("failed") if n["state"] == "expired"]
            assert len(gone) == 1
            return gone

        [gone] = eventually(expired, timeout=DEADLINE_S + 5)
        assert gone["id"] == pending["id"]
        assert "HTTP 500" in gone["last_error"]
        assert gone["attempts"] == len(down.requests) >= 3
        assert listed("pending") == []
        both = http.get("/v1/notifications", headers=maint).json()  # default: undelivered
        assert sorted(n["state"] for n in both["notifications"]) == ["expired", "failed"]
        assert both["pending"] == 0
        metrics = http.get("/metrics").text.splitlines()
        assert "chargewatch_webhook_pending 0.0" in metrics
        assert 'chargewatch_webhook_deliveries_total{result="failed"} 2.0' in metrics

        detail = http.get(f"/v1/alerts/{alert_id}", headers=maint).json()
        assert sorted((d["webhook_id"], d["status"]) for d in detail["deliveries"]) == [
            (subs["night shift"], "expired"),
            (subs["old room"], "failed"),
        ]
        assert all(d["deadline"] for d in detail["deliveries"])

        assert http.get("/v1/notifications").status_code == 401
        bad = http.get("/v1/notifications", headers=maint, params={"state": "lost"})
        assert bad.status_code == 422


def _nonempty(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert items
    return items
