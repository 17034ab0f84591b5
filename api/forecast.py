"""Forecasts from history: the "best time to come" per station, and the chance that a port
or battery is still there when a rider arrives.

Forecast: every station's devices are sampled every ``FORECAST_EVERY_MS`` over the past
weeks (sample and hold, ``api.series``); each instant gives the station's free ports and
ready batteries; instants are grouped by local hour of day, and by ISO weekday and hour,
into a mean with its sample size (instants and distinct days behind it).

Arrival (``arrive_in_s``): riders who take a port/battery come as a Poisson process with
the rate seen at this station at this hour of day (session starts / swaps per hour in the
history, divided by the days observed at that hour); ports come free the same way
(session ends per hour); batteries come ready when their own charge estimate says so
(``next_ready_in_s`` per slot). The chance that at least one is left on arrival is
``P(taken < now + freed)``. With no history at that hour we say so and use the current
count alone.

Blocking: call from a worker thread. ``StationStats`` caches per station for a few minutes
(history changes slowly; one district's forecast reads ~100k stored statuses).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request

from api.series import Held, grid, load, sum_at
from api.views import rfc3339
from devices.catalog import Catalog, StationSpec, district_tz
from ingest.store import HistoryStore, RollupStore

FORECAST_EVERY_MS = 15 * 60 * 1000
HOUR_MS = 3_600_000
DEFAULT_WEEKS = 4
RATE_DAYS = 7
"""Demand rates for arrival estimates come from this many recent days."""
STATS_TTL_S = 300.0
MAX_HAPPENINGS = 200_000


def _release(catalog: Catalog, station: StationSpec, default: float) -> dict[str, float]:
    return {d.id: float(d.release_soc or default) for d in station.devices}


@dataclass
class StationStats:
    forecast: dict[str, Any]
    # per local hour: (pile takes/h, pile frees/h, cabinet takes/h, days observed)
    rates: list[tuple[float, float, float, int]]
    computed_at: float


def compute_stats(
    store: HistoryStore,
    catalog: Catalog,
    station: StationSpec,
    now_ms: int,
    *,
    weeks: int = DEFAULT_WEEKS,
    release_soc: float = 90.0,
) -> StationStats:
    tz = district_tz(catalog)
    since = now_ms - weeks * 7 * 86400 * 1000
    ids = [d.id for d in station.devices]
    piles = [d.id for d in station.devices if d.kind == "pile"]
    cabinets = [d.id for d in station.devices if d.kind == "cabinet"]
    rate_since = now_ms - RATE_DAYS * 86400 * 1000
    # closed hours from the station's hourly rollups when the store keeps them (no raw
    # statuses read for them); the hours since, from raw history
    rolled: list[dict[str, Any]] = []
    raw_since = since
    if isinstance(store, RollupStore):
        through = store.rolled_through()
        if through is not None and through > since:
            rolled = store.rollups("station", [station.id], since - since % HOUR_MS, through)
            raw_since = min(through, now_ms)
    # after rollups, the statuses standing when they end are held into the raw part
    lead = HOUR_MS if rolled else 0
    samples = store.status_samples(ids, raw_since - lead, now_ms, FORECAST_EVERY_MS)
    happenings = store.happenings(ids, raw_since - 86400_000, now_ms, MAX_HAPPENINGS)
    held = Held(samples, happenings, _release(catalog, station, release_soc), FORECAST_EVERY_MS)

    hour_sum: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    week_sum: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    hour_days: dict[int, set[str]] = defaultdict(set)
    week_days: dict[tuple[int, int], set[str]] = defaultdict(set)
    recent_hour_days: dict[int, set[str]] = defaultdict(set)
    days: set[str] = set()
    instants = 0
    first_ms: int | None = None
    takes_pile: dict[int, int] = defaultdict(int)
    frees_pile: dict[int, int] = defaultdict(int)
    takes_cab: dict[int, int] = defaultdict(int)
    per_hour = HOUR_MS // FORECAST_EVERY_MS  # an hour's rollup weighs as its instants
    for row in rolled:
        r = row["data"]
        local = datetime.fromtimestamp(row["hour_ms"] / 1000, tz=UTC).astimezone(tz)
        if row["hour_ms"] >= rate_since:
            takes_pile[local.hour] += r["sessions"]
            frees_pile[local.hour] += r["sessions_ended"]
            takes_cab[local.hour] += r["swaps"]
        if not r["minutes_online"]:
            continue
        if row["hour_ms"] >= rate_since:
            recent_hour_days[local.hour].add(local.date().isoformat())
        first_ms = first_ms if first_ms is not None else row["hour_ms"]
        instants += per_hour
        day = local.date().isoformat()
        days.add(day)
        key = (local.isoweekday(), local.hour)
        for bucket in (hour_sum[local.hour], week_sum[key]):
            bucket[0] += r["port_minutes"] * per_hour / 60  # the hour's mean, per instant
            bucket[1] += r["battery_minutes"] * per_hour / 60
            bucket[2] += per_hour
        hour_days[local.hour].add(day)
        week_days[key].add(day)
    for t in grid(raw_since, now_ms, FORECAST_EVERY_MS):
        present = sum_at(held, ids, t)
        if not present:
            continue
        first_ms = first_ms if first_ms is not None else t
        instants += 1
        local = datetime.fromtimestamp(t / 1000, tz=UTC).astimezone(tz)
        day = local.date().isoformat()
        days.add(day)
        free = sum(c.free for c in present if c.kind == "pile")
        ready = sum(c.free for c in present if c.kind == "cabinet")
        key = (local.isoweekday(), local.hour)
        for bucket in (hour_sum[local.hour], week_sum[key]):
            bucket[0] += free
            bucket[1] += ready
            bucket[2] += 1
        hour_days[local.hour].add(day)
        week_days[key].add(day)
        if t >= rate_since:
            recent_hour_days[local.hour].add(day)

    def entry(sums: list[float], day_set: set[str]) -> dict[str, Any]:
        n = int(sums[2])
        return {
            "ports_free": round(sums[0] / n, 2) if piles else None,
            "batteries_ready": round(sums[1] / n, 2) if cabinets else None,
            "samples": n,
            "days": len(day_set),
        }

    by_hour: list[dict[str, Any]] = [
        {"hour": h, **entry(hour_sum[h], hour_days[h])}
        if h in hour_sum
        else {
            "hour": h,
            "ports_free": None,
            "batteries_ready": None,
            "samples": 0,
            "days": 0,
        }
        for h in range(24)
    ]
    by_week = [
        {"weekday": k[0], "hour": k[1], **entry(week_sum[k], week_days[k])}
        for k in sorted(week_sum)
    ]

    def best(field: str) -> list[int]:
        rows = [(float(r[field]), int(r["hour"])) for r in by_hour if r[field] is not None]
        rows.sort(key=lambda r: (-r[0], r[1]))
        return [hour for _, hour in rows[:3]]

    # demand per local hour over the recent days (after the rollups: from events)
    for row in happenings:
        if row["type"] != "event" or row["ts_ms"] < max(rate_since, raw_since):
            continue
        event = load(row["payload"]).get("type")
        hour = datetime.fromtimestamp(row["ts_ms"] / 1000, tz=UTC).astimezone(tz).hour
        if event == "session_started":
            takes_pile[hour] += 1
        elif event == "session_ended":
            frees_pile[hour] += 1
        elif event == "swap":
            takes_cab[hour] += 1
    rates = []
    for h in range(24):
        observed = len(recent_hour_days[h])
        div = max(observed, 1)
        rates.append((takes_pile[h] / div, frees_pile[h] / div, takes_cab[h] / div, observed))

    forecast = {
        "station_id": station.id,
        "timezone": str(tz),
        "from": rfc3339(since),
        "to": rfc3339(now_ms),
        "first_sample_at": rfc3339(first_ms),
        "every_s": FORECAST_EVERY_MS // 1000,
        "samples": instants,
        "days": len(days),
        "statuses_read": held.samples,
        "rollup_hours_read": len(rolled),
        "ports_total": sum(d.units for d in station.devices if d.kind == "pile"),
        "slots_total": sum(d.units for d in station.devices if d.kind == "cabinet"),
        "by_hour": by_hour,
        "by_weekday_hour": by_week,
        "best_hours": {
            "pile": best("ports_free") if piles else [],
            "cabinet": best("batteries_ready") if cabinets else [],
        },
        "method": (
            f"mean of the station's free ports / ready batteries sampled every"
            f" {FORECAST_EVERY_MS // 60000} min over the history (each device's last status"
            f" held until its next one or its death), by local hour of day and by ISO"
            f" weekday (1 = Monday) and hour; samples = instants, days = distinct dates."
            f" Hours already rolled up count as their {HOUR_MS // FORECAST_EVERY_MS} instants at"
            f" the hour's mean over its minutes within opening hours (rollup_hours_read)"
        ),
    }
    return StationStats(forecast, rates, time.monotonic())


class StatsCache:
    """Per-station stats, recomputed at most every ``ttl_s`` (thread-safe)."""

    def __init__(self, ttl_s: float = STATS_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, int], StationStats] = {}

    def get(
        self,
        store: HistoryStore,
        catalog: Catalog,
        station: StationSpec,
        now_ms: int,
        weeks: int = DEFAULT_WEEKS,
        release_soc: float = 90.0,
    ) -> StationStats:
        key = (station.id, weeks)
        with self._lock:
            hit = self._stats.get(key)
        if hit is not None and time.monotonic() - hit.computed_at < self.ttl_s:
            return hit
        stats = compute_stats(store, catalog, station, now_ms, weeks=weeks, release_soc=release_soc)
        with self._lock:
            self._stats[key] = stats
        return stats

    def clear(self) -> None:
        with self._lock:
            self._stats.clear()


def poisson_cdf(k: int, mean: float) -> float:
    """P(X <= k) for X ~ Poisson(mean)."""
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    term = math.exp(-mean)
    total = term
    for i in range(1, k + 1):
        term *= mean / i
        total += term
    return min(1.0, total)


def p_left(now: int, takes_mean: float, frees_mean: float, sure_frees: int = 0) -> float:
    """P(now + freed + sure_frees - taken >= 1), taken ~ Poisson, freed ~ Poisson."""
    if frees_mean <= 0:
        return poisson_cdf(now + sure_frees - 1, takes_mean)
    # sum over freed counts until the tail is negligible
    total = 0.0
    term = math.exp(-frees_mean)
    limit = int(frees_mean + 10 * math.sqrt(frees_mean) + 10)
    for f in range(limit + 1):
        if f > 0:
            term *= frees_mean / f
        total += term * poisson_cdf(now + sure_frees + f - 1, takes_mean)
    return min(1.0, total)


def arrival_estimate(
    view: dict[str, Any],
    devices: list[dict[str, Any]],
    stats: StationStats | None,
    arrive_in_s: int,
    local_hour: int,
) -> dict[str, Any]:
    """The chance that a free port / a ready battery is still there in ``arrive_in_s``."""
    hours = arrive_in_s / 3600
    takes_pile = frees_pile = takes_cab = 0.0
    observed = 0
    if stats is not None:
        takes_pile, frees_pile, takes_cab, observed = stats.rates[local_hour]
    piles, cabinets = view["piles"], view["cabinets"]
    sure_ready = sum(
        1
        for d in devices
        if d["kind"] == "cabinet" and d["online"]
        for s in d["slots"]
        if s["ready_in_s"] is not None and s["ready_in_s"] <= arrive_in_s
    )
    p_pile = p_cab = None
    if piles["devices"]:
        p_pile = round(p_left(piles["ports_free"], takes_pile * hours, frees_pile * hours), 3)
    if cabinets["devices"]:
        p_cab = round(p_left(cabinets["batteries_ready"], takes_cab * hours, 0.0, sure_ready), 3)
    if observed:
        basis = (
            f"Poisson demand at local hour {local_hour:02d} from {observed} day(s) of history:"
            f" {takes_pile:.2f} pile sessions started/h, {frees_pile:.2f} ended/h,"
            f" {takes_cab:.2f} swaps/h; {sure_ready} battery(ies) due ready by arrival"
        )
    else:
        basis = (
            f"no history at local hour {local_hour:02d}: current counts only"
            f" (+{sure_ready} battery(ies) due ready by arrival)"
        )
    options = [p for p in (p_pile, p_cab) if p is not None]
    p_any = 1.0 - math.prod(1.0 - p for p in options) if options else 0.0
    return {
        "arrive_in_s": arrive_in_s,
        "p_port": p_pile,
        "p_battery": p_cab,
        "p_any": round(p_any, 3),
        "expected_ports_free": (
            round(max(0.0, piles["ports_free"] + (frees_pile - takes_pile) * hours), 2)
            if piles["devices"]
            else None
        ),
        "expected_batteries_ready": (
            round(max(0.0, cabinets["batteries_ready"] + sure_ready - takes_cab * hours), 2)
            if cabinets["devices"]
            else None
        ),
        "rates_per_h": {
            "pile_sessions_started": round(takes_pile, 3),
            "pile_sessions_ended": round(frees_pile, 3),
            "cabinet_swaps": round(takes_cab, 3),
            "days_observed": observed,
        },
        "method": basis,
    }


def get_stats(request: Request) -> StatsCache:
    stats: StatsCache = request.app.state.stats
    return stats


StatsDep = Annotated[StatsCache, Depends(get_stats)]
