"""The rider page and the maintenance console in headless Debian chromium (Playwright's
Python package driving the system browser), against a real mosquitto, a ``chargewatch
serve`` process and simulated devices. Screenshots go to test-artifacts/."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.alerts.keys import maintainer_key
from tests.alerts.receiver import receiver
from tests.api.district import District, artifacts_dir, serve_district
from tests.servers import chargewatch_argv, chargewatch_serve, eventually

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 10_000


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[District]:
    with serve_district(tmp_path_factory.mktemp("pages"), hand=False) as district:
        yield district


def phone(browser: Any) -> Any:
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        locale="zh-CN",
    )
    context.set_default_timeout(TIMEOUT_MS)
    return context


def csp_violations(page: Any) -> list[str]:
    """What the page's Content-Security-Policy refused, as chromium reports it (an inline
    script, style or handler left in the pages would be here)."""
    refused: list[str] = []
    page.on(
        "console",
        lambda msg: refused.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => console.error("
        "'Content Security Policy refused ' + e.violatedDirective + ' ' + e.blockedURI))"
    )
    return refused


def card_counts(page: Any) -> dict[str, dict[str, str]]:
    return page.eval_on_selector_all(
        "#stations .card",
        """cards => Object.fromEntries(cards.map(c => [c.dataset.station,
             Object.fromEntries([...c.querySelectorAll('[data-count]')].map(n => [n.dataset.count, n.textContent]))]))""",
    )


def test_rider_page_live_counts_detail_and_report(d: District, browser: Any) -> None:
    context = phone(browser)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    refused = csp_violations(page)
    page.goto(d.service.base_url + "/")
    page.wait_for_selector("#stations .card")
    assert page.inner_text("h1") == "骑手充换电", "Chinese by default"

    # pick a location: tap the map near the middle of the district
    box = page.locator("#map").bounding_box()
    page.locator("#map").click(position={"x": box["width"] * 0.45, "y": box["height"] * 0.55})
    page.wait_for_function("() => document.body.dataset.origin !== undefined")
    lat, lon = (float(x) for x in page.evaluate("document.body.dataset.origin").split(","))

    def same_as_api() -> list[dict[str, Any]]:
        api = d.get("/v1/stations", lat=lat, lon=lon, radius_m=5000)["stations"]
        shown = card_counts(page)
        assert list(shown) == [s["id"] for s in api], "sorted by distance like the API"
        for s in api:
            assert shown[s["id"]] == {
                "ports_free": str(s["piles"]["ports_free"]),
                "batteries_ready": str(s["cabinets"]["batteries_ready"]),
            }, s["id"]
        return api

    api = eventually(same_as_api, timeout=10)
    page.screenshot(path=str(artifacts_dir() / "rider-list.png"), full_page=True)

    # a slot changes in the simulator: the count on the page follows by SSE, no reload
    target = next(s for s in api if s["cabinets"]["batteries_ready"] > 0)
    cabinet = next(
        v for v in d.get(f"/v1/stations/{target['id']}")["devices"]
        if v["kind"] == "cabinet" and v["batteries_ready"] > 0
    )  # fmt: skip
    slot = next(s for s in cabinet["slots"] if s["ready"])
    before = target["cabinets"]["batteries_ready"]
    loads = page.evaluate("document.body.dataset.loaded")
    started = time.monotonic()
    d.fleet.call(lambda f: f.take_battery(cabinet["id"], slot["n"]))
    selector = f'#stations [data-station="{target["id"]}"] [data-count="batteries_ready"]'
    page.wait_for_function(
        "([sel, want]) => document.querySelector(sel)?.textContent === want",
        arg=[selector, str(before - 1)],
    )
    live_s = time.monotonic() - started
    assert page.evaluate("document.body.dataset.loaded") == loads, "updated live, not reloaded"
    print(f"rider page: slot change shown {live_s:.2f}s after the simulator made it")

    # open the station: each device with its ports/slots, the best-time chart
    page.click(f'#stations [data-station="{target["id"]}"] .card-btn')
    page.wait_for_selector(f'[data-station-title="{target["id"]}"]')
    detail = d.get(f"/v1/stations/{target['id']}")
    assert page.locator("#detail-body article.device").count() == len(detail["devices"])
    shown_cab = page.locator(f'article[data-device="{cabinet["id"]}"] .unit').count()
    assert shown_cab == len(cabinet["slots"])
    page.wait_for_function(
        "() => document.querySelector('#chart svg') || document.querySelector('#chart-note').textContent"
    )
    # English switch
    page.click("#lang")
    assert page.inner_text("h1") == "Rider charging & swaps"
    page.click("#lang")
    page.screenshot(path=str(artifacts_dir() / "rider-station.png"), full_page=True)

    # report a problem on one slot
    page.click("#report-open")
    page.select_option("#report-device", cabinet["id"])
    page.fill("#report-unit", str(slot["n"]))
    page.select_option("#report-category", "damage")
    page.fill("#report-text", "仓门关不上 <b>door</b>")
    page.click("#report button[type=submit]")
    page.wait_for_selector("#report-result.ok")
    alert_id = int(page.get_attribute("#report-result", "data-alert-id"))
    assert alert_id > 0
    page.screenshot(path=str(artifacts_dir() / "rider-report.png"), full_page=True)
    assert not errors, errors
    assert not refused, refused
    context.close()
    d.fleet.call(lambda f: f.insert_battery(cabinet["id"], slot["n"], 96.0))


def make_key(d: District, role: str = "maintainer", name: str = "console-test") -> str:
    out = subprocess.run(
        chargewatch_argv("keys", "--data-dir", str(d.service.data_dir), "create", "--name", name, "--role", role),
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return out.stdout.split()[0]


def test_console_login_and_acknowledge(d: District, browser: Any) -> None:
    station = next(iter(d.catalog.stations))
    opened = httpx.post(
        d.service.base_url + "/v1/reports",
        json={"station": station, "category": "not_working", "text": "console test"},
        timeout=10,
    )
    assert opened.status_code == 201, opened.text
    alert_id = opened.json()["alert_id"]
    key = make_key(d)

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    refused = csp_violations(page)
    page.goto(d.service.base_url + "/console")
    # a selector, not wait_for_function: a predicate not true at once is polled as a string
    # evaluated in the page, which the console's CSP (script-src 'self') refuses
    page.wait_for_selector("body[data-auth='no']")
    page.fill("#key", key)
    page.click("#login button[type=submit]")
    row = f'#alerts tr[data-alert-id="{alert_id}"]'
    page.wait_for_selector(row)
    assert page.get_attribute(row, "data-status") == "open"
    page.evaluate(f"location.hash = '#alert-{alert_id}'")  # what a notification links to
    page.wait_for_selector(f"{row}.focus")
    page.wait_for_selector("#health .health")
    assert page.locator("#health .health").count() == len(d.catalog.stations)
    page.click(f"{row} button.ack")
    page.wait_for_selector(f'{row}[data-status="acknowledged"]')
    acked = httpx.get(
        f"{d.service.base_url}/v1/alerts/{alert_id}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    ).json()
    assert acked["status"] == "acknowledged"
    assert acked["acknowledged_by"] == "console-test"
    # a new alert shows up live (the SSE stream read with the key), not at the next refresh
    page.wait_for_selector("body[data-live='yes']")
    loads = int(page.evaluate("document.body.dataset.streamLoads || '0'"))
    second = httpx.post(
        d.service.base_url + "/v1/reports",
        json={"station": list(d.catalog.stations)[1], "category": "not_working", "text": "live"},
        timeout=10,
    )
    assert second.status_code == 201, second.text
    page.wait_for_selector(f'#alerts tr[data-alert-id="{second.json()["alert_id"]}"]', timeout=3000)
    # loaded because the stream said so (a counter only the stream's handler moves)
    page.wait_for_function(f"() => Number(document.body.dataset.streamLoads || 0) > {loads}")
    device = next(iter(d.catalog.devices))
    page.fill("#device-id", device)
    page.click("#device-form button[type=submit]")
    page.wait_for_selector(f'#device h3[data-device="{device}"]')
    assert page.locator("#device polyline").count() >= 1
    page.screenshot(path=str(artifacts_dir() / "console.png"), full_page=True)
    assert not refused, refused
    context.close()


def test_the_console_cannot_be_framed(d: District, browser: Any) -> None:
    """The console keeps its key in localStorage: another site must not frame it and lure a
    maintainer into clicks. Chromium refuses the frame (frame-ancestors 'none')."""
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    # a page of another origin (another loopback port) that frames the console
    html = f"<iframe id=f src='{d.service.base_url}/console'></iframe>".encode()

    class Framing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Framing)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
    finally:
        other.shutdown()
        other.server_close()
    frame = page.frame_locator("#f")

    def settled() -> str:
        urls = [f.url for f in page.frames[1:]]
        assert urls, "the frame is not there yet"
        assert urls[0] not in ("", "about:blank"), urls
        return urls[0]

    # without the headers the frame holds the console, logged out: its #login form
    assert eventually(settled, timeout=10).startswith("chrome-error://"), page.frames
    assert frame.locator("#login").count() == 0
    context.close()


def test_console_lists_undelivered_notifications(d: District, browser: Any) -> None:
    """A webhook receiver is down: the notification of a new alert waits for its next try,
    and the console's panel shows it (subscription, alert, attempts, last error)."""
    admin = {"Authorization": f"Bearer {make_key(d, 'admin', 'console-admin')}"}
    key = make_key(d)
    base = d.service.base_url
    pile = next(v for v in d.catalog.devices.values() if v.kind == "pile")
    with receiver() as down, httpx.Client(base_url=base, timeout=10) as http:
        down.down_for(3600)
        created = http.post(
            "/v1/webhooks", headers=admin, json={"url": down.url, "name": "夜班 night shift"}
        )
        assert created.status_code == 201, created.text
        webhook_id = created.json()["id"]
        try:
            d.fleet.call(lambda f: f.inject_fault(pile.id, "over_current", 1))

            def pending() -> dict[str, Any]:
                r = http.get("/v1/notifications", headers=admin, params={"state": "pending"})
                found = [n for n in r.json()["notifications"] if n["alert"]["device"] == pile.id]
                assert len(found) == 1
                assert found[0]["attempts"] >= 2
                return found[0]

            notification = eventually(pending, timeout=15)

            context = browser.new_context(viewport={"width": 1200, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(base + "/console")
            page.fill("#key", key)
            page.click("#login button[type=submit]")
            row = f'#notifications tr[data-delivery-id="{notification["id"]}"]'
            page.wait_for_selector(row)
            assert page.get_attribute(row, "data-state") == "pending"
            text = page.inner_text(row)
            assert "夜班 night shift" in text
            assert "HTTP 500" in text
            assert pile.id in text
            assert page.inner_text("#notifications-count") != ""
            page.locator("#notifications").scroll_into_view_if_needed()
            page.screenshot(path=str(artifacts_dir() / "console-notifications.png"))
            assert not errors, errors
            context.close()
        finally:
            assert http.delete(f"/v1/webhooks/{webhook_id}", headers=admin).status_code == 204
            d.fleet.call(lambda f: f.clear_fault(pile.id, "over_current", 1))


def test_console_speaks_chinese_by_default_and_switches_to_english(
    d: District, browser: Any
) -> None:
    """A first visit (nothing remembered) reads Chinese: titles, the alert's severity and
    fault in words, the station's Chinese name, the port; the switch turns all of it English,
    and the choice is remembered."""
    pile = [v for v in d.catalog.devices.values() if v.kind == "pile"][-1]
    station = d.catalog.stations[pile.station_id]
    key = make_key(d, name="console-lang")
    d.fleet.call(lambda f: f.inject_fault(pile.id, "lock_failure", 2))

    def opened() -> int:
        found = httpx.get(
            f"{d.service.base_url}/v1/alerts",
            params={"device": pile.id, "rule": "lock_failure", "status": "active"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).json()["alerts"]
        assert len(found) == 1
        return int(found[0]["id"])

    row = f'#alerts tr[data-alert-id="{eventually(opened, timeout=15)}"]'

    context = browser.new_context(viewport={"width": 1200, "height": 900}, locale="en-US")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(d.service.base_url + "/console")
    # a selector, not wait_for_function: a predicate not true at once is polled as a string
    # evaluated in the page, which the console's CSP (script-src 'self') refuses
    page.wait_for_selector("body[data-auth='no']")
    assert page.inner_text("h1") == "运维控制台", "Chinese by default, whatever the browser's"
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert page.inner_text("#lang") == "EN"
    page.fill("#key", key)
    page.click("#login button[type=submit]")
    page.wait_for_selector(row)
    text = page.inner_text(row)
    assert "次要" in text  # severity minor
    assert "锁止故障" in text
    assert f"{pile.id} · 2号端口" in text
    assert station.name.zh in text
    assert "确认" in page.inner_text(f"{row} button.ack")
    assert page.inner_text("#alerts th >> nth=0") == "级别"

    page.click("#lang")
    page.wait_for_function(
        "() => document.querySelector('h1').textContent === 'Maintenance console'"
    )
    assert page.evaluate("document.documentElement.lang") == "en"
    page.wait_for_function(
        "([sel, name]) => document.querySelector(sel)?.textContent.includes(name)",
        arg=[row, station.name.en],
    )
    text = page.inner_text(row)
    assert "MINOR" in text
    assert "Lock failure" in text
    assert f"{pile.id} · port 2" in text
    assert page.inner_text(f"{row} button.ack") == "Ack"
    assert page.inner_text("#alerts th >> nth=0") == "severity"
    page.screenshot(path=str(artifacts_dir() / "console-en.png"), full_page=True)

    page.reload()  # remembered
    page.wait_for_selector(row)
    assert page.inner_text("h1") == "Maintenance console"
    page.click("#lang")
    page.wait_for_function("() => document.querySelector('h1').textContent === '运维控制台'")
    assert not errors, errors
    context.close()
    d.fleet.call(lambda f: f.clear_fault(pile.id, "lock_failure", 2))


def test_rider_registers_reports_and_sees_outcome_and_points(tmp_path: Path, browser: Any) -> None:
    """A service of its own (no devices: nothing confirms by telemetry, and the district's
    report limits stay for the other tests): register on the page, report, then a
    maintainer confirms over the API and the page shows the report confirmed and the points."""
    with chargewatch_serve(tmp_path, None) as service:
        context = phone(browser)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        refused = csp_violations(page)
        page.goto(service.base_url + "/")
        page.wait_for_selector("#register:not([hidden])")
        assert page.inner_text("#mine h2") == "我的上报"
        station = page.eval_on_selector("#register-station", "s => s.options[1].value")
        page.select_option("#register-station", station)
        page.fill("#register-nickname", "138 0013 8000")  # refused: no phone numbers
        page.click("#register button[type=submit]")
        page.wait_for_selector("#register-result.bad")
        assert "phone number" in page.inner_text("#register-result")
        page.fill("#register-nickname", "哨兵小王")
        page.click("#register button[type=submit]")
        page.wait_for_selector("#mine-body:not([hidden])")
        assert page.inner_text("#mine-who") == "哨兵小王"
        assert page.inner_text("#mine-points") == "0"
        token = page.evaluate("localStorage.getItem('cw-rider')")
        assert token.startswith("cwr_")
        rider = {"Authorization": f"Rider {token}"}

        page.click(f'#stations [data-station="{station}"] .card-btn')
        page.wait_for_selector(f'[data-station-title="{station}"]')
        page.click("#report-open")
        page.select_option("#report-category", "damage")
        page.fill("#report-text", "充电口外壳裂了")
        page.click("#report button[type=submit]")
        page.wait_for_selector("#report-result.ok")
        report_id = page.get_attribute("#report-result", "data-report-id")
        page.click("#back")
        mine = f'#mine-reports li[data-report="{report_id}"]'
        page.wait_for_selector(f'{mine}[data-outcome="pending"]')
        assert "待确认" in page.inner_text(mine)

        r = httpx.post(
            f"{service.base_url}/v1/reports/{report_id}/confirm",
            headers={"Authorization": f"Bearer {maintainer_key(service.data_dir)}"},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        earned = r.json()["points"]
        assert earned == 5, "the default rate of damage"
        page.click("#mine-refresh")
        page.wait_for_selector(f'{mine}[data-outcome="confirmed"]')
        assert page.inner_text("#mine-points") == str(earned)
        assert f"+{earned}" in page.inner_text(mine)
        assert "运维确认" in page.inner_text("#mine-ledger")
        me = httpx.get(f"{service.base_url}/v1/riders/me", headers=rider, timeout=10).json()
        assert me["points"] == earned
        page.click("#lang")
        assert page.inner_text("#mine h2") == "My reports"
        # the list is drawn again in English after the heading: wait for it, not a race
        page.wait_for_selector(f'{mine}:has-text("confirmed")')
        assert "confirmed" in page.inner_text(mine)
        page.screenshot(path=str(artifacts_dir() / "rider-mine.png"), full_page=True)

        # the service forgot this phone's registration (a forged token is the same): the
        # next hazard report still goes through, anonymous, and the panel says so
        page.evaluate("localStorage.setItem('cw-rider', 'cwr_deadbeef_forged')")
        page.click(f'#stations [data-station="{station}"] .card-btn')
        page.wait_for_selector(f'[data-station-title="{station}"]')
        page.click("#report-open")
        page.select_option("#report-category", "smoke")
        page.click("#report button[type=submit]")
        page.wait_for_selector("#report-result.ok")
        anonymous = page.get_attribute("#report-result", "data-report-id")
        assert anonymous != report_id
        assert page.evaluate("localStorage.getItem('cw-rider')") is None
        page.click("#back")
        page.wait_for_selector("#register:not([hidden])")
        assert "register again" in page.inner_text("#mine-status")
        listed = httpx.get(
            f"{service.base_url}/v1/reports",
            headers={"Authorization": f"Bearer {maintainer_key(service.data_dir)}"},
            timeout=10,
        ).json()["reports"]
        assert (listed[0]["id"], listed[0]["rider_id"]) == (int(anonymous), None)
        assert not errors, errors
        assert not refused, refused
        context.close()


def test_console_disables_a_port_and_shows_the_command_state(d: District, browser: Any) -> None:
    """The device view's "disable" button of a free port sends the command through the
    service and mosquitto to the simulated pile; the command's row goes to done, the port
    reads disabled; then the page enables it again."""
    key = make_key(d, name="console-commands")
    auth = {"Authorization": f"Bearer {key}"}
    base = d.service.base_url
    pile = next(v for v in d.catalog.devices.values() if v.kind == "pile")
    port = next(
        p["n"] for p in d.get(f"/v1/devices/{pile.id}")["ports"] if p["state"] == "available"
    )

    context = browser.new_context(viewport={"width": 1200, "height": 900}, locale="zh-CN")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base + "/console")
    page.fill("#key", key)
    page.click("#login button[type=submit]")
    page.wait_for_selector("body[data-auth='yes']")
    page.fill("#device-id", pile.id)
    page.click("#device-form button[type=submit]")
    button = f'#device-units tr[data-unit="{port}"] button[data-cmd="disable_port"]'
    page.wait_for_selector(button)
    assert page.inner_text(button) == "停用此口"  # Chinese first
    page.click(button)
    row = '#device-commands-table tr[data-type="disable_port"]'
    page.wait_for_selector(f'{row}[data-state="done"]')
    assert "已完成" in page.inner_text(row)
    assert "console-commands" in page.inner_text(row)  # who asked
    [command] = [
        c
        for c in httpx.get(
            f"{base}/v1/devices/{pile.id}/commands", headers=auth, timeout=10
        ).json()["commands"]
        if c["type"] == "disable_port"
    ]
    assert (command["state"], command["port"], command["requested_by"]) == (
        "done", port, "console-commands",
    )  # fmt: skip

    def disabled() -> None:
        ports = d.get(f"/v1/devices/{pile.id}")["ports"]
        assert next(p for p in ports if p["n"] == port)["state"] == "disabled"

    eventually(disabled)
    page.wait_for_selector(f'#recent-commands tr[data-command-id="{command["id"]}"]')
    page.locator("#device-commands").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts_dir() / "console-commands.png"))
    # once done, the view shows the port as it is now: "enable" is offered
    enable = f'#device-units tr[data-unit="{port}"][data-state="disabled"] button[data-cmd="enable_port"]'
    page.click(enable)
    page.wait_for_selector('#device-commands-table tr[data-type="enable_port"][data-state="done"]')
    eventually(lambda: _assert_state(d, pile.id, port, "available"))
    assert not errors, errors
    context.close()


def _assert_state(d: District, device: str, port: int, state: str) -> None:
    ports = d.get(f"/v1/devices/{device}")["ports"]
    assert next(p for p in ports if p["n"] == port)["state"] == state
