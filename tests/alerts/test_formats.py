"""Webhook payload formats against what the receiving robots document.

- WeCom group robot (developer.work.weixin.qq.com, 群机器人配置说明): ``{"msgtype":
  "markdown", "markdown": {"content": ...}}``, content UTF-8, at most 4096 bytes.
- DingTalk custom robot (open.dingtalk.com, 自定义机器人 / 加签): ``{"msgtype": "markdown",
  "markdown": {"title", "text"}}``; with 加签, ``timestamp`` (epoch ms) and ``sign`` query
  parameters, sign = urlencode(base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}"))).
- Feishu custom bot (open.feishu.cn, 自定义机器人使用指南): ``{"msg_type": "text", "content":
  {"text"}}``; with 签名校验, ``timestamp`` (epoch seconds, a string) and ``sign`` in the body,
  sign = base64(HMAC-SHA256(key=f"{timestamp}\\n{secret}", msg=b"")), within an hour of now.
- Plain JSON: ``X-Chargewatch-Signature: sha256=<hex HMAC-SHA256 of the exact body>``.

Messages are Chinese unless a subscription or the setting says English (test_messages.py
covers every fault code and rule in both languages).

Expected signatures are computed here from the stdlib, independently of ingest/alerts/notify.py,
and checked against a published DingTalk vector.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import types
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote_plus

import httpx
import pytest

from devices.catalog import Catalog
from ingest.alerts import notify
from ingest.alerts.config import WebhookOptions
from ingest.alerts.model import Alert, alert_view
from ingest.alerts.notify import Notifier, place, render
from ingest.alerts.store import AlertStore

TS_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
TS_S = TS_MS // 1000
SECRET = "SEC5a3ecf88f2b3eb50db30ecfc00f53033ac909c99bf7f88fd612bda89d7f3a9dc"
OPENED_MS = 1_796_284_800_000  # 2026-12-03T08:00:00Z, 16:00 in Hefei
CATALOG = Catalog.load()


def make_alert(**overrides: Any) -> Alert:
    fields: dict[str, Any] = {
        "id": 4711,
        "rule": "fault",
        "code": "thermal_runaway",
        "severity": "critical",
        "status": "open",
        "station_id": "wanguo-south",
        "device_id": "WGS-C07",
        "unit": 9,
        "unit_kind": "slot",
        "opened_at_ms": OPENED_MS,
        "last_seen_at_ms": OPENED_MS,
        "last_value": 81.5,
        "info": "slot 9",
    }
    fields.update(overrides)
    return Alert(**fields)


def payload(event: str = "opened", **overrides: Any) -> dict[str, Any]:
    """As ``Notifier.publish`` builds it, with the district catalog."""
    alert = make_alert(**overrides)
    return {"event": event, "alert": alert_view(alert), **place(CATALOG, alert)}


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """notify.py reads the wall clock through its ``time`` module: pin it."""
    stub = types.SimpleNamespace(time=lambda: TS_MS / 1000, time_ns=lambda: TS_MS * 1_000_000)
    monkeypatch.setattr(notify, "time", stub)


def dingtalk_sign(timestamp: str, secret: str) -> str:
    """DingTalk 加签: base64 of HMAC-SHA256 keyed with the secret over "timestamp\\nsecret"."""
    string_to_sign = f"{timestamp}\n{secret}".encode()
    digest = hmac.new(secret.encode(), string_to_sign, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def feishu_sign(timestamp: str, secret: str) -> str:
    """Feishu 签名校验: HMAC-SHA256 keyed with "timestamp\\nsecret" over an empty message."""
    digest = hmac.new(f"{timestamp}\n{secret}".encode(), b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def unmarkdown(text: str) -> str:
    """What a reader sees: the line markup we write (heading, bold title, quote) and
    markdown backslash escapes removed."""
    lines = [re.sub(r"^(#### |> )", "", line) for line in text.split("\n")]
    if lines and lines[0].startswith("**") and lines[0].endswith("**"):
        lines[0] = lines[0][2:-2]
    return re.sub(r"\\(.)", r"\1", "\n".join(lines))


def message_text(fmt: str, body: bytes) -> str:
    """The text a group member reads, whichever robot format."""
    message = json.loads(body)
    if fmt == "wecom":
        return unmarkdown(message["markdown"]["content"])
    if fmt == "dingtalk":
        return unmarkdown(message["markdown"]["text"])
    text: str = message["content"]["text"]
    return text


EVENT_ZH = {"opened": "新告警", "escalated": "告警升级", "resolved": "已恢复"}


def assert_actionable(text: str, *, event: str = "opened") -> None:
    """Severity, what, where (station, address, device, slot), the event, and the id to act
    on: in Chinese, the default."""
    assert text.startswith(
        f"【紧急】{EVENT_ZH[event]}：热失控 · 万国农贸街区南门歇歇角 WGS-C07 9号仓位"
    )
    assert "站点：万国农贸街区南门歇歇角（wanguo-south）" in text
    assert "地址：包河区滨湖世纪社区万国农贸街区南门" in text
    assert "设备：换电柜 WGS-C07，9号仓位" in text
    assert "故障：热失控（thermal_runaway）" in text  # the code too: what to search for
    assert "发生时间：2026-12-03 16:00:00（北京时间）" in text
    assert "告警编号：4711" in text  # POST /v1/alerts/4711/ack


def test_published_dingtalk_vector_matches_our_reference() -> None:
    # The vector of the `dingding` crate's signature test (docs.rs, src/signature.rs).
    assert quote_plus(dingtalk_sign("1700000000000", "secret")) == (
        "OuzzJR5%2BxZ4%2FEYwqtNt6sMYZQMTa%2FHEGvc9miJe7XzY%3D"
    )


@pytest.mark.usefixtures("fixed_clock")
def test_wecom_markdown_message() -> None:
    query, body = render("wecom", SECRET, "opened", payload())
    assert query == ""  # WeCom robots have no signing; the key is in the webhook URL
    message = json.loads(body)
    assert message["msgtype"] == "markdown"
    assert set(message) == {"msgtype", "markdown"}
    assert set(message["markdown"]) == {"content"}
    content = message["markdown"]["content"]
    assert isinstance(content, str)
    assert body.decode("utf-8")  # content must be UTF-8
    assert len(content.encode()) <= 4096  # documented limit of markdown.content
    assert_actionable(unmarkdown(content))
    assert "详情：上报数值 81.5" in content  # the last value read


@pytest.mark.usefixtures("fixed_clock")
def test_dingtalk_markdown_and_signed_query() -> None:
    query, body = render("dingtalk", SECRET, "opened", payload())
    message = json.loads(body)
    assert message["msgtype"] == "markdown"
    title, text = message["markdown"]["title"], message["markdown"]["text"]
    assert isinstance(title, str)
    assert 0 < len(title) <= 64
    # the title is all a phone's notification shows: severity, fault and target are in it
    assert title == "【紧急】新告警：热失控 · 万国农贸街区南门歇歇角 WGS-C07 9号仓位"
    assert_actionable(unmarkdown(text))
    params = parse_qs(query, strict_parsing=True)
    assert set(params) == {"timestamp", "sign"}
    assert params["timestamp"] == [str(TS_MS)]  # epoch milliseconds
    assert params["sign"] == [dingtalk_sign(str(TS_MS), SECRET)]
    # url-encoded exactly once: base64 "+", "/" and "=" must not reach DingTalk raw
    assert f"sign={quote_plus(dingtalk_sign(str(TS_MS), SECRET))}" in query.split("&")


@pytest.mark.usefixtures("fixed_clock")
def test_dingtalk_signature_for_the_published_vector() -> None:
    query, _ = render("dingtalk", "secret", "opened", payload())
    assert query == f"timestamp={TS_MS}&sign=OuzzJR5%2BxZ4%2FEYwqtNt6sMYZQMTa%2FHEGvc9miJe7XzY%3D"


@pytest.mark.usefixtures("fixed_clock")
def test_feishu_text_message_signed_in_the_body() -> None:
    query, body = render("feishu", SECRET, "opened", payload())
    assert query == ""
    message = json.loads(body)
    assert message["msg_type"] == "text"
    assert set(message) == {"msg_type", "content", "timestamp", "sign"}
    assert message["timestamp"] == str(TS_S)  # epoch seconds, as a string
    assert message["sign"] == feishu_sign(str(TS_S), SECRET)
    text = message["content"]["text"]
    assert_actionable(text)  # plain text: nothing to unescape


@pytest.mark.usefixtures("fixed_clock")
def test_unsigned_robots_carry_no_signature_fields() -> None:
    query, _ = render("dingtalk", "", "opened", payload())
    assert query == ""
    message = json.loads(render("feishu", "", "opened", payload())[1])
    assert "timestamp" not in message
    assert "sign" not in message


@pytest.mark.parametrize("fmt", ["wecom", "dingtalk"])
@pytest.mark.usefixtures("fixed_clock")
def test_device_data_cannot_inject_markdown(fmt: str) -> None:
    hostile = '[ack here](http://evil.example/x) **now** <font color="warning">x</font>'
    hostile_offline = payload(rule="offline", code="offline", info=hostile, last_value=None)
    _, body = render(fmt, SECRET, "opened", hostile_offline)
    message = json.loads(body)
    content = message["markdown"]["content" if fmt == "wecom" else "text"]
    # every markup character of device data arrives escaped: no live link, bold or tag
    assert re.search(r"(?<!\\)\]\(http://evil", content) is None
    assert re.search(r"(?<!\\)\*\*now", content) is None
    assert re.search(r"(?<!\\)<font", content) is None
    assert hostile in unmarkdown(content)  # yet the maintainer reads what the device said


@pytest.mark.parametrize("fmt", ["wecom", "dingtalk", "feishu"])
@pytest.mark.usefixtures("fixed_clock")
def test_escalated_and_resolved_messages_say_so(fmt: str) -> None:
    escalated = payload("escalated", escalation_level=2, escalated_at_ms=OPENED_MS + 300_000)
    resolved = payload(
        "resolved",
        status="resolved",
        resolved_at_ms=OPENED_MS + 900_000,
        resolved_by="chargewatch",
        resolved_how="auto",
    )
    for event, data, must in (
        ("escalated", escalated, "升级：超时未确认，第 2 次升级通知"),
        ("resolved", resolved, "恢复：2026-12-03 16:15:00（北京时间） 自动恢复"),
    ):
        text = message_text(fmt, render(fmt, SECRET, event, data)[1])
        assert_actionable(text, event=event)
        assert must in text


def test_port_alert_names_the_port_and_device_level_names_neither() -> None:
    port = payload(
        device_id="WGS-P03",
        unit=3,
        unit_kind="port",
        code="over_current",
        severity="major",
        info="port 3",
    )
    text = json.loads(render("feishu", "", "opened", port)[1])["content"]["text"]
    assert text.startswith("【重要】新告警：过流 · 万国农贸街区南门歇歇角 WGS-P03 3号端口\n")
    assert "设备：充电桩 WGS-P03，3号端口\n" in text
    english = json.loads(render("feishu", "", "opened", port, "en")[1])["content"]["text"]
    assert english.startswith(
        "[MAJOR] Opened: Over-current · WGS-P03 port 3 at Wanguo Market Street South Gate"
    )
    device = payload(unit=None, unit_kind=None, code="water_leak", info=None)
    text = json.loads(render("feishu", "", "opened", device)[1])["content"]["text"]
    assert text.startswith("【紧急】新告警：进水 · 万国农贸街区南门歇歇角 WGS-C07\n")
    assert "设备：换电柜 WGS-C07\n" in text
    offline = payload(rule="offline", code="offline", severity="major", unit=None, info=None)
    text = json.loads(render("feishu", "", "opened", offline)[1])["content"]["text"]
    assert text.startswith("【重要】新告警：设备离线 · 万国农贸街区南门歇歇角 WGS-C07\n")


# -- through the notifier: what actually goes over the wire -------------------------------


async def deliver(
    tmp_path: Path,
    url: str,
    fmt: str,
    answer: httpx.Response | list[httpx.Response],
    **options: Any,
) -> tuple[list[httpx.Request], dict[str, Any]]:
    """One `opened` notification to one subscription: the requests the robot received, and
    the delivery as logged. The chat robots are on the internet, so an httpx.MockTransport
    stands in for them; ``answer`` is its reply, or its replies in turn."""
    seen: list[httpx.Request] = []
    answers = answer if isinstance(answer, list) else None

    def robot(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if answers is not None:
            return answers[min(len(seen), len(answers)) - 1]
        assert isinstance(answer, httpx.Response)
        return answer

    store = AlertStore.in_dir(tmp_path)
    opts = WebhookOptions(attempts=2, backoff_s=0.01, timeout_s=2, **options)
    try:
        async with Notifier(store, opts, transport=httpx.MockTransport(robot)) as notifier:
            sub = await notifier.add(url, secret=SECRET, format=fmt)
            assert notifier.publish("opened", make_alert()) == 1
            await notifier.idle()
            assert sub.delivered + sub.failed == 1
        deliveries = store.deliveries(4711)
    finally:
        store.close()
    assert len(deliveries) == 1
    return seen, deliveries[0]


def assert_chargewatch_signature(request: httpx.Request) -> None:
    expected = "sha256=" + hmac.new(SECRET.encode(), request.content, hashlib.sha256).hexdigest()
    assert request.headers["X-Chargewatch-Signature"] == expected


async def test_json_delivery_signs_the_exact_body(tmp_path: Path) -> None:
    before_ms = time.time_ns() // 1_000_000
    [request], delivery = await deliver(
        tmp_path, "http://hooks.example/cw", "json", httpx.Response(204)
    )
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)
    assert request.method == "POST"
    assert request.headers["Content-Type"].startswith("application/json")
    assert_chargewatch_signature(request)
    tampered = request.content.replace(b"4711", b"4712")
    assert tampered != request.content
    forged = "sha256=" + hmac.new(SECRET.encode(), tampered, hashlib.sha256).hexdigest()
    assert request.headers["X-Chargewatch-Signature"] != forged
    assert request.headers["X-Chargewatch-Event"] == "opened"
    assert request.headers["X-Chargewatch-Attempt"] == "1"
    assert int(request.headers["X-Chargewatch-Delivery"]) >= 1
    body = json.loads(request.content)
    assert set(body) == {
        "event", "alert", "created_at", "station", "device_kind", "language", "title", "summary"
    }  # fmt: skip
    assert body["event"] == "opened"
    assert body["alert"] == alert_view(make_alert())  # every field it always had
    assert body["station"] == {"id": "wanguo-south", "timezone": "Asia/Shanghai"}  # no catalog
    assert body["language"] == "zh"
    assert body["title"] == "【紧急】新告警：热失控 · wanguo-south WGS-C07 9号仓位"
    assert body["summary"].startswith(body["title"] + "\n站点：wanguo-south\n")
    created = body["created_at"]
    assert created.endswith("Z")
    assert before_ms // 1000 * 1000 <= _ms(created) <= time.time_ns() // 1_000_000


def _ms(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


async def test_dingtalk_delivery_keeps_access_token_and_adds_a_fresh_signature(
    tmp_path: Path,
) -> None:
    url = "https://oapi.dingtalk.com/robot/send?access_token=0a1b2c"
    ok = httpx.Response(200, json={"errcode": 0, "errmsg": "ok"})
    before_ms = time.time_ns() // 1_000_000
    [request], delivery = await deliver(tmp_path, url, "dingtalk", ok)
    assert delivery["status"] == "delivered"
    assert (request.url.host, request.url.path) == ("oapi.dingtalk.com", "/robot/send")
    raw = request.url.query.decode()
    params = parse_qs(raw, strict_parsing=True)
    assert params["access_token"] == ["0a1b2c"]
    ts = params["timestamp"][0]
    assert before_ms <= int(ts) <= time.time_ns() // 1_000_000  # epoch ms, DingTalk: < 1 h old
    assert params["sign"] == [dingtalk_sign(ts, SECRET)]
    assert f"sign={quote_plus(dingtalk_sign(ts, SECRET))}" in raw.split("&")
    assert_chargewatch_signature(request)
    assert json.loads(request.content)["msgtype"] == "markdown"


async def test_feishu_delivery_signature_is_fresh(tmp_path: Path) -> None:
    url = "https://open.feishu.cn/open-apis/bot/v2/hook/4f0e"
    ok = httpx.Response(200, json={"code": 0, "msg": "success", "data": {}})
    [request], delivery = await deliver(tmp_path, url, "feishu", ok)
    assert delivery["status"] == "delivered"
    assert str(request.url) == url
    body = json.loads(request.content)
    assert abs(int(body["timestamp"]) - time.time()) < 60  # Feishu: within one hour
    assert body["sign"] == feishu_sign(body["timestamp"], SECRET)
    assert body["msg_type"] == "text"
    assert_chargewatch_signature(request)


@pytest.mark.parametrize(
    ("fmt", "answer"),
    [
        ("dingtalk", {"errcode": 310000, "errmsg": "sign not match"}),
        ("wecom", {"errcode": 93000, "errmsg": "invalid webhook url"}),
        ("feishu", {"code": 19021, "msg": "sign match fail or timestamp is not within one hour"}),
    ],
)
async def test_robot_error_in_a_200_is_a_failed_delivery(
    tmp_path: Path, fmt: str, answer: dict[str, Any]
) -> None:
    requests, delivery = await deliver(
        tmp_path, "https://robot.example/send", fmt, httpx.Response(200, json=answer)
    )
    assert len(requests) == 1  # a robot's refusal is not retried (it would refuse again)
    assert (delivery["status"], delivery["http_status"], delivery["attempts"]) == ("failed", 200, 1)
    assert str(next(iter(answer.values()))) in delivery["error"]


@pytest.mark.parametrize("fmt", ["json", "wecom", "dingtalk", "feishu"])
async def test_notifications_link_to_the_alert_in_the_console(tmp_path: Path, fmt: str) -> None:
    ok = httpx.Response(200, json={"errcode": 0, "code": 0})
    [request], delivery = await deliver(
        tmp_path, "https://robot.example/send", fmt, ok, public_url="https://ops.example.cn/"
    )
    assert delivery["status"] == "delivered"
    link = "https://ops.example.cn/console#alert-4711"
    body = json.loads(request.content)
    if fmt == "json":
        assert body["url"] == link
    elif fmt == "feishu":
        assert body["content"]["text"].endswith("\n" + link)
    else:
        assert (
            f"[在控制台处理]({link})"
            in body["markdown"]["text" if fmt == "dingtalk" else "content"]
        )


@pytest.mark.parametrize("bad", ["javascript:alert(1)", "ftp://x", "https://x/a b", "https://x/)"])
def test_public_url_must_be_a_plain_http_address(bad: str) -> None:
    with pytest.raises(ValueError, match="public_url"):
        WebhookOptions(public_url=bad)


@pytest.mark.parametrize(
    ("fmt", "limited", "ok"),
    [
        ("wecom", {"errcode": 45009, "errmsg": "api freq out of limit"}, {"errcode": 0}),
        ("dingtalk", {"errcode": 130101, "errmsg": "send too fast"}, {"errcode": 0}),
        ("feishu", {"code": 11232, "msg": "frequency limited"}, {"code": 0, "msg": "success"}),
    ],
)
async def test_robot_rate_limit_in_a_200_is_retried(
    tmp_path: Path, fmt: str, limited: dict[str, Any], ok: dict[str, Any]
) -> None:
    answers = [httpx.Response(200, json=limited), httpx.Response(200, json=ok)]
    requests, delivery = await deliver(tmp_path, "https://robot.example/send", fmt, answers)
    assert len(requests) == 2  # the robot said "later", and later it took the message
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 2)


async def test_queued_notifications_survive_a_stop(tmp_path: Path) -> None:
    """A receiver hangs on the first notification while two more wait behind it; the service
    stops. All three are pending delivery rows, and the next start sends them."""
    entered = asyncio.Event()
    seen: list[int] = []

    async def hanging(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()  # never answers
        raise AssertionError("unreachable")

    async def ok(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["alert"]["id"])
        return httpx.Response(204)

    store = AlertStore.in_dir(tmp_path)
    options = WebhookOptions(attempts=1, timeout_s=30)
    try:
        async with Notifier(store, options, transport=httpx.MockTransport(hanging)) as notifier:
            await notifier.add("https://hooks.example/cw", format="json")
            for alert_id in (1, 2, 3):
                assert notifier.publish("opened", make_alert(id=alert_id)) == 1
            await asyncio.wait_for(entered.wait(), 5)
        pending = store.deliveries(status="pending")
        assert sorted(d["alert_id"] for d in pending) == [1, 2, 3]
        async with Notifier(store, options, transport=httpx.MockTransport(ok)) as notifier:
            await notifier.idle()
        assert sorted(seen) == [1, 2, 3]
        assert store.deliveries(status="pending") == []
        assert len(store.deliveries(status="delivered")) == 3
    finally:
        store.close()


async def test_a_full_queue_drops_its_oldest_notification_and_says_so(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def hanging(request: httpx.Request) -> httpx.Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    store = AlertStore.in_dir(tmp_path)
    options = WebhookOptions(attempts=1, timeout_s=30, queue_max=1)
    try:
        async with Notifier(store, options, transport=httpx.MockTransport(hanging)) as notifier:
            sub = await notifier.add("https://hooks.example/cw", format="json")
            assert notifier.publish("opened", make_alert(id=1)) == 1
            await asyncio.wait_for(entered.wait(), 5)  # 1 is in flight
            for alert_id in (2, 3):  # 2 waits, then 3 pushes it out
                assert notifier.publish("opened", make_alert(id=alert_id)) == 1
            assert sub.dropped == 1
        status = {d["alert_id"]: d["status"] for d in store.deliveries()}
        assert status == {1: "pending", 2: "dropped", 3: "pending"}  # 1 and 3: next start
    finally:
        store.close()
