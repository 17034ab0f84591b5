"""The one topic scheme: build and parse, and everything outside it."""

from __future__ import annotations

import pytest

from devices.topics import CHANNELS, DEFAULT_PREFIX, Channel, Topic, TopicScheme

SCHEME = TopicScheme()


@pytest.mark.parametrize("channel", sorted(CHANNELS))
@pytest.mark.parametrize("device_id", ["WGS-P01", "a", "0", "x_y-z", "A" * 64, "9abc_-"])
def test_round_trip(device_id: str, channel: Channel) -> None:
    topic = SCHEME.build(device_id, channel)
    assert topic == f"cw/v1/{device_id}/{channel}"
    assert SCHEME.parse(topic) == Topic(device_id, channel)


def test_default_prefix_and_subscription() -> None:
    assert DEFAULT_PREFIX == "cw/v1"
    assert SCHEME.prefix == "cw/v1"
    assert SCHEME.subscription == "cw/v1/+/+"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "cw/v1",
        "cw/v1/",
        "cw/v1/WGS-P01",
        "cw/v1/WGS-P01/",
        "cw/v1/WGS-P01/telemetry",
        "cw/v1/WGS-P01/Status",
        "cw/v1/WGS-P01/status/extra",
        "cw/v1//status",
        "cw/v2/WGS-P01/status",
        "CW/v1/WGS-P01/status",
        "/cw/v1/WGS-P01/status",
        "x/cw/v1/WGS-P01/status",
        "cw/v1/WGS-P01/status/",
        "cw/v1/+/status",
        "cw/v1/#",
        "cw/v1/-lead/status",  # must start with a letter or digit
        "cw/v1/_lead/status",
        "cw/v1/has space/status",
        "cw/v1/dot.ted/status",
        "cw/v1/中文/status",
        "cw/v1/" + "A" * 65 + "/status",
        "cw/v1/WGS-P01/status\n",
        "cw/v1/WGS-P01\n/status",
    ],
)
def test_outside_the_scheme(topic: str) -> None:
    assert SCHEME.parse(topic) is None


@pytest.mark.parametrize(
    "device_id",
    ["", "-a", "_a", "a b", "a/b", "a+b", "a#b", "a.b", "ä", "A" * 65, "WGS-P01\n", "\nWGS"],
)
def test_build_rejects_invalid_device_id(device_id: str) -> None:
    with pytest.raises(ValueError, match="invalid device id"):
        SCHEME.build(device_id, "status")


def test_build_rejects_unknown_channel() -> None:
    with pytest.raises(ValueError, match="invalid channel"):
        SCHEME.build("WGS-P01", "telemetry")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prefix", "normalised"),
    [
        ("fleet/hefei", "fleet/hefei"),
        ("/fleet/hefei/", "fleet/hefei"),
        ("single", "single"),
        ("a.b(c)", "a.b(c)"),  # regex metacharacters are literal
    ],
)
def test_custom_prefix(prefix: str, normalised: str) -> None:
    scheme = TopicScheme(prefix)
    assert scheme.prefix == normalised
    topic = scheme.build("CAB-1", "event")
    assert topic == f"{normalised}/CAB-1/event"
    assert scheme.parse(topic) == Topic("CAB-1", "event")
    assert scheme.subscription == f"{normalised}/+/+"
    # the default scheme does not claim it, and it does not claim the default's topics
    assert SCHEME.parse(topic) is None
    assert scheme.parse("cw/v1/CAB-1/event") is None


def test_prefix_metacharacters_are_not_patterns() -> None:
    scheme = TopicScheme("a.b")
    assert scheme.parse("aXb/CAB-1/event") is None


@pytest.mark.parametrize("prefix", ["cw/+/v1", "+", "cw/#", "#", "cw/v1+", "", "/", "//"])
def test_bad_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        TopicScheme(prefix)
