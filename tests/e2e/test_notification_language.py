"""The notification language end to end: a ``chargewatch serve`` process (real mosquitto)
told by its environment to speak English, one subscription asking for Chinese over the
API, a rider's report, and what two real HTTP receivers get."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from devices.catalog import Catalog
from tests.alerts.receiver import receiver
from tests.e2e.test_alerts import bearer, create_key
from tests.servers import Process, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e


def test_the_setting_and_a_subscriptions_language_reach_the_receivers(
    broker: Process, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S", "0")
    monkeypatch.setenv("CHARGEWATCH_INGEST__ALERTS__WEBHOOKS__LANGUAGE", "en")
    station = Catalog.load().stations["guanhu-garden"]
    data_dir = tmp_path / "serve" / "data"
    admin = bearer(create_key(data_dir, "admin", "ops-lead"))
    with (
        receiver() as english,
        receiver() as chinese,
        chargewatch_serve(tmp_path / "serve", broker.url, data_dir=data_dir) as svc,
        httpx.Client(base_url=svc.base_url, timeout=10) as http,
    ):
        bad = http.post("/v1/webhooks", headers=admin, json={"url": english.url, "language": "fr"})
        assert bad.status_code == 422
        r = http.post("/v1/webhooks", headers=admin, json={"url": english.url})
        assert r.status_code == 201, r.text
        assert r.json()["language"] is None  # follows the setting
        r = http.post(
            "/v1/webhooks",
            headers=admin,
            json={"url": chinese.url, "format": "feishu", "language": "zh"},
        )
        assert r.status_code == 201, r.text
        listed = http.get("/v1/webhooks", headers=admin).json()["webhooks"]
        assert sorted(str(w["language"]) for w in listed) == ["None", "zh"]
        report = http.post(
            "/v1/reports",
            json={"station": station.id, "category": "fire", "text": "烟很大"},
        )
        assert report.status_code == 201, report.text

        def arrived() -> tuple[dict[str, Any], dict[str, Any]]:
            [en] = english.delivered()
            [zh] = chinese.delivered()
            return en.json, zh.json

        en, zh = eventually(arrived, timeout=10)
    assert en["language"] == "en"
    assert en["title"] == f"[CRITICAL] Opened: Rider report: Fire · {station.name.en}"
    assert f"address: {station.address.en}" in en["summary"]
    assert en["station"]["name"] == {"zh": station.name.zh, "en": station.name.en}
    text = zh["content"]["text"]
    assert text.startswith(f"【紧急】新告警：骑手报告：起火 · {station.name.zh}\n")
    assert f"站点：{station.name.zh}（{station.id}）" in text
    assert f"地址：{station.address.zh}" in text
    assert "（北京时间）" in text
