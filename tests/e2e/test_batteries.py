"""Battery passports against a real mosquitto and a real ``chargewatch serve``, two
cabinets published by hand with a plain MQTT client: pack B-1 overheats in cabinet 1 slot
3 and is flagged; swapped into cabinet 2 slot 5, a critical alert opens there at once, the
rider API counts cabinet 2's ready batteries without it, its passport shows both stays and
the event, and no public answer names a serial."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.passport_store import PassportStore
from tests.alerts.keys import maintainer_key
from tests.api.district import Publisher, artifacts_dir, mini_catalog
from tests.e2e.test_pages import TIMEOUT_MS, csp_violations
from tests.servers import Service, chargewatch_serve, eventually, mosquitto

pytestmark = pytest.mark.e2e

STATION, CAB1, CAB2 = "battery-test", "BTT-C01", "BTT-C02"
ENV = {"CHARGEWATCH_INGEST__ALERTS__STARTUP_GRACE_S": "0"}


def _catalog(path: Path) -> None:
    mini_catalog(path, hand=False)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["stations"].append(
        {
            "id": STATION,
            "name": {"zh": "电池测试站", "en": "Battery Test Station"},
            "lat": 31.7530,
            "lon": 117.3110,
            "address": {"zh": "测试路 2 号", "en": "2 Test Road"},
            "site_kind": "roadside",
            "devices": [
                {"id": CAB1, "kind": "cabinet", "slots": 6},
                {"id": CAB2, "kind": "cabinet", "slots": 6},
            ],
        }
    )
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _slots(filled: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    slots: list[dict[str, Any]] = [{"n": n, "state": "empty"} for n in range(1, 7)]
    for n, slot in filled.items():
        slots[n - 1] = {"n": n, "state": "ready", "soc": 100, "temp_c": 26.0, **slot}
    return slots


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Service, Publisher, Publisher]]:
    _catalog(tmp_path / "catalog.json")
    with (
        mosquitto(tmp_path / "mosquitto") as broker,
        chargewatch_serve(
            tmp_path / "serve", broker.url, "--catalog", str(tmp_path / "catalog.json"), env=ENV
        ) as svc,
    ):
        one, two = Publisher(broker.port, CAB1), Publisher(broker.port, CAB2)
        try:
            yield svc, one, two
        finally:
            one.close()
            two.close()


def test_a_flagged_pack_is_caught_in_another_cabinet(
    served: tuple[Service, Publisher, Publisher],
) -> None:
    svc, one, two = served
    key = {"Authorization": f"Bearer {maintainer_key(svc.data_dir)}"}

    def get(path: str, **kw: Any) -> httpx.Response:
        return httpx.get(svc.base_url + path, timeout=10, **kw)

    def now() -> int:
        return int(time.time() * 1000)

    birth = {"online": True, "model": "M", "firmware": "f", "heartbeat_s": 30, "kind": "cabinet"}
    for cab in (one, two):
        cab.send("state", {**birth, "ts": now(), "slots": 6})
    one.send("status", {"ts": now(), "kind": "cabinet", "slots": _slots({3: {"battery": "B-1"}})})
    two.send(
        "status",
        {"ts": now(), "kind": "cabinet",
         "slots": _slots({5: {"battery": "B-2"}, 6: {"battery": "B-3"}})},
    )  # fmt: skip

    def ready_in_two() -> int:
        r = get(f"/v1/devices/{CAB2}")
        assert r.status_code == 200, r.text
        return int(r.json()["batteries_ready"])

    assert eventually(lambda: _equal(ready_in_two(), 2), timeout=15)

    def written() -> None:  # by the writer task, no request asking for it
        store = PassportStore.in_dir(svc.data_dir)
        try:
            passport = store.passport("B-2")
        finally:
            store.close()
        assert passport is not None
        assert [(s["device_id"], s["slot"]) for s in passport["stays"]] == [(CAB2, 5)]

    eventually(written, timeout=10)

    # B-1 overheats in cabinet 1 slot 3: temperature_high, B-1 flagged
    hot = _slots({3: {"battery": "B-1", "temp_c": 78.0, "state": "charging"}})
    one.send("status", {"ts": now(), "kind": "cabinet", "slots": hot})

    def flagged() -> dict[str, Any]:
        r = get("/v1/batteries/B-1", headers=key)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["flagged"] is True, body
        return body

    assert eventually(flagged, timeout=15)["flag_reason"] == "temperature_high"

    # a rider takes B-1 from cabinet 1 and returns it into cabinet 2 slot 5
    one.send("event", {"ts": now(), "type": "swap", "slot_out": 3, "battery_out": "B-1",
                       "soc_out": 80, "slot_in": 3, "battery_in": "B-7", "soc_in": 10})  # fmt: skip
    t_swap = time.monotonic()
    two.send("event", {"ts": now(), "type": "swap", "slot_out": 5, "battery_out": "B-2",
                       "soc_out": 100, "slot_in": 5, "battery_in": "B-1", "soc_in": 100})  # fmt: skip

    def alert_at_cabinet_two() -> dict[str, Any]:
        r = get("/v1/alerts", headers=key, params={"rule": "flagged_battery"})
        assert r.status_code == 200, r.text
        alerts = r.json()["alerts"]
        assert len(alerts) == 1, alerts
        alert: dict[str, Any] = alerts[0]
        return alert

    alert = eventually(alert_at_cabinet_two, timeout=10)
    waited = time.monotonic() - t_swap
    assert (alert["device"], alert["slot"], alert["severity"]) == (CAB2, 5, "critical")
    assert waited < 5, waited  # at once: no tick, no verification window

    # and the service holds the pack: a lock_battery command for that slot, asked by itself
    # (the plain client as the cabinet never answers, so it stays pending or sent)
    def lock_sent() -> dict[str, Any]:
        r = get(f"/v1/devices/{CAB2}/commands", headers=key)
        assert r.status_code == 200, r.text
        locks = [c for c in r.json()["commands"] if c["type"] == "lock_battery"]
        assert len(locks) == 1, locks
        lock: dict[str, Any] = locks[0]
        return lock

    lock = eventually(lock_sent, timeout=10)
    assert (lock["slot"], lock["state"]) in ((5, "pending"), (5, "sent")), lock
    assert lock["requested_by"].startswith("chargewatch"), lock

    # the cabinet reports B-1 ready at 100 %: riders see one ready battery, not two
    two.send(
        "status",
        {"ts": now(), "kind": "cabinet",
         "slots": _slots({5: {"battery": "B-1"}, 6: {"battery": "B-3"}})},
    )  # fmt: skip
    assert eventually(lambda: _equal(ready_in_two(), 1), timeout=15)

    def station_ready() -> None:
        r = get(f"/v1/stations/{STATION}")
        assert r.json()["cabinets"]["batteries_ready"] == 1, r.text

    eventually(station_ready, timeout=15)

    passport = get("/v1/batteries/B-1", headers=key).json()
    stays = [(s["device_id"], s["slot"], s["until"] is None) for s in passport["stays"]]
    assert stays == [(CAB2, 5, True), (CAB1, 3, False)]
    kinds = [(e["kind"], e["device_id"], e["slot"]) for e in passport["events"]]
    assert kinds == [("appeared", CAB2, 5), ("temperature_high", CAB1, 3)]
    assert passport["max_temp_c"] == 78.0

    listed = get("/v1/batteries", headers=key, params={"flagged": "true"}).json()
    assert [b["serial"] for b in listed["batteries"]] == ["B-1"]

    # public answers: no serial anywhere; the passport needs a key
    for path in (f"/v1/stations/{STATION}", f"/v1/devices/{CAB2}", f"/v1/devices/{CAB1}",
                 "/v1/stations", f"/v1/devices/{CAB2}/history"):  # fmt: skip
        text = get(path).text
        for serial in ("B-1", "B-2", "B-3", "B-7"):
            assert f'"{serial}"' not in text, (path, serial)
    assert get("/v1/batteries/B-1").status_code == 401
    assert get("/v1/batteries").status_code == 401

    # a pack that arrives already hot is flagged by the status that brings it: the
    # service runs the passports' observer before the alert engine's
    one.send(
        "status",
        {"ts": now(), "kind": "cabinet",
         "slots": _slots({4: {"battery": "B-5", "temp_c": 85.0, "state": "charging"}})},
    )  # fmt: skip

    def hot_on_arrival() -> None:
        r = get("/v1/batteries/B-5", headers=key)
        assert r.status_code == 200, r.text
        assert (r.json()["flagged"], r.json()["flag_reason"]) == (True, "temperature_high")

    eventually(hot_on_arrival, timeout=15)


def test_console_battery_view(served: tuple[Service, Publisher, Publisher], browser: Any) -> None:
    """The console in headless chromium: the flagged list (Chinese first), a passport by
    serial with its event and stay, English on the switch, and clearing the flag with a
    note (the prompt answered), which the API then shows."""
    svc, one, _ = served
    key = maintainer_key(svc.data_dir)
    now = int(time.time() * 1000)
    birth = {"online": True, "model": "M", "firmware": "f", "heartbeat_s": 30, "kind": "cabinet"}
    one.send("state", {**birth, "ts": now, "slots": 6})
    hot = _slots({2: {"battery": "C-9", "temp_c": 81.0, "state": "charging"}})
    one.send("status", {"ts": now, "kind": "cabinet", "slots": hot})
    auth = {"Authorization": f"Bearer {key}"}

    def flagged() -> None:
        r = httpx.get(f"{svc.base_url}/v1/batteries/C-9", headers=auth, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["flagged"] is True, r.text

    eventually(flagged, timeout=15)

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    refused = csp_violations(page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(svc.base_url + "/console")
    # selectors, not wait_for_function: its polling evaluates a string, which the
    # console's CSP (script-src 'self') refuses
    page.wait_for_selector("body[data-auth='no']")
    assert page.inner_text("#batteries-box h2") == "电池档案"
    page.fill("#key", key)
    page.click("#login button[type=submit]")
    row = '#flagged tr[data-serial="C-9"]'
    page.wait_for_selector(row)
    text = page.inner_text(row)
    assert "温度过高" in text
    assert f"{CAB1} · 2号仓位" in text
    assert "81 °C" in text
    page.click(f"{row} a")
    page.wait_for_selector('#battery h3[data-serial="C-9"][data-flagged="yes"]')
    assert "已标记" in page.inner_text("#battery h3")
    assert page.locator('#battery tr[data-kind="temperature_high"]').count() == 1
    assert page.locator(f'#battery tr[data-stay="{CAB1}/2"]').count() == 1

    page.click("#lang")
    page.wait_for_selector("#batteries-box h2:text-is('Battery passports')")
    page.wait_for_selector("#battery h3:has-text('FLAGGED')")
    assert "Temperature high" in page.inner_text('#battery tr[data-kind="temperature_high"]')

    page.on("dialog", lambda dialog: dialog.accept("cell replaced, tested OK"))
    page.click("#battery button.clear-flag")
    page.wait_for_selector('#battery h3[data-serial="C-9"][data-flagged="no"]')
    assert "null" not in page.inner_text("#battery")
    page.wait_for_selector('#flagged tr[data-serial="C-9"]', state="detached")
    page.screenshot(path=str(artifacts_dir() / "console-batteries.png"), full_page=True)
    passport = httpx.get(f"{svc.base_url}/v1/batteries/C-9", headers=auth, timeout=10).json()
    assert passport["flagged"] is False
    assert [c["note"] for c in passport["clearances"]] == ["cell replaced, tested OK"]

    page.fill("#battery-serial", "NO-SUCH")
    page.click("#battery-form button[type=submit]")
    page.wait_for_selector('#battery p[data-missing="NO-SUCH"]')
    assert not refused, refused
    assert not errors, errors
    context.close()


def _equal(a: int, b: int) -> bool:
    assert a == b, (a, b)
    return True
