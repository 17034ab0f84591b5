"""Per-device random streams derived from (seed, device id, stream name).

Each device gets its own ``random.Random`` so adding, removing or sharding devices never
changes what another device does for the same seed.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(seed: int, *parts: str) -> int:
    """A 64-bit seed from ``seed`` and ``parts``, stable across processes and Python versions."""
    text = "\x1f".join([str(seed), *parts])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def device_rng(seed: int, device_id: str, stream: str = "behaviour") -> random.Random:
    """The random stream ``stream`` of device ``device_id`` under ``seed``."""
    return random.Random(derive_seed(seed, device_id, stream))
