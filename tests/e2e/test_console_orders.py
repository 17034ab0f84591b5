"""The console's work orders in headless chromium, against the district of
tests/e2e/test_pages.py (a real mosquitto, ``chargewatch serve``, simulated devices): a
maintainer makes a work order from an alert's row, sees it under "my orders", moves it on
site, resolves the alert (the order turns fixed by itself) and closes it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.district import District, artifacts_dir
from tests.e2e.test_pages import TIMEOUT_MS, csp_violations, d, make_key

pytestmark = pytest.mark.e2e
__all__ = ["d"]  # the fixture, shared with test_pages (browser: tests/e2e/conftest.py)


def test_console_makes_and_moves_a_work_order(d: District, browser: Any) -> None:
    name = "orders-console"
    station = list(d.catalog.stations)[-1]
    opened = httpx.post(
        d.service.base_url + "/v1/reports",
        json={"station": station, "category": "damage", "text": "work order test"},
        timeout=10,
    )
    assert opened.status_code == 201, opened.text
    alert_id = opened.json()["alert_id"]
    key = make_key(d, name=name)
    auth = {"Authorization": f"Bearer {key}"}

    context = browser.new_context(viewport={"width": 1200, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    refused = csp_violations(page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: dialog.accept(name))  # the assignee: me
    page.goto(d.service.base_url + "/console")
    page.wait_for_selector(
        "body[data-auth='no']"
    )  # a selector: polling a function is eval, CSP refuses it
    page.fill("#key", key)
    page.click("#login button[type=submit]")
    alert_row = f'#alerts tr[data-alert-id="{alert_id}"]'
    page.wait_for_selector(alert_row)
    assert page.inner_text(f"{alert_row} button.order") == "建工单"

    page.click(f"{alert_row} button.order")
    row = f'#orders tr[data-alert-id="{alert_id}"]'
    page.wait_for_selector(f'{row}[data-state="assigned"]')
    order_id = int(page.get_attribute(row, "data-order-id") or 0)
    assert name in page.inner_text(row)
    assert "已派单" in page.inner_text(row)
    assert page.inner_text("#orders th >> nth=4") == "处理人"

    page.click(f"{row} button.to-on_site")
    page.wait_for_selector(f'{row}[data-state="on_site"]')
    assert "已到场" in page.inner_text(row)
    assert page.locator(f"{row} button.to-fixed").count() == 1

    page.click(f"{alert_row} button.resolve")  # the alert resolved: the order is fixed
    page.wait_for_selector(f'{row}[data-state="fixed"]')
    page.screenshot(path=str(artifacts_dir() / "console-orders.png"), full_page=True)
    page.click(f"{row} button.to-closed")
    page.wait_for_selector(row, state="detached")  # "my orders" lists unclosed ones

    got = httpx.get(f"{d.service.base_url}/v1/work-orders/{order_id}", headers=auth, timeout=10)
    order = got.json()
    assert (order["state"], order["assignee"], order["closed_by"]) == ("closed", name, name)
    assert [e["what"] for e in order["log"]] == ["created", "on_site", "fixed", "closed"]
    assert not refused, refused
    assert not errors, errors
    context.close()
