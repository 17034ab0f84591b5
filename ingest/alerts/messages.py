"""What a notification says to a person, in Chinese (the default) or English.

``compose(event, payload, language)`` turns one notification (the webhook payload: the
alert's view, the event, its station from the catalog, the district's time zone) into a
``Message``: a title (severity, event, what, where) and lines (station name and address,
device and port/slot, the condition in words, when, what happened since, the alert id).
``notify.render`` lays it out in each robot's dialect. Pure: no I/O, no clock.

Words: severities follow the alarm levels Chinese maintenance staff know from network and
equipment management systems (ITU-T X.733 perceived severity as used in YD/T alarm
standards): critical 紧急, major 重要, minor 次要, warning 提示. Fault codes, rules, rider
report categories and events have a word in each language; an unknown fault code or
category is shown as the code itself, an unknown rule as a sentence naming the rule: a
template missing never makes a message empty or fails a delivery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Language = Literal["zh", "en"]
LANGUAGES: tuple[Language, ...] = ("zh", "en")
DEFAULT_TIMEZONE = "Asia/Shanghai"
SERVICE_STATION = "service"  # the ``station`` of alerts about the service itself
TEXT_MAX = 300  # characters of one free-text value (device data, reasons, names) shown

SEVERITY_WORDS: dict[Language, dict[str, str]] = {
    "zh": {"critical": "紧急", "major": "重要", "minor": "次要", "warning": "提示"},
    "en": {"critical": "CRITICAL", "major": "MAJOR", "minor": "MINOR", "warning": "WARNING"},
}

FAULT_WORDS: dict[Language, dict[str, str]] = {
    "zh": {
        "over_temperature": "过温",
        "over_current": "过流",
        "over_voltage": "过压",
        "under_voltage": "欠压",
        "ground_fault": "接地故障（漏电）",
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
    },
    "en": {
        "over_temperature": "Over-temperature",
        "over_current": "Over-current",
        "over_voltage": "Over-voltage",
        "under_voltage": "Under-voltage",
        "ground_fault": "Ground fault (leakage)",
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
    },
}

RULE_WORDS: dict[Language, dict[str, str]] = {
    "zh": {
        "fault": "设备故障",
        "offline": "设备离线",
        "temperature_high": "温度过高",
        "temperature_rise": "温度快速上升",
        "charging_no_power": "充电无功率",
        "energy_backwards": "电量读数倒退",
        "ready_low_soc": "满电仓电量不足",
        "door_open_long": "维护门长时间未关",
        "station_unavailable": "站点无空闲端口和满电电池",
        "station_offline": "站点设备大面积离线",
        "rider_report": "骑手报告",
        "ingest_stalled": "数据接收停滞",
        "task_failed": "服务任务异常退出",
        "store_unavailable": "数据存储不可写",
        "broker_session_lost": "消息代理会话丢失",
        "disk_filling": "磁盘即将写满",
        "flagged_battery": "问题电池入仓",
    },
    "en": {
        "fault": "Device fault",
        "offline": "Device offline",
        "temperature_high": "Temperature high",
        "temperature_rise": "Temperature rising fast",
        "charging_no_power": "Charging without power",
        "energy_backwards": "Energy counter going backwards",
        "ready_low_soc": "Ready battery below release level",
        "door_open_long": "Maintenance door open too long",
        "station_unavailable": "Station with nothing free",
        "station_offline": "Station offline",
        "rider_report": "Rider report",
        "ingest_stalled": "Ingest stalled",
        "task_failed": "Service task died",
        "store_unavailable": "Store cannot write",
        "broker_session_lost": "Broker session lost",
        "flagged_battery": "Flagged battery in a slot",
        "disk_filling": "Disk filling up",
    },
}

# The rider page's words for the same categories (api/static/i18n.js, cat*).
REPORT_WORDS: dict[Language, dict[str, str]] = {
    "zh": {
        "smoke": "冒烟",
        "fire": "起火",
        "water": "进水",
        "heat": "发烫",
        "damage": "损坏",
        "not_working": "不能用",
        "blocked": "被占用/堵住",
        "other": "其他",
    },
    "en": {
        "smoke": "Smoke",
        "fire": "Fire",
        "water": "Water",
        "heat": "Too hot",
        "damage": "Damaged",
        "not_working": "Not working",
        "blocked": "Blocked",
        "other": "Other",
    },
}

EVENT_WORDS: dict[Language, dict[str, str]] = {
    "zh": {
        "opened": "新告警",
        "escalated": "告警升级",
        "resolved": "已恢复",
        "acknowledged": "已确认",
        "repeated": "再次发生",
        "clearing": "正在恢复",
        "note": "新备注",
        "report": "骑手报告",
        "overdue": "工单超时",
    },
    "en": {
        "opened": "Opened",
        "escalated": "Escalated",
        "resolved": "Resolved",
        "acknowledged": "Acknowledged",
        "repeated": "Repeated",
        "clearing": "Clearing",
        "note": "Note",
        "report": "Rider report",
        "overdue": "Work order overdue",
    },
}

# The states of a work order (ingest/alerts/order_model.py).
ORDER_STATE_WORDS: dict[Language, dict[str, str]] = {
    "zh": {
        "open": "待派单",
        "assigned": "已派单",
        "on_site": "已到场",
        "fixed": "已修复",
        "closed": "已关闭",
    },
    "en": {
        "open": "open",
        "assigned": "assigned",
        "on_site": "on site",
        "fixed": "fixed",
        "closed": "closed",
    },
}

STATUS_WORDS: dict[Language, dict[str, str]] = {
    "zh": {"open": "待处理", "acknowledged": "已确认", "resolved": "已解决"},
    "en": {"open": "open", "acknowledged": "acknowledged", "resolved": "resolved"},
}

KIND_WORDS: dict[Language, dict[str, str]] = {
    "zh": {"pile": "充电桩", "cabinet": "换电柜"},
    "en": {"pile": "charging pile", "cabinet": "swap cabinet"},
}

# The labels of the lines, and the other fixed phrases.
LABELS: dict[Language, dict[str, str]] = {
    "zh": {
        "station": "站点",
        "address": "地址",
        "device": "设备",
        "fault": "故障",
        "rule": "告警",
        "detail": "详情",
        "severity": "级别",
        "status": "状态",
        "count": "第 {n} 次",
        "opened": "发生时间",
        "escalation": "升级",
        "escalated": "超时未确认，第 {n} 次升级通知",
        "acknowledged": "确认",
        "acknowledged_by": "{by} 于 {at} 确认",
        "resolved": "恢复",
        "resolved_auto": "{at} 自动恢复（状况已消除并经核实）",
        "resolved_manual": "{at} 由 {by} 人工关闭",
        "reports": "骑手报告 {n} 份",
        "alert_id": "告警编号",
        "service": "chargewatch 服务本身",
        "port": "{n}号端口",
        "slot": "{n}号仓位",
        "link": "在控制台处理",
        "sep": "：",
        "open_paren": "（",
        "close_paren": "）",
        "list_sep": "，",
        "unknown_rule": "告警规则 {rule}",
        "local_time": "北京时间",
        "work_order": "工单",
        "work_order_line": "#{id}，{state}，处理人 {assignee}",
        "due": "期限",
        "overdue_notice": "已超过期限 {late}，第 {n} 次提醒",
    },
    "en": {
        "station": "station",
        "address": "address",
        "device": "device",
        "fault": "fault",
        "rule": "alert",
        "detail": "detail",
        "severity": "severity",
        "status": "status",
        "count": "count {n}",
        "opened": "opened",
        "escalation": "escalation",
        "escalated": "not acknowledged; escalation {n}",
        "acknowledged": "acknowledged",
        "acknowledged_by": "by {by} at {at}",
        "resolved": "resolved",
        "resolved_auto": "automatically at {at} (condition cleared and verified)",
        "resolved_manual": "by {by} at {at}",
        "reports": "{n} rider report(s)",
        "alert_id": "alert id",
        "service": "the chargewatch service itself",
        "port": "port {n}",
        "slot": "slot {n}",
        "link": "Open in the console",
        "sep": ": ",
        "open_paren": " (",
        "close_paren": ")",
        "list_sep": ", ",
        "unknown_rule": "Alert rule {rule}",
        "local_time": "Beijing time, UTC+8",
        "work_order": "work order",
        "work_order_line": "#{id}, {state}, assigned to {assignee}",
        "due": "due",
        "overdue_notice": "{late} past due; notice {n}",
    },
}


@dataclass(frozen=True, slots=True)
class Message:
    """One notification as a person reads it: plain text, not escaped for any format."""

    language: Language
    title: str
    lines: list[str]
    link_label: str

    @property
    def text(self) -> str:
        """Title and lines, one per line (the JSON ``summary``, Feishu's text)."""
        return "\n".join([self.title, *self.lines])


def language_of(value: object) -> Language:
    return "en" if value == "en" else "zh"


def clip(value: object, limit: int = TEXT_MAX) -> str:
    """Free text, on one line and at most ``limit`` characters (device data, reasons)."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return clip(value, 40)
    return f"{value:g}"


def _duration(lang: Language, seconds: object) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        return clip(seconds, 40)
    s = max(0, int(seconds))
    if lang == "zh":
        if s < 120:
            return f"{s} 秒"
        if s < 7200:
            return f"{s // 60} 分钟"
        return f"{s // 3600} 小时 {s % 3600 // 60} 分钟"
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def zone(name: str) -> tzinfo:
    """The district's time zone; China's fixed UTC+8 if this machine lacks tzdata."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return timezone(timedelta(hours=8), DEFAULT_TIMEZONE)


def local_time(lang: Language, iso: object, tz_name: str) -> str:
    """An RFC 3339 time as people read it in the district: ``2026-12-03 16:00:00（北京时间）``."""
    if not isinstance(iso, str):
        return "—"
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return clip(iso, 40)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    local = when.astimezone(zone(tz_name))
    offset = local.utcoffset() or timedelta(0)
    if tz_name == DEFAULT_TIMEZONE and offset == timedelta(hours=8):
        label = LABELS[lang]["local_time"]
    else:
        hours, rest = divmod(int(offset.total_seconds()) // 60, 60)
        label = f"{tz_name}, UTC{'+' if offset >= timedelta(0) else '-'}{abs(hours):02d}:{rest:02d}"
    open_paren, close_paren = LABELS[lang]["open_paren"], LABELS[lang]["close_paren"]
    return f"{local:%Y-%m-%d %H:%M:%S}{open_paren}{label}{close_paren}"


def fault_word(lang: Language, code: str) -> str:
    return FAULT_WORDS[lang].get(code, code)


def severity_word(lang: Language, severity: str) -> str:
    return SEVERITY_WORDS[lang].get(severity, clip(severity, 20))


def event_word(lang: Language, event: str) -> str:
    return EVENT_WORDS[lang].get(event, clip(event, 20))


def what(lang: Language, rule: str, code: str) -> str:
    """The condition in words: the fault, the rule, a rider's category, a task's name."""
    if rule == "fault":
        return fault_word(lang, code)
    word = RULE_WORDS[lang].get(rule)
    if word is None:
        return LABELS[lang]["unknown_rule"].format(rule=clip(rule, 64))
    if rule == "rider_report":
        return f"{word}{LABELS[lang]['sep']}{REPORT_WORDS[lang].get(code, clip(code, 64))}"
    if code and code != rule:  # task_failed: the task's name
        return f"{word}{LABELS[lang]['sep']}{clip(code, 64)}"
    return word


def unit_text(lang: Language, alert: dict[str, Any]) -> str | None:
    for kind in ("port", "slot"):
        n = alert.get(kind)
        if n is not None:
            return LABELS[lang][kind].format(n=_number(n))
    return None


_LIMIT = re.compile(r"[>≥]\s*(?P<limit>-?\d+(?:\.\d+)?)")
_OF = re.compile(r"^(?P<offline>\d+) of (?P<seen>\d+) devices offline$")
# ingest.diskusage.DiskWatch.problem
_DISK = re.compile(
    r"full in (?P<days>[\d.]+) days at the measured rate \((?P<rate>[\d.]+ [KMGT]?i?B)/day;"
    r" (?P<free>[\d.]+ [KMGT]?i?B) free of (?P<size>[\d.]+ [KMGT]?i?B)"
)


_FLAGGED_FOR = re.compile(r"flagged for (?P<reason>[a-z_]+)")


def detail(lang: Language, alert: dict[str, Any]) -> str | None:
    """The condition's reading in words (``info`` and ``last_value`` as the rules set them)."""
    rule, value, info = alert.get("rule"), alert.get("last_value"), alert.get("info")
    info_text = clip(info) if info else None
    limit_match = _LIMIT.search(info_text or "")
    limit = limit_match["limit"] if limit_match else None
    zh = lang == "zh"
    if rule == "fault":
        if value is None:
            return None
        return f"上报数值 {_number(value)}" if zh else f"reported value {_number(value)}"
    if rule == "offline":
        if info == "Will received":
            return (
                "设备已报告下线（MQTT 遗嘱消息）"
                if zh
                else "the device said it went offline (MQTT Will)"
            )
        if info == "no message for 3 heartbeats":
            return "连续 3 个心跳周期没有消息" if zh else "no message for 3 heartbeats"
        return info_text
    if rule == "temperature_high" and value is not None:
        v = _number(value)
        if zh:
            return f"温度 {v} °C" + (f"，超过上限 {limit} °C" if limit else "")
        return f"temperature {v} °C" + (f", above the {limit} °C limit" if limit else "")
    if rule == "temperature_rise" and value is not None:
        v = _number(value)
        return f"每分钟升温 {v} °C" if zh else f"rising {v} °C per minute"
    if rule == "charging_no_power" and value is not None:
        d = _duration(lang, value)
        return f"充电中但功率接近 0 W，已持续 {d}" if zh else f"charging at ~0 W for {d}"
    if rule == "energy_backwards" and value is not None:
        v = _number(value)
        return (
            f"同一次充电中电量读数倒退 {v} Wh" if zh else f"energy counter fell {v} Wh in a session"
        )
    if rule == "ready_low_soc" and value is not None:
        v, below = _number(value), re.search(r"(\d+(?:\.\d+)?)", info_text or "")
        level = below.group(1) if below else None
        if zh:
            return f"标为满电但电量仅 {v}%" + (f"（门槛 {level}%）" if level else "")
        return f"marked ready at {v} %" + (f" (release level {level} %)" if level else "")
    if rule == "door_open_long" and value is not None:
        d = _duration(lang, value)
        return f"维护门已打开 {d}" if zh else f"maintenance door open for {d}"
    if rule == "station_unavailable" and value is not None:
        d = _duration(lang, value)
        if zh:
            return f"营业时间内无空闲端口、无满电电池，已持续 {d}"
        return f"open, yet no free port and no ready battery for {d}"
    if rule == "station_offline":
        counts = _OF.match(info or "")
        if counts and zh:
            return f"{counts['seen']} 台设备中 {counts['offline']} 台离线"
        return info_text
    if rule == "rider_report":
        return "骑手在骑手页报告了问题" if zh else "a rider reported it on the rider page"
    if rule == "disk_filling":
        disk = _DISK.search(info or "")
        if disk and zh:
            return (
                f"按近期增长速度（每天 {disk['rate']}），数据盘约 {disk['days']} 天后写满；"
                f"剩余 {disk['free']}，共 {disk['size']}"
            )
        return info_text
    if rule == "flagged_battery":
        why = _FLAGGED_FOR.search(info_text or "")
        reason = why["reason"] if why else None
        word = (RULE_WORDS[lang].get(reason) or fault_word(lang, reason)) if reason else None
        if zh:
            past = f"（{word}）" if word else ""
            return f"曾发生安全事件{past}的电池被放入此仓位，请勿发放给骑手"
        past = f" ({word})" if word else ""
        return f"a pack with a past safety event{past} is in this slot: do not release it"
    if rule == "ingest_stalled":
        reason = f"{LABELS[lang]['sep']}{info_text}" if info_text else ""
        if zh:
            return f"已连接消息代理，但设备应上报时收不到任何消息{reason}"
        return f"connected to the broker, yet no message arrives{reason}"
    return info_text  # the rule's own words (service alerts: a reason for maintainers)


def _station(lang: Language, payload: dict[str, Any], station_id: str) -> tuple[str, str | None]:
    """(station line value, address or None) from the payload's catalog entry."""
    if station_id == SERVICE_STATION:
        return LABELS[lang]["service"], None
    info = payload.get("station")
    if not isinstance(info, dict) or info.get("id") != station_id or not info.get("name"):
        return clip(station_id, 64), None  # not in the catalog (or an older stored payload)
    name, address = info["name"], info.get("address") or {}
    shown = clip(name.get(lang) or name.get("zh") or station_id, 100)
    paren = LABELS[lang]
    line = f"{shown}{paren['open_paren']}{clip(station_id, 64)}{paren['close_paren']}"
    where = address.get(lang) or address.get("zh")
    return line, clip(where, 200) if where else None


def station_name(lang: Language, payload: dict[str, Any], station_id: str) -> str:
    if station_id == SERVICE_STATION:
        return "chargewatch"
    info = payload.get("station")
    if isinstance(info, dict) and info.get("id") == station_id:
        name = info.get("name") or {}
        return clip(name.get(lang) or name.get("zh") or station_id, 100)
    return clip(station_id, 64)


def compose(event: str, payload: dict[str, Any], language: object = "zh") -> Message:
    """The notification of ``event`` (``payload`` as ``Notifier.publish`` builds it)."""
    lang = language_of(language)
    words = LABELS[lang]
    sep = words["sep"]
    a: dict[str, Any] = payload.get("alert") or {}
    rule, code = str(a.get("rule") or ""), str(a.get("code") or "")
    station_id = str(a.get("station") or "")
    tz_name = str((payload.get("station") or {}).get("timezone") or DEFAULT_TIMEZONE)
    severity = severity_word(lang, str(a.get("severity") or ""))
    condition = what(lang, rule, code)
    unit = unit_text(lang, a)
    device = clip(a["device"], 64) if a.get("device") else None
    place = station_name(lang, payload, station_id)
    if lang == "zh":  # the place, then the device: 万国农贸街区南门歇歇角 WGS-C07 9号仓位
        target = " ".join(x for x in (place, device, unit) if x is not None)
        title = f"【{severity}】{event_word(lang, event)}：{condition} · {target}"
    else:  # the device first, where a phone's preview cuts a long English name
        unit_at = " ".join(x for x in (device, unit) if x is not None)
        target = f"{unit_at} at {place}" if unit_at else place
        title = f"[{severity}] {event_word(lang, event)}: {condition} · {target}"
    station_line, address = _station(lang, payload, station_id)
    lines = [f"{words['station']}{sep}{station_line}"]
    if address:
        lines.append(f"{words['address']}{sep}{address}")
    if device is not None:
        kind = KIND_WORDS[lang].get(str(payload.get("device_kind") or ""))
        shown = " ".join(x for x in (kind, device) if x)
        lines.append(f"{words['device']}{sep}{shown}{words['list_sep'] + unit if unit else ''}")
    label = words["fault"] if rule == "fault" else words["rule"]
    named = (
        f"{words['open_paren']}{clip(code if rule == 'fault' else rule, 64)}{words['close_paren']}"
    )
    lines.append(f"{label}{sep}{condition}{named}")
    said = detail(lang, a)
    if said:
        lines.append(f"{words['detail']}{sep}{said}")
    status = STATUS_WORDS[lang].get(str(a.get("status")), clip(a.get("status"), 20))
    count = words["count"].format(n=_number(a.get("count") or 1))
    state = f"{words['severity']}{sep}{severity}{words['list_sep']}{words['status']}{sep}{status}"
    lines.append(f"{state}{words['list_sep']}{count}")
    if a.get("reports"):
        lines.append(words["reports"].format(n=_number(a["reports"])))
    lines.append(f"{words['opened']}{sep}{local_time(lang, a.get('opened_at'), tz_name)}")
    if event == "escalated":
        level = words["escalated"].format(n=_number(a.get("escalation_level") or 0))
        lines.append(f"{words['escalation']}{sep}{level}")
    if a.get("acknowledged_at") and event in ("acknowledged", "escalated", "resolved"):
        at = local_time(lang, a["acknowledged_at"], tz_name)
        by = clip(a.get("acknowledged_by") or "—", 100)
        lines.append(f"{words['acknowledged']}{sep}{words['acknowledged_by'].format(by=by, at=at)}")
    if event == "resolved" or a.get("resolved_at"):
        at = local_time(lang, a.get("resolved_at"), tz_name)
        how = "resolved_auto" if a.get("resolved_how") == "auto" else "resolved_manual"
        by = clip(a.get("resolved_by") or "—", 100)
        lines.append(f"{words['resolved']}{sep}{words[how].format(at=at, by=by)}")
    order = payload.get("work_order")
    if isinstance(order, dict):
        lines += _order_lines(lang, order, payload.get("created_at"), tz_name)
    if a.get("id") is not None:
        lines.append(f"{words['alert_id']}{sep}{_number(a['id'])}")
    return Message(lang, title, lines, words["link"])


def _order_lines(lang: Language, order: dict[str, Any], now: object, tz_name: str) -> list[str]:
    """A work order's lines in an overdue notice: who has it, in what state, since when due."""
    words, sep = LABELS[lang], LABELS[lang]["sep"]
    state = ORDER_STATE_WORDS[lang].get(str(order.get("state")), clip(order.get("state"), 20))
    line = words["work_order_line"].format(
        id=_number(order.get("id")), state=state, assignee=clip(order.get("assignee") or "—", 100)
    )
    lines = [f"{words['work_order']}{sep}{line}"]
    due = order.get("due_at")
    lines.append(f"{words['due']}{sep}{local_time(lang, due, tz_name)}")
    if order.get("overdue_notices") and isinstance(due, str) and isinstance(now, str):
        try:
            late = (datetime.fromisoformat(now) - datetime.fromisoformat(due)).total_seconds()
        except ValueError:
            late = 0.0
        notice = words["overdue_notice"].format(
            late=_duration(lang, late), n=_number(order["overdue_notices"])
        )
        lines.append(notice)
    return lines
