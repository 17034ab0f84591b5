"""The one topic scheme of contract v1: ``{prefix}/{device_id}/{channel}``.

``build`` makes a topic, ``parse`` reads one back; both live here so nothing else splits
topic strings by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

Channel = Literal["state", "status", "event", "cmd"]
CHANNELS: frozenset[str] = frozenset(get_args(Channel))
DEFAULT_PREFIX = "cw/v1"
DEVICE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
# \Z, not $: in Python "$" also matches before a trailing newline
DEVICE_ID_RE = re.compile(rf"^{DEVICE_ID_PATTERN}\Z")


@dataclass(frozen=True, slots=True)
class Topic:
    device_id: str
    channel: Channel


class TopicScheme:
    """Builds and parses topics under one prefix (default ``cw/v1``)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = prefix.strip("/")
        if not prefix or any(c in prefix for c in "+#"):
            raise ValueError(f"topic prefix {prefix!r} must be non-empty and free of + and #")
        self.prefix = prefix
        self._matcher = re.compile(
            rf"^{re.escape(prefix)}/(?P<device_id>{DEVICE_ID_PATTERN})/"
            rf"(?P<channel>state|status|event|cmd)\Z"
        )

    def build(self, device_id: str, channel: Channel) -> str:
        if not DEVICE_ID_RE.match(device_id):
            raise ValueError(f"invalid device id {device_id!r}")
        if channel not in CHANNELS:
            raise ValueError(f"invalid channel {channel!r}")
        return f"{self.prefix}/{device_id}/{channel}"

    def parse(self, topic: str) -> Topic | None:
        """The device and channel of ``topic``, or None when it is outside the scheme."""
        m = self._matcher.match(topic)
        if m is None:
            return None
        return Topic(m["device_id"], m["channel"])  # type: ignore[arg-type]

    @property
    def subscription(self) -> str:
        """The filter that the ingestor subscribes to: every device, every channel."""
        return f"{self.prefix}/+/+"
