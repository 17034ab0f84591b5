"""The wait before a reconnect: capped, jittered exponential backoff, shared by the loops
that follow PostgreSQL (every LISTEN follower: ``ingest.listen``; unknown devices, the
partition leases, serve's database lock).

The wait doubles from ``first_s`` per failure in a row up to ``cap_s``, times 0.5-1 so that
many workers do not retry in step (aiomqtt's shape). The exponent stops growing once the
cap is reached: a loop that counts failures through a day-long outage must not overflow a
float (``0.25 * 2**1100`` raises ``OverflowError``, which ended the loop that retried).
"""

from __future__ import annotations

import math
import random


def backoff_s(failures: int, *, first_s: float, cap_s: float) -> float:
    """The wait after ``failures`` failed attempts in a row (0 or 1: ``first_s``), capped
    at ``cap_s`` (a cap below the first wait is the wait), jittered. ValueError for a first
    wait that is not positive."""
    if not first_s > 0:
        raise ValueError(f"the first wait must be positive, not {first_s}")
    to_cap = math.ceil(math.log2(cap_s / first_s)) if cap_s > first_s else 0
    doublings = min(max(failures - 1, 0), to_cap)
    return min(cap_s, first_s * 2.0**doublings) * random.uniform(0.5, 1.0)
