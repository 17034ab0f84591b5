"""Contract v1 decoding: every documented example, both ts forms, and every rejection reason."""

from __future__ import annotations

import gc
import json
from typing import Any

import pytest

from devices import contract
from devices.contract import (
    CLOCK_SKEW_MAX_MS,
    COMMAND_KIND,
    COMMAND_TYPES,
    COMMAND_UNIT,
    HEARTBEAT_MAX_S,
    MAX_PAYLOAD_BYTES,
    SEQ_MAX,
    Birth,
    CabinetStatus,
    Command,
    ContractError,
    Death,
    Event,
    PileStatus,
    clock_skewed,
    command_id,
    decode,
    decode_command,
    ms_to_datetime,
    parse_ts,
)
from devices.topics import Channel

# 2026-11-28T12:00:00+08:00 == 2026-11-28T04:00:00Z
NOON_CST_MS = 1_795_838_400_000

PILE_STATUS = (
    b'{"v":1,"ts":"2026-11-28T12:00:00.000+08:00","boot":"7f3a","seq":42,"kind":"pile",'
    b'"voltage_v":229.8,"temp_c":31.5,"rssi_dbm":-71,"faults":[],'
    b'"ports":[{"n":1,"state":"charging","power_w":182.0,"energy_wh":96.4,"session":"s-1a2b"},'
    b'{"n":2,"state":"available","power_w":0,"energy_wh":0}]}'
)
CABINET_STATUS = (
    b'{"v":1,"ts":1796284800000,"boot":"c0ff","seq":7,"kind":"cabinet",'
    b'"temp_c":28.0,"smoke":false,"door_open":false,"faults":[],'
    b'"slots":[{"n":1,"state":"ready","battery":"B-88123","soc":97,"temp_c":27.1},'
    b'{"n":2,"state":"charging","battery":"B-10017","soc":43,"temp_c":33.0,"power_w":250},'
    b'{"n":3,"state":"empty"},'
    b'{"n":4,"state":"faulted","fault":"lock_failure"}]}'
)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def header(**extra: Any) -> dict[str, Any]:
    return {"v": 1, "ts": 1796284800000, "boot": "b00t", "seq": 3, **extra}


def pile(**extra: Any) -> dict[str, Any]:
    return header(
        kind="pile",
        ports=[{"n": 1, "state": "available"}, {"n": 2, "state": "charging", "power_w": 150}],
        **extra,
    )


def cabinet(**extra: Any) -> dict[str, Any]:
    return header(
        kind="cabinet",
        slots=[{"n": 1, "state": "ready", "soc": 95}, {"n": 2, "state": "empty"}],
        **extra,
    )


def reason_of(channel: Channel, payload: bytes) -> str:
    with pytest.raises(ContractError) as info:
        decode(channel, payload)
    return info.value.reason


# -- the documented examples ----------------------------------------------------------------


def test_pile_status_example() -> None:
    msg = decode("status", PILE_STATUS)
    assert isinstance(msg, PileStatus)
    assert msg.ts == NOON_CST_MS
    assert (msg.boot, msg.seq, msg.kind) == ("7f3a", 42, "pile")
    assert (msg.voltage_v, msg.temp_c, msg.rssi_dbm) == (229.8, 31.5, -71)
    assert [(p.n, p.state, p.power_w, p.energy_wh, p.session) for p in msg.ports] == [
        (1, "charging", 182.0, 96.4, "s-1a2b"),
        (2, "available", 0.0, 0.0, None),
    ]
    assert msg.device_faults == []


def test_cabinet_status_example() -> None:
    msg = decode("status", CABINET_STATUS)
    assert isinstance(msg, CabinetStatus)
    assert msg.ts == 1796284800000
    assert (msg.boot, msg.seq, msg.temp_c, msg.smoke, msg.door_open) == (
        "c0ff",
        7,
        28.0,
        False,
        False,
    )
    assert [(s.n, s.state, s.battery, s.soc, s.fault) for s in msg.slots] == [
        (1, "ready", "B-88123", 97, None),
        (2, "charging", "B-10017", 43, None),
        (3, "empty", None, None, None),
        (4, "faulted", None, None, "lock_failure"),
    ]
    assert msg.slots[1].power_w == 250
    assert msg.device_faults == []


@pytest.mark.parametrize(
    ("payload", "kind", "units", "heartbeat_s"),
    [
        (
            b'{"v":1,"ts":"2026-11-28T12:00:00+08:00","boot":"7f3a","seq":0,"online":true,'
            b'"kind":"pile","model":"CW-P10","firmware":"1.4.2","ports":10,"heartbeat_s":30}',
            "pile",
            10,
            30,
        ),
        (
            b'{"v":1,"ts":1796284800000,"boot":"c0ff","seq":5,"online":true,'
            b'"kind":"cabinet","model":"CW-C12","firmware":"2.0.0","slots":12}',
            "cabinet",
            12,
            30,  # the default heartbeat
        ),
        (
            b'{"v":1,"ts":1796284800000,"boot":"c0ff","seq":5,"online":true,'
            b'"kind":"cabinet","slots":12,"heartbeat_s":60}',
            "cabinet",
            12,
            60,
        ),
    ],
)
def test_birth(payload: bytes, kind: str, units: int, heartbeat_s: int) -> None:
    msg = decode("state", payload)
    assert isinstance(msg, Birth)
    assert (msg.kind, msg.units, msg.heartbeat_s, msg.online) == (kind, units, heartbeat_s, True)


def test_birth_fields() -> None:
    msg = decode(
        "state",
        b'{"v":1,"ts":1796284800000,"boot":"7f3a","seq":0,"online":true,'
        b'"kind":"pile","model":"CW-P10","firmware":"1.4.2","ports":10}',
    )
    assert isinstance(msg, Birth)
    assert (msg.ts, msg.boot, msg.seq, msg.model, msg.firmware) == (
        1796284800000,
        "7f3a",
        0,
        "CW-P10",
        "1.4.2",
    )


def test_will_without_ts() -> None:
    msg = decode("state", b'{"v":1,"online":false,"boot":"7f3a","seq":3}')
    assert isinstance(msg, Death)
    assert (msg.online, msg.boot, msg.seq, msg.ts) == (False, "7f3a", 3, None)


def test_graceful_death_with_ts() -> None:
    msg = decode(
        "state", b'{"v":1,"online":false,"boot":"7f3a","seq":3,"ts":"2026-11-28T04:00:00Z"}'
    )
    assert isinstance(msg, Death)
    assert msg.ts == NOON_CST_MS


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        (
            {"type": "fault_raised", "code": "over_temperature", "port": 3, "value": 81.5},
            {"code": "over_temperature", "port": 3, "value": 81.5},
        ),
        (
            {"type": "fault_cleared", "code": "lock_failure", "slot": 4, "info": "relatched"},
            {"code": "lock_failure", "slot": 4, "info": "relatched"},
        ),
        (
            {"type": "fault_raised", "code": "vendor_x42"},  # unknown codes are kept
            {"code": "vendor_x42", "port": None, "slot": None},
        ),
        (
            {"type": "session_started", "port": 2, "session": "s-9"},
            {"port": 2, "session": "s-9", "energy_wh": None},
        ),
        (
            {"type": "session_ended", "port": 2, "session": "s-9", "energy_wh": 310.5},
            {"port": 2, "session": "s-9", "energy_wh": 310.5},
        ),
        (
            {
                "type": "swap",
                "slot_out": 1,
                "battery_out": "B-1",
                "soc_out": 97,
                "slot_in": 1,
                "battery_in": "B-2",
                "soc_in": 12,
            },
            {"slot_out": 1, "battery_out": "B-1", "soc_out": 97, "battery_in": "B-2", "soc_in": 12},
        ),
        ({"type": "door_opened"}, {"code": None}),
        ({"type": "door_closed"}, {"code": None}),
    ],
)
def test_events(fields: dict[str, Any], check: dict[str, Any]) -> None:
    msg = decode("event", dumps(header(**fields)))
    assert isinstance(msg, Event)
    assert msg.type == fields["type"]
    assert {name: getattr(msg, name) for name in check} == check


# -- timestamps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        ("2026-11-28T12:00:00.000+08:00", NOON_CST_MS),
        ("2026-11-28T12:00:00+08:00", NOON_CST_MS),
        ("2026-11-28T04:00:00Z", NOON_CST_MS),
        ("2026-11-28T04:00:00.123Z", NOON_CST_MS + 123),
        ("2026-11-28T04:00:00.999+00:00", NOON_CST_MS + 999),
        ("2026-11-27T23:00:00-05:00", NOON_CST_MS),
        (NOON_CST_MS, NOON_CST_MS),
        (0, 0),
    ],
)
def test_ts_forms(ts: str | int, expected_ms: int) -> None:
    assert parse_ts(ts) == expected_ms
    msg = decode("status", dumps(pile(ts=ts)))
    assert msg.ts == expected_ms


# -- rejections ------------------------------------------------------------------------------


def test_oversized() -> None:
    payload = dumps(pile(vendor="x" * MAX_PAYLOAD_BYTES))
    assert len(payload) > MAX_PAYLOAD_BYTES
    assert reason_of("status", payload) == "oversized"


def test_exactly_16_kib_is_accepted() -> None:
    base = dumps(pile(vendor=""))
    payload = dumps(pile(vendor="x" * (MAX_PAYLOAD_BYTES - len(base))))
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert decode("status", payload).seq == 3


@pytest.mark.parametrize(
    ("channel", "payload", "reason"),
    [
        ("status", b"", "not_json"),
        ("status", b"hello", "not_json"),
        ("status", b'{"v":1,', "not_json"),
        ("status", b"\xff\xfe{}", "not_json"),
        # not UTF-8 inside a string value, a key, an unknown field (found by fuzzing)
        ("status", PILE_STATUS.replace(b"12:00:00", b"12:00:\xcb0"), "not_json"),
        ("status", CABINET_STATUS.replace(b'"seq"', b'"\xa0eq"'), "not_json"),
        ("state", b'{"v":1,"online":false,"boot":"abcd","seq":1,"vendor":"\xe8"}', "not_json"),
        (
            "event",
            b'{"v":1,"ts":1,"boot":"abcd","seq":1,"type":"door_opened","info":"\xf4"}',
            "not_json",
        ),
        ("status", b'{"v":1,"ts":1,"boot":"abcd","seq":1,"kind":"pile","temp_c":NaN}', "not_json"),
        (
            "status",
            b'{"v":1,"ts":1,"boot":"abcd","seq":1,"kind":"pile","temp_c":Infinity}',
            "not_json",
        ),
        ("status", b'{"v":1,"x":' + b"[" * 4000 + b"]" * 4000 + b"}", "not_json"),
        ("status", b"[" * 4000 + b"]" * 4000, "not_json"),
        ("status", b'[{"v":1}]', "not_object"),
        ("status", b'"text"', "not_object"),
        ("status", b"42", "not_object"),
        ("state", b"null", "not_object"),
        ("status", b'{"ts":1,"boot":"abcd","seq":1,"kind":"pile"}', "version"),
        ("status", b'{"v":2,"ts":1,"boot":"abcd","seq":1,"kind":"pile"}', "version"),
        ("status", b'{"v":"1","ts":1,"boot":"abcd","seq":1,"kind":"pile"}', "version"),
        ("status", b'{"v":true,"ts":1,"boot":"abcd","seq":1,"kind":"pile"}', "version"),
        ("state", b'{"v":0,"online":false,"boot":"abcd","seq":1}', "version"),
        ("event", b'{"v":null,"ts":1,"boot":"abcd","seq":1,"type":"door_opened"}', "version"),
    ],
)
def test_rejected_before_schema(channel: Channel, payload: bytes, reason: str) -> None:
    assert reason_of(channel, payload) == reason


def _ports(*states: str) -> list[dict[str, Any]]:
    return [{"n": i, "state": s} for i, s in enumerate(states, 1)]


SCHEMA_VIOLATIONS: list[tuple[Channel, dict[str, Any]]] = [
    ("status", pile(seq="4")),
    ("status", pile(seq=-1)),
    ("status", pile(seq=4.0)),
    ("status", pile(boot="abc")),  # boot too short
    ("status", pile(boot="x" * 33)),  # boot too long
    ("status", pile(boot=1234)),
    ("status", pile(ts="2026-11-28T12:00:00")),  # no offset
    ("status", pile(ts="2026-11-28")),  # date only
    ("status", pile(ts="yesterday")),
    ("status", pile(ts=True)),
    ("status", pile(ts=1.5e12)),
    ("status", pile(ts=-1)),
    ("status", pile(temp_c="31.5")),
    ("status", pile(faults="smoke")),
    ("status", cabinet(smoke=0)),
    ("status", cabinet(door_open="false")),
    ("status", {**pile(), "kind": "charger"}),
    ("status", {k: v for k, v in pile().items() if k != "ports"}),
    ("status", {k: v for k, v in pile().items() if k != "ts"}),
    ("status", {k: v for k, v in pile().items() if k != "boot"}),
    ("status", {k: v for k, v in pile().items() if k != "seq"}),
    ("status", {**pile(), "ports": []}),
    ("status", {**pile(), "ports": _ports("available", "plugged")}),
    ("status", {**pile(), "ports": _ports("Available")}),
    ("status", {**pile(), "ports": _ports("faulted")}),  # faulted port without fault
    ("status", {**pile(), "ports": [{"n": 1, "state": "faulted", "fault": ""}]}),
    ("status", {**pile(), "ports": [{"n": 1}]}),
    ("status", {**pile(), "ports": [{"state": "available"}]}),
    ("status", {**pile(), "ports": [{"n": "1", "state": "available"}]}),
    ("status", {**pile(), "ports": [{"n": 0, "state": "available"}]}),
    ("status", {**pile(), "ports": [{"n": 2, "state": "available"}]}),  # not from 1
    (
        "status",
        {**pile(), "ports": [{"n": 1, "state": "available"}, {"n": 1, "state": "charging"}]},
    ),
    (
        "status",
        {**pile(), "ports": [{"n": 1, "state": "available"}, {"n": 3, "state": "charging"}]},
    ),
    ("status", {**pile(), "ports": [{"n": 1, "state": "charging", "power_w": "150"}]}),
    ("status", {**cabinet(), "slots": [{"n": 1, "state": "ready", "soc": 101}]}),
    ("status", {**cabinet(), "slots": [{"n": 1, "state": "ready", "soc": -1}]}),
    ("status", {**cabinet(), "slots": [{"n": 1, "state": "full"}]}),
    ("status", {**cabinet(), "slots": [{"n": 1, "state": "faulted"}]}),
    ("status", {**cabinet(), "slots": [{"n": 1, "state": "available"}]}),  # a port state
    ("status", {**cabinet(), "slots": [{"n": 2, "state": "empty"}, {"n": 2, "state": "empty"}]}),
    ("state", {**header(), "online": True, "kind": "pile"}),  # birth without ports
    ("state", {**header(), "online": True, "kind": "cabinet", "ports": 12}),
    ("state", {**header(), "online": True, "kind": "pile", "ports": "10"}),
    ("state", {**header(), "online": True, "kind": "pile", "ports": 10, "heartbeat_s": 0}),
    ("state", {**header(), "online": "yes", "kind": "pile", "ports": 10}),
    ("state", {**header(), "kind": "pile", "ports": 10}),  # online missing
    ("state", {"v": 1, "online": False, "boot": "abcd"}),  # Will without seq
    ("state", {"v": 1, "online": False, "seq": 1}),  # Will without boot
    ("state", {"v": 1, "online": False, "boot": "abcd", "seq": 1, "ts": "noon"}),
    ("event", header(type="exploded")),
    ("event", header()),  # no type
    ("event", header(type="fault_raised")),  # no code
    ("event", header(type="session_started", port=1)),  # no session
    ("event", header(type="session_ended", port=1, session="s")),  # no energy
    ("event", header(type="swap", slot_out=1, battery_out="B", soc_out=90)),
    ("event", header(type="fault_raised", code="smoke", port="1")),
]


@pytest.mark.parametrize(("channel", "data"), SCHEMA_VIOLATIONS)
def test_schema_violations(channel: Channel, data: dict[str, Any]) -> None:
    assert reason_of(channel, dumps(data)) == "schema"


@pytest.mark.parametrize(
    "ts",
    [
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-23:59",  # after year 9999 in UTC
        "1969-12-31T23:59:59.999Z",  # before the epoch, like an int ts of -1
        253402300800000,  # year 10000 as epoch ms
    ],
)
def test_ts_outside_the_representable_range(ts: str | int) -> None:
    # both forms share one range, so every accepted ts can be shown as a UTC date-time
    assert reason_of("status", dumps(pile(ts=ts))) == "schema"


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [("1970-01-01T00:00:00Z", 0), ("9999-12-31T23:59:59.999Z", 253402300799999)],
)
def test_ts_range_edges(ts: str, expected_ms: int) -> None:
    assert parse_ts(ts) == expected_ms
    assert ms_to_datetime(expected_ms).isoformat().startswith(ts[:19])


def test_number_literal_overflowing_to_infinity() -> None:
    # 1e400 is valid JSON syntax but parses to infinity, which the contract rejects
    payload = dumps(cabinet(temp_c=0)).replace(b'"temp_c": 0', b'"temp_c": 1e400')
    assert b"1e400" in payload
    assert reason_of("status", payload) == "schema"


@pytest.mark.parametrize("seq", [2**53, 2**63 - 1, 2**63, 10**30])
def test_seq_from_2_53_rejected(seq: int) -> None:
    # seq < 2^53: it fits every store's signed 64-bit integer and a JavaScript number, and a
    # device that sends a message a microsecond takes 285 years to get there
    assert reason_of("status", dumps(pile(seq=seq))) == "schema"
    assert reason_of("state", dumps({"v": 1, "online": False, "boot": "abcd", "seq": seq})) == (
        "schema"
    )


def test_largest_seq_accepted() -> None:
    assert SEQ_MAX == 2**53 - 1
    assert decode("status", dumps(pile(seq=2**53 - 1))).seq == 2**53 - 1


def _numbered(count: int, n: int) -> list[dict[str, Any]]:
    """``count`` available ports; the last one is numbered ``n``."""
    return [{"n": i, "state": "available"} for i in range(1, count)] + [
        {"n": n, "state": "available"}
    ]


@pytest.mark.parametrize("n", [257, 2**63, 10**30])
@pytest.mark.parametrize(
    ("channel", "data"),
    [
        ("event", lambda n: header(type="fault_raised", code="smoke", port=n)),
        ("event", lambda n: header(type="fault_cleared", code="smoke", slot=n)),
        ("event", lambda n: header(type="session_started", port=n, session="s")),
        ("event", lambda n: header(type="session_ended", port=n, session="s", energy_wh=1)),
        (
            "event",
            lambda n: header(
                type="swap", slot_out=n, battery_out="B", soc_out=90, slot_in=1,
                battery_in="C", soc_in=10,
            ),
        ),
        (
            "event",
            lambda n: header(
                type="swap", slot_out=1, battery_out="B", soc_out=90, slot_in=n,
                battery_in="C", soc_in=10,
            ),
        ),
        ("status", lambda n: header(kind="pile", ports=_numbered(1, n))),
        ("status", lambda n: header(kind="cabinet", slots=_numbered(1, n))),
    ],
)  # fmt: skip
def test_unit_numbers_beyond_256_rejected(channel: Channel, data: Any, n: int) -> None:
    # no device has more than 256 ports or slots (the catalog's and the birth's limit); a
    # number past 2^63 once killed the alert writer (its SQLite insert overflowed)
    assert reason_of(channel, dumps(data(n))) == "schema"


def test_unit_256_accepted() -> None:
    event = decode("event", dumps(header(type="fault_raised", code="smoke", port=256)))
    assert isinstance(event, Event)
    assert event.port == 256
    status = decode("status", dumps(header(kind="pile", ports=_numbered(256, 256))))
    assert len(status.units) == 256


@pytest.mark.parametrize(("heartbeat_s", "ok"), [(0, False), (1, True), (600, True), (601, False)])
def test_heartbeat_bounds(heartbeat_s: int, ok: bool) -> None:
    # a birth's heartbeat decides how long its state counts as live: 3 x 86400 s let one
    # forged birth show fake state as online for three days
    assert HEARTBEAT_MAX_S == 600
    birth = header(online=True, kind="pile", ports=2, heartbeat_s=heartbeat_s)
    if ok:
        msg = decode("state", dumps(birth))
        assert isinstance(msg, Birth)
        assert msg.heartbeat_s == heartbeat_s
    else:
        assert reason_of("state", dumps(birth)) == "schema"


def test_schema_detail_names_the_field() -> None:
    with pytest.raises(ContractError) as info:
        decode("status", dumps({**pile(), "ports": _ports("available", "plugged")}))
    assert info.value.detail.startswith("ports.1.state:")


def test_cmd_channel_carries_no_data() -> None:
    assert reason_of("cmd", dumps(pile())) == "topic"


# -- leniency and defaults -------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    data = pile(vendor_field={"anything": [1, 2]}, grid_hz=50.01)
    data["ports"][0]["vendor_port_field"] = "x"
    msg = decode("status", dumps(data))
    assert isinstance(msg, PileStatus)
    assert [p.state for p in msg.ports] == ["available", "charging"]
    assert not hasattr(msg, "vendor_field")


def test_unknown_fields_ignored_on_birth_will_and_event() -> None:
    birth = decode("state", dumps(header(online=True, kind="pile", ports=10, sim=True)))
    will = decode("state", b'{"v":1,"online":false,"boot":"abcd","seq":0,"reason":"lwt"}')
    event = decode("event", dumps(header(type="door_opened", who="tech-7")))
    assert (type(birth), type(will), type(event)) == (Birth, Death, Event)


def test_ports_listed_in_any_order() -> None:
    data = {**pile(), "ports": [{"n": 2, "state": "charging"}, {"n": 1, "state": "available"}]}
    msg = decode("status", dumps(data))
    assert isinstance(msg, PileStatus)
    assert sorted(p.n for p in msg.ports) == [1, 2]


def test_pile_defaults() -> None:
    msg = decode(
        "status",
        dumps(header(kind="pile", ports=[{"n": 1, "state": "charging"}])),
    )
    assert isinstance(msg, PileStatus)
    port = msg.ports[0]
    assert (port.power_w, port.energy_wh, port.fault, port.session) == (0.0, 0.0, None, None)
    assert (msg.faults, msg.voltage_v, msg.temp_c, msg.rssi_dbm) == ([], None, None, None)


def test_cabinet_defaults() -> None:
    msg = decode("status", dumps(header(kind="cabinet", slots=[{"n": 1, "state": "charging"}])))
    assert isinstance(msg, CabinetStatus)
    slot = msg.slots[0]
    assert (slot.power_w, slot.energy_wh, slot.soc, slot.battery, slot.temp_c) == (
        0.0,
        0.0,
        None,
        None,
        None,
    )
    assert (msg.smoke, msg.door_open, msg.faults, msg.device_faults) == (False, False, [], [])


@pytest.mark.parametrize(
    ("faults", "smoke", "device_faults"),
    [
        ([], True, ["smoke"]),
        (["water_leak"], True, ["water_leak", "smoke"]),
        (["smoke"], True, ["smoke"]),  # not counted twice
        (["smoke"], False, ["smoke"]),
        (["over_temperature"], False, ["over_temperature"]),
        (["vendor_x42"], False, ["vendor_x42"]),  # unknown codes are kept
    ],
)
def test_smoke_counts_as_device_fault(
    faults: list[str], smoke: bool, device_faults: list[str]
) -> None:
    msg = decode("status", dumps(cabinet(faults=faults, smoke=smoke)))
    assert isinstance(msg, CabinetStatus)
    assert msg.device_faults == device_faults
    assert msg.faults == faults  # the reported list itself is left as sent


def test_pile_device_faults() -> None:
    msg = decode("status", dumps(pile(faults=["ground_fault"])))
    assert isinstance(msg, PileStatus)
    assert msg.device_faults == ["ground_fault"]


@pytest.mark.parametrize(
    ("ts", "retained", "skewed"),
    [
        (NOON_CST_MS, False, False),
        (NOON_CST_MS + CLOCK_SKEW_MAX_MS, False, False),
        (NOON_CST_MS + CLOCK_SKEW_MAX_MS + 1, False, True),
        (NOON_CST_MS - CLOCK_SKEW_MAX_MS - 1, False, True),
        (NOON_CST_MS - CLOCK_SKEW_MAX_MS - 1, True, False),  # a retained copy may be old
        (NOON_CST_MS + CLOCK_SKEW_MAX_MS + 1, True, True),  # never from our future
        (0, False, True),
    ],
)
def test_clock_skew(ts: int, retained: bool, skewed: bool) -> None:
    assert clock_skewed(ts, NOON_CST_MS, retained=retained) is skewed


def _dup(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert old in payload
    return payload.replace(old, new, 1)


@pytest.mark.parametrize(
    ("channel", "payload", "key"),
    [
        # the smuggling case: a reader that keeps the first value sees "available"
        (
            "status",
            _dup(PILE_STATUS, b'"state":"charging"', b'"state":"available","state":"charging"'),
            "state",
        ),
        ("status", _dup(PILE_STATUS, b'"seq":42', b'"seq":42,"seq":43'), "seq"),
        ("status", _dup(CABINET_STATUS, b'"smoke":false', b'"smoke":true,"smoke":false'), "smoke"),
        (
            "status",
            _dup(CABINET_STATUS, b'"fault":"lock_failure"', b'"fault":"x","fault":"lock_failure"'),
            "fault",
        ),
        # a duplicate the typed decode does not know (vendor field) and one after whitespace
        ("status", _dup(PILE_STATUS, b'"seq":42', b'"seq":42,"x":1,"x":2'), "x"),
        ("status", _dup(PILE_STATUS, b'"seq":42', b'"seq" :41 ,"seq":42'), "seq"),
        ("status", _dup(PILE_STATUS, b'"seq":42', b'"\\u0073eq":41,"seq":42'), "seq"),
        (
            "event",
            b'{"v":1,"ts":1796284800000,"boot":"c0ff","seq":8,"type":"fault_raised",'
            b'"code":"a","code":"over_temp"}',
            "code",
        ),
        (
            "state",
            b'{"v":1,"ts":1796284800000,"boot":"7f3a","seq":0,"online":true,"kind":"pile",'
            b'"ports":10,"ports":2}',
            "ports",
        ),
        ("state", b'{"v":1,"online":false,"boot":"7f3a","boot":"abcd","seq":3}', "boot"),
        # compact, known keys only: a repeat in one unit beside a unit that lacks the key
        # (a check that counted keys per name across the units would miss these)
        (
            "status",
            _dup(PILE_STATUS, b'"power_w":0,', b"").replace(
                b'"power_w":182.0', b'"power_w":1.0,"power_w":182.0'
            ),
            "power_w",
        ),
        (
            "status",
            _dup(PILE_STATUS, b'"session":"s-1a2b"', b'"session":"x","session":"s-1a2b"'),
            "session",
        ),
        (
            "status",
            _dup(CABINET_STATUS, b'"temp_c":28.0,', b"").replace(
                b'"temp_c":27.1', b'"temp_c":20.0,"temp_c":27.1'
            ),
            "temp_c",
        ),
        (
            "status",
            _dup(CABINET_STATUS, b'"soc":97', b'"soc":null,"soc":97'),
            "soc",
        ),
        ("status", _dup(CABINET_STATUS, b'"smoke":false', b'"smoke":false,"smoke":false'), "smoke"),
    ],
)
def test_duplicate_keys_are_rejected(channel: Channel, payload: bytes, key: str) -> None:
    """msgspec keeps the last of two equal keys, other JSON readers the first: a device
    (or someone in its name) could show one state to us and another to the next reader."""
    with pytest.raises(ContractError) as info:
        decode(channel, payload)
    assert info.value.reason == "duplicate_key"
    assert repr(key) in info.value.detail


@pytest.mark.parametrize(
    "payload",
    [
        PILE_STATUS,
        CABINET_STATUS,
        # equal keys in different objects, a colon-quote inside a string, a vendor field
        _dup(PILE_STATUS, b'"seq":42', b'"seq":42,"vendor":{"seq":1,"note":"a\\":b"}'),
        _dup(PILE_STATUS, b'"seq":42', b'"seq":42,"slots":"vendor"'),
    ],
)
def test_equal_keys_in_different_objects_are_fine(payload: bytes) -> None:
    assert decode("status", payload).seq in (7, 42)


# -- v1.1: commands and their results ---------------------------------------------------------


def command(**fields: Any) -> dict[str, Any]:
    return {"v": 1, "id": "c-12345678", "ts": 1796284800000, "expires": 1796284860000, **fields}


@pytest.mark.parametrize("ctype", COMMAND_TYPES)
def test_every_command_type_round_trips(ctype: str) -> None:
    unit = COMMAND_UNIT[ctype]
    fields = command(type=ctype, **({unit: 3} if unit else {}))
    decoded = decode_command(dumps(fields))
    assert decoded.type == ctype
    assert decoded.unit == (3 if unit else None)
    assert json.loads(decoded.encode()) == fields  # v, ts as epoch ms, no null port/slot
    assert decode_command(decoded.encode()) == decoded
    assert COMMAND_KIND[ctype] in ("pile", "cabinet", None)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        (command(type="disable_port"), "schema"),  # no port
        (command(type="disable_slot", port=2), "schema"),  # a slot command names a slot
        (command(type="disable_port", port=0), "schema"),
        (command(type="disable_port", port=257), "schema"),  # past MAX_UNITS
        (command(type="self_destruct"), "schema"),
        (command(type="reboot", id="short"), "schema"),  # ids are 8-64 chars
        (command(type="reboot", id="x" * 65), "schema"),
        (command(type="reboot", expires=-1), "schema"),
        (command(type="reboot", expires=2**63), "schema"),
        (command(type="reboot", expires="soon"), "schema"),
        (command(type="reboot", ts="yesterday"), "schema"),
        (command(type="reboot", v=2), "version"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(fields: dict[str, Any], reason: str) -> None:
    with pytest.raises(ContractError) as info:
        decode_command(dumps(fields))
    assert info.value.reason == reason


def test_a_bad_command_still_names_its_id_when_it_has_one() -> None:
    assert command_id(dumps(command(type="self_destruct"))) == "c-12345678"
    assert command_id(dumps(command(type="reboot", id="short"))) is None
    assert command_id(b"[1]") is None
    assert command_id(b"not json") is None
    assert command_id(b"{" * 100_000) is None  # oversized


def test_command_result_event() -> None:
    result = header(type="command_result", cmd="c-12345678", result="done", info="port 3 disabled")
    event = decode("event", dumps(result))
    assert isinstance(event, Event)
    assert (event.cmd, event.result, event.info) == ("c-12345678", "done", "port 3 disabled")
    for bad in (
        header(type="command_result", result="done"),  # which command?
        header(type="command_result", cmd="c-12345678"),  # what result?
        header(type="command_result", cmd="c-12345678", result="maybe"),
        header(type="command_result", cmd="short", result="done"),
    ):
        assert reason_of("event", dumps(bad)) == "schema"


def test_command_model_checks_its_unit_when_built() -> None:
    with pytest.raises(ValueError, match="needs slot"):
        Command(v=1, id="c-12345678", ts=0, type="lock_battery", expires=1)


def test_decoded_messages_are_not_tracked_by_the_collector() -> None:
    """The contract's structs hold no cycles (strings, numbers, lists of units): untracked,
    the dozen or so a status makes (and the duplicate-key check's mirror of its keys)
    cost the garbage collector nothing, however long a twin keeps them."""
    pile, cabinet = decode("status", PILE_STATUS), decode("status", CABINET_STATUS)
    assert isinstance(pile, PileStatus)
    assert isinstance(cabinet, CabinetStatus)
    structs = [pile, *pile.ports, cabinet, *cabinet.slots]
    assert [gc.is_tracked(s) for s in structs] == [False] * len(structs)
    mirror = contract._KEYS["status"].decode(PILE_STATUS)
    assert [gc.is_tracked(m) for m in (mirror, *mirror.ports)] == [False] * 3
