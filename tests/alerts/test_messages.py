"""What maintainers read: every fault code and every alert rule, in Chinese and English,
in every webhook format. Each message must be valid for its robot, say the severity, the
condition and the event in the chosen language, name the station with its address (from
the catalog), the device and its port/slot, and leave nothing untranslated or unfilled."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from devices.faults import FAULT_CODES
from ingest.alerts import notify
from ingest.alerts.config import WebhookOptions
from ingest.alerts.messages import RULE_WORDS, compose
from ingest.alerts.notify import Notifier, render
from ingest.alerts.store import AlertStore
from tests.alerts.helpers import Clock, Device, config, eventually, running
from tests.alerts.receiver import receiver
from tests.alerts.test_formats import CATALOG, SECRET, payload, unmarkdown

ROOT = Path(__file__).resolve().parents[2]
FORMATS = ("json", "wecom", "dingtalk", "feishu")
LANGS = ("zh", "en")
UNKNOWN_CODE = "vendor_e42"

# The words a maintainer expects (the spec of messages.py, written out independently).
FAULT_ZH = {
    "over_temperature": "过温",
    "over_current": "过流",
    "over_voltage": "过压",
    "under_voltage": "欠压",
    "ground_fault": "接地故障",
    "relay_stuck": "继电器粘连",
    "meter_failure": "电表故障",
    "comm_error": "通信故障",
    "power_loss": "断电",
    "lock_failure": "锁止故障",
    "door_fault": "仓门故障",
    "battery_fault": "电池故障",
    "smoke": "烟雾",
    "thermal_runaway": "热失控",
    "water_leak": "进水",
    "internal_error": "设备内部错误",
    UNKNOWN_CODE: UNKNOWN_CODE,  # an unknown vendor code is shown as itself
}
FAULT_EN = {
    "over_temperature": "Over-temperature",
    "over_current": "Over-current",
    "over_voltage": "Over-voltage",
    "under_voltage": "Under-voltage",
    "ground_fault": "Ground fault",
    "relay_stuck": "Relay stuck",
    "meter_failure": "Meter failure",
    "comm_error": "Communication error",
    "power_loss": "Power loss",
    "lock_failure": "Lock failure",
    "door_fault": "Door fault",
    "battery_fault": "Battery fault",
    "smoke": "Smoke",
    "thermal_runaway": "Thermal runaway",
    "water_leak": "Water leak",
    "internal_error": "Internal error",
    UNKNOWN_CODE: UNKNOWN_CODE,
}
SEVERITY = {
    "zh": {"critical": "【紧急】", "major": "【重要】", "minor": "【次要】", "warning": "【提示】"},
    "en": {
        "critical": "[CRITICAL]",
        "major": "[MAJOR]",
        "minor": "[MINOR]",
        "warning": "[WARNING]",
    },
}
PLACE = {
    "zh": ("万国农贸街区南门歇歇角", "包河区滨湖世纪社区万国农贸街区南门"),
    "en": (
        "Wanguo Market Street South Gate Rest Corner",
        "South gate, Wanguo farmers' market street, Binhu Century",
    ),
}
OPENED = {"zh": "发生时间：2026-12-03 16:00:00（北京时间）", "en": "opened: 2026-12-03 16:00:00"}

# One alert of each rule as the rules and the engine raise it: (fields, words zh, words en).
SERVICE = {"station_id": "service", "device_id": None, "unit": None, "unit_kind": None}
STATION = {"device_id": None, "unit": None, "unit_kind": None}
DEVICE = {"unit": None, "unit_kind": None}
RULES: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    "fault": (
        {"code": "smoke", "severity": "critical", "last_value": None, "info": "slot 9"},
        ["烟雾", "9号仓位"],
        ["Smoke", "slot 9"],
    ),
    "offline": (
        {"severity": "major", "info": "no message for 3 heartbeats", "last_value": None, **DEVICE},
        ["设备离线", "连续 3 个心跳周期没有消息"],
        ["Device offline", "no message for 3 heartbeats"],
    ),
    "temperature_high": (
        {"last_value": 68.5, "info": "slot > 60.0 °C"},
        ["温度过高", "温度 68.5 °C，超过上限 60.0 °C"],
        ["Temperature high", "temperature 68.5 °C, above the 60.0 °C limit"],
    ),
    "temperature_rise": (
        {"last_value": 4.25, "info": "°C per minute"},
        ["温度快速上升", "每分钟升温 4.25 °C"],
        ["Temperature rising fast", "rising 4.25 °C per minute"],
    ),
    "charging_no_power": (
        {
            "device_id": "WGS-P03",
            "unit": 3,
            "unit_kind": "port",
            "severity": "minor",
            "last_value": 720,
            "info": "seconds at ~0 W",
        },
        ["充电无功率", "3号端口", "充电桩 WGS-P03", "已持续 12 分钟"],
        ["Charging without power", "port 3", "charging pile WGS-P03", "for 12 min"],
    ),
    "energy_backwards": (
        {
            "device_id": "WGS-P03",
            "unit": 2,
            "unit_kind": "port",
            "severity": "warning",
            "last_value": 3.5,
            "info": "Wh lost",
        },
        ["电量读数倒退", "2号端口", "倒退 3.5 Wh"],
        ["Energy counter going backwards", "port 2", "fell 3.5 Wh"],
    ),
    "ready_low_soc": (
        {"severity": "minor", "last_value": 72, "info": "ready below 90 %"},
        ["满电仓电量不足", "电量仅 72%（门槛 90%）"],
        ["Ready battery below release level", "ready at 72 % (release level 90 %)"],
    ),
    "door_open_long": (
        {"severity": "major", "last_value": 900, "info": "seconds open", **DEVICE},
        ["维护门长时间未关", "维护门已打开 15 分钟"],
        ["Maintenance door open too long", "door open for 15 min"],
    ),
    "station_unavailable": (
        {
            "severity": "major",
            "last_value": 1200,
            "info": "seconds with no free port or ready battery",
            **STATION,
        },
        ["站点无空闲端口和满电电池", "已持续 20 分钟"],
        ["Station with nothing free", "for 20 min"],
    ),
    "station_offline": (
        {"severity": "major", "last_value": 0.75, "info": "3 of 4 devices offline", **STATION},
        ["站点设备大面积离线", "4 台设备中 3 台离线"],
        ["Station offline", "3 of 4 devices offline"],
    ),
    "rider_report": (
        {"code": "smoke", "info": "rider report: smoke", "last_value": None, "reports": 2},
        ["骑手报告：冒烟", "骑手报告 2 份"],
        ["Rider report: Smoke", "2 rider report(s)"],
    ),
    "ingest_stalled": (
        {"info": "no message for 95 s while 412 devices should report", **SERVICE},
        ["数据接收停滞", "chargewatch 服务本身", "收不到任何消息"],
        ["Ingest stalled", "the chargewatch service itself", "no message arrives"],
    ),
    "task_failed": (
        {"code": "alerts:writer", "info": "task alerts:writer died: boom", **SERVICE},
        ["服务任务异常退出：alerts:writer", "task alerts:writer died: boom"],
        ["Service task died: alerts:writer", "task alerts:writer died: boom"],
    ),
    "store_unavailable": (
        {"info": "database is locked", **SERVICE},
        ["数据存储不可写", "database is locked"],
        ["Store cannot write", "database is locked"],
    ),
    "disk_filling": (
        {
            "info": "the disk of /var/lib/chargewatch is full in 3.2 days at the measured rate"
            " (1.1 GiB/day; 3.5 GiB free of 20.0 GiB, the data dir holds 9.8 GiB)",
            **SERVICE,
        },
        ["磁盘即将写满", "约 3.2 天后写满", "每天 1.1 GiB", "剩余 3.5 GiB，共 20.0 GiB"],
        ["Disk filling up", "full in 3.2 days", "1.1 GiB/day"],
    ),
    "broker_session_lost": (
        {"info": "session not present after reconnect", **SERVICE},
        ["消息代理会话丢失"],
        ["Broker session lost"],
    ),
    "flagged_battery": (
        {"code": "B-1", "info": "flagged battery B-1 in slot 9 (flagged for temperature_high)"},
        ["问题电池入仓：B-1", "9号仓位", "曾发生安全事件（温度过高）", "请勿发放"],
        ["Flagged battery in a slot: B-1", "slot 9", "past safety event (Temperature high)"],
    ),
}


def rule_alert(rule: str, **more: Any) -> dict[str, Any]:
    fields, _, _ = RULES[rule]
    base: dict[str, Any] = {"rule": rule, "code": rule, "severity": "critical", "last_value": None}
    return payload("opened", **{**base, **fields, **more})


def unlinked(text: str) -> str:
    """Without the console link (its own paragraph at the end, when configured)."""
    return re.sub(r"\n\n\[[^\]]+\]\(https?://\S+\)$", "", text)


def readable(fmt: str, body: bytes) -> str:
    """The body checked against its format's shape, and the text a person reads."""
    message = json.loads(body)
    if fmt == "json":
        assert isinstance(message["summary"], str)
        assert message["summary"].startswith(message["title"] + "\n")
        text: str = message["summary"]
        return text
    if fmt == "wecom":
        assert set(message) == {"msgtype", "markdown"}
        assert message["msgtype"] == "markdown"
        content = message["markdown"]["content"]
        assert len(content.encode()) <= 4096
        return unlinked(unmarkdown(content))
    if fmt == "dingtalk":
        assert message["msgtype"] == "markdown"
        title, text = message["markdown"]["title"], message["markdown"]["text"]
        assert 0 < len(title) <= 64
        assert text.startswith("#### ")
        return unlinked(unmarkdown(text))
    assert message["msg_type"] == "text"
    assert set(message["content"]) == {"text"}
    text = message["content"]["text"]
    assert len(body) <= 20_000
    return text


# What may stay Latin in a Chinese message: ids, codes, units and names of things.
LATIN_OK = re.compile(
    r"WGS-[CP]\d+|wanguo-south|chargewatch|MQTT|alerts:writer|（[a-z0-9_]+）|°C|Wh|\bW\b"
    r"|GiB|https?://\S+|database is locked|session not present after reconnect|task .* died: boom"
    r"|no message for 95 s while 412 devices should report|smoke|" + UNKNOWN_CODE
)


def assert_complete(text: str, lang: str) -> None:
    """Nothing unfilled, and a Chinese message has no English words left in it."""
    assert re.search(r"\{[a-z_]*\}", text) is None, text  # a template placeholder
    assert "None" not in text, text
    assert "null" not in text, text
    assert "\n\n" not in text.strip(), text  # no empty line (a value that was missing)
    if lang == "zh":
        rest = LATIN_OK.sub("", text)
        assert re.search(r"[A-Za-z]{2,}", rest) is None, rest


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("code", [*sorted(FAULT_CODES), UNKNOWN_CODE])
def test_every_fault_code_in_both_languages(code: str, lang: str, fmt: str) -> None:
    severity = "critical" if code in ("smoke", "thermal_runaway", "water_leak") else "major"
    data = payload(code=code, severity=severity, last_value=None, info="slot 9")
    data["url"] = "https://ops.example.cn/console#alert-4711"
    text = readable(fmt, render(fmt, SECRET, "opened", data, lang)[1])
    name, address = PLACE[lang]
    if lang == "zh":
        expected = f"{SEVERITY['zh'][severity]}新告警：{FAULT_ZH[code]}"
        assert text.startswith(expected), text
        assert f"故障：{FAULT_ZH[code]}" in text
        assert f"（{code}）" in text  # the code as well, to search for
        assert "设备：换电柜 WGS-C07，9号仓位" in text
        assert f"站点：{name}（wanguo-south）" in text
        assert f"地址：{address}" in text
    else:
        assert text.startswith(f"{SEVERITY['en'][severity]} Opened: {FAULT_EN[code]}"), text
        assert f"({code})" in text
        assert "device: swap cabinet WGS-C07, slot 9" in text
        assert f"station: {name} (wanguo-south)" in text
        assert f"address: {address}" in text
    assert OPENED[lang] in text
    if fmt in ("wecom", "dingtalk"):
        label = "在控制台处理" if lang == "zh" else "Open in the console"
        assert (
            f"[{label}](https://ops.example.cn/console#alert-4711)"
            in json.loads(render(fmt, SECRET, "opened", data, lang)[1])["markdown"][
                "content" if fmt == "wecom" else "text"
            ]
        )
    else:
        assert "https://ops.example.cn/console#alert-4711" in json.dumps(json.loads(
            render(fmt, SECRET, "opened", data, lang)[1]
        ))  # fmt: skip
    assert_complete(text, lang)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_alert_rule_in_both_languages(rule: str, lang: str, fmt: str) -> None:
    data = rule_alert(rule)
    text = readable(fmt, render(fmt, SECRET, "opened", data, lang)[1])
    _, zh, en = RULES[rule]
    for words in zh if lang == "zh" else en:
        assert words in text, (words, text)
    alert = data["alert"]
    assert text.startswith(SEVERITY[lang][alert["severity"]])
    name, address = PLACE[lang]
    if alert["station"] == "service":
        assert "wanguo" not in text.lower()
    else:
        assert name in text
        assert address in text
    if alert["device"]:
        assert alert["device"] in text
    assert_complete(text, lang)


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("event", ["opened", "escalated", "resolved", "acknowledged"])
def test_every_event_says_what_happened(event: str, lang: str) -> None:
    data = rule_alert(
        "temperature_high",
        status="resolved" if event == "resolved" else "acknowledged",
        escalation_level=1,
        acknowledged_at_ms=1_796_284_860_000,
        acknowledged_by="王师傅",
        resolved_at_ms=1_796_285_700_000 if event == "resolved" else None,
        resolved_by="王师傅" if event == "resolved" else None,
        resolved_how="manual" if event == "resolved" else None,
    )
    for fmt in FORMATS:
        text = readable(fmt, render(fmt, SECRET, event, data, lang)[1])
        expected = {
            "zh": {
                "opened": ["【紧急】新告警："],
                "escalated": ["【紧急】告警升级：", "超时未确认，第 1 次升级通知"],
                "resolved": [
                    "【紧急】已恢复：",
                    "恢复：2026-12-03 16:15:00（北京时间） 由 王师傅 人工关闭",
                ],
                "acknowledged": [
                    "【紧急】已确认：",
                    "王师傅 于 2026-12-03 16:01:00（北京时间） 确认",
                ],
            },
            "en": {
                "opened": ["[CRITICAL] Opened: "],
                "escalated": ["[CRITICAL] Escalated: ", "not acknowledged; escalation 1"],
                "resolved": ["[CRITICAL] Resolved: ", "resolved: by 王师傅 at 2026-12-03 16:15:00"],
                "acknowledged": ["[CRITICAL] Acknowledged: ", "by 王师傅 at 2026-12-03 16:01:00"],
            },
        }[lang][event]
        for words in expected:
            assert words in text, (words, text)
        assert_complete(text, lang)


def rule_names_in_code() -> set[str]:
    """Every rule name ingest/alerts/*.py (and ingest/passports.py: flagged_battery) raises
    or compares: ``Key(station, device, unit, RULE, code)``, ``_key(twin, RULE, ...)``,
    ``rule=RULE`` and ``x.rule == RULE``."""
    found: set[str] = set()
    paths = [*(ROOT / "ingest" / "alerts").glob("*.py"), ROOT / "ingest" / "passports.py"]
    for path in sorted(paths):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            candidates: list[ast.expr] = []
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name == "Key" and len(node.args) >= 4:
                    candidates.append(node.args[3])
                if name == "_key" and len(node.args) >= 2:
                    candidates.append(node.args[1])
                candidates += [k.value for k in node.keywords if k.arg == "rule"]
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "rule" for s in sides):
                    candidates += sides
                    for side in sides:  # x.rule in ("a", "b")
                        if isinstance(side, ast.Tuple | ast.Set | ast.List):
                            candidates += side.elts
            found |= {
                c.value
                for c in candidates
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            }
    return found


def rule_names_in_docs() -> set[str]:
    text = (ROOT / "docs" / "alerts.md").read_text()
    table = text.split("## Rules", 1)[1].split("Root cause", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))


def test_every_rule_in_the_code_and_the_docs_has_words_in_both_languages() -> None:
    in_code, in_docs = rule_names_in_code(), rule_names_in_docs()
    # the scan finds what we know is there: it cannot pass by finding nothing
    assert {"fault", "offline", "temperature_rise", "station_offline", "task_failed"} <= in_code
    assert {"fault", "rider_report", "ingest_stalled", "task_failed"} <= in_docs
    for rule in in_code | in_docs | {"store_unavailable", "broker_session_lost"}:
        assert rule in RULE_WORDS["zh"], f"no Chinese words for rule {rule!r}"
        assert rule in RULE_WORDS["en"], f"no English words for rule {rule!r}"
        assert rule in RULES, f"no message test for rule {rule!r}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("lang", LANGS)
def test_a_rule_without_words_falls_back_to_a_sentence_naming_it(fmt: str, lang: str) -> None:
    data = payload(rule="coolant_low", code="coolant_low", severity="minor", info="level 12 %")
    text = readable(fmt, render(fmt, SECRET, "opened", data, lang)[1])
    expected = (
        "【次要】新告警：告警规则 coolant_low"
        if lang == "zh"
        else "[MINOR] Opened: Alert rule coolant_low"
    )
    assert text.startswith(expected), text
    assert "level 12 %" in text


@pytest.mark.parametrize("fmt", ["wecom", "dingtalk", "feishu"])
def test_long_device_text_stays_within_each_robots_limits(fmt: str) -> None:
    huge = ("温度传感器[异常](x) " * 2000) + "\\"
    data = rule_alert("task_failed", info=huge, code="任务" * 500)
    data["url"] = "https://ops.example.cn/console#alert-4711"
    _, body = render(fmt, SECRET, "opened", data)
    text = readable(fmt, body)  # WeCom ≤ 4096 bytes, DingTalk title ≤ 64, Feishu ≤ 20 000
    assert text.startswith("【紧急】新告警：服务任务异常退出：任务")
    assert "4711" in text or fmt == "wecom"  # the id survives unless WeCom had to cut
    message = json.loads(body)
    if fmt != "feishu":
        markdown = message["markdown"]["content" if fmt == "wecom" else "text"]
        assert markdown.endswith("(https://ops.example.cn/console#alert-4711)")  # link kept


def test_the_language_setting_and_a_subscriptions_own_language() -> None:
    assert WebhookOptions().language == "zh"
    with pytest.raises(ValueError, match="language"):
        WebhookOptions(language="fr")  # type: ignore[arg-type]
    zh = compose("opened", payload())
    en = compose("opened", payload(), "en")
    assert (zh.language, en.language) == ("zh", "en")
    assert zh.title != en.title


async def test_engine_notifications_speak_each_subscriptions_language(tmp_path: Path) -> None:
    """Through the engine with the district catalog and a real HTTP receiver: the setting
    says English, one subscription asks for Chinese."""
    clock = Clock()
    cfg = config()
    cfg.webhooks.language = "en"
    with receiver() as hook:
        async with running(tmp_path, clock, cfg) as engine:
            default = await engine.notifier.add(hook.url + "/default", format="feishu")
            chinese = await engine.notifier.add(hook.url + "/zh", format="json", language="zh")
            assert (default.view()["language"], chinese.view()["language"]) == (None, "zh")
            with pytest.raises(ValueError, match="language"):
                await engine.notifier.add(hook.url, language="fr")
            cabinet = Device(engine, clock, "WGS-C07")
            cabinet.birth()
            cabinet.cabinet(slots={4: {"state": "faulted", "fault": "smoke"}})

            def both() -> dict[str, Any]:
                got = {r.path: r.json for r in hook.delivered()}
                assert set(got) == {"/hook/default", "/hook/zh"}
                return got

            got = await eventually(both)
    english = got["/hook/default"]["content"]["text"]
    assert english.startswith("[CRITICAL] Opened: Smoke · WGS-C07 slot 4 at Wanguo Market")
    assert "address: South gate, Wanguo farmers' market street, Binhu Century" in english
    assert "opened: 2026-12-03 16:00:00 (Beijing time, UTC+8)" in english
    body = got["/hook/zh"]
    assert body["language"] == "zh"
    assert body["title"] == "【紧急】新告警：烟雾 · 万国农贸街区南门歇歇角 WGS-C07 4号仓位"
    assert "地址：包河区滨湖世纪社区万国农贸街区南门" in body["summary"]
    assert body["station"]["name"] == CATALOG.stations["wanguo-south"].name.model_dump()
    assert body["device_kind"] == "cabinet"
    assert body["alert"]["code"] == "smoke"  # the alert's fields as ever


@pytest.mark.parametrize("limit", range(8, 40))
def test_a_cut_message_ends_on_a_whole_character_and_a_whole_escape(limit: int) -> None:
    text = "告\\[警\\]" * 20  # 3-byte characters and two-character markdown escapes
    cut = notify._fit(text, limit)
    assert len(cut.encode()) <= limit
    assert cut.endswith("…")
    body = cut.removesuffix("…")
    assert text.startswith(body)
    assert (len(body) - len(body.rstrip("\\"))) % 2 == 0  # no escape cut in half


async def test_a_subscriptions_language_survives_a_restart(tmp_path: Path) -> None:
    store = AlertStore.in_dir(tmp_path)
    try:
        async with Notifier(store, WebhookOptions()) as notifier:
            sub = await notifier.add("https://hooks.example/cw", language="en")
        async with Notifier(store, WebhookOptions()) as notifier:
            assert notifier.subscriptions[sub.id].language == "en"
    finally:
        store.close()
