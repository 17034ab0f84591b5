"""The device-side MQTT 3.1.1 packets, byte for byte (OASIS MQTT 3.1.1, sections 2-3)."""

from __future__ import annotations

import pytest

from simulators.mqtt import (
    ConnectRefused,
    Link,
    Will,
    connect_packet,
    publish_packet,
    publish_topic,
    remaining_length,
)


@pytest.mark.parametrize(
    ("n", "encoded"),
    [  # the spec's table 2.4 boundaries
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
    ],
)
def test_remaining_length(n: int, encoded: bytes) -> None:
    assert remaining_length(n) == encoded


def test_connect_carries_the_will_username_and_clean_session() -> None:
    will = Will("cw/v1/P1/state", b'{"online":false}')
    packet = connect_packet("P1", keepalive_s=60, will=will, username="P1")
    body = (
        b"\x00\x04MQTT\x04"  # protocol name and level 4 (3.1.1)
        + bytes([0x80 | 0x20 | 0x08 | 0x04 | 0x02])  # username, will retain+QoS 1+flag, clean
        + b"\x00\x3c"  # keepalive 60 s
        + b"\x00\x02P1"
        + b"\x00\x0ecw/v1/P1/state"
        + b'\x00\x10{"online":false}'
        + b"\x00\x02P1"
    )
    assert packet == b"\x10" + bytes([len(body)]) + body


def test_publish_at_qos1_with_and_without_retain() -> None:
    topic = publish_topic("cw/v1/P1/status")
    assert topic == b"\x00\x0fcw/v1/P1/status"
    retained = publish_packet(topic, b"{}", 0x0102, retain=True)
    assert retained == b"\x33" + bytes([17 + 2 + 2]) + topic + b"\x01\x02{}"
    event = publish_packet(topic, b"x" * 200, 7, retain=False)
    assert event[:3] == b"\x32" + remaining_length(17 + 2 + 200)
    assert event[3:20] == topic
    assert event[20:22] == b"\x00\x07"
    assert len(event) == 3 + 17 + 2 + 200


async def test_acks_split_across_reads_are_all_delivered_in_order() -> None:
    acked: list[int] = []
    link = Link(acked.append, keepalive_s=60)
    stream = b"\x20\x02\x00\x00" + b"".join(b"\x40\x02" + n.to_bytes(2, "big") for n in (1, 2, 300))
    stream += b"\xd0\x00"  # PINGRESP
    stream += b"\x40\x02\x01\x2d"  # 301
    for i in range(0, len(stream), 3):  # the worst case: every packet split
        link.data_received(stream[i : i + 3])
    assert acked == [1, 2, 300, 301]
    assert link._connack.done()
    assert link._connack.exception() is None


async def test_a_refused_connect_names_the_return_code() -> None:
    link = Link(lambda _: None, keepalive_s=60)
    link.data_received(b"\x20\x02\x00\x05")  # not authorised
    with pytest.raises(ConnectRefused, match="return code 5"):
        await link._connack
