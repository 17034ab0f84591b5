"""Operator reports: per station or per device and calendar period (day, week or month of
the district's time zone), from the hourly rollups (``ingest.rollups``), the alerts'
timestamps and the riders' reports. Pure: plain rows in, rows of numbers out; the route
(``api.routes.summaries``) reads the stores and renders JSON or CSV.

- ``port_free_share`` / ``battery_ready_share``: of the station's minutes within opening
  hours, the share in which at least one pile had a free port / one cabinet a ready battery
  (None for a station without piles / cabinets, or no open minute rolled up).
- ``offline_minutes``: device-minutes offline (a device silent or dead for a minute counts
  one; a station of 12 devices offline for an hour counts 720).
- ``energy_wh`` of the sessions that ended in the period; ``sessions`` started; ``swaps``;
  ``faults`` raised, by code.
- ``alerts`` opened in the period at the station (of the device, for a device's row: a
  station's own alerts, e.g. a report naming no device, count at the station only),
  ``mtta_s`` (opened -> acknowledged, over those acknowledged) and ``mttr_s`` (opened ->
  resolved, over those resolved).
- ``reports``: riders' reports made in the period (from the rollups); ``reports_<outcome>``:
  what became of the reports made in the period (from the sentinel store, as of now: an
  outcome is decided after the hour is rolled up); a device's are those naming it.
A device's row has its own rollups: its shares are of its own minutes (a pile has no
``battery_ready_share``, a cabinet no ``port_free_share``).
Periods are whole: every day, ISO week (Monday first) or calendar month that [from, to)
touches. ``hours_rolled_up`` says how much of a period the rollups cover (the current hour,
the grace after it, and hours before the history began are not rolled up).
"""

from __future__ import annotations

import bisect
import csv
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Literal, NamedTuple

from devices.faults import FAULT_CODES
from ingest.alerts.model import SERVICE_STATION, Timing
from ingest.alerts.repair import RepairGroup

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
HOUR_MS = 3_600_000
SPAN_MAX_DAYS = 366
OUTCOMES = ("confirmed", "rejected", "expired", "pending")


@dataclass(frozen=True, slots=True)
class StationInfo:
    id: str
    name_zh: str
    name_en: str
    piles: int
    cabinets: int

    def labels(self) -> dict[str, str]:
        """The row's first columns: which station."""
        return {"station_id": self.id, "name_zh": self.name_zh, "name_en": self.name_en}


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    kind: str  # "pile" or "cabinet"
    station: StationInfo

    @property
    def piles(self) -> int:
        return int(self.kind == "pile")

    @property
    def cabinets(self) -> int:
        return int(self.kind == "cabinet")

    def labels(self) -> dict[str, str]:
        """The row's first columns: which device, of which station."""
        return {"device_id": self.id, "kind": self.kind, **self.station.labels()}


class ReportOutcome(NamedTuple):
    station_id: str
    at_ms: int
    outcome: str
    device_id: str | None = None  # the device the rider named, if any


def _local_midnight(day: date, tz: tzinfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def _period_first_day(day: date, period: Period) -> date:
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    return day


def _next_first_day(first: date, period: Period) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def periods(since_ms: int, until_ms: int, period: Period, tz: tzinfo) -> list[tuple[int, int]]:
    """[start, end) in epoch ms of each whole period (local calendar) that [since_ms,
    until_ms) touches, oldest first."""
    first = datetime.fromtimestamp(since_ms / 1000, tz=tz).date()
    last = datetime.fromtimestamp((until_ms - 1) / 1000, tz=tz).date()
    out: list[tuple[int, int]] = []
    day = _period_first_day(first, period)
    while day <= last:
        after = _next_first_day(day, period)
        out.append((_local_midnight(day, tz), _local_midnight(after, tz)))
        day = after
    return out


@dataclass(slots=True)
class _Acc:
    """What one station's period adds up to."""

    hours_rolled_up: int = 0
    open_minutes: int = 0
    port_free_minutes: int = 0
    battery_ready_minutes: int = 0
    offline_minutes: int = 0
    energy_wh: float = 0.0
    sessions: int = 0
    swaps: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    reports: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    repair: RepairGroup = field(default_factory=lambda: RepairGroup(""))

    def add_hour(self, data: dict[str, Any]) -> None:
        devices = int(data.get("devices", 0))
        self.hours_rolled_up += 1
        # a station's minutes_open sums its devices' (each the station's own hours)
        self.open_minutes += int(data.get("minutes_open", 0)) // devices if devices else 0
        self.port_free_minutes += int(data.get("minutes_port_free", 0))
        self.battery_ready_minutes += int(data.get("minutes_battery_ready", 0))
        self.offline_minutes += int(data.get("minutes_offline", 0))
        self.energy_wh += float(data.get("energy_wh", 0.0))
        self.sessions += int(data.get("sessions", 0))
        self.swaps += int(data.get("swaps", 0))
        for code, n in data.get("faults", {}).items():
            self.faults[code] = self.faults.get(code, 0) + int(n)
        self.reports += int(data.get("reports", 0))


def _share(minutes: int, of: int, has: bool) -> float | None:
    return round(minutes / of, 4) if has and of else None


def summarize(
    subjects: Sequence[StationInfo] | Sequence[DeviceInfo],
    spans: Sequence[tuple[int, int]],
    rollups: Iterable[dict[str, Any]],
    timings: Iterable[Timing],
    outcomes: Iterable[ReportOutcome],
    *,
    period: Period,
    tz: tzinfo,
) -> list[dict[str, Any]]:
    """One row per subject (station or device, in the given order) and period (``spans``,
    oldest first). ``rollups``: the subjects' hourly rollups as ``{id, hour_ms, data}``;
    ``timings``: the alerts; ``outcomes``: the riders' reports."""
    starts = [s for s, _ in spans]
    wanted = {s.id for s in subjects}
    by_device = any(isinstance(s, DeviceInfo) for s in subjects)
    acc: dict[tuple[str, int], _Acc] = defaultdict(_Acc)

    def span_of(t_ms: int) -> int | None:
        i = bisect.bisect_right(starts, t_ms) - 1
        return starts[i] if i >= 0 and t_ms < spans[i][1] else None

    for row in rollups:
        start = span_of(int(row["hour_ms"]))
        if start is not None and row["id"] in wanted:
            acc[row["id"], start].add_hour(row["data"])
    for t in timings:
        where = t.device_id if by_device else t.station_id
        start = span_of(t.opened_ms)
        if start is None or where not in wanted or t.station_id == SERVICE_STATION:
            continue
        acc[where, start].repair.add(t)
    for report in outcomes:
        start = span_of(report.at_ms)
        where = report.device_id if by_device else report.station_id
        if start is not None and where in wanted and report.outcome in OUTCOMES:
            acc[where, start].outcomes[report.outcome] += 1
    out: list[dict[str, Any]] = []
    for subject in subjects:
        for start, end in spans:
            a = acc.get((subject.id, start)) or _Acc()
            repair = a.repair.view()
            out.append(
                {
                    **subject.labels(),
                    "period": period,
                    "start": _local_time(start, tz),
                    "end": _local_time(end, tz),
                    "hours": (end - start) // HOUR_MS,
                    "hours_rolled_up": a.hours_rolled_up,
                    "open_minutes": a.open_minutes,
                    "port_free_share": _share(
                        a.port_free_minutes, a.open_minutes, subject.piles > 0
                    ),
                    "battery_ready_share": _share(
                        a.battery_ready_minutes, a.open_minutes, subject.cabinets > 0
                    ),
                    "offline_minutes": a.offline_minutes,
                    "energy_wh": round(a.energy_wh, 1),
                    "sessions": a.sessions,
                    "swaps": a.swaps,
                    "faults": dict(sorted(a.faults.items())),
                    "alerts": repair["alerts"],
                    "acknowledged": repair["acknowledged"],
                    "resolved": repair["resolved"],
                    "mtta_s": repair["mtta_s"],
                    "mttr_s": repair["mttr_s"],
                    "reports": a.reports,
                    **{f"reports_{o}": a.outcomes[o] for o in OUTCOMES},
                }
            )
    assert len(out) == len(subjects) * len(starts)
    return out


def _local_time(ms: int, tz: tzinfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=tz).isoformat()


# -- CSV -------------------------------------------------------------------------------

_KNOWN_FAULTS = tuple(sorted(FAULT_CODES))
_METRIC_COLUMNS: tuple[str, ...] = (
    "period", "start", "end", "hours", "hours_rolled_up",
    "open_minutes", "port_free_share", "battery_ready_share", "offline_minutes", "energy_wh",
    "sessions", "swaps", "faults_total", *(f"faults_{c}" for c in _KNOWN_FAULTS),
    "faults_other", "alerts", "acknowledged", "resolved", "mtta_s", "mttr_s", "reports",
    *(f"reports_{o}" for o in OUTCOMES),
)  # fmt: skip
CSV_COLUMNS: tuple[str, ...] = ("station_id", "name_zh", "name_en", *_METRIC_COLUMNS)
DEVICE_CSV_COLUMNS: tuple[str, ...] = ("device_id", "kind", *CSV_COLUMNS)


def to_csv(rows: Iterable[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    """A header row (``columns``: ``CSV_COLUMNS`` for stations, ``DEVICE_CSV_COLUMNS`` for
    devices), then one row per station or device and period: faults one column per
    contract code (vendors' own codes summed in ``faults_other``), an empty cell for no
    value, numbers as Python writes them (a dot, no thousands separator)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        faults: dict[str, int] = row["faults"]
        flat = {
            **row,
            "faults_total": sum(faults.values()),
            **{f"faults_{c}": faults.get(c, 0) for c in _KNOWN_FAULTS},
            "faults_other": sum(n for c, n in faults.items() if c not in FAULT_CODES),
        }
        writer.writerow(["" if flat[c] is None else flat[c] for c in columns])
    return buf.getvalue()
