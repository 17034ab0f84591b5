"""The day cycle of the district: rider demand and ambient temperature by local hour.

Riders charge and swap around their work: peaks at lunch (11:00-13:00) and dinner
(17:00-20:00) Asia/Shanghai time, little at night. China has kept UTC+08:00 all year
since 1991, so a fixed offset is exact.
"""

from __future__ import annotations

import math
from datetime import timedelta, timezone

UTC_OFFSET_S = 8 * 3600
LOCAL_TZ = timezone(timedelta(seconds=UTC_OFFSET_S), "Asia/Shanghai")

#: Relative arrival rate for each local hour 0..23; the mean over the day is 1.0.
_RAW_DEMAND = (
    0.15, 0.10, 0.08, 0.06, 0.06, 0.12, 0.35, 0.60,  # 00-07: night, early shift
    0.75, 0.75, 0.95, 1.90, 2.10, 1.70, 0.95, 0.80,  # 08-15: lunch peak 11-13
    1.00, 1.80, 2.10, 2.00, 1.60, 1.00, 0.60, 0.30,  # 16-23: dinner peak 17-20
)  # fmt: skip
HOURLY_DEMAND: tuple[float, ...] = tuple(w * 24 / sum(_RAW_DEMAND) for w in _RAW_DEMAND)


def local_hour(t: float) -> float:
    """Local (Asia/Shanghai) hour of day 0 <= h < 24 at sim epoch seconds ``t``."""
    return ((t + UTC_OFFSET_S) % 86400) / 3600  # cheap: this runs every step of every device


def demand_factor(t: float) -> float:
    """How busy riders are at ``t`` relative to the daily mean (1.0)."""
    return HOURLY_DEMAND[int(local_hour(t)) % 24]


def arrival_probability(rate_per_hour: float, t: float, dt_s: float) -> float:
    """Chance that at least one rider arrives within ``dt_s`` (Poisson at the hour's rate)."""
    expected = rate_per_hour * demand_factor(t) * dt_s / 3600
    return 1 - math.exp(-expected)


def ambient_c(t: float) -> float:
    """Outdoor temperature in Hefei in late autumn: about 4 C before dawn, 14 C mid-afternoon."""
    return 9.0 + 5.0 * math.sin(2 * math.pi * (local_hour(t) - 9) / 24)
