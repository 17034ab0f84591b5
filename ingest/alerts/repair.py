"""Mean (and median) time to acknowledge and to repair, per station or per fault code,
from the alerts' stored timestamps. Pure: the rows come from ``AlertStore.timings``.

Time to acknowledge: opened -> acknowledged (alerts never acknowledged are left out of it).
Time to repair: opened -> resolved, whether the device reported healthy (auto) or a
maintainer resolved it. Alerts of the service itself (station ``service``) are no repair
and are left out.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ingest.alerts.model import SERVICE_STATION, Timing

GroupBy = Literal["station", "code"]


@dataclass(slots=True)
class RepairGroup:
    key: str
    alerts: int = 0
    ack_s: list[float] = field(default_factory=list)
    repair_s: list[float] = field(default_factory=list)

    def add(self, t: Timing) -> None:
        self.alerts += 1
        if t.acked_ms is not None and t.acked_ms >= t.opened_ms:
            self.ack_s.append((t.acked_ms - t.opened_ms) / 1000)
        if t.resolved_ms is not None and t.resolved_ms >= t.opened_ms:
            self.repair_s.append((t.resolved_ms - t.opened_ms) / 1000)

    def view(self) -> dict[str, object]:
        def mean(values: list[float]) -> float | None:
            return round(statistics.fmean(values), 3) if values else None

        def median(values: list[float]) -> float | None:
            return round(statistics.median(values), 3) if values else None

        return {
            "key": self.key,
            "alerts": self.alerts,
            "acknowledged": len(self.ack_s),
            "resolved": len(self.repair_s),
            "mtta_s": mean(self.ack_s),
            "mtta_median_s": median(self.ack_s),
            "mttr_s": mean(self.repair_s),
            "mttr_median_s": median(self.repair_s),
        }


def repair_times(rows: Iterable[Timing], by: GroupBy) -> list[RepairGroup]:
    """One group per station (or code), in key order."""
    groups: dict[str, RepairGroup] = {}
    for t in rows:
        if t.station_id == SERVICE_STATION:
            continue
        key = t.station_id if by == "station" else t.code
        group = groups.get(key)
        if group is None:
            group = groups[key] = RepairGroup(key)
        group.add(t)
    return [groups[k] for k in sorted(groups)]
