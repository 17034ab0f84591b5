"""Station views computed once and shared by every request that wants them.

Computing one station means computing each of its devices (estimates included): about
30 ms for the whole district on this machine, which capped the station list at ~30
requests/s. Riders ask far more often than devices change, so a station's view is kept and
recomputed when one of its devices changed (at most every ``REFRESH_MS``, so a busy station
cannot make every request recompute) or when it is ``MAX_AGE_MS`` old (what only time
changes: a device going stale, countdowns). Ages (``data_age_s``) are recomputed for every
answer, so they stay exact; ETags are computed once per view, not per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.caching import etag_of
from api.live import Trends
from api.views import station_view
from devices.catalog import Catalog
from ingest.pipeline import Twins
from ingest.twins import Twin

REFRESH_MS = 250
"""A changed station is recomputed at most this often: counts are at most this late."""
MAX_AGE_MS = 1000
"""An unchanged station is recomputed this often: staleness shows at most this late."""


@dataclass(frozen=True, slots=True)
class _Entry:
    computed_ms: int
    view: dict[str, Any]  # with "devices"; shared, never mutated
    updated_ms: int | None
    etag: str  # of the view with its devices (station detail)
    summary_etag: str  # of the view without devices (one station in the list)


@dataclass(frozen=True, slots=True)
class Snapshot:
    view: dict[str, Any]  # a copy: the caller may add to it; "devices" is shared
    etag: str
    summary_etag: str


class StationViews:
    def __init__(self, catalog: Catalog, twins: Twins, trends: Trends) -> None:
        self.catalog = catalog
        self.twins = twins
        self.trends = trends
        self._entries: dict[str, _Entry] = {}
        self._dirty: set[str] = set()

    def on_change(self, twins: list[Twin]) -> None:
        """Pipeline listener: these devices changed."""
        self._dirty.update(t.station_id for t in twins)

    def get(self, station_id: str, now_ms: int, *, fresh: bool = False) -> Snapshot:
        """The station's view (``devices`` included, shared read-only) and its ETags.
        ``fresh``: a changed station is recomputed now, not after ``REFRESH_MS`` (for the
        SSE streams, woken once per change; the first one recomputes, the rest share it)."""
        entry = self._entries.get(station_id)
        if entry is not None:
            age = now_ms - entry.computed_ms
            dirty = station_id in self._dirty
            if (fresh and dirty) or not (age < REFRESH_MS or (age < MAX_AGE_MS and not dirty)):
                entry = None
        if entry is None:
            view = station_view(
                self.catalog.stations[station_id],
                self.twins,
                now_ms,
                trends=self.trends,
                with_devices=True,
            )
            updated = max(
                (
                    t.last_seen_ms
                    for d in self.catalog.stations[station_id].devices
                    if (t := self.twins[d.id]).last_seen_ms is not None
                ),
                default=None,
            )
            summary = {k: v for k, v in view.items() if k != "devices"}
            entry = _Entry(now_ms, view, updated, etag_of(view), etag_of(summary))
            self._entries[station_id] = entry
            self._dirty.discard(station_id)
        out = dict(entry.view)
        if entry.updated_ms is not None:
            out["data_age_s"] = round(max(0, now_ms - entry.updated_ms) / 1000, 1)
        return Snapshot(out, entry.etag, entry.summary_etag)
