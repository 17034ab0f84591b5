"""Hourly rollups of the embedded history, per device and per station, for closed hours.

``HourlyRollups.roll(hour_ms)`` reads each device's history around the hour from the store
(the status standing at its start, its messages), computes ``devices.rollup.device_hour``,
sums each station's devices, and upserts them all with the mark "rolled up through" in one
transaction: running an hour again gives the same rows (idempotent). ``catch_up`` rolls
the hours after the mark that are over, a few per call (the housekeeping task calls it).
Rollups are kept when raw history is pruned: they are what remains of older days.

Riders' reports count in the hour they were made, from a ``ReportSource`` (the API's
sentinel store, which keeps every report: ``api.sentinels``): a report naming a device in
its device's rollup and its station's, one naming only the station in the station's.
Without a source (ingest running without the API) the rollups count none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from devices.catalog import Catalog, StationSpec, district_tz
from devices.contract import ContractError, Death, decode
from devices.rollup import HOUR_MS, RiderReport, Rollup, Stored, device_hour
from devices.topics import Channel

log = logging.getLogger(__name__)

LOOKBACK_MS = HOUR_MS
"""History read before the hour: the status standing at its start (devices beat every
``heartbeat_s``, so an older one only stands for a device that is offline anyway; a device
with no message in the lookback nor the hour counts as offline all hour, which holds for
heartbeats up to 20 minutes: ``STALE_FACTOR`` x 20 min)."""

_CHANNEL: dict[str, Channel] = {
    "birth": "state",
    "death": "state",
    "status": "status",
    "event": "event",
}


class RolledHistory(Protocol):
    """What the rollups read and write: the embedded store (``ingest.sqlite_store``) or an
    InfluxDB history (``ingest.influxrollups``)."""

    def messages(
        self,
        device_id: str,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]: ...

    def last_state_before(self, device_id: str, t_ms: int) -> tuple[str, str] | None: ...

    def active_devices(self, since_ms: int, until_ms: int) -> set[str]: ...

    def first_ts(self) -> int | None: ...

    def fact(self, name: str) -> str | None: ...

    def save_rollups(self, rows: Sequence[tuple[str, str, int, str]], through_ms: int) -> None: ...


class ReportSource(Protocol):
    def reports_made(self, since_ms: int, until_ms: int) -> Sequence[RiderReport]:
        """Riders' reports made in [since_ms, until_ms) (epoch ms)."""


class HourlyRollups:
    def __init__(
        self,
        store: RolledHistory,
        catalog: Catalog,
        release_soc: float = 90.0,
        reports: ReportSource | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.release_soc = release_soc
        self.reports = reports
        self.tz = district_tz(catalog)
        self.undecodable = 0

    def _is_open(self, station: StationSpec) -> Callable[[int], bool]:
        def is_open(t_ms: int) -> bool:
            local = datetime.fromtimestamp(t_ms / 1000, tz=UTC).astimezone(self.tz)
            return station.is_open(local.hour * 60 + local.minute)

        return is_open

    def _stored(self, mtype: str, payload: str, ts_ms: int) -> Stored | None:
        try:
            return Stored(ts_ms, decode(_CHANNEL[mtype], payload.encode()))
        except (ContractError, KeyError, ValueError):
            self.undecodable += 1  # validated when it was ingested: a contract change since
            return None

    def device(self, device_id: str, hour_ms: int) -> Rollup:
        device = self.catalog.devices[device_id]
        station = self.catalog.stations[device.station_id]
        since = hour_ms - LOOKBACK_MS
        online, heartbeat_s = False, 30
        before = self.store.last_state_before(device_id, since)
        if before is not None:
            state = self._stored(before[0], before[1], since)
            if state is not None and not isinstance(state.message, Death):
                online, heartbeat_s = True, getattr(state.message, "heartbeat_s", 30)
        rows = self.store.messages(device_id, since, hour_ms + HOUR_MS, limit=1_000_000)
        history = [
            s for r in rows if (s := self._stored(r["type"], r["payload"], r["ts_ms"])) is not None
        ]
        release = float(device.spec.release_soc or self.release_soc)
        return device_hour(
            hour_ms,
            history,
            release_soc=release,
            is_open=self._is_open(station),
            online=online,
            heartbeat_s=heartbeat_s,
        )

    def roll(self, hour_ms: int) -> dict[str, Rollup]:
        """Roll up one hour for every device and station; returns the stations'."""
        rows: list[tuple[str, str, int, str]] = []
        stations: dict[str, Rollup] = {}
        # a device silent since before the lookback is offline all hour (stale): no reads
        active = self.store.active_devices(hour_ms - LOOKBACK_MS, hour_ms + HOUR_MS)
        reported = self._reports(hour_ms)
        for station in self.catalog.stations.values():
            total = Rollup(devices=0)
            silent: Rollup | None = None
            for spec in station.devices:
                if spec.id in active:
                    r = self.device(spec.id, hour_ms)
                else:
                    if silent is None:
                        opened = self._is_open(station)
                        minutes = sum(opened(hour_ms + k * 60_000 + 30_000) for k in range(60))
                        silent = Rollup(minutes_open=minutes)
                    r = silent
                if (station.id, spec.id) in reported:  # silent devices share one rollup
                    r = replace(r, faults=dict(r.faults), reports_by_category={})
                    r.add_reports(reported[station.id, spec.id])
                rows.append(("device", spec.id, hour_ms, json.dumps(r.as_dict())))
                total.add(r)
            total.add_reports(reported.get((station.id, None), {}))
            rows.append(("station", station.id, hour_ms, json.dumps(total.as_dict())))
            stations[station.id] = total
        self.store.save_rollups(rows, hour_ms + HOUR_MS)
        return stations

    def _reports(self, hour_ms: int) -> dict[tuple[str, str | None], dict[str, int]]:
        """The hour's reports by (station, device or None), then category; a device
        that is not the station's (a catalog change since) counts at the station."""
        out: dict[tuple[str, str | None], dict[str, int]] = {}
        if self.reports is None:
            return out
        for r in self.reports.reports_made(hour_ms, hour_ms + HOUR_MS):
            station = self.catalog.stations.get(r.station_id)
            if station is None:
                continue
            device = r.device_id if any(d.id == r.device_id for d in station.devices) else None
            counts = out.setdefault((station.id, device), {})
            counts[r.category] = counts.get(r.category, 0) + 1
        return out

    def catch_up(self, before_ms: int, max_hours: int = 6, since_ms: int = 0) -> int:
        """Roll up to ``max_hours`` hours that ended by ``before_ms``, after the mark (or
        from the oldest history, not before ``since_ms``: a device clock at 1970 does not
        make us roll up fifty years); returns how many (0: up to date)."""
        mark = self.store.fact("rollups_through")
        if mark is not None:
            start = int(mark)
        else:
            first = self.store.first_ts()
            if first is None:
                return 0
            start = first - first % HOUR_MS
        start = max(start, since_ms - since_ms % HOUR_MS)
        done = 0
        hour = start
        while done < max_hours and hour + HOUR_MS <= before_ms:
            self.roll(hour)
            hour += HOUR_MS
            done += 1
        return done
